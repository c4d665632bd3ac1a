"""`snapkv` (Li et al., SnapKV): keep what the last window of queries attends to, clustered by pooling.

Score = attention of the last `window_queries` queries (averaged), pooled along the slots with `kernel`
(neighbours of an important token are kept too), averaged over the KV group; per (layer, KV head).
Defaults: observation window 32 queries, kernel 7, max pooling: the SnapKV authors' code. kvpress's SnapKVPress
uses window 64, kernel 5 and average pooling: `window_queries=64 kernel=5 pooling=avg` gives that variant."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import (MAX_KERNEL, MAX_WINDOW_QUERIES, ParameterError, StatsSpec, TopKScorer, check_range,
                                         group_reduce, pool_slots)


@dataclass
class SnapKV(TopKScorer):
    """Windowed attention, pooled."""

    name: ClassVar[str] = "snapkv"
    stats: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    window_queries: int = 32
    kernel: int = 7
    pooling: str = "max"

    def validate(self) -> None:
        check_range("snapkv", "window_queries", self.window_queries, 1, MAX_WINDOW_QUERIES)
        check_range("snapkv", "kernel", self.kernel, 1, MAX_KERNEL, odd=True)
        if self.pooling not in ("max", "avg"):
            raise ParameterError("snapkv: pooling is max or avg")

    def spec(self) -> StatsSpec:
        return StatsSpec(self.stats, window_queries=self.window_queries)

    def score(self, frame: StatsFrame) -> Tensor:
        return group_reduce(pool_slots(frame.stats["window_attention"], self.kernel, self.pooling), frame)
