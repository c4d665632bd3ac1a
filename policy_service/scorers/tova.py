"""`tova` (Oren et al., Token Omission Via Attention): evict by the current query's attention.

Score = attention of the most recent query, averaged over the query heads of each KV group; per (layer, KV
head). [INFERRED] The paper averages over all heads of a layer (one keep set per layer); kvpilot keeps per-KV-head
sets like the other attention scorers; set `per_layer=true` for the paper's layer-wide ranking."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer, group_reduce


@dataclass
class TOVA(TopKScorer):
    """Attention of the latest query."""

    name: ClassVar[str] = "tova"
    stats: ClassVar[frozenset[str]] = frozenset({"last_attention"})
    per_layer: bool = False

    def score(self, frame: StatsFrame) -> Tensor:
        score = group_reduce(frame.stats["last_attention"], frame)
        if self.per_layer:
            score = score.mean(dim=1, keepdim=True).expand_as(score)
        return score
