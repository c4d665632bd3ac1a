"""Per-session scorer state for stateless policy replicas (async): Redis when distributed, memory otherwise.

Any replica may serve any frame of a session, so what a scorer carries between frames (an RNG state,
accumulators) and the audit trail of decisions live here, not in the replica.

Redis layout (all keys of a session in one hash slot via the `{id}` hash tag, all with the same sliding TTL):
    {prefix}decisions:{<id>}        stream, capped with XADD MAXLEN ~ max_decisions: one entry per decision
    {prefix}policy:{<id>}           hash of counters: frames, last_frame_id, last_replica, last_policy, ...
    {prefix}policy:{<id>}:blobs     hash name -> bytes: carried scorer state
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit


class PolicyStateError(Exception):
    """Any failure of the policy state store; the message names the backend and the operation."""


class PolicyStateUnavailable(PolicyStateError):
    """The backend cannot be reached (refused, timed out, authentication failed)."""


@runtime_checkable
class PolicyStateStore(Protocol):
    async def record_decision(self, session_id: str, frame_id: int, policy: str, seed: int | None,
                              latency_s: float, kept: int, evicted: int, replica: str) -> None: ...
    async def get_state(self, session_id: str) -> dict: ...
    async def decision_log(self, session_id: str, count: int = 100) -> list[dict]: ...
    async def put_blob(self, session_id: str, name: str, data: bytes) -> None: ...
    async def get_blob(self, session_id: str, name: str) -> bytes | None: ...
    async def delete(self, session_id: str) -> bool: ...
    async def ttl(self, session_id: str) -> float | None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def _decision_fields(frame_id, policy, seed, latency_s, kept, evicted, replica) -> dict[str, str]:
    return {"frame_id": str(int(frame_id)), "policy": policy, "seed": "" if seed is None else str(int(seed)),
            "latency_s": repr(float(latency_s)), "kept": str(int(kept)), "evicted": str(int(evicted)),
            "replica": replica, "ts": repr(time.time())}


def _parse_decision(entry_id: str, f: dict[str, str]) -> dict:
    return {"id": entry_id, "frame_id": int(f["frame_id"]), "policy": f["policy"],
            "seed": None if f["seed"] == "" else int(f["seed"]), "latency_s": float(f["latency_s"]),
            "kept": int(f["kept"]), "evicted": int(f["evicted"]), "replica": f["replica"], "ts": float(f["ts"])}


def _parse_state(f: dict[str, str]) -> dict:
    if not f:
        return {}
    return {"frames": int(f["frames"]), "last_frame_id": int(f["last_frame_id"]),
            "last_replica": f["last_replica"], "last_policy": f["last_policy"],
            "kept_tokens": int(f["kept_tokens"]), "evicted_tokens": int(f["evicted_tokens"]),
            "updated_at": float(f["updated_at"])}


def _text(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rsplit('@', 1)[1]}"))


# KEYS: stream, counters, blobs. ARGV[1] TTL ms, ARGV[2] max stream length, ARGV[3] frame id, ARGV[4] replica,
# ARGV[5] policy, ARGV[6] kept, ARGV[7] evicted, ARGV[8] now, ARGV[9..] stream entry field, value pairs.
_RECORD_LUA = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 9))
redis.call('HINCRBY', KEYS[2], 'frames', 1)
redis.call('HINCRBY', KEYS[2], 'kept_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[2], 'evicted_tokens', ARGV[7])
redis.call('HSET', KEYS[2], 'last_frame_id', ARGV[3], 'last_replica', ARGV[4], 'last_policy', ARGV[5],
           'updated_at', ARGV[8])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
"""


class RedisPolicyStateStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", ttl_s: float = 3600.0, prefix: str = "kvpilot:",
                 max_decisions: int = 1000, connect_timeout_s: float = 0.5, op_timeout_s: float = 2.0):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url, self.ttl_s, self.prefix, self.max_decisions = url, ttl_s, prefix, max_decisions
        self._ttl_ms = max(1, int(ttl_s * 1000))
        # No retries: a retried record would count a frame twice; unreachable must fail fast (caller falls back).
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=False)  # blobs are raw bytes; text decoded below
        self._record = self._redis.register_script(_RECORD_LUA)

    def keys(self, session_id: str) -> tuple[str, str, str]:
        """(decision stream, counters hash, blobs hash) of a session."""
        tag = f"{{{session_id}}}"
        return (f"{self.prefix}decisions:{tag}", f"{self.prefix}policy:{tag}", f"{self.prefix}policy:{tag}:blobs")

    async def _call(self, what: str, coro):
        from redis import exceptions as rx

        try:
            return await coro
        except (rx.ConnectionError, rx.TimeoutError, OSError, asyncio.TimeoutError) as e:
            raise PolicyStateUnavailable(
                f"redis at {_redact(self.url)} is unreachable ({what}): {type(e).__name__}: {e}") from e
        except rx.RedisError as e:
            raise PolicyStateError(f"redis at {_redact(self.url)} failed to {what}: {e}") from e

    async def record_decision(self, session_id: str, frame_id: int, policy: str, seed: int | None,
                              latency_s: float, kept: int, evicted: int, replica: str) -> None:
        fields = _decision_fields(frame_id, policy, seed, latency_s, kept, evicted, replica)
        args = [self._ttl_ms, self.max_decisions, fields["frame_id"], replica, policy, fields["kept"],
                fields["evicted"], fields["ts"]]
        for k, v in fields.items():
            args += [k, v]
        await self._call(f"record decision for frame {frame_id} of session {session_id!r}",
                         self._record(keys=list(self.keys(session_id)), args=args))

    async def get_state(self, session_id: str) -> dict:
        raw = await self._call(f"read policy state of session {session_id!r}",
                               self._redis.hgetall(self.keys(session_id)[1]))
        return _parse_state(_text(raw))

    async def decision_log(self, session_id: str, count: int = 100) -> list[dict]:
        """The last `count` decisions, oldest first."""
        entries = await self._call(f"read decision log of session {session_id!r}",
                                   self._redis.xrevrange(self.keys(session_id)[0], count=count))
        return [_parse_decision(entry_id.decode(), _text(f)) for entry_id, f in reversed(entries)]

    async def put_blob(self, session_id: str, name: str, data: bytes) -> None:
        stream, counters, blobs = self.keys(session_id)

        async def write():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(blobs, name, bytes(data))
                for key in (stream, counters, blobs):
                    pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()

        await self._call(f"write blob {name!r} of session {session_id!r}", write())

    async def get_blob(self, session_id: str, name: str) -> bytes | None:
        return await self._call(f"read blob {name!r} of session {session_id!r}",
                                self._redis.hget(self.keys(session_id)[2], name))

    async def delete(self, session_id: str) -> bool:
        n = await self._call(f"delete policy state of session {session_id!r}",
                             self._redis.delete(*self.keys(session_id)))
        return n > 0

    async def ttl(self, session_id: str) -> float | None:
        """Seconds until the session's state expires (None if it has none); keys share one TTL."""
        async def read():
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in self.keys(session_id):
                    pipe.pttl(key)
                return await pipe.execute()

        ms = max(await self._call(f"read TTL of session {session_id!r}", read()))
        return None if ms == -2 else (math.inf if ms == -1 else ms / 1000.0)

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass
class _SessionState:
    counters: dict[str, str] = field(default_factory=dict)
    log: collections.deque = field(default_factory=collections.deque)
    blobs: dict[str, bytes] = field(default_factory=dict)
    expires_at: float = 0.0


class MemoryPolicyStateStore:
    """In-process policy state with the same interface and semantics (the log is capped exactly)."""

    def __init__(self, ttl_s: float = 3600.0, max_decisions: int = 1000):
        self.ttl_s, self.max_decisions = ttl_s, max_decisions
        self._sessions: dict[str, _SessionState] = {}
        self._seq = 0  # stream-like entry ids, increasing across sessions
        self._lock = threading.Lock()

    def _live(self, session_id: str, create: bool = False) -> _SessionState | None:
        now = time.monotonic()
        state = self._sessions.get(session_id)
        if state is not None and state.expires_at <= now:
            del self._sessions[session_id]
            state = None
        if state is None and create:
            for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[sid]  # sweep on creation keeps memory bounded by live sessions
            state = self._sessions[session_id] = _SessionState(log=collections.deque(maxlen=self.max_decisions))
        if state is not None and create:
            state.expires_at = now + self.ttl_s
        return state

    async def record_decision(self, session_id: str, frame_id: int, policy: str, seed: int | None,
                              latency_s: float, kept: int, evicted: int, replica: str) -> None:
        fields = _decision_fields(frame_id, policy, seed, latency_s, kept, evicted, replica)
        with self._lock:
            state = self._live(session_id, create=True)
            self._seq += 1
            state.log.append((f"0-{self._seq}", fields))
            c = state.counters
            c["frames"] = str(int(c.get("frames", 0)) + 1)
            c["kept_tokens"] = str(int(c.get("kept_tokens", 0)) + int(kept))
            c["evicted_tokens"] = str(int(c.get("evicted_tokens", 0)) + int(evicted))
            c.update(last_frame_id=fields["frame_id"], last_replica=replica, last_policy=policy,
                     updated_at=fields["ts"])

    async def get_state(self, session_id: str) -> dict:
        with self._lock:
            state = self._live(session_id)
            return _parse_state(dict(state.counters)) if state else {}

    async def decision_log(self, session_id: str, count: int = 100) -> list[dict]:
        with self._lock:
            state = self._live(session_id)
            entries = list(state.log)[-count:] if state and count > 0 else []
        return [_parse_decision(entry_id, f) for entry_id, f in entries]

    async def put_blob(self, session_id: str, name: str, data: bytes) -> None:
        with self._lock:
            self._live(session_id, create=True).blobs[name] = bytes(data)

    async def get_blob(self, session_id: str, name: str) -> bytes | None:
        with self._lock:
            state = self._live(session_id)
            return state.blobs.get(name) if state else None

    async def delete(self, session_id: str) -> bool:
        with self._lock:
            found = self._live(session_id) is not None
            self._sessions.pop(session_id, None)
            return found

    async def ttl(self, session_id: str) -> float | None:
        with self._lock:
            state = self._live(session_id)
            return state.expires_at - time.monotonic() if state else None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def make_policy_state_store(url: str | None, ttl_s: float = 3600.0, prefix: str = "kvpilot:",
                            max_decisions: int = 1000) -> PolicyStateStore:
    """None or "memory" -> MemoryPolicyStateStore; redis://, rediss://, unix:// -> RedisPolicyStateStore."""
    if url is None or url in ("memory", "memory://"):
        return MemoryPolicyStateStore(ttl_s=ttl_s, max_decisions=max_decisions)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return RedisPolicyStateStore(url, ttl_s=ttl_s, prefix=prefix, max_decisions=max_decisions)
    raise ValueError(f"unsupported policy state URL {_redact(url)!r}: use 'memory' or redis://host:port/db")
