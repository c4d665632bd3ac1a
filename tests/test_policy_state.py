"""Per-session policy state (decision log, counters, carried scorer blobs) against a real Redis and in memory.

Each Redis test uses its own key prefix and deletes its keys afterwards. If Redis is not running the tests
FAIL (never skip).
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
import torch

from policy_service.state import (
    MemoryPolicyStateStore, PolicyStateStore, PolicyStateUnavailable, RedisPolicyStateStore, make_policy_state_store,
)

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


@pytest.fixture(params=["memory", "redis"])
def store_factory(request):
    """store_factory(**options) -> a store of the parametrized kind (tests close it in their own loop)."""
    def make(**options):
        if request.param == "memory":
            return MemoryPolicyStateStore(**options)
        return RedisPolicyStateStore(REDIS_URL, prefix=request.getfixturevalue("prefix"), **options)

    return make


async def record(store, sid: str, frame: int, replica: str = "r0", seed: int | None = 11, kept: int = 64,
                 evicted: int = 16, policy: str = "vase"):
    await store.record_decision(sid, frame_id=frame, policy=policy, seed=seed, latency_s=0.0125, kept=kept,
                                evicted=evicted, replica=replica)


async def test_record_state_and_log(store_factory):
    store = store_factory()
    try:
        assert await store.get_state("s") == {} and await store.decision_log("s", 10) == []
        await record(store, "s", 1, replica="r0", seed=None)
        await record(store, "s", 2, replica="r1", seed=42, evicted=5, policy="h2o")
        state = await store.get_state("s")
        assert {k: state[k] for k in ("frames", "last_frame_id", "last_replica", "last_policy")} == \
            {"frames": 2, "last_frame_id": 2, "last_replica": "r1", "last_policy": "h2o"}
        assert state["kept_tokens"] == 128 and state["evicted_tokens"] == 21
        log = await store.decision_log("s", 10)
        assert [d["frame_id"] for d in log] == [1, 2]  # oldest first
        assert log[0]["seed"] is None and log[1]["seed"] == 42  # the seed is recorded with each decision
        assert log[1] | {"id": None, "ts": None} == {"id": None, "ts": None, "frame_id": 2, "policy": "h2o",
                                                      "seed": 42, "latency_s": 0.0125, "kept": 64, "evicted": 5,
                                                      "replica": "r1"}
        assert [d["frame_id"] for d in await store.decision_log("s", 1)] == [2]
        assert await store.get_state("other") == {}  # sessions are independent
        assert await store.delete("s") is True and await store.get_state("s") == {}
        assert await store.delete("s") is False
    finally:
        await store.close()


async def test_decision_log_is_capped(store_factory):
    store = store_factory(max_decisions=20)
    try:
        for frame in range(300):
            await record(store, "s", frame)
        log = await store.decision_log("s", 1000)
        # MAXLEN ~ trims whole stream nodes (100 entries by default), so Redis may keep a little more.
        assert 20 <= len(log) <= 20 + 100
        assert [d["frame_id"] for d in log] == list(range(300 - len(log), 300))
        assert (await store.get_state("s"))["frames"] == 300  # counters are not capped
    finally:
        await store.close()


async def test_concurrent_records_keep_counters_exact(store_factory):
    store = store_factory()
    tasks, rounds = 10, 20

    async def replica(r: int):
        for i in range(rounds):
            await record(store, "hot", r * rounds + i, replica=f"r{r}", evicted=r + 1)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(replica(r) for r in range(tasks)))
        state = await store.get_state("hot")
        assert state["frames"] == tasks * rounds
        assert state["evicted_tokens"] == rounds * sum(r + 1 for r in range(tasks))
        log = await store.decision_log("hot", 10_000)
        assert sorted(d["frame_id"] for d in log) == list(range(tasks * rounds))
        # The counters and the log were updated together: the last entry is the last frame recorded.
        assert (log[-1]["frame_id"], log[-1]["replica"]) == (state["last_frame_id"], state["last_replica"])
    finally:
        await store.close()


async def test_blobs_carry_scorer_state_between_replicas(store_factory):
    store = store_factory()
    try:
        assert await store.get_blob("s", "rng") is None
        # Replica A draws, saves its generator; replica B restores it and continues the same random sequence.
        g = torch.Generator().manual_seed(1234)
        torch.rand(5, generator=g)
        await store.put_blob("s", "rng", g.get_state().numpy().tobytes())
        expected = torch.rand(5, generator=g)
        g2 = torch.Generator()
        g2.set_state(torch.frombuffer(bytearray(await store.get_blob("s", "rng")), dtype=torch.uint8))
        assert torch.equal(torch.rand(5, generator=g2), expected)
        raw = bytes(range(256)) * 4
        await store.put_blob("s", "acc", raw)
        assert await store.get_blob("s", "acc") == raw  # binary-safe, including NUL bytes
        await store.put_blob("s", "acc", b"v2")
        assert await store.get_blob("s", "acc") == b"v2"
        assert await store.get_blob("s", "missing") is None
    finally:
        await store.close()


async def test_ttl_set_refreshed_and_expires(store_factory):
    store = store_factory(ttl_s=2.0)
    try:
        assert await store.ttl("s") is None
        await record(store, "s", 1)
        assert 1.8 < await store.ttl("s") <= 2.0
        await asyncio.sleep(0.4)
        assert await store.ttl("s") < 1.7
        await record(store, "s", 2)
        assert await store.ttl("s") > 1.8
        await asyncio.sleep(0.3)
        await store.put_blob("s", "rng", b"x")
        assert await store.ttl("s") > 1.8
    finally:
        await store.close()
    short = store_factory(ttl_s=0.3)
    try:
        await record(short, "gone", 1)
        await short.put_blob("gone", "rng", b"x")
        await asyncio.sleep(0.5)
        assert await short.get_state("gone") == {} and await short.decision_log("gone", 10) == []
        assert await short.get_blob("gone", "rng") is None
    finally:
        await short.close()


async def test_redis_layout_and_pttl(redis_client, prefix):
    store = RedisPolicyStateStore(REDIS_URL, ttl_s=60, prefix=prefix)
    try:
        await record(store, "abc", 7)
        await store.put_blob("abc", "rng", b"\x00\x01")
        stream, counters, blobs = store.keys("abc")
        assert (stream, counters, blobs) == (f"{prefix}decisions:{{abc}}", f"{prefix}policy:{{abc}}",
                                             f"{prefix}policy:{{abc}}:blobs")
        assert redis_client.type(stream) == b"stream" and redis_client.xlen(stream) == 1
        assert redis_client.hget(counters, "frames") == b"1" and redis_client.hget(counters, "last_frame_id") == b"7"
        for key in (stream, counters, blobs):
            redis_client.pexpire(key, 5_000)
        await record(store, "abc", 8)  # one decision refreshes every key of the session
        for key in (stream, counters, blobs):
            assert 59_000 < redis_client.pttl(key) <= 60_000, key
    finally:
        await store.close()


async def test_factory_and_protocol():
    assert isinstance(make_policy_state_store(None), MemoryPolicyStateStore)
    store = make_policy_state_store(REDIS_URL, max_decisions=5)
    assert isinstance(store, RedisPolicyStateStore) and store.max_decisions == 5
    assert isinstance(store, PolicyStateStore) and isinstance(MemoryPolicyStateStore(), PolicyStateStore)
    await store.close()
    with pytest.raises(ValueError, match="unsupported policy state URL"):
        make_policy_state_store("postgres://x")


async def test_unreachable_redis_fails_fast_with_clear_message():
    store = RedisPolicyStateStore(DEAD_URL)
    try:
        for call in (store.ping(), record(store, "s", 1), store.get_state("s"), store.decision_log("s", 5),
                     store.put_blob("s", "rng", b"x"), store.get_blob("s", "rng")):
            start = time.monotonic()
            with pytest.raises(PolicyStateUnavailable, match=r"redis at redis://127\.0\.0\.1:6390/0 is unreachable"):
                await call
            assert time.monotonic() - start < 1.5
    finally:
        await store.close()
