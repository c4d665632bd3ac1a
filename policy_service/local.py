"""The in-process policy client: scorers run in the caller's process, behind the same interface the decoder
uses for the remote policy service (describe / decide). The embedded default (`kvpilot serve` without
--policy-url) hands one to the decoder; every policy-service replica decides through one too.

Scorers are built once per (policy, params), `setup()` is called then (a learned scorer loads its weights
there), and the cache is an LRU: clients choose parameters, so it must stay bounded.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvpilot_protocol.frame import Decision, StatsFrame
from kvpilot_protocol.policy import ParameterError, PolicyDescription, PolicyRejected
from policy_service.registry import POLICIES, describe
from policy_service.scorers.base import Scorer


class InProcessPolicy:
    asynchronous = False
    MAX_CACHED_SCORERS = 256

    def __init__(self, policies: dict[str, type[Scorer]] | None = None):
        self.classes = dict(POLICIES if policies is None else policies)
        self._scorers: OrderedDict[tuple, Scorer] = OrderedDict()
        self._lock = threading.Lock()  # the decoder's event loop (describe) and engine thread (decide) share it

    def policies(self) -> list[str]:
        return sorted(self.classes)

    def scorer(self, policy: str, params: dict[str, str] | None = None) -> Scorer:
        """The cached scorer; raises PolicyRejected for an unknown policy or invalid parameters."""
        params = dict(params or {})
        key = (policy, tuple(sorted(params.items())))
        with self._lock:
            if key in self._scorers:
                self._scorers.move_to_end(key)
                return self._scorers[key]
        if policy not in self.classes:
            raise PolicyRejected(f"unknown policy {policy!r}; available: {', '.join(self.policies())}")
        try:
            scorer = self.classes[policy].from_params(params)
            scorer.setup()  # a learned scorer reads its weights: a missing or foreign file is the caller's to fix
        except ParameterError as exc:
            raise PolicyRejected(str(exc)) from None
        with self._lock:
            self._scorers[key] = scorer
            while len(self._scorers) > self.MAX_CACHED_SCORERS:
                self._scorers.popitem(last=False)
        return scorer

    def describe(self, policy: str, params: dict[str, str] | None = None) -> PolicyDescription:
        return describe(self.scorer(policy, params))

    def listing(self, policy: str) -> PolicyDescription:
        """The description for a catalogue: a policy that cannot be built with its defaults here (a learned
        scorer without its weights file) is listed with the reason instead of failing the whole listing."""
        try:
            return self.describe(policy)
        except PolicyRejected as exc:
            return PolicyDescription(policy=policy, summary=f"[unavailable here: {exc}]")

    def decide(self, frame: StatsFrame, policy: str, params: dict[str, str] | None = None) -> Decision:
        scorer = self.scorer(policy, params)
        start = time.perf_counter()
        plan = scorer.plan(frame)
        return Decision(frame_id=frame.frame_id, plan=plan, policy=policy, seed=frame.seed,
                        latency_s=time.perf_counter() - start)
