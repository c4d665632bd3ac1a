"""Durable session store against a real Redis server (127.0.0.1:6379) and the in-memory store.

Each Redis test uses its own key prefix and deletes its keys afterwards. If Redis is not running the tests
FAIL (never skip): the distributed shape depends on it.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
import torch

from decoder_service.session_store import (
    MemorySessionStore, RedisSessionStore, SessionDataError, SessionStoreError, SessionStoreUnavailable,
    SessionVersionConflict, make_session_store, update_session,
)
from decoder_service.sessions import Session

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_URL = "redis://127.0.0.1:6390/0"  # nothing listens here


@pytest.fixture(scope="module")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis not reachable on 127.0.0.1:6379: start it (redis-server --daemonize yes --bind 127.0.0.1 "
                    f"--port 6379 --save '' --appendonly no) or run .ci/run ({e})", pytrace=False)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client):
    """A fresh key prefix; every key under it is deleted after the test."""
    p = f"kvpilot-test:{uuid.uuid4().hex[:12]}:"
    yield p
    keys = list(redis_client.scan_iter(match=f"{p}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def make_store(kind: str, request, ttl_s: float = 3600.0):
    if kind == "memory":
        return MemorySessionStore(ttl_s=ttl_s)
    return RedisSessionStore(REDIS_URL, ttl_s=ttl_s, prefix=request.getfixturevalue("prefix"))


@pytest.fixture(params=["memory", "redis"])
def store_factory(request):
    """store_factory(ttl_s=...) -> a store of the parametrized kind (tests close it in their own loop)."""
    return lambda ttl_s=3600.0: make_store(request.param, request, ttl_s)


def sample_session(sid: str = "s1") -> Session:
    s = Session(id=sid, token_ids=list(range(100, 140)), compression={"policy": "h2o", "budget": 32},
                turns=2, generated_tokens=17, evicted_tokens=8)
    s.add_segment(0, 10, "user")
    s.add_segment(10, 30, "tool")
    s.add_segment(30, 40, "model")
    return s


# ---- behaviour shared by both backends ------------------------------------------------------------------

async def test_round_trip_and_missing(store_factory):
    store = store_factory()
    try:
        assert await store.get("nope") is None and await store.get_with_version("nope") is None
        s = sample_session()
        assert await store.put(s) == 1
        got, version = await store.get_with_version("s1")
        assert version == 1
        assert got.to_dict() == s.to_dict()
        # What is stored is a copy: mutating the caller's object changes nothing until the next put.
        s.token_ids.append(7)
        assert (await store.get("s1")).token_ids == list(range(100, 140))
    finally:
        await store.close()


async def test_versions_and_compare_and_set(store_factory):
    store = store_factory()
    try:
        s = sample_session()
        assert await store.put(s, expected_version=0) == 1  # 0 = create only if absent
        with pytest.raises(SessionVersionConflict) as err:
            await store.put(s, expected_version=0)
        assert (err.value.expected, err.value.actual) == (0, 1)
        s.turns = 3
        assert await store.put(s, expected_version=1) == 2
        with pytest.raises(SessionVersionConflict):
            await store.put(s, expected_version=1)  # stale reader loses
        assert (await store.get("s1")).turns == 3
        assert await store.put(s) == 3  # unconditional write still bumps the version
    finally:
        await store.close()


async def test_delete_removes_session_and_snapshot(store_factory):
    store = store_factory()
    try:
        await store.put(sample_session())
        await store.put_kv_snapshot("s1", {"k": torch.ones(2, 2)}, {})
        assert await store.delete("s1") is True
        assert await store.get("s1") is None and await store.get_kv_snapshot("s1") is None
        assert await store.delete("s1") is False
        assert await store.put(sample_session(), expected_version=0) == 1  # versions restart
    finally:
        await store.close()


async def test_tombstones_and_versions_of_many(store_factory):
    """A deletion leaves a tombstone (a lost key does not); `versions` reads many sessions at once."""
    store = store_factory()
    try:
        await store.put(sample_session("kept"))
        await store.put(sample_session("gone"))
        await store.put(sample_session("kept"))
        assert await store.delete("gone") is True
        assert await store.deleted("gone") and not await store.deleted("kept") and not await store.deleted("never")
        assert await store.versions(["kept", "gone", "never"]) == {
            "kept": (2, False), "gone": (None, True), "never": (None, False)}
        assert await store.versions([]) == {}
    finally:
        await store.close()


async def test_ttl_set_refreshed_and_expires(store_factory):
    store = store_factory(ttl_s=2.0)
    try:
        assert await store.ttl("s1") is None
        await store.put(sample_session())
        assert 1.8 < await store.ttl("s1") <= 2.0
        await asyncio.sleep(0.4)
        assert await store.ttl("s1") < 1.7
        assert await store.touch("s1") is True
        assert await store.ttl("s1") > 1.8
        await asyncio.sleep(0.4)
        await store.put(await store.get("s1"))  # a write refreshes it too
        assert await store.ttl("s1") > 1.8
        assert await store.touch("other") is False
    finally:
        await store.close()
    short = store_factory(ttl_s=0.3)
    try:
        await short.put(sample_session("gone"))
        await short.put_kv_snapshot("gone", {"k": torch.zeros(1)}, {})
        await asyncio.sleep(0.5)
        assert await short.get("gone") is None and await short.get_kv_snapshot("gone") is None
        assert await short.put(sample_session("gone"), expected_version=0) == 1  # expired = absent
    finally:
        await short.close()


async def test_concurrent_updates_keep_counters_exact(store_factory):
    store = store_factory()
    tasks, rounds = 8, 12

    def bump(s: Session) -> None:
        s.turns += 1
        s.generated_tokens += 3
        s.token_ids.append(s.turns)

    async def worker():
        for _ in range(rounds):
            await update_session(store, "hot", bump, max_attempts=10_000)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(worker() for _ in range(tasks)))
        final, version = await store.get_with_version("hot")
        assert final.turns == tasks * rounds and final.generated_tokens == 3 * tasks * rounds
        assert final.token_ids == list(range(1, tasks * rounds + 1))  # every append landed, in order
        assert version == tasks * rounds
    finally:
        await store.close()


async def test_stale_writer_race_exactly_one_wins(store_factory):
    store = store_factory()
    try:
        await store.put(sample_session())
        copies = [await store.get_with_version("s1") for _ in range(6)]
        results = await asyncio.gather(*(store.put(s, expected_version=v) for s, v in copies), return_exceptions=True)
        assert sum(isinstance(r, int) for r in results) == 1
        assert sum(isinstance(r, SessionVersionConflict) for r in results) == 5
    finally:
        await store.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
async def test_kv_snapshot_round_trip_bit_exact(store_factory, dtype):
    store = store_factory()
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 37, 16, generator=g).to(dtype)
    keys[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    tensors = {"layer0.keys": keys, "layer0.values": torch.randn(2, 2, 37, 16, generator=g).to(dtype),
               "positions": torch.arange(37, dtype=torch.int64), "valid": torch.rand(37, generator=g) > 0.5}
    meta = {"session_version": 3, "policy": "snapkv", "slots": 37, "nested": {"layers": [0, 1]}}
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    try:
        assert await store.get_kv_snapshot("s1") is None
        await store.put_kv_snapshot("s1", tensors, meta)
        got, got_meta = await store.get_kv_snapshot("s1")
        assert got_meta == meta and set(got) == set(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape
            same = got[name].view(bits) if t.is_floating_point() else got[name]
            want = t.view(bits) if t.is_floating_point() else t
            assert torch.equal(same, want), name  # compares bit patterns, so NaN and -0.0 count too
        # Views of one pool tensor (strided, or sharing storage) are stored by value.
        pool = torch.randn(2, 4, 8, generator=g).to(dtype)
        views = {"pool": pool, "a": pool[0], "b": pool[1], "t": pool[0].t()}  # overlapping: safetensors refuses
        await store.put_kv_snapshot("s1", views, {})
        got, _ = await store.get_kv_snapshot("s1")
        for name, t in views.items():
            assert torch.equal(got[name].view(bits), t.contiguous().view(bits)), name
        with pytest.raises(SessionDataError, match="cannot be encoded"):
            await store.put_kv_snapshot("s1", {"k": pool}, {"not json": object()})
    finally:
        await store.close()


async def test_factory_and_protocol():
    from decoder_service.session_store import SessionStore

    assert isinstance(make_session_store(None), MemorySessionStore)
    assert isinstance(make_session_store("memory"), MemorySessionStore)
    store = make_session_store(REDIS_URL, ttl_s=5)
    assert isinstance(store, RedisSessionStore) and store.ttl_s == 5
    assert isinstance(store, SessionStore) and isinstance(MemorySessionStore(), SessionStore)
    await store.close()
    with pytest.raises(ValueError, match="unsupported session store URL"):
        make_session_store("http://:secret@example:6379")


# ---- Redis specifics ------------------------------------------------------------------------------------

async def test_redis_layout_and_pttl(redis_client, prefix):
    store = RedisSessionStore(REDIS_URL, ttl_s=60, prefix=prefix)
    try:
        await store.put(sample_session("abc"))
        await store.put_kv_snapshot("abc", {"k": torch.ones(3)}, {"n": 1})
        skey, kvkey = f"{prefix}session:{{abc}}", f"{prefix}session:{{abc}}:kv"
        assert (store.session_key("abc"), store.kv_key("abc")) == (skey, kvkey)  # same hash tag -> same slot
        assert redis_client.type(skey) == b"hash" and redis_client.type(kvkey) == b"string"
        assert redis_client.hget(skey, "version") == b"1"
        assert redis_client.hget(skey, "token_ids").startswith(b"[100,101")
        for key in (skey, kvkey):
            assert 59_000 < redis_client.pttl(key) <= 60_000
        # TTL shrinks, then touch refreshes both keys (checked with PTTL directly on the server).
        redis_client.pexpire(skey, 5_000)
        redis_client.pexpire(kvkey, 5_000)
        assert await store.touch("abc")
        assert redis_client.pttl(skey) > 59_000 and redis_client.pttl(kvkey) > 59_000
        # A session write refreshes the snapshot's TTL as well, so they expire together.
        redis_client.pexpire(kvkey, 5_000)
        await store.put(await store.get("abc"))
        assert redis_client.pttl(kvkey) > 59_000 and redis_client.hget(skey, "version") == b"2"
    finally:
        await store.close()


async def test_redis_store_shared_by_two_clients(prefix):
    # Two decoder processes: one writes, the other continues the session; a stale write from the first fails.
    a = RedisSessionStore(REDIS_URL, prefix=prefix)
    b = RedisSessionStore(REDIS_URL, prefix=prefix)
    try:
        v1 = await a.put(sample_session())
        s, v = await b.get_with_version("s1")
        s.turns += 1
        assert await b.put(s, expected_version=v) == v1 + 1
        with pytest.raises(SessionVersionConflict):
            await a.put(sample_session(), expected_version=v1)
    finally:
        await a.close()
        await b.close()


async def test_redis_corrupt_data_is_a_clear_error(redis_client, prefix):
    store = RedisSessionStore(REDIS_URL, prefix=prefix)
    try:
        redis_client.set(store.kv_key("bad"), b"not safetensors")
        with pytest.raises(SessionDataError, match="127.0.0.1:6379.*not a valid safetensors"):
            await store.get_kv_snapshot("bad")
        redis_client.hset(store.session_key("bad"), mapping={"schema": "99", "version": "1"})
        with pytest.raises(SessionDataError, match="cannot be decoded"):
            await store.get("bad")
        redis_client.delete(store.session_key("wrongtype"))
        redis_client.set(store.session_key("wrongtype"), b"x")
        with pytest.raises(SessionStoreError, match="redis at redis://127.0.0.1:6379/0"):
            await store.get("wrongtype")
    finally:
        await store.close()


async def test_unreachable_redis_fails_fast_with_clear_message():
    store = RedisSessionStore(DEAD_URL)
    try:
        for call in (store.ping(), store.get("s1"), store.put(sample_session()), store.touch("s1"),
                     store.put_kv_snapshot("s1", {"k": torch.ones(1)}, {}), store.get_kv_snapshot("s1")):
            start = time.monotonic()
            with pytest.raises(SessionStoreUnavailable, match=r"redis at redis://127\.0\.0\.1:6390/0 is unreachable"):
                await call
            assert time.monotonic() - start < 1.5
    finally:
        await store.close()


async def test_password_is_not_leaked_in_errors():
    store = RedisSessionStore("redis://user:hunter2@127.0.0.1:6390/0")
    try:
        with pytest.raises(SessionStoreUnavailable) as err:
            await store.ping()
        assert "hunter2" not in str(err.value) and "user:***@127.0.0.1:6390" in str(err.value)
    finally:
        await store.close()
