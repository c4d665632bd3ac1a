"""`triattention` (TriAttention, arXiv 2604.04921): keep the keys that the model's query centres will attend to.

Pre-RoPE queries and keys cluster around fixed non-zero centres, so a key's expected attention is a
trigonometric series in the query-key distance. The decoder computes it (statistic `trig_scores` [L, Hq, n],
decoder_service/calibration.py): from the model's calibration (per layer and query head, the mean pre-RoPE
query q̄_f and E|q_f| of every RoPE frequency pair f, measured once by `kvpilot calibrate`), a key k at
position p scored at the next token's position t gets the mean over the offsets o = 1, 2, 4, ..., 65536 of
    s(t - p + o),  s(Δ) = Σ_f |q̄_f||k_f| cos(w_f Δ + φ_f) + Σ_f (E|q_f| - |q̄_f|)|k_f|,  φ_f = arg(q̄_f conj k_f).
Here, per query head: scores z-normalised over the slots (`normalize`, the paper's runners: on) plus tie-break
noise 1e-6 N(0, 1) drawn from the frame's seed (`head_scores`); then one of two selections:
  global       (default; what CASK builds on) each of the L x Hq heads takes its top-k; the union is ranked by
               the max-over-heads score and its top-k kept, filled from the other candidates if the union is
               short (`union_select`). One keep set for every layer and head.
  per_kv_head  (the paper's main runs) each KV head keeps its own top-k by the mean over layers of the max over
               that layer's query heads in its group; every layer uses the KV head's set: a per-head KeepSet
               [L, H, k] whose rows for one KV head are equal across layers.
Protection: TriAttention pins the prompt unless prompt tokens count in the budget, and uses no sinks and no
recent window (the trig scores favour nearby keys). kvpilot always counts the prompt in the budget, so:
  [CHOICE] `pin_prompt` (default on) keeps the prompt's slots (positions < frame.prompt_len) when they fit in
           the budget together with the protected slots; otherwise the prompt is scored like the rest.
  kvpilot's request-level sinks and window (frame.protected_mask) are always kept, as for every scorer
  (sinks=0 window=0 gives the paper's behaviour).
Defaults: normalize on, mode global, pin_prompt on; 17 offsets (decoder side).
[INFERRED] z-normalisation runs over all n slots of a head (protected ones included), with the std clamped at
           1e-6; the noise is added after it (to the raw scores when normalize is off).
[INFERRED] with one k for every head, the union of per-head top-k always contains the top-k by the max over
           heads (a slot outside some head's top-k has k better slots under that head, hence under the max),
           so global selection equals the top-k by max-over-heads score; `union_select` stays literal for callers
           that pass other candidate sets (CASK).
[CHOICE] the selections need rows that hold the same positions (one global set, or one set per KV head across
         layers). Only a session whose earlier turn ran another per-head policy breaks that; then every
         (layer, KV head) row selects alone over its own query heads (union rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import KeepSet, Plan, StatsFrame
from policy_service.scorers.base import ParameterError, Scorer, StatsSpec

MODES = ("global", "per_kv_head")
TIE_BREAK = 1e-6


def head_scores(frame: StatsFrame, normalize: bool = True) -> Tensor:
    """[L, Hq, n] float32 per-query-head scores: trig_scores, z-normalised over the slots of each head when
    `normalize`, plus tie-break noise (1e-6 N(0, 1), from the frame's seed: reproducible per frame)."""
    scores = frame.stats["trig_scores"].float()
    if normalize:
        mean, std = scores.mean(-1, keepdim=True), scores.std(-1, keepdim=True).nan_to_num(0.0).clamp_min(1e-6)
        scores = (scores - mean) / std
    noise = torch.randn(scores.shape, generator=frame.generator(), device=frame.device)
    return scores + TIE_BREAK * noise


def union_select(scores: Tensor, k: int, candidates: Tensor) -> Tensor:
    """TriAttention's union-based selection over heads: [heads, n] scores, [n] bool candidates -> the chosen
    candidate slots, sorted ascending (min(k, candidates) of them).

    Every head takes its top-k candidates; the union is ranked by the max-over-heads score and its top-k kept;
    if the union is short, the best other candidates (same ranking) fill it."""
    device = scores.device
    k = min(k, int(candidates.sum()))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    masked = scores.float().masked_fill(~candidates, float("-inf"))  # [heads, n]
    union = torch.zeros(masked.shape[-1], dtype=torch.bool, device=device)
    union[masked.topk(k, dim=-1).indices.flatten()] = True
    union &= candidates
    aggregate = masked.amax(dim=0)  # the max over heads
    chosen = aggregate.masked_fill(~union, float("-inf")).topk(min(k, int(union.sum()))).indices
    short = k - chosen.numel()
    if short > 0:
        rest = aggregate.masked_fill(union | ~candidates, float("-inf")).topk(short).indices
        chosen = torch.cat([chosen, rest])
    return chosen.sort().values


@dataclass
class TriAttention(Scorer):
    """Trigonometric scores from calibrated pre-RoPE query centres."""

    name: ClassVar[str] = "triattention"
    stats: ClassVar[frozenset[str]] = frozenset({"trig_scores", "positions"})
    normalize: bool = True
    mode: str = "global"
    pin_prompt: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ParameterError(f"triattention: mode is one of {', '.join(MODES)} (got {self.mode!r})")

    def spec(self) -> StatsSpec:
        return StatsSpec(self.stats)

    def plan(self, frame: StatsFrame) -> Plan | None:
        if frame.n <= frame.keep:
            return None
        scores = head_scores(frame, self.normalize)  # [L, Hq, n]
        positions = frame.stats["positions"]  # [L, H, n]
        L, H, n = positions.shape
        group = scores.shape[1] // H
        if self.mode == "global" and bool((positions == positions[0, 0]).all()):
            return KeepSet(self.keep_row(frame, scores.reshape(-1, n), positions[0, 0]))
        if self.mode == "per_kv_head" and bool((positions == positions[:1]).all()):
            # Per KV head: the max over its query heads in each layer, averaged over the layers.
            votes = scores.view(L, H, group, n).amax(dim=2).mean(dim=0)  # [H, n]
            rows = torch.stack([self.keep_row(frame, votes[h:h + 1], positions[0, h]) for h in range(H)])
            return KeepSet(rows.expand(L, H, frame.keep).contiguous())
        # Rows disagree on positions ([CHOICE] in the module docstring): each (layer, KV head) row alone.
        rows = [[self.keep_row(frame, scores[l, h * group:(h + 1) * group], positions[l, h]) for h in range(H)]
                for l in range(L)]
        return KeepSet(torch.stack([torch.stack(r) for r in rows]))

    def keep_row(self, frame: StatsFrame, heads: Tensor, positions: Tensor) -> Tensor:
        """The keep set [keep] of slots holding `positions` [n], voted by `heads` [m, n]: the forced slots
        (protected, and the prompt when pinned and it fits) plus the union-selected best of the others."""
        forced = self.forced(frame, positions)
        chosen = union_select(heads, frame.keep - int(forced.sum()), ~forced)
        return torch.cat([forced.nonzero().flatten(), chosen]).sort().values

    def forced(self, frame: StatsFrame, positions: Tensor) -> Tensor:
        """[n] bool: the sinks and the window, and the prompt's slots when pin_prompt and they fit."""
        protected = frame.protected_mask(positions.device)
        if self.pin_prompt:
            pinned = protected | (positions < frame.prompt_len)
            if int(pinned.sum()) <= frame.keep:
                return pinned
        return protected
