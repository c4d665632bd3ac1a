"""`random`: keep a uniformly random subset (plus sinks and window): the floor any scorer must beat.

Two floors (`per_head`):
  false (default)  one random keep set shared by every layer and KV head: a token is either kept everywhere or
                   gone everywhere, so a needed token is lost in every head at once (the harsher floor);
  true             an independent random keep set per (layer, KV head): every token survives in some heads,
                   which measured far higher (0.97 vs 0.40 on variables at 75% of the sequence)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class Random(TopKScorer):
    """Uniformly random eviction, seeded per request and frame (global or per KV head)."""

    name: ClassVar[str] = "random"
    per_head: bool = False

    def score(self, frame: StatsFrame) -> Tensor:
        shape = (frame.num_layers, frame.num_kv_heads, frame.n) if self.per_head else (frame.n,)
        return torch.rand(shape, generator=frame.generator(), device=frame.device)
