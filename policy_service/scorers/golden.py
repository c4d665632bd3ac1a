"""`golden` (ForesightKV's Golden Eviction): the oracle upper bound, evaluation only.

Keeps, per (layer, KV head), the slots the reference trace's *future* queries attend to most: the decoder's
`future_attention` statistic, i.e. for each cached slot the max over future blocks of `interval` queries
(from the compression point on) of the block's attention to it, averaged over the block's queries and the KV
group's query heads (decoder_service/oracle.py says exactly which queries count). Sinks and the recent window
are protected as for every top-k scorer. It needs the future, so it runs only where a harness computed the
oracle from the reference trace (`kvpilot eval`, `bench pareto`: the full-cache greedy reference; `bench
fidelity`: the replayed trace itself); the decoder's gRPC server refuses it. It is what the other policies
are read against, not a policy to serve."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import TopKScorer


@dataclass
class Golden(TopKScorer):
    """Golden Eviction (ForesightKV's oracle): keep what the reference trace's future queries attend to most."""

    name: ClassVar[str] = "golden"
    stats: ClassVar[frozenset[str]] = frozenset({"future_attention"})
    eval_only: ClassVar[bool] = True

    def score(self, frame: StatsFrame) -> Tensor:
        future = frame.stats["future_attention"].float()  # [L, H, n]
        # No evidence (a slot at a position the reference never had, or a run past the reference's end) is
        # exactly 0, since a softmax never gives 0 to a visible key: such slots rank below every slot with
        # evidence, among themselves by recency (scores in [-1, 0), newest highest).
        recency = torch.arange(frame.n, dtype=torch.float32, device=future.device) / max(frame.n, 1) - 1.0
        return torch.where(future > 0, future, recency.expand_as(future))
