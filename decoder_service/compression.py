"""Decode-time compression: when to compress, how a frame becomes a decision, how a plan is applied.

Cadence (DESIGN invariants 2 and 10): a sequence is compressed back to `budget` whenever it holds
budget + interval slots, in prefill and decode alike; the engine cuts prefill chunks at that point, so when a
sequence compresses and over which slots depends on the sequence alone, never on what shares the step.
Admission control reserved budget + interval + max_lag slots (the lag is a remote decision's slack), so a
sequence never holds more.

Two kinds of policy sit behind the same interface:
  in-process (policy_service.local.InProcessPolicy, handed in by the app)  decides synchronously; the plan
                              is applied in the same step;
  remote (`RemotePolicy`)     `submit` sends the frame and returns at once; the sequence keeps decoding and
                              the decision is applied when it arrives (invariant 5: slots appended since the
                              snapshot are kept; a decision more than `max_lag` of the sequence's steps old,
                              or for a superseded frame, is dropped and counted).
Whenever no usable decision is there in time (service down, error, too late, invalid plan, circuit open, no
statistics yet) the local fallback policy (default StreamingLLM, which needs no statistics) compresses
instead, and that is counted, traced and reported (invariant 6). A fault the fallback cannot absorb raises
out of the hook; the engine ends that sequence alone (invariant 9).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

import kvpilot_kernels as kernels
from decoder_service.circuit_breaker import CircuitBreaker
from decoder_service.requests import EvictionEvent, InternalError, SegmentKind
from decoder_service.statistics import build_frame
from kvpilot_protocol import telemetry
from kvpilot_protocol.frame import Decision, KeepSet, MergePlanSpec, Plan, SpanDrop, StatsFrame
from kvpilot_protocol.policy import FULL, PolicyDescription, PolicyRejected

log = logging.getLogger(__name__)


class NoPolicy:
    """What an engine built without a policy client serves: the full cache only."""

    asynchronous = False

    def policies(self) -> list[str]:
        return ["full"]

    def describe(self, policy: str, params: dict[str, str] | None = None) -> PolicyDescription:
        if policy != "full":
            raise PolicyRejected(f"unknown policy {policy!r}: this decoder has no policy configured (only 'full')")
        return FULL

    def decide(self, frame: StatsFrame, policy: str, params=None) -> Decision:
        raise PolicyRejected("no policy configured")


class RecencyFallback:
    """The built-in local fallback (StreamingLLM's keep set): the sinks and the most recent slots. It needs no
    statistics, so it works exactly when a policy's decision or statistics are missing."""

    name = "streaming_llm"

    def plan(self, frame: StatsFrame) -> KeepSet | None:
        if frame.n <= frame.keep:
            return None
        sinks = min(frame.sinks, frame.keep)
        recent = torch.arange(frame.n - (frame.keep - sinks), frame.n, device=frame.device)
        return KeepSet(torch.cat([torch.arange(sinks, device=frame.device), recent]))


@dataclass
class PendingFrame:
    """A frame sent to a remote policy, waiting for its decision."""

    frame: StatsFrame
    key: object
    span: object
    sent_at: float
    seq_step: int


@dataclass
class CompressionState:
    """Per-sequence bookkeeping of the compressor."""

    frames: int = 0  # frames snapshotted (frame ids are 1, 2, ...)
    epoch: int = 0  # plans applied: a frame taken before the latest one is superseded
    frame_epoch: dict[int, int] = field(default_factory=dict)  # frame id -> epoch at snapshot
    frame_step: dict[int, int] = field(default_factory=dict)  # frame id -> the sequence's step at snapshot
    pending: PendingFrame | None = None


def frame_seed(request_seed: int, frame_id: int) -> int:
    """Stochastic scorers draw from this: reproducible from the request seed, different per frame."""
    return (request_seed * 1_000_003 + frame_id * 7919 + 1) % (2**63)


class Compressor:
    def __init__(self, policy=None, fallback=None, decision_timeout_s: float = 2.0, metrics=None,
                 breaker: CircuitBreaker | None = None):
        self.policy = policy or NoPolicy()  # a policy client (kvpilot_protocol.policy.PolicyClient)
        self.fallback = fallback or RecencyFallback()  # `name` and `plan(frame)`; must need no statistics
        self.decision_timeout_s = decision_timeout_s  # a stalled sequence waits at most this long
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker(on_change=self._breaker_changed)

    def __call__(self, engine, seq) -> None:
        c = seq.request.compression
        if not c.bounded or seq.kv is None:
            return
        state = seq.compression_state
        if state.pending is not None:
            self.resolve_pending(engine, seq)
            if state.pending is not None:
                return
        if not self.due(engine, seq):
            return
        if seq.stats is not None and not seq.stats.ready:
            self.apply_fallback(engine, seq, None, None, reason="no statistics yet (no query observed)")
            return
        frame, span = self.snapshot(engine, seq)
        if getattr(self.policy, "asynchronous", False):
            if not self.breaker.allow():
                self.apply_fallback(engine, seq, frame, span, reason=f"policy circuit open after "
                                    f"{self.breaker.consecutive_failures} failures; probing again in "
                                    f"{self.breaker.retry_in_s():.1f} s")
                return
            key = self.policy.submit(frame, c.policy, c.params, telemetry.inject(span), request_id=seq.id)
            if key is None:  # known down: this fails fast already, so it does not count against the circuit
                self.apply_fallback(engine, seq, frame, span, reason="policy service unavailable")
                return
            state.pending = PendingFrame(frame, key, span, time.monotonic(), seq.steps)
            return
        try:
            decision = self.policy.decide(frame, c.policy, c.params)
        except Exception as exc:  # never stall, never die (invariant 6)
            log.exception("policy %s failed on frame %d; applying the fallback", c.policy, frame.frame_id)
            self.apply_fallback(engine, seq, frame, span, reason=f"{type(exc).__name__}: {exc}")
            return
        self.apply_or_fallback(engine, seq, frame, decision, span)

    def release(self, seq, reason: str) -> None:
        """The sequence is retiring: forget its decision in flight and close that frame's span (invariant 9)."""
        pending = seq.compression_state.pending
        if pending is None:
            return
        seq.compression_state.pending = None
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(pending.key)
        if pending.span is not None:
            telemetry.end_compaction_span(pending.span, slots_after=seq.kv.n if seq.kv is not None else 0, evicted=0,
                                          merged=0, latency_s=0.0, staleness=0, fallback=False, dropped=True,
                                          reason=reason)

    def blocked(self, seq) -> bool:
        """A sequence waiting for its decision without room (or with max_lag 0) is not scheduled."""
        pending = seq.compression_state.pending
        return pending is not None and (seq.kv.free_slots == 0 or seq.request.compression.max_lag == 0)

    def due(self, engine, seq) -> bool:
        c, kv = seq.request.compression, seq.kv
        return kv.free_slots == 0 or kv.n >= c.budget + c.interval

    def room(self, seq) -> int:
        """Slots the sequence may fill before it must be compressed: the engine cuts prefill chunks here so the
        compression points are a function of the sequence alone (invariant 10)."""
        c, kv = seq.request.compression, seq.kv
        if not c.bounded or seq.compression_state.pending is not None:
            return kv.free_slots  # unbounded, or decoding into the lag slack while a decision is out
        return max(0, min(kv.free_slots, c.budget + c.interval - kv.n))

    def resolve_pending(self, engine, seq) -> None:
        """Apply an arrived decision; or, once it is too late, give up on it and fall back.

        While the decision is out, the sequence keeps decoding into its reserved slack (max_lag slots); a
        sequence out of room is simply not scheduled (others keep going) until the decision arrives or
        `decision_timeout_s` passes."""
        state = seq.compression_state
        pending = state.pending
        result = self.policy.poll(pending.key)
        if result is None:
            late = seq.steps - pending.seq_step > seq.request.compression.max_lag
            timed_out = time.monotonic() - pending.sent_at >= self.decision_timeout_s
            if not (late or timed_out):
                return
            self.policy.forget(pending.key)
            state.pending = None
            seq.usage.dropped_decisions += 1
            self._count("dropped")
            self.breaker.failure()
            self.apply_fallback(engine, seq, pending.frame, pending.span,
                                reason=f"no decision within {seq.request.compression.max_lag} steps"
                                       f" / {self.decision_timeout_s:.1f} s")
            return
        state.pending = None
        if self.metrics is not None:
            self.metrics.round_trip.record(time.monotonic() - pending.sent_at, {"kvpilot.policy": seq.request.compression.policy})
        if isinstance(result, Exception):  # a lost stream fails its frames at once: no wait to cut short
            self.apply_fallback(engine, seq, pending.frame, pending.span, reason=f"policy service: {result}")
            return
        self.breaker.success()
        self.apply_or_fallback(engine, seq, pending.frame, result, pending.span)

    @torch.inference_mode()
    def snapshot(self, engine, seq) -> tuple[StatsFrame, object]:
        c = seq.request.compression
        state = seq.compression_state
        state.frames += 1
        state.frame_epoch[state.frames] = state.epoch
        state.frame_step[state.frames] = seq.steps
        session = seq.session
        frame = build_frame(
            state.frames, session.id if session else seq.id, seq.kv, seq.stats, seq.spec,
            seq.position_tokens, tool_segments(seq), keep=c.budget, sinks=c.sinks, window=c.window,
            num_heads=engine.model_config.num_heads, step=len(seq.generated),
            seed=frame_seed(seq.usage.seed, state.frames), prompt_len=prompt_length(seq),
            rope_inv_freq=engine.model.model.rotary_emb.inv_freq, calibration=engine.loaded.calibration,
            oracle=seq.request.oracle, next_position=seq.next_position)  # oracle: eval only (golden)
        span = telemetry.start_compaction_span(seq.request.trace_parent, frame.frame_id, c.policy, frame.n)
        return frame, span

    def apply_or_fallback(self, engine, seq, frame: StatsFrame, decision: Decision, span) -> None:
        if decision.note:  # the policy answered with an error
            self.apply_fallback(engine, seq, frame, span, reason=decision.note)
            return
        try:
            self.apply(engine, seq, frame, decision, span=span)
        except Exception as exc:  # an invalid plan: fall back rather than fail the request
            log.warning("plan for frame %d rejected: %s", frame.frame_id, exc)
            self.apply_fallback(engine, seq, frame, span, reason=f"invalid plan: {exc}")

    @torch.inference_mode()
    def apply(self, engine, seq, frame: StatsFrame, decision: Decision, fallback: bool = False, reason: str = "",
              span=None) -> bool:
        """Apply a decision to the live cache (invariant 5). Returns False when it was dropped as stale: its
        frame was superseded by a later applied plan, or it is more than `max_lag` of the sequence's steps
        old. Slots appended after the frame's snapshot are always kept."""
        kv, state = seq.kv, seq.compression_state
        staleness = seq.steps - state.frame_step.pop(frame.frame_id, seq.steps)
        superseded = state.frame_epoch.pop(frame.frame_id, state.epoch) != state.epoch
        if superseded or (staleness > seq.request.compression.max_lag and not fallback):
            seq.usage.dropped_decisions += 1
            self._count("dropped")
            if span is not None:
                telemetry.end_compaction_span(span, slots_after=kv.n, evicted=0, merged=0, latency_s=decision.latency_s,
                                              staleness=staleness, fallback=False, dropped=True,
                                              reason="superseded" if superseded else "too late")
            return False
        start = time.perf_counter()
        before = kv.n
        plan = decision.plan
        guards = getattr(plan, "guards", ())
        if guards and not reason:  # the policy's regime guards (CASK) show in the event and the span
            reason = "guards: " + ", ".join(guards)
        merged = 0
        if plan is None:
            if kv.free_slots == 0:
                raise RuntimeError(f"policy {decision.policy} kept everything but the sequence has no free slot")
        else:
            keep = self.keep_indices(plan, frame, kv)
            if keep is not None and kv.n > frame.n:
                keep = with_new_slots(keep, frame.n, kv.n)
            if isinstance(plan, MergePlanSpec):
                # Slots that arrived after the snapshot stay, each a group of one (invariant 5).
                late = range(frame.n, kv.n)
                groups = list(plan.groups) + [[i] for i in late]
                weights = list(plan.weights) + [[1.0] for _ in late]
                anchors = list(plan.anchors) + list(late)
                kv.merge(kernels.MergePlan.from_groups(groups, weights, anchors))
                merged = sum(len(g) - 1 for g in plan.groups)
                if seq.stats is not None:
                    seq.stats.merge(groups, before)
            else:
                kv.compact(keep)
                if seq.stats is not None:
                    seq.stats.gather(keep, before)
        state.epoch += 1
        evicted = before - kv.n - merged
        u = seq.usage
        u.compression_events += 1
        u.evicted_tokens += evicted
        u.merged_tokens += merged
        u.fallbacks += int(fallback)
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            attrs = {"kvpilot.policy": decision.policy}
            self.metrics.evicted.add(evicted, attrs)
            self.metrics.compaction.record(elapsed, attrs)
            if fallback:
                self.metrics.fallbacks.add(1, attrs)
        if span is not None:
            telemetry.end_compaction_span(span, slots_after=kv.n, evicted=evicted, merged=merged,
                                          latency_s=decision.latency_s, staleness=staleness, fallback=fallback,
                                          reason=reason)
        seq.emit(EvictionEvent(step=len(seq.generated), frame_id=frame.frame_id, policy=decision.policy,
                               slots_before=before, slots_after=kv.n, evicted=evicted, merged=merged,
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
            return span_keep_set(plan, kv, frame.n, frame.keep, frame.sinks)
        if not isinstance(plan, KeepSet):
            raise TypeError(f"unknown plan {type(plan).__name__}")
        keep = plan.indices.to(kv.pool.device, torch.long)
        rows = (kv.pool.num_layers, kv.pool.num_kv_heads)
        if plan.per_head and tuple(keep.shape[:2]) != rows:
            raise ValueError(f"per-head keep set shape {tuple(keep.shape)} does not match the cache {rows}")
        if keep.shape[-1] > frame.keep:
            raise ValueError(f"keep set holds {keep.shape[-1]} slots, budget is {frame.keep}")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= frame.n):
            raise ValueError(f"keep set names slots outside the frame's {frame.n}")
        return keep

    def apply_fallback(self, engine, seq, frame: StatsFrame | None, span, reason: str) -> None:
        """Compress with the local fallback policy on a fresh view of the cache (the frame may be stale).

        If even that fails, the fault belongs to this sequence: it is raised as an InternalError and the engine
        ends this request alone."""
        state = seq.compression_state
        c = seq.request.compression
        if frame is not None:
            state.frame_step.pop(frame.frame_id, None)
            state.frame_epoch.pop(frame.frame_id, None)
            frame_id, seed = frame.frame_id, frame.seed
        else:
            state.frames += 1
            frame_id, seed = state.frames, frame_seed(seq.usage.seed, state.frames)
        fresh = live_frame(engine, seq, frame_id, seed, keep=c.budget, window=c.window)
        if span is None:
            span = telemetry.start_compaction_span(seq.request.trace_parent, frame_id, self.fallback.name, fresh.n)
        try:
            start = time.perf_counter()
            plan = self.fallback.plan(fresh)
            decision = Decision(frame_id=frame_id, plan=plan, policy=self.fallback.name, seed=seed,
                                latency_s=time.perf_counter() - start)
            self.apply(engine, seq, fresh, decision, fallback=True, reason=reason, span=span)
        except Exception as exc:
            telemetry.end_compaction_span(span, slots_after=seq.kv.n, evicted=0, merged=0, latency_s=0.0, staleness=0,
                                          fallback=True, dropped=True, reason=f"fallback failed: {exc}")
            raise InternalError(f"KV compression failed ({reason}; the fallback policy {self.fallback.name!r} "
                                f"failed too: {type(exc).__name__}: {exc})") from exc

    def drop_spans(self, engine, seq, spans: list[tuple[int, int]], reason: str) -> None:
        """Drop these position spans from the live cache now, every other slot kept, outside the budget cadence
        (side threads' deletions at a turn boundary, Breadcrumbs' folded windows): one more event through `apply`."""
        state = seq.compression_state
        state.frames += 1
        frame = live_frame(engine, seq, state.frames, seq.usage.seed, keep=seq.kv.n, window=0)
        decision = Decision(frame_id=frame.frame_id, plan=SpanDrop(spans), policy=seq.request.compression.policy,
                            seed=frame.seed)
        self.apply(engine, seq, frame, decision, reason=reason)

    def _count(self, what: str) -> None:
        if self.metrics is not None and what == "dropped":
            self.metrics.dropped.add(1)

    def _breaker_changed(self, old: str, new: str) -> None:
        log.warning("policy circuit %s -> %s", old, new)
        if self.metrics is not None:
            self.metrics.circuit.add(1, {"kvpilot.circuit.state": new})


def live_frame(engine, seq, frame_id: int, seed: int, keep: int, window: int) -> StatsFrame:
    """A frame of the cache as it stands, without statistics: what plans made on the decoder's side (the
    fallback, span drops, side-thread frames) are checked and applied against."""
    c, m = seq.request.compression, engine.model_config
    return StatsFrame(frame_id=frame_id, session_id=seq.session.id if seq.session else seq.id, n=seq.kv.n, keep=keep,
                      sinks=c.sinks, window=window, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                      num_heads=m.num_heads, step=len(seq.generated), seed=seed, device=seq.kv.pool.device)


def tool_segments(seq) -> list[tuple[int, int, int]]:
    """The session's tool outputs in the cache as (start position, end position, id): the running turn's own
    tool input included (a session records its segments when a turn ends), those a side thread dropped excluded.
    Segments are history ranges; frames speak logical positions (apart from history indices once input-only
    tokens were fed), and only the computed part of a segment has positions."""
    session = seq.session
    if session is None:
        return []
    where = seq.history_positions
    ranges = [(s.start, s.end, s.index) for s in session.segments if s.kind == "tool" and not s.dropped]
    if seq.request.input_kind == SegmentKind.TOOL and all(s.start != seq.input_start for s in session.segments):
        index = sum(1 for s in session.segments if s.kind == "tool")
        ranges.append((seq.input_start, seq.input_start + seq.usage.prompt_tokens, index))
    return [(where[start], where[min(end, len(where)) - 1] + 1, index)
            for start, end, index in ranges if start < len(where)]


def prompt_length(seq) -> int:
    """The frame's prompt_len: logical positions below it hold the first turn's prompt (<bos> included) -- a
    session's first turn (its first segment), a fork's parent's, otherwise this request's input. Prompt tokens
    not computed yet take the next positions (input-only tokens are fed only after the pending history)."""
    if seq.fork_parent is not None:
        return prompt_length(seq.fork_parent)
    session = seq.session
    if session is not None and session.segments:
        first = session.segments[0]
        end = first.end if first.kind != "model" else 0
    else:
        end = seq.input_start + seq.usage.prompt_tokens
    where = seq.history_positions
    if end <= len(where):
        return where[end - 1] + 1 if end else 0
    return seq.next_position + (end - len(where))


def with_new_slots(keep: torch.Tensor, frame_n: int, n: int) -> torch.Tensor:
    """Append the slots [frame_n, n) that arrived after the snapshot (always kept) to a keep set."""
    new = torch.arange(frame_n, n, device=keep.device, dtype=keep.dtype)
    if keep.dim() == 3:
        new = new.expand(*keep.shape[:2], n - frame_n)
    return torch.cat([keep, new], dim=-1)


def span_keep_set(plan: SpanDrop, kv, frame_n: int, keep: int, sinks: int = 0) -> torch.Tensor:
    """Slots of the snapshot whose positions fall outside the dropped spans, per (layer, head) [L, H, k].

    After per-head compaction the heads hold different positions, so a span can remove a different number
    of slots from each; and the spans alone may leave more than the budget. A recency top-up (what the
    fallback keeps) then trims every head to the same count k = min(budget, fewest survivors of any head):
    the surviving sinks (slots [0, sinks)) stay first, then the most recent survivors."""
    positions = kv.pool.positions[:, :, kv.slot_map[:frame_n]]
    survives = torch.ones_like(positions, dtype=torch.bool)
    for start, end in plan.spans:
        survives &= (positions < start) | (positions >= end)
    k = min(keep, int(survives.sum(-1).min()))
    # Rank survivors by position (most recent first, sinks above all); the k best per row stay, in slot order.
    score = positions.float().masked_fill(torch.arange(frame_n, device=positions.device) < sinks, float("inf"))
    score = score.masked_fill(~survives, float("-inf"))
    top = torch.topk(score, k, dim=-1).indices
    return torch.sort(top, dim=-1).values
