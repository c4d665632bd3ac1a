"""`random`: keep a uniformly random subset (plus sinks and window): the floor any scorer must beat."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class Random(TopKScorer):
    """Uniformly random eviction, seeded per request and frame (one keep set shared by all heads)."""

    name: ClassVar[str] = "random"

    def score(self, frame: StatsFrame) -> Tensor:
        return torch.rand(frame.n, generator=frame.generator(), device=frame.device)
