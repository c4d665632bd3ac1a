"""Decode-time compression: when to compress, how a frame is turned into a decision, how a plan is applied.

Cadence (DESIGN invariant 2): once a sequence holds >= budget slots it is compressed back to `budget` every
`interval` new tokens (the cache oscillates between budget and budget + interval); while a long prompt is
prefilled in chunks, it is compressed between chunks whenever the next chunk would not fit. Admission control
reserved budget + interval + max_lag slots, so a sequence never holds more.

The engine calls `Compressor` as a step hook. The policy behind it is in-process here (`LocalPolicy`); the
remote policy service plugs in through the same `decide` interface. Any failure to get a usable plan falls
back to the local fallback policy (default StreamingLLM) and is counted, traced and reported in the stream.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

import kernels
from decoder_service.requests import EvictionEvent
from decoder_service.statistics import build_frame
from policy_service.frame import Decision, KeepSet, MergePlanSpec, Plan, SpanDrop, StatsFrame
from policy_service.registry import make_scorer
from policy_service.scorers.base import Scorer

log = logging.getLogger(__name__)


class LocalPolicy:
    """The embedded policy: the request's scorer plans synchronously in the decoder process."""

    def decide(self, frame: StatsFrame, scorer: Scorer) -> Decision:
        start = time.perf_counter()
        plan = scorer.plan(frame)
        return Decision(frame_id=frame.frame_id, plan=plan, policy=scorer.name, seed=frame.seed,
                        latency_s=time.perf_counter() - start)


@dataclass
class CompressionState:
    """Per-sequence bookkeeping of the compressor."""

    frames: int = 0  # frames snapshotted (frame ids are 1, 2, ...)
    epoch: int = 0  # plans applied: a frame taken before the latest one is superseded
    frame_epoch: dict[int, int] = field(default_factory=dict)  # frame id -> epoch at snapshot
    frame_step: dict[int, int] = field(default_factory=dict)  # frame id -> engine step at snapshot


def frame_seed(request_seed: int, frame_id: int) -> int:
    """Stochastic scorers draw from this: reproducible from the request seed, different per frame."""
    return (request_seed * 1_000_003 + frame_id * 7919 + 1) % (2**63)


class Compressor:
    def __init__(self, policy=None, fallback: str = "streaming_llm"):
        self.policy = policy or LocalPolicy()
        self.fallback = make_scorer(fallback)

    def __call__(self, engine, seq) -> None:
        c = seq.request.compression
        if not c.bounded or seq.kv is None or not self.due(engine, seq):
            return
        frame = self.snapshot(engine, seq)
        try:
            decision = self.policy.decide(frame, seq.scorer)
            self.apply(engine, seq, frame, decision)
        except Exception as exc:  # never stall, never die (invariant 6): fall back and say so
            log.exception("policy %s failed on frame %d; applying the fallback", seq.scorer.name, frame.frame_id)
            self.apply_fallback(engine, seq, frame, reason=f"{type(exc).__name__}: {exc}")

    def due(self, engine, seq) -> bool:
        c, kv = seq.request.compression, seq.kv
        if seq.pending > 1:  # still prefilling: make room only when the next chunk would not fit
            return kv.n > c.budget and kv.free_slots < min(seq.pending, engine.config.prefill_chunk)
        return kv.n >= c.budget + c.interval

    @torch.inference_mode()
    def snapshot(self, engine, seq) -> StatsFrame:
        c = seq.request.compression
        state = seq.compression_state
        state.frames += 1
        state.frame_epoch[state.frames] = state.epoch
        state.frame_step[state.frames] = engine.steps
        session = seq.session
        tool_segments = [(s.start, s.end, s.index) for s in session.segments if s.kind == "tool"] if session else []
        return build_frame(
            state.frames, session.id if session else seq.id, seq.kv, seq.stats, seq.scorer.spec(),
            seq.token_ids, tool_segments, keep=c.budget, sinks=c.sinks, window=c.window,
            num_heads=engine.model_config.num_heads, step=len(seq.generated),
            seed=frame_seed(seq.usage.seed, state.frames))

    @torch.inference_mode()
    def apply(self, engine, seq, frame: StatsFrame, decision: Decision, fallback: bool = False, reason: str = "") -> bool:
        """Apply a decision to the live cache (DESIGN invariant 5). Returns False when it was dropped as stale:
        its frame was superseded by a later applied plan, or it is more than `max_lag` steps old. Slots
        appended after the frame's snapshot are always kept."""
        kv, state = seq.kv, seq.compression_state
        staleness = engine.steps - state.frame_step.pop(frame.frame_id, engine.steps)
        superseded = state.frame_epoch.pop(frame.frame_id, state.epoch) != state.epoch
        if superseded or staleness > seq.request.compression.max_lag:
            seq.usage.dropped_decisions += 1
            return False
        before = kv.n
        plan = decision.plan
        if plan is None:
            if kv.free_slots == 0:
                raise RuntimeError(f"policy {decision.policy} kept everything but the sequence has no free slot")
            return True
        merged = 0
        keep = self.keep_indices(plan, frame, kv)
        if keep is not None and kv.n > frame.n:
            keep = with_new_slots(keep, frame.n, kv.n)
        if isinstance(plan, MergePlanSpec):
            kv.n = kernels.merge_(kv.k, kv.v, kv.positions, kernels.MergePlan.from_groups(
                plan.groups, plan.weights, plan.anchors), kv.n)
            merged = sum(len(g) - 1 for g in plan.groups)
            if seq.stats is not None:
                seq.stats.merge(plan.groups, before)
        else:
            kv.n = kernels.compact_(kv.k, kv.v, kv.positions, keep, kv.n)
            if seq.stats is not None:
                seq.stats.gather(keep, before)
        state.epoch += 1
        u = seq.usage
        u.compression_events += 1
        u.evicted_tokens += before - kv.n - merged
        u.merged_tokens += merged
        u.fallbacks += int(fallback)
        seq.emit(EvictionEvent(step=len(seq.generated), frame_id=frame.frame_id, policy=decision.policy,
                               slots_before=before, slots_after=kv.n, evicted=before - kv.n - merged, merged=merged,
                               policy_latency_s=decision.latency_s, staleness_steps=staleness, fallback=fallback,
                               reason=reason))
        return True

    def keep_indices(self, plan: Plan, frame: StatsFrame, kv) -> torch.Tensor | None:
        """Validate a plan against the frame and return the keep set the compaction kernel takes."""
        if isinstance(plan, MergePlanSpec):
            if plan.count > frame.keep:
                raise ValueError(f"merge plan keeps {plan.count} slots, budget is {frame.keep}")
            return None
        if isinstance(plan, SpanDrop):
            return span_keep_set(plan, kv)
        if not isinstance(plan, KeepSet):
            raise TypeError(f"unknown plan {type(plan).__name__}")
        keep = plan.indices.to(kv.k.device, torch.long)
        if plan.per_head and tuple(keep.shape[:2]) != tuple(kv.k.shape[:2]):
            raise ValueError(f"per-head keep set shape {tuple(keep.shape)} does not match the cache {tuple(kv.k.shape[:2])}")
        if keep.shape[-1] > frame.keep:
            raise ValueError(f"keep set holds {keep.shape[-1]} slots, budget is {frame.keep}")
        return keep

    def apply_fallback(self, engine, seq, frame: StatsFrame, reason: str) -> None:
        decision = LocalPolicy().decide(frame, self.fallback)
        self.apply(engine, seq, frame, decision, fallback=True, reason=reason)


def with_new_slots(keep: torch.Tensor, frame_n: int, n: int) -> torch.Tensor:
    """Append the slots [frame_n, n) that arrived after the snapshot (always kept) to a keep set."""
    new = torch.arange(frame_n, n, device=keep.device, dtype=keep.dtype)
    if keep.dim() == 3:
        new = new.expand(*keep.shape[:2], n - frame_n)
    return torch.cat([keep, new], dim=-1)


def span_keep_set(plan: SpanDrop, kv) -> torch.Tensor:
    """Slots whose positions fall outside the dropped spans, per (layer, head); counts must agree."""
    positions = kv.positions[:, :, :kv.n]
    drop = torch.zeros_like(positions, dtype=torch.bool)
    for start, end in plan.spans:
        drop |= (positions >= start) & (positions < end)
    counts = (~drop).sum(-1)
    if not bool((counts == counts.flatten()[0]).all()):
        raise ValueError("span drop would leave different slot counts per head (cache was compressed per head)")
    keep = (~drop).nonzero()[:, 2].view(*positions.shape[:2], int(counts.flatten()[0]))
    return keep
