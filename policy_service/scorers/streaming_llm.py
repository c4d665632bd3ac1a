"""`streaming_llm` (Xiao et al., StreamingLLM): attention sinks + the most recent tokens, nothing else.

The sink count and recent window are the request's `sinks` / `window`; every other slot is ranked by recency,
so the cache holds the first `sinks` tokens and the last `budget - sinks` tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class StreamingLLM(TopKScorer):
    """Sinks + recent window (the default local fallback)."""

    name: ClassVar[str] = "streaming_llm"

    def score(self, frame: StatsFrame) -> Tensor:
        # Slots are in position order in every row, so the slot index ranks recency.
        return torch.arange(frame.n, dtype=torch.float32, device=frame.device)
