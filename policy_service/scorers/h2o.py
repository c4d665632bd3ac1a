"""`h2o` (Zhang et al., Heavy-Hitter Oracle): keep the tokens that received the most attention so far.

Score = cumulative attention each slot received, summed over all queries since it entered the cache and over
the query heads of its KV group; per (layer, KV head). The recent window is protected as in the paper."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class H2O(TopKScorer):
    """Cumulative attention (heavy hitters) + recent window."""

    name: ClassVar[str] = "h2o"
    stats: ClassVar[frozenset[str]] = frozenset({"cumulative_attention"})
    normalize: bool = False  # divide by the number of queries that could see the slot (kvpress' variant)

    def score(self, frame: StatsFrame) -> Tensor:
        score = frame.stats["cumulative_attention"]
        if self.normalize:
            # Older slots were visible to more queries; positions give their age.
            age = (frame.stats["positions"].max() - frame.stats["positions"] + 1).float()
            score = score / age
        return score

    def spec(self):
        from policy_service.scorers.base import StatsSpec

        return StatsSpec(self.stats | ({"positions"} if self.normalize else set()))
