"""Sessions: a conversation's token history, its segments (user turns, tool outputs, model turns) and counters.

The store holds the durable part (what any decoder process needs to continue the conversation). The KV
cache of a session stays in the engine that computed it while memory allows ("resident"); a session whose
KV was dropped is re-prefilled from its history on the next turn.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class SegmentRecord:
    start: int  # first token index in the session history
    end: int  # one past the last
    kind: str  # "user" | "tool" | "model"
    index: int  # per-kind counter: tool outputs are #0, #1, ... (what model-driven policies name)
    dropped: bool = False  # a tool output a side thread deleted from the KV (the history keeps its tokens)


@dataclass
class Session:
    id: str
    token_ids: list[int] = field(default_factory=list)
    segments: list[SegmentRecord] = field(default_factory=list)
    compression: dict = field(default_factory=dict)
    turns: int = 0
    generated_tokens: int = 0
    evicted_tokens: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    owner: str = ""  # the principal that created it (with auth on, only it can see, continue or delete it)

    def visible_to(self, principal: str | None) -> bool:
        """Auth off (principal None) sees every session; a principal sees its own and ownerless ones."""
        return principal is None or not self.owner or self.owner == principal

    def add_segment(self, start: int, end: int, kind: str) -> None:
        if end <= start:
            return
        index = sum(1 for s in self.segments if s.kind == kind)
        self.segments.append(SegmentRecord(start, end, kind, index))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Session":
        d = dict(d)
        d["segments"] = [SegmentRecord(**s) for s in d.get("segments", [])]
        return cls(**d)


class InMemorySessionStore:
    """The embedded default: sessions live in this process (same interface as the Redis store)."""

    def __init__(self, ttl_s: float = 3600.0):
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            self._expire()
            return self._sessions.get(session_id)

    def put(self, session: Session) -> None:
        session.updated_at = time.time()
        with self._lock:
            self._sessions[session.id] = session

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def _expire(self) -> None:
        now = time.time()
        for sid in [sid for sid, s in self._sessions.items() if now - s.updated_at > self.ttl_s]:
            del self._sessions[sid]
