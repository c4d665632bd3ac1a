"""Side threads (SideQuest): the model manages its own memory beside the KV; the policy decides.

For a session turn whose policy declares `side_thread` (policy_service/scorers/sidequest.py):
  turn frame    once the turn's input is in the cache (its first token sampled), a turn that brought a tool
                output asks the policy whether to run a side thread ("turn" frame: the tool segments, no
                statistics);
  fork          on a SideThreadPlan the decoder forks the running turn's cache copy-on-write
                (GenerationRequest.fork_of) and runs the plan's prompt greedily as one more sequence in the
                batch; the main thread is not paused, and the fork's tokens go nowhere but its answer. The fork
                leases the turn's full blocks (fork_lease: no private copy promised, so under memory pressure
                it still starts); a compaction of the main thread while it runs ends it, answer void (cut);
  answer frame  when the fork finishes (or is cut at its allowance), its text goes back to the policy ("answer"
                frame), which returns the spans to drop (SpanDrop);
  drop          the spans drop at the session's next turn boundary: when the running turn ends, before its KV
                is parked (so the drop never moves a token under the main thread's feet mid-turn).
In-process policies answer at once; a remote one's decision is polled at every step of the session's turns.
A side thread is best effort: its failure, a void answer or a lost decision never touches the main thread.
Counters (side threads, their tokens, cut ones, outputs dropped, ids ignored) go to the usage of the turn that
ends next, so every side token is reported exactly once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from decoder_service.requests import (
    CompressionConfig,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SegmentKind,
)
from decoder_service.compression import live_frame, tool_segments
from kvpilot_protocol import telemetry
from kvpilot_protocol.frame import Decision, SideThreadPlan, SpanDrop, StatsFrame

log = logging.getLogger(__name__)
MAX_SIDE_TOKENS = 256  # a plan asking for more is refused (a side thread is a short answer)


@dataclass
class SessionSide:
    """What a session's side threads left for its next turn boundary."""

    spans: list[tuple[int, int]] = field(default_factory=list)  # to drop at the next turn end
    dropped: list[int] = field(default_factory=list)  # the tool outputs (ids) those spans are
    gone: set[int] = field(default_factory=set)  # every tool output dropped so far (marked on the session's segments)
    threads: int = 0
    tokens: int = 0
    cut: int = 0
    ignored: int = 0
    remote: tuple | None = None  # (key, frame, the turn's sequence, span) of a decision in flight


def guard_count(guards: tuple[str, ...], name: str) -> int:
    """`unknown=2` -> 2 (the sidequest policy's counters ride on its plan's guards); a bare name counts 1."""
    for guard in guards:
        key, _, value = guard.partition("=")
        if key == name:
            return int(value) if value.isdigit() else 1
    return 0


class SideThreads:
    """The engine's step hook for side-thread policies (one per engine)."""

    def __init__(self):
        self.sessions: dict[str, SessionSide] = {}
        self.asked: set[str] = set()  # request ids (turns) whose turn frame went out

    @staticmethod
    def wanted(seq) -> bool:
        return "side_thread" in seq.spec.names and seq.session is not None and seq.kv is not None

    def __call__(self, engine, seq) -> None:
        if not self.wanted(seq):
            return
        side = self.sessions.setdefault(seq.session.id, SessionSide())
        if side.remote is not None:
            self.poll(engine, seq.session.id, side)
        if seq.id in self.asked or seq.in_prefill or seq.request.input_kind != SegmentKind.TOOL:
            return
        self.asked.add(seq.id)
        frame = self.frame(engine, seq, "turn")
        self.decide(engine, seq, side, frame, span=None)

    # ---- frames and decisions ---------------------------------------------------------------------
    def frame(self, engine, seq, event: str, answer: str = "", cut: bool = False) -> StatsFrame:
        c, state = seq.request.compression, seq.compression_state
        state.frames += 1  # frame ids stay unique within the request, whatever their kind
        return replace(live_frame(engine, seq, state.frames, seq.usage.seed, keep=c.budget, window=c.window),
                       tool_segments=tool_segments(seq), side_event=event, side_answer=answer, side_cut=cut,
                       turn=seq.session.turns)

    def decide(self, engine, seq, side: SessionSide, frame: StatsFrame, span) -> None:
        policy, c = engine.compressor.policy, seq.request.compression
        try:
            if getattr(policy, "asynchronous", False):
                key = policy.submit(frame, c.policy, c.params, telemetry.inject(span), request_id=seq.id)
                if key is not None:
                    side.remote = (key, frame, seq, span)
                    return
                decision = None  # the service is down: this side thread's chance is lost, the main thread goes on
            else:
                decision = policy.decide(frame, c.policy, c.params)
        except Exception:
            log.exception("policy %s failed on side frame %d of %s", c.policy, frame.frame_id, seq.id)
            decision = None
        self.act(engine, seq, side, frame, decision, span)

    def poll(self, engine, session_id: str, side: SessionSide) -> None:
        key, frame, seq, span = side.remote
        result = engine.compressor.policy.poll(key)
        if result is None:
            return
        side.remote = None
        self.act(engine, seq, side, frame, result if isinstance(result, Decision) else None, span)

    def act(self, engine, seq, side: SessionSide, frame: StatsFrame, decision: Decision | None, span) -> None:
        plan = decision.plan if decision is not None and not decision.note else None
        if frame.side_event == "turn":
            if isinstance(plan, SideThreadPlan):
                self.fork(engine, seq, side, plan)
            return
        if span is not None:
            span.set_attribute("kvpilot.side.guards", list(getattr(plan, "guards", ())))
            span.end()
        if isinstance(plan, SpanDrop):
            named = {(start, end): index for start, end, index in frame.tool_segments}
            side.spans += plan.spans
            side.dropped += [named[dropped] for dropped in plan.spans if dropped in named]
            side.ignored += sum(guard_count(plan.guards, name) for name in ("unknown", "protected", "repeated"))

    # ---- the fork -----------------------------------------------------------------------------------
    def fork(self, engine, seq, side: SessionSide, plan: SideThreadPlan) -> None:
        """Run the plan's prompt on a copy-on-write fork of the turn's cache, as one more sequence in the batch."""
        if seq.finish_reason is not None or not 1 <= plan.max_tokens <= MAX_SIDE_TOKENS:
            return
        span = telemetry.start_side_thread_span(seq.request.trace_parent, plan.prompt, plan.max_tokens)
        request = GenerationRequest(
            request_id=f"{seq.id}/side{seq.compression_state.frames}",
            input_ids=engine.tokenizer.encode(plan.prompt),
            sampling=SamplingParams(temperature=0.0, max_new_tokens=plan.max_tokens,
                                    stop=[plan.stop] if plan.stop else []),
            compression=CompressionConfig(), fork_of=seq.id, fork_lease=True)
        started = time.monotonic()

        def on_event(event) -> None:
            if isinstance(event, FinishEvent):
                self.answered(engine, seq, side, plan, event, span, time.monotonic() - started)

        try:
            engine.add_request(request, on_event)
        except Exception as exc:  # e.g. no room for the fork: the main thread goes on without it
            log.warning("side thread of %s not started: %s", seq.id, exc)
            span.set_attribute("error.type", type(exc).__name__)
            span.end()
            side.cut += 1

    def answered(self, engine, seq, side: SessionSide, plan: SideThreadPlan, event: FinishEvent, span,
                 seconds: float) -> None:
        """The fork ended (engine thread): count it, and send its answer to the policy."""
        cut = event.error is not None or event.finish_reason not in (FinishReason.STOP, FinishReason.EOS)
        answer = event.text + (f" {plan.stop}" if event.matched_stop == plan.stop and plan.stop else "")
        side.threads += 1
        side.tokens += event.usage.generated_tokens
        side.cut += int(cut)
        span.set_attributes({"kvpilot.side.tokens": event.usage.generated_tokens, "kvpilot.side.answer": answer,
                             "kvpilot.side.cut": cut, "kvpilot.side.seconds": seconds})
        if seq.session is None or seq.kv is None:
            span.end()
            return
        frame = self.frame(engine, seq, "answer", answer=answer, cut=cut)
        self.decide(engine, seq, side, frame, span)

    # ---- the turn boundary --------------------------------------------------------------------------
    def turn_ended(self, engine, seq) -> None:
        """The session's turn is ending (before its KV is parked): apply the drops its side threads asked for and
        report the side counters in this turn's usage."""
        self.asked.discard(seq.id)
        if seq.session is None:
            return
        side = self.sessions.get(seq.session.id)
        if side is None:
            return
        u = seq.usage
        u.side_threads += side.threads
        u.side_tokens += side.tokens
        u.side_cut += side.cut
        u.side_ignored += side.ignored
        side.threads = side.tokens = side.cut = side.ignored = 0
        if not side.spans or seq.kv is None or seq.error is not None:
            return
        spans, dropped = side.spans, set(side.dropped)
        side.spans, side.dropped = [], []
        u.dropped_tool_outputs += len(dropped)
        side.gone |= dropped
        engine.compressor.drop_spans(engine, seq, spans, reason="side thread: tool outputs dropped at the turn boundary")

    def mark_segments(self, session) -> None:
        """Flag the session's dropped tool outputs (called once the ending turn's segments are recorded), so
        GetSession and the agent's environment see what was deleted."""
        side = self.sessions.get(session.id)
        for segment in session.segments if side is not None else ():
            if segment.kind == "tool" and segment.index in side.gone:
                segment.dropped = True

    def forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

