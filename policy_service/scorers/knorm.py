"""`knorm` (Devoto et al., "A simple and effective L2 norm-based strategy for KV cache compression"):
keys with a LOW L2 norm tend to receive high attention, so keep the lowest-norm keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class Knorm(TopKScorer):
    """Keep low-norm keys."""

    name: ClassVar[str] = "knorm"
    stats: ClassVar[frozenset[str]] = frozenset({"key_norm"})

    def score(self, frame: StatsFrame) -> Tensor:
        return -frame.stats["key_norm"]
