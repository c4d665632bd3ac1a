"""`sidequest` (SideQuest, NVIDIA): the model itself names the tool outputs it no longer needs, in a side thread
forked from the session, and those outputs are dropped at the next turn boundary.

The decision logic lives here; the model compute stays beside the KV (decoder_service/side_threads.py):
  1. when a session turn begins (a "turn" frame: the turn's input is in the cache), every `every` tool outputs
     the policy asks for a side thread (SideThreadPlan): the decoder forks the session copy-on-write, feeds the
     trigger, and generates greedily, as one more sequence in the batch, while the main thread goes on;
  2. the side thread's answer comes back in an "answer" frame; the policy parses it
     (policy_service/sidequest_grammar.py: `#i #j ... .`), ignores and counts unknown, protected and repeated
     ids, voids malformed and cut answers, and returns the named outputs' positions as a SpanDrop, which the
     decoder applies at the main thread's next turn boundary;
  3. under a budget (a "" frame: the cache reached budget + interval) the token-level `base` policy compresses
     as usual (the hybrid: sidequest:base=rkv), or, without one, the recent tokens are kept.
The side thread needs a checkpoint fine-tuned for it (the trigger and the answer grammar):
kvpilot/assets/reasoner-v2-sidequest (`kvpilot train-model --sidequest-share`); any other model answers noise,
which parses as malformed and drops nothing.

[INFERRED] where the method notes are silent: the cadence counts tool outputs (`every`), the newest
`protect_latest` outputs (0 by default) are never dropped, the side thread is greedy with a
token allowance of `max_side_tokens` and stops at the grammar's `.`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvpilot_protocol.frame import KeepSet, Plan, SideThreadPlan, SpanDrop, StatsFrame
from policy_service.scorers.base import ParameterError, Scorer, StatsSpec, check_range
from policy_service.sidequest_grammar import END, MAX_TOOL_OUTPUTS, TRIGGER, parse_answer


@dataclass
class SideQuest(Scorer):
    """The model names obsolete tool outputs in a forked side thread; they drop at the next turn boundary."""

    name: ClassVar[str] = "sidequest"
    stats: ClassVar[frozenset[str]] = frozenset({"side_thread"})
    every: int = 1  # tool outputs between side threads (1: a side thread at every tool output)
    max_side_tokens: int = 34  # the side thread's token allowance (every id of the grammar + its end)
    # The newest tool outputs are never dropped. 0 by default: the model names the output its turn is reading only
    # because the drop waits for that turn's end (the labels of kvpilot/training/sidequest_data.py).
    protect_latest: int = 0
    base: str = ""  # token-level policy under a budget ("" = keep the most recent tokens)

    def validate(self) -> None:
        check_range(self.name, "every", self.every, 1, MAX_TOOL_OUTPUTS)
        check_range(self.name, "max_side_tokens", self.max_side_tokens, 2, 2 * MAX_TOOL_OUTPUTS)
        check_range(self.name, "protect_latest", self.protect_latest, 0, 8)
        if self.base:
            from policy_service.registry import POLICIES

            if self.base in (self.name, "golden", "full") or self.base not in POLICIES:
                choices = sorted(set(POLICIES) - {self.name, "golden", "full"})
                raise ParameterError(f"sidequest: base is a token-level policy, one of {', '.join(choices)} "
                                     f"(got {self.base!r}); leave it empty for none")

    def base_scorer(self) -> Scorer | None:
        if not self.base:
            return None
        from policy_service.registry import POLICIES

        return POLICIES[self.base]()

    def setup(self) -> None:
        base = self.base_scorer()
        if base is not None:
            base.setup()

    def spec(self) -> StatsSpec:
        base = self.base_scorer()
        if base is None:
            return StatsSpec(self.stats)
        inner = base.spec()
        return StatsSpec(inner.names | self.stats, window_queries=inner.window_queries, decay=inner.decay,
                         projection_rank=inner.projection_rank, feature_weights=inner.feature_weights,
                         model_fingerprint=inner.model_fingerprint)

    def plan(self, frame: StatsFrame) -> Plan | None:
        if frame.side_event == "turn":
            outputs = len(frame.tool_segments)
            if outputs and outputs % self.every == 0:
                return SideThreadPlan(prompt=TRIGGER, max_tokens=self.max_side_tokens, stop=END)
            return None
        if frame.side_event == "answer":
            return self.drop_plan(frame)
        base = self.base_scorer()
        if base is not None:
            return base.plan(frame)
        if frame.n <= frame.keep:
            return None
        sinks = min(frame.sinks, frame.keep)
        recent = torch.arange(frame.n - (frame.keep - sinks), frame.n, device=frame.device)
        return KeepSet(torch.cat([torch.arange(sinks, device=frame.device), recent]))

    def drop_plan(self, frame: StatsFrame) -> SpanDrop | None:
        """The spans of the outputs the answer names; guards count what was ignored (reported with the event)."""
        spans = {index: (start, end) for start, end, index in frame.tool_segments}
        newest = sorted(spans)[-self.protect_latest:] if self.protect_latest else []
        parsed = parse_answer(frame.side_answer if not frame.side_cut else frame.side_answer.rstrip(END),
                              live=set(spans), protected=set(newest))
        if frame.side_cut:
            parsed.cut, parsed.drop = True, []
        guards = [f"{name}={len(ids)}" for name, ids in (("unknown", parsed.unknown), ("protected", parsed.protected))
                  if ids]
        if parsed.repeated:
            guards.append(f"repeated={parsed.repeated}")
        if parsed.malformed:
            guards.append("malformed")
        if parsed.cut:
            guards.append("cut")
        guards.append(f"dropped={len(parsed.drop)}")
        return SpanDrop([spans[i] for i in parsed.drop], guards=tuple(guards))
