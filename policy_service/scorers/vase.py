"""`vase` (Chang et al., VaSE: value-aware stochastic KV cache eviction for reasoning models).

Two variants, per (layer, KV head), with sinks and the recent window protected:
  attnv (default, "VaSE-AttnV"): reserve the `large_fraction` (1/4) of the budget with the largest value
        range (max - min over the value vector: evicting these causes repetition loops), then SAMPLE the rest
        without replacement in proportion to the attention of the last `window_queries` (64) queries,
        smoothed with an average pool of `smooth_kernel` (5) and averaged over the KV group.
  dkv   ("VaSE-DKV", stochastic CurDKV): score = |k G|^2 * |v G|^2 with a fresh Gaussian G [D, rank=20]
        drawn per compression from the frame's seed; keep the top scores.
Defaults from the authors' code: R = 64 recent, 4 sinks, n_large = budget / 4, smoothing on, rank 20.
[INFERRED] VaSE's softmax runs over candidates only; the frame's window attention is a softmax over all
slots, which is proportional on the candidates, and multinomial sampling normalises anyway."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import KeepSet, Plan, StatsFrame
from policy_service.scorers.base import (MAX_KERNEL, MAX_PROJECTION_RANK, MAX_WINDOW_QUERIES, ParameterError, StatsSpec,
                                         TopKScorer, check_range, group_reduce, pool_slots, select_top)


@dataclass
class VaSE(TopKScorer):
    """Value-aware stochastic eviction (AttnV or DKV)."""

    name: ClassVar[str] = "vase"
    variant: str = "attnv"
    large_fraction: float = 0.25
    window_queries: int = 64
    smooth_kernel: int = 5
    rank: int = 20

    def validate(self) -> None:
        if self.variant not in ("attnv", "dkv"):
            raise ParameterError(f"vase: variant is attnv or dkv (got {self.variant!r})")
        if not 0.0 <= self.large_fraction < 1.0:
            raise ParameterError(f"vase: large_fraction must be in [0, 1) (got {self.large_fraction})")
        check_range("vase", "window_queries", self.window_queries, 1, MAX_WINDOW_QUERIES)
        check_range("vase", "smooth_kernel", self.smooth_kernel, 1, MAX_KERNEL)
        check_range("vase", "rank", self.rank, 1, MAX_PROJECTION_RANK)

    def spec(self) -> StatsSpec:
        if self.variant == "dkv":
            return StatsSpec(frozenset({"kv_projection"}), projection_rank=self.rank)
        return StatsSpec(frozenset({"value_range", "window_attention"}), window_queries=self.window_queries)

    def score(self, frame: StatsFrame) -> Tensor:  # dkv
        proj = frame.stats["kv_projection"]
        score = proj[..., 0] * proj[..., 1]
        return score / score.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def plan(self, frame: StatsFrame) -> Plan | None:
        if frame.n <= frame.keep:
            return None
        if self.variant == "dkv":
            return KeepSet(select_top(self.score(frame), frame))
        return KeepSet(self.sample_attnv(frame))

    def sample_attnv(self, frame: StatsFrame) -> Tensor:
        value_range = frame.stats["value_range"].float()  # [L, H, n]
        L, H, n = value_range.shape
        protected = frame.protected_mask()
        free = frame.keep - int(protected.sum())
        n_large = min(int(self.large_fraction * frame.keep), free)
        # Reserved set: protected slots first (infinite range), then the largest value ranges.
        reserved_rank = value_range.masked_fill(protected, float("inf"))
        reserved = torch.topk(reserved_rank, int(protected.sum()) + n_large, dim=-1).indices
        chosen = torch.zeros(L, H, n, dtype=torch.bool, device=value_range.device)
        chosen.scatter_(-1, reserved, True)
        attention = group_reduce(pool_slots(frame.stats["window_attention"].float(), self.smooth_kernel, "avg"), frame)
        weights = attention.masked_fill(chosen, 0.0).reshape(L * H, n)
        to_sample = frame.keep - reserved.shape[-1]
        if to_sample > 0:
            # Rows whose attention mass vanished still need `to_sample` distinct picks: add a tiny uniform floor.
            weights = weights + (~chosen).reshape(L * H, n).float() * 1e-12
            sampled = torch.multinomial(weights, to_sample, replacement=False, generator=frame.generator())
            chosen.view(L * H, n).scatter_(-1, sampled, True)
        keep = chosen.nonzero()[:, 2].view(L, H, frame.keep)  # nonzero is row-major: sorted per row
        return keep
