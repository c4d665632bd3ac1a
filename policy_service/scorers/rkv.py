"""`rkv` (Cai et al., R-KV: redundancy-aware KV compression for reasoning models).

score = lam * importance - (1 - lam) * redundancy, per (layer, KV head):
  importance  attention of the last `window_queries` (alpha = 8) queries, max over the KV group's query heads,
              averaged over the queries, max-pooled along slots with kernel 7;
  redundancy  softmax over slots of the mean cosine similarity of a key to the others, where each key's most
              recent near-duplicate (similarity > `threshold`) does not count (kernels.key_redundancy).
Defaults: lam 0.1 (paper/README; the code's CLI uses 0.07), alpha 8, kernel 7, threshold 0.5.
[INFERRED] R-KV takes the max over the group of the *logits* before the softmax; kvpilot's frame carries
per-query-head probabilities, so the max is taken over probabilities. R-KV protects no sinks; kvpilot's
request-level `sinks` applies (set sinks=0 for the paper's behaviour)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import (MAX_KERNEL, MAX_WINDOW_QUERIES, StatsSpec, TopKScorer, check_range, group_reduce,
                                         pool_slots)


@dataclass
class RKV(TopKScorer):
    """Importance minus redundancy."""

    name: ClassVar[str] = "rkv"
    stats: ClassVar[frozenset[str]] = frozenset({"window_attention", "key_redundancy"})
    lam: float = 0.1
    window_queries: int = 8
    kernel: int = 7

    def validate(self) -> None:
        check_range("rkv", "lam", self.lam, 0.0, 1.0)
        check_range("rkv", "window_queries", self.window_queries, 1, MAX_WINDOW_QUERIES)
        check_range("rkv", "kernel", self.kernel, 1, MAX_KERNEL, odd=True)

    def spec(self) -> StatsSpec:
        return StatsSpec(self.stats, window_queries=self.window_queries)

    def score(self, frame: StatsFrame) -> Tensor:
        importance = pool_slots(group_reduce(frame.stats["window_attention"], frame, "max"), self.kernel, "max")
        return self.lam * importance - (1 - self.lam) * frame.stats["key_redundancy"]
