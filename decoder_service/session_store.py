"""Durable session store (async): Redis for the distributed shape, memory for the embedded default.

The gRPC layer (asyncio) loads a session before continuing one this decoder process does not know, and
writes it back after every turn, optionally with a compressed-KV snapshot. The engine thread keeps using
the synchronous `InMemorySessionStore` in sessions.py; this module never runs inside the engine.

Redis layout (one session = two keys in the same hash slot thanks to the `{id}` hash tag):
    {prefix}session:{<id>}      hash: version, schema, id, token_ids/segments/compression (JSON), counters
    {prefix}session:{<id>}:kv   string: a safetensors file (tensors + JSON meta in the header metadata)
Both keys carry the session TTL, refreshed on every write and on `touch` (Redis 7.0 has no per-field TTL).
Writes go through one Lua script: compare version, write, bump version, refresh TTLs in one round trip.
"""
from __future__ import annotations

import asyncio
import json
import math
import struct
import threading
import time
from typing import Callable, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from decoder_service.sessions import Session

SCHEMA = 1  # bump when the hash layout changes so old records are recognised


class SessionStoreError(Exception):
    """Any failure of the durable session store; the message names the backend and the operation."""


class SessionStoreUnavailable(SessionStoreError):
    """The backend cannot be reached (refused, timed out, authentication failed)."""


class SessionVersionConflict(SessionStoreError):
    """A compare-and-set write found another version than the one the caller read."""

    def __init__(self, session_id: str, expected: int, actual: int):
        super().__init__(f"session {session_id!r} is at version {actual}, expected {expected}")
        self.session_id, self.expected, self.actual = session_id, expected, actual


class SessionDataError(SessionStoreError):
    """A stored record or snapshot cannot be decoded (wrong schema, corrupt bytes, wrong key type)."""


@runtime_checkable
class SessionStore(Protocol):
    """Versions start at 1 on the first write; an absent session is version 0, so `expected_version=0`
    means "create only if it does not exist"."""

    async def get(self, session_id: str) -> Session | None: ...
    async def get_with_version(self, session_id: str) -> tuple[Session, int] | None: ...
    async def put(self, session: Session, expected_version: int | None = None) -> int: ...
    async def delete(self, session_id: str) -> bool: ...
    async def deleted(self, session_id: str) -> bool: ...
    async def versions(self, session_ids: list[str]) -> dict[str, tuple[int | None, bool]]: ...
    async def put_kv_snapshot(self, session_id: str, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...
    async def get_kv_snapshot(self, session_id: str) -> tuple[dict[str, torch.Tensor], dict] | None: ...
    async def touch(self, session_id: str) -> bool: ...
    async def ttl(self, session_id: str) -> float | None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


# ---- encoding shared by both backends (so the memory store behaves exactly like Redis) -------------------

def _encode_session(session: Session) -> dict[str, str]:
    d = session.to_dict()
    return {
        "schema": str(SCHEMA),
        "id": d["id"],
        "token_ids": json.dumps(d["token_ids"], separators=(",", ":")),
        "segments": json.dumps(d["segments"], separators=(",", ":")),
        "compression": json.dumps(d["compression"], separators=(",", ":")),
        "turns": str(d["turns"]),
        "generated_tokens": str(d["generated_tokens"]),
        "evicted_tokens": str(d["evicted_tokens"]),
        "created_at": repr(d["created_at"]),
        "updated_at": repr(d["updated_at"]),
        "owner": d["owner"],
    }


def _decode_session(fields: dict[str, str]) -> Session:
    if fields.get("schema") != str(SCHEMA):
        raise ValueError(f"unknown schema {fields.get('schema')!r} (this code reads schema {SCHEMA})")
    return Session.from_dict({
        "id": fields["id"],
        "token_ids": json.loads(fields["token_ids"]),
        "segments": json.loads(fields["segments"]),
        "compression": json.loads(fields["compression"]),
        "turns": int(fields["turns"]),
        "generated_tokens": int(fields["generated_tokens"]),
        "evicted_tokens": int(fields["evicted_tokens"]),
        "created_at": float(fields["created_at"]),
        "updated_at": float(fields["updated_at"]),
        "owner": fields.get("owner", ""),  # records written before sessions had owners belong to nobody
    })


def encode_kv_snapshot(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """A plain safetensors file; `meta` (JSON) rides in the header metadata so one value is self-contained."""
    cpu, storages = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors whose memory overlaps (views of one pool tensor): copy the repeats.
        ptr = t.untyped_storage().data_ptr()
        cpu[name] = t.clone() if ptr in storages else t
        storages.add(ptr)
    try:
        return st_save(cpu, metadata={"kvpilot.meta": json.dumps(meta)})
    except (TypeError, ValueError) as e:  # meta not JSON-serialisable, unsupported dtype
        raise SessionDataError(f"KV snapshot cannot be encoded: {e}") from e


def decode_kv_snapshot(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    # safetensors layout: u64 little-endian header length, then the JSON header (holds __metadata__).
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header.get("__metadata__", {}).get("kvpilot.meta", "{}"))
    return st_load(data), meta


def redact_url(url: str) -> str:
    """The URL for messages and logs, without a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# ---- Redis --------------------------------------------------------------------------------------------

# KEYS[1] session hash, KEYS[2] kv snapshot; ARGV[1] expected version ("" = unconditional), ARGV[2] TTL ms,
# ARGV[3..] field, value pairs. Returns {1, new_version} or {0, current_version} on a version mismatch.
_PUT_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version')) or 0
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= current then
  return {0, current}
end
local version = current + 1
redis.call('HSET', KEYS[1], 'version', version, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {1, version}
"""


class RedisSessionStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", ttl_s: float = 3600.0, prefix: str = "kvpilot:",
                 connect_timeout_s: float = 0.5, op_timeout_s: float = 2.0):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url, self.ttl_s, self.prefix = url, ttl_s, prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        # No retries: a retried Lua write could be applied twice, and an unreachable Redis must fail fast so
        # the caller can fall back. The pool re-checks idle connections before reuse, so restarts are fine.
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=False)
        self._put_script = self._redis.register_script(_PUT_LUA)

    def session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}"

    def kv_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}:kv"

    def tombstone_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{session_id}}}:deleted"

    async def _call(self, what: str, coro):
        """Await a redis-py call, turning its errors into SessionStoreError subclasses that name the URL."""
        from redis import exceptions as rx

        try:
            return await coro
        except (rx.ConnectionError, rx.TimeoutError, OSError, asyncio.TimeoutError) as e:
            raise SessionStoreUnavailable(
                f"redis at {redact_url(self.url)} is unreachable ({what}): {type(e).__name__}: {e}") from e
        except rx.ResponseError as e:
            raise SessionDataError(f"redis at {redact_url(self.url)} rejected {what}: {e}") from e
        except rx.RedisError as e:
            raise SessionStoreError(f"redis at {redact_url(self.url)} failed to {what}: {e}") from e

    async def get_with_version(self, session_id: str) -> tuple[Session, int] | None:
        raw = await self._call(f"read session {session_id!r}", self._redis.hgetall(self.session_key(session_id)))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return _decode_session(fields), int(fields["version"])
        except (KeyError, ValueError, TypeError) as e:
            raise SessionDataError(f"redis at {redact_url(self.url)}: session {session_id!r} "
                                   f"({self.session_key(session_id)}) cannot be decoded: {e!r}") from e

    async def get(self, session_id: str) -> Session | None:
        found = await self.get_with_version(session_id)
        return None if found is None else found[0]

    async def put(self, session: Session, expected_version: int | None = None) -> int:
        session.updated_at = time.time()
        args = ["" if expected_version is None else int(expected_version), self._ttl_ms]
        for field, value in _encode_session(session).items():
            args += [field, value]
        ok, version = await self._call(
            f"write session {session.id!r}",
            self._put_script(keys=[self.session_key(session.id), self.kv_key(session.id)], args=args))
        if not ok:
            raise SessionVersionConflict(session.id, int(expected_version), int(version))
        return int(version)

    async def delete(self, session_id: str) -> bool:
        n = await self._call(f"delete session {session_id!r}", self._delete(session_id))
        return bool(n)

    async def _delete(self, session_id: str) -> int:
        # The tombstone (as long-lived as the session would have been) tells a decoder holding a local copy that
        # the session was deleted on purpose, not lost with a Redis restart: it must not bring it back.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.session_key(session_id)).delete(self.kv_key(session_id))
            pipe.set(self.tombstone_key(session_id), b"1", px=self._ttl_ms)
            removed, _, _ = await pipe.execute()
        return removed

    async def deleted(self, session_id: str) -> bool:
        found = await self._call(f"read tombstone of session {session_id!r}",
                                 self._redis.exists(self.tombstone_key(session_id)))
        return bool(found)

    async def versions(self, session_ids: list[str]) -> dict[str, tuple[int | None, bool]]:
        """session id -> (stored version or None when absent, deleted on purpose), in one round trip."""
        async def read():
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hget(self.session_key(sid), "version").exists(self.tombstone_key(sid))
                return await pipe.execute()

        if not session_ids:
            return {}
        raw = await self._call(f"read versions of {len(session_ids)} sessions", read())
        return {sid: (int(raw[2 * i]) if raw[2 * i] is not None else None, bool(raw[2 * i + 1]))
                for i, sid in enumerate(session_ids)}

    async def put_kv_snapshot(self, session_id: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        data = encode_kv_snapshot(tensors, meta)

        async def write():
            # The snapshot write also refreshes the session's TTL: both keys expire together.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self.kv_key(session_id), data, px=self._ttl_ms)
                pipe.pexpire(self.session_key(session_id), self._ttl_ms)
                await pipe.execute()

        await self._call(f"write KV snapshot of session {session_id!r} ({len(data)} bytes)", write())

    async def get_kv_snapshot(self, session_id: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        data = await self._call(f"read KV snapshot of session {session_id!r}", self._redis.get(self.kv_key(session_id)))
        if data is None:
            return None
        try:
            return decode_kv_snapshot(data)
        except Exception as e:  # safetensors raises its own error types; any of them means corrupt bytes
            raise SessionDataError(f"redis at {redact_url(self.url)}: KV snapshot {self.kv_key(session_id)} "
                                   f"is not a valid safetensors file: {e!r}") from e

    async def touch(self, session_id: str) -> bool:
        async def refresh():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.pexpire(self.session_key(session_id), self._ttl_ms)
                pipe.pexpire(self.kv_key(session_id), self._ttl_ms)
                return await pipe.execute()

        found, _ = await self._call(f"refresh TTL of session {session_id!r}", refresh())
        return bool(found)

    async def ttl(self, session_id: str) -> float | None:
        """Seconds until the session expires (None if absent)."""
        ms = await self._call(f"read TTL of session {session_id!r}", self._redis.pttl(self.session_key(session_id)))
        return None if ms == -2 else (math.inf if ms == -1 else ms / 1000.0)

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


# ---- memory -------------------------------------------------------------------------------------------

class MemorySessionStore:
    """The embedded default: same async interface and semantics (versions, CAS, TTL) in this process.

    Records are stored encoded, like in Redis, so a caller mutating its Session after `put` or after `get`
    never changes what is stored."""

    def __init__(self, ttl_s: float = 3600.0):
        self.ttl_s = ttl_s
        self._sessions: dict[str, tuple[dict[str, str], int, float]] = {}  # id -> (fields, version, expires_at)
        self._kv: dict[str, tuple[bytes, float]] = {}  # id -> (safetensors bytes, expires_at)
        self._tombstones: dict[str, float] = {}  # id -> expires_at (see RedisSessionStore._delete)
        self._lock = threading.Lock()  # the store may be shared with non-asyncio threads

    def _live(self, table: dict, session_id: str):
        entry = table.get(session_id)
        if entry is not None and entry[-1] <= time.monotonic():
            del table[session_id]
            return None
        return entry

    def _sweep(self) -> None:
        now = time.monotonic()
        for table in (self._sessions, self._kv):
            for sid in [sid for sid, e in table.items() if e[-1] <= now]:
                del table[sid]

    async def get_with_version(self, session_id: str) -> tuple[Session, int] | None:
        with self._lock:
            entry = self._live(self._sessions, session_id)
        return None if entry is None else (_decode_session(entry[0]), entry[1])

    async def get(self, session_id: str) -> Session | None:
        found = await self.get_with_version(session_id)
        return None if found is None else found[0]

    async def put(self, session: Session, expected_version: int | None = None) -> int:
        session.updated_at = time.time()
        fields = _encode_session(session)
        with self._lock:
            self._sweep()  # keeps memory bounded by live sessions
            entry = self._live(self._sessions, session.id)
            current = 0 if entry is None else entry[1]
            if expected_version is not None and expected_version != current:
                raise SessionVersionConflict(session.id, expected_version, current)
            expires = time.monotonic() + self.ttl_s
            self._sessions[session.id] = (fields, current + 1, expires)
            if session.id in self._kv:
                self._kv[session.id] = (self._kv[session.id][0], expires)
            return current + 1

    async def delete(self, session_id: str) -> bool:
        with self._lock:
            self._kv.pop(session_id, None)
            found = self._live(self._sessions, session_id) is not None
            self._sessions.pop(session_id, None)
            self._sweep_tombstones()
            self._tombstones[session_id] = time.monotonic() + self.ttl_s
            return found

    async def deleted(self, session_id: str) -> bool:
        with self._lock:
            self._sweep_tombstones()
            return session_id in self._tombstones

    async def versions(self, session_ids: list[str]) -> dict[str, tuple[int | None, bool]]:
        with self._lock:
            self._sweep_tombstones()
            out = {}
            for sid in session_ids:
                entry = self._live(self._sessions, sid)
                out[sid] = (entry[1] if entry is not None else None, sid in self._tombstones)
            return out

    def _sweep_tombstones(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, t in self._tombstones.items() if t <= now]:
            del self._tombstones[sid]

    async def put_kv_snapshot(self, session_id: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        data = encode_kv_snapshot(tensors, meta)
        with self._lock:
            expires = time.monotonic() + self.ttl_s
            self._kv[session_id] = (data, expires)
            if self._live(self._sessions, session_id) is not None:
                fields, version, _ = self._sessions[session_id]
                self._sessions[session_id] = (fields, version, expires)

    async def get_kv_snapshot(self, session_id: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        with self._lock:
            entry = self._live(self._kv, session_id)
        return None if entry is None else decode_kv_snapshot(entry[0])

    async def touch(self, session_id: str) -> bool:
        with self._lock:
            expires = time.monotonic() + self.ttl_s
            kv = self._live(self._kv, session_id)
            if kv is not None:
                self._kv[session_id] = (kv[0], expires)
            entry = self._live(self._sessions, session_id)
            if entry is None:
                return False
            self._sessions[session_id] = (entry[0], entry[1], expires)
            return True

    async def ttl(self, session_id: str) -> float | None:
        with self._lock:
            entry = self._live(self._sessions, session_id)
        return None if entry is None else entry[2] - time.monotonic()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ---- helpers ------------------------------------------------------------------------------------------

def make_session_store(url: str | None, ttl_s: float = 3600.0, prefix: str = "kvpilot:") -> SessionStore:
    """None or "memory" -> MemorySessionStore; redis://, rediss://, unix:// -> RedisSessionStore."""
    if url is None or url in ("memory", "memory://"):
        return MemorySessionStore(ttl_s=ttl_s)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return RedisSessionStore(url, ttl_s=ttl_s, prefix=prefix)
    raise ValueError(f"unsupported session store URL {redact_url(url)!r}: use 'memory' or redis://host:port/db")


async def update_session(store: SessionStore, session_id: str, mutate: Callable[[Session], None],
                         max_attempts: int = 32) -> tuple[Session, int]:
    """Read-modify-write with compare-and-set, retried on conflicts; creates the session if absent.

    `mutate` may run several times (once per attempt), each time on a freshly read Session; after
    `max_attempts` lost races the last SessionVersionConflict propagates."""
    for attempt in range(max_attempts):
        found = await store.get_with_version(session_id)
        session, version = found if found is not None else (Session(id=session_id), 0)
        mutate(session)
        try:
            return session, await store.put(session, expected_version=version)
        except SessionVersionConflict:
            if attempt == max_attempts - 1:
                raise
            await asyncio.sleep(0)  # let the writer that won finish before re-reading
    raise ValueError("max_attempts must be >= 1")
