"""A circuit breaker in front of the remote policy service.

A hung policy service (SIGSTOP, a wedged replica) answers nothing: without a breaker every compression of
every stream would wait out its own timeout. After `failure_threshold` consecutive failures (decisions too
late: a service that is down or answers with an error fails fast already and is not counted) the circuit opens: frames are not sent and the local fallback compresses at
once. After `cool_down_s` one probe frame goes out (half-open); a decision in time closes the circuit, a
failure opens it for another cool-down.

Used from the engine thread only, so it needs no lock.
"""
from __future__ import annotations

import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cool_down_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None):
        if failure_threshold < 1 or cool_down_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cool_down_s > 0")
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self.clock = clock
        self.on_change = on_change  # (old state, new state): metrics and logs
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.times_opened = 0
        self.rejected = 0  # frames not sent because the circuit was open
        self._probe_out = False

    def allow(self) -> bool:
        """May a frame be sent now? In half-open state only one probe is out at a time."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.cool_down_s:
            self._move(HALF_OPEN)
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        self.rejected += 1
        return False

    def success(self) -> None:
        self.consecutive_failures = 0
        self._probe_out = False
        if self.state != CLOSED:
            self._move(CLOSED)

    def failure(self) -> None:
        self.consecutive_failures += 1
        self._probe_out = False
        if self.state == HALF_OPEN or (self.state == CLOSED and self.consecutive_failures >= self.failure_threshold):
            self.opened_at = self.clock()
            self.times_opened += 1
            self._move(OPEN)

    def retry_in_s(self) -> float:
        return max(0.0, self.cool_down_s - (self.clock() - self.opened_at)) if self.state == OPEN else 0.0

    def _move(self, state: str) -> None:
        old, self.state = self.state, state
        if self.on_change is not None:
            self.on_change(old, state)
