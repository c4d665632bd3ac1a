"""Containment (DESIGN invariant 9): a fault or a bad request ends that request alone, with a status and a
message, and gives back everything it held; the engine, its pool and every other stream go on.

Each test reproduces one of the observed failures through the real engine (and, where the failure was seen
over the wire, through a real gRPC server on loopback). Faults are injected where no client input can reach
them (a NaN in one sequence's cache, a statistics allocation that fails, a scorer that raises)."""
from __future__ import annotations

import ast
import pathlib
import threading
import time

import grpc
import pytest
import torch

import decoder_service.engine as engine_module
from decoder_service.circuit_breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from kvpilot.runtime import fallback_scorer
from decoder_service.requests import (
    CompressionConfig,
    EvictionEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ResourceExhausted,
    SamplingParams,
)
from decoder_service.server import SESSION_ID_METADATA, BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import decoder_pb2 as pb
from policy_service.local import InProcessPolicy
from policy_service.registry import serving_policies
from policy_service.scorers.streaming_llm import StreamingLLM

PROMPT = list(range(3, 123))


def greedy(rid, prompt=PROMPT, n=24, policy="full", budget=0, temperature=0.0, session_id=None, create=False,
           **params):
    compression = CompressionConfig(policy=policy, budget=budget, interval=8, window=8, sinks=4,
                                    params={k: str(v) for k, v in params.items()})
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=temperature, max_new_tokens=n,
                                                               ignore_eos=True, seed=1),
                             compression=compression, session_id=session_id, create_session=create)


def collect(engine, requests):
    """Queue requests, run to completion; returns {request id: [events]}."""
    events = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r, events[r.request_id].append)
    engine.run_until_done()
    return events


def final(events) -> FinishEvent:
    assert isinstance(events[-1], FinishEvent)
    return events[-1]


def assert_pool_at_baseline(engine):
    info = engine.server_info()
    assert info["pool_reserved_slots"] == info["parked_slots"], info
    assert info["stats_reserved_bytes"] == sum(engine.parked_stats_bytes.values()), info
    assert not engine.running and not engine.waiting
    engine.pool.check_consistency()


# ---- 1. an engine-step fault ends one sequence ------------------------------------------------------------

def test_tiny_temperature_is_greedy_not_a_crash(make_engine):
    engine = make_engine()
    tiny = greedy("tiny", temperature=1e-40)
    tiny.sampling.ignore_eos = True
    events = collect(engine, [tiny, greedy("ref")])
    assert final(events["tiny"]).finish_reason is FinishReason.LENGTH
    assert final(events["tiny"]).token_ids == final(events["ref"]).token_ids  # the T -> 0 limit is the argmax


@pytest.mark.parametrize("temperature", [float("nan"), -1.0, 100.5, float("inf")])
def test_temperature_outside_its_range_is_invalid(make_engine, temperature):
    with pytest.raises(InvalidRequest, match=r"temperature must be in \[0, 100\]"):
        make_engine().add_request(greedy("t", temperature=temperature), lambda ev: None)


def test_sampling_fault_fails_only_its_sequence(make_engine):
    """A NaN in one sequence's cache (a numeric blow-up) ends it with INTERNAL; the batch goes on."""
    engine = make_engine()
    reqs = [greedy(f"s{i}", temperature=0.8) for i in range(4)]
    events = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r, events[r.request_id].append)
    for _ in range(3):
        engine.step()
    victim = next(s for s in engine.running if s.id == "s1")
    victim.kv.pool.v[:, :, victim.kv.slot_map[:victim.kv.n]] = float("nan")
    engine.run_until_done()
    bad = final(events["s1"])
    assert bad.finish_reason is FinishReason.ERROR and bad.error.code == "INTERNAL"
    assert "non-finite logits" in str(bad.error)
    for rid in ("s0", "s2", "s3"):
        assert final(events[rid]).finish_reason is FinishReason.LENGTH
        assert final(events[rid]).usage.generated_tokens == 24
    assert engine.failures == {"INTERNAL": 1}
    assert_pool_at_baseline(engine)


@pytest.mark.parametrize("where", ["forward", "commit"])
def test_step_fault_is_isolated_sequence_by_sequence(make_engine, where):
    """A batched forward that raises is retried per sequence: only the one that raises alone fails, and the
    others are not fed twice (their tokens equal a clean run's)."""
    clean = collect(make_engine(), [greedy(r) for r in ("a", "c")])
    engine = make_engine()
    events = {r: [] for r in ("a", "b", "c")}
    for r in events:
        engine.add_request(greedy(r), events[r].append)
    engine.step()
    victim = next(s for s in engine.running if s.id == "b")
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected fault in {where}")

    if where == "forward":
        victim.kv.prepare_append = broken  # its K/V cannot be placed: the batched forward raises
    else:
        victim.kv.advance = broken  # its tokens can no longer be made valid after the forward
    engine.run_until_done()
    assert final(events["b"]).finish_reason is FinishReason.ERROR
    assert final(events["b"]).error.code == "INTERNAL"
    for r in ("a", "c"):
        assert final(events[r]).token_ids == final(clean[r]).token_ids
    assert engine.pool.reserved_slots == 0


def test_policy_without_statistics_yet_plans_safely(make_engine):
    """A parked session continued under tova with a smaller budget compresses before any query was seen."""
    engine = make_engine()
    first = final(collect(engine, [greedy("t1", n=20, create=True, session_id="tova-s")])["t1"])
    assert first.finish_reason is FinishReason.LENGTH
    second = collect(engine, [greedy("t2", prompt=[7, 8, 9], n=20, policy="tova", budget=40,
                                     session_id="tova-s")])["t2"]
    done = final(second)
    assert done.finish_reason is FinishReason.LENGTH and done.usage.generated_tokens == 20
    first_eviction = next(e for e in second if isinstance(e, EvictionEvent))
    assert first_eviction.fallback and "no statistics yet" in first_eviction.reason
    later = [e for e in second if isinstance(e, EvictionEvent)][1:]
    assert later and not any(e.fallback for e in later)  # once queries were seen, tova itself decides


# ---- 2. no request can leak the pool ----------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["rkv", "snapkv", "vase"])
def test_query_window_is_bounded(make_engine, policy):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=r"window_queries must be in \[1, 8192\]"):
        engine.add_request(greedy("w", policy=policy, budget=40, window_queries=1_000_000_000), lambda ev: None)
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 512"):
        engine.add_request(greedy("w", policy=policy, budget=40, window_queries=600), lambda ev: None)
    assert not engine.waiting and engine.pool.reserved_slots == 0


def test_statistics_memory_is_counted_by_admission(make_engine):
    engine = make_engine(stats_memory_bytes=200_000)  # one 300-query ring (156 KB) at a time
    with pytest.raises(ResourceExhausted, match="MiB of attention statistics"):
        engine.add_request(greedy("big", policy="snapkv", budget=40, window_queries=500), lambda ev: None)
    # Two that fit one at a time run one after the other, never over the ledger.
    seen = []
    engine.step_hooks.append(lambda e, s: seen.append(e.stats_reserved_bytes))
    events = collect(engine, [greedy(f"q{i}", policy="snapkv", budget=40, window_queries=300) for i in range(2)])
    assert all(final(ev).finish_reason is FinishReason.LENGTH for ev in events.values())
    assert max(seen) <= engine.stats_capacity_bytes
    assert_pool_at_baseline(engine)


def test_failed_allocation_after_reservation_frees_the_region(make_engine, monkeypatch):
    engine = make_engine()

    class FailingStatistics:
        def __init__(self, *args, **kwargs):
            raise MemoryError("injected: statistics allocation failed")

    monkeypatch.setattr(engine_module, "SequenceStatistics", FailingStatistics)
    events = collect(engine, [greedy("doomed", policy="snapkv", budget=40), greedy("fine")])
    doomed = final(events["doomed"])
    assert doomed.finish_reason is FinishReason.ERROR and doomed.error.code == "RESOURCE_EXHAUSTED"
    assert final(events["fine"]).usage.generated_tokens == 24
    assert engine.steps < 60  # failed once, never retried step after step
    assert_pool_at_baseline(engine)


def test_vase_rank_is_honoured(make_engine):
    from decoder_service.statistics import build_frame

    engine = make_engine()
    frames = {}
    for rank in (1, 7):
        scorer = InProcessPolicy().scorer("vase", {"variant": "dkv", "rank": str(rank)})
        kv = engine.pool.allocate(f"r{rank}", 8)
        pool = engine.pool
        shape = (pool.num_layers, pool.num_kv_heads, 8, pool.head_dim)
        keys = torch.randn(shape)
        kv.load(keys, torch.randn(shape), torch.arange(8).expand(*shape[:2], 8))
        frames[rank] = build_frame(1, "s", kv, None, scorer.spec(), list(range(8)), [], keep=6, sinks=1, window=1,
                                   num_heads=4, step=0, seed=11)
        gen = torch.Generator().manual_seed(11)
        g = torch.randn(pool.head_dim, rank, generator=gen) / rank ** 0.5
        expected = (keys @ g).pow(2).sum(-1)
        assert torch.allclose(frames[rank].stats["kv_projection"][..., 0], expected)
        engine.pool.free(f"r{rank}")


# ---- 4. head-of-line blocking ------------------------------------------------------------------------------

def test_parked_session_grows_without_blocking_the_queue(make_engine):
    """A continuation grows its parked reservation in place: the same blocks, nothing copied, even when the
    pool has room only for the growth; an unrelated small request behind it is served too."""
    engine = make_engine()
    collect(engine, [greedy("t1", prompt=list(range(3, 60)), n=4, create=True, session_id="grow")])
    parked = engine.resident["grow"][0]
    assert parked.capacity == parked.n == 61 and len(parked.blocks) == engine.pool.blocks_for(61)
    blocks = list(parked.blocks)
    growth = engine.pool.blocks_for(61 + 10 + 20) - len(blocks)
    rest = engine.pool.allocate("rest", engine.pool.available_slots - (growth + 1) * engine.pool.block_size)
    events = collect(engine, [greedy("t2", prompt=[9] * 10, n=20, session_id="grow"), greedy("small", prompt=[5], n=4)])
    assert final(events["t2"]).usage.cached_tokens == 61  # continued from its KV, no re-prefill
    assert final(events["t2"]).usage.generated_tokens == 20
    assert final(events["small"]).usage.generated_tokens == 4
    assert engine.resident["grow"][0].blocks[:len(blocks)] == blocks  # the parked blocks were never copied
    engine.pool.free(rest.owner)
    engine.pool.check_consistency()


def test_small_requests_overtake_one_that_does_not_fit_yet(make_engine):
    engine = make_engine(max_bypass_s=30.0)
    blocker = engine.pool.allocate("blocker", engine.pool.capacity_slots - 100)
    done = []
    engine.add_request(greedy("big", prompt=list(range(3, 200)), n=20), lambda ev: isinstance(ev, FinishEvent) and done.append("big"))
    engine.add_request(greedy("small", prompt=[5, 6], n=4), lambda ev: isinstance(ev, FinishEvent) and done.append("small"))
    for _ in range(10):
        engine.step()
    assert done == ["small"] and [s.id for s in engine.waiting] == ["big"]
    engine.pool.free(blocker.owner)
    engine.run_until_done()
    assert done == ["small", "big"]


def test_a_request_that_waited_long_enough_is_not_overtaken(make_engine):
    engine = make_engine(max_bypass_s=0.0)
    blocker = engine.pool.allocate("blocker", engine.pool.capacity_slots - 100)
    engine.add_request(greedy("big", prompt=list(range(3, 200)), n=20), lambda ev: None)
    engine.add_request(greedy("small", prompt=[5, 6], n=4), lambda ev: None)
    engine.step()
    assert [s.id for s in engine.waiting] == ["big", "small"]  # no starvation of the head
    engine.pool.free(blocker.owner)


def test_waiting_request_honours_its_deadline(make_engine):
    engine = make_engine()
    blocker = engine.pool.allocate("blocker", engine.pool.capacity_slots - 10)
    events = []
    req = greedy("late", prompt=list(range(3, 100)))
    req.deadline = time.monotonic() + 0.2
    engine.add_request(req, events.append)
    while not events:
        engine.step()
        time.sleep(0.02)
    assert events[-1].finish_reason is FinishReason.ERROR and events[-1].error.code == "DEADLINE_EXCEEDED"
    assert not engine.waiting
    engine.pool.free(blocker.owner)


# ---- 6. the fallback ---------------------------------------------------------------------------------------

def test_fallback_that_needs_statistics_is_refused():
    with pytest.raises(ValueError, match="needs statistics"):
        fallback_scorer("h2o")
    with pytest.raises(ValueError, match="unknown policy"):
        fallback_scorer("no-such-policy")
    assert fallback_scorer("streaming_llm").name == "streaming_llm"


def test_failing_fallback_ends_only_its_request(make_engine):
    class BrokenPolicy:
        asynchronous = False

        def describe(self, policy, params=None):
            return InProcessPolicy().describe(policy, params)

        def decide(self, frame, policy, params=None):
            raise RuntimeError("injected policy failure")

    class BrokenFallback(StreamingLLM):
        def plan(self, frame):
            if frame.session_id == "victim":
                raise RuntimeError("injected fallback failure")
            return super().plan(frame)

    engine = make_engine()
    engine.compressor.policy = BrokenPolicy()
    engine.compressor.fallback = BrokenFallback()
    events = collect(engine, [greedy("victim", policy="h2o", budget=40), greedy("other", policy="h2o", budget=40)])
    victim = final(events["victim"])
    assert victim.finish_reason is FinishReason.ERROR and victim.error.code == "INTERNAL"
    assert "fallback policy" in str(victim.error)
    other = final(events["other"])
    assert other.usage.generated_tokens == 24 and other.usage.fallbacks > 0
    assert_pool_at_baseline(engine)


# ---- 7. the circuit breaker ---------------------------------------------------------------------------------

def test_circuit_breaker_opens_probes_and_recovers():
    now = [0.0]
    changes = []
    breaker = CircuitBreaker(failure_threshold=3, cool_down_s=5.0, clock=lambda: now[0],
                             on_change=lambda old, new: changes.append(new))
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow() and breaker.rejected == 1
    now[0] = 5.0
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == OPEN and breaker.times_opened == 2
    now[0] = 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


# ---- 8. smaller ones ---------------------------------------------------------------------------------------

def test_compression_schedule_is_batch_invariant(make_engine):
    """Invariant 10: with 12 streams sharing a small step budget, every stream compresses at the same points
    over the same slots as alone, and its greedy tokens are the same."""
    prompts = [list(range(3 + i, 90 + 7 * i)) for i in range(12)]
    reqs = lambda: [greedy(f"b{i}", prompt=p, n=40, policy="rkv", budget=48) for i, p in enumerate(prompts)]  # noqa: E731
    batch = collect(make_engine(max_batch_tokens=37, prefill_chunk=29), reqs())
    for r in reqs():
        alone = collect(make_engine(), [r])[r.request_id]
        schedule = lambda evs: [(e.step, e.slots_before, e.slots_after) for e in evs if isinstance(e, EvictionEvent)]  # noqa: E731
        assert schedule(batch[r.request_id]) == schedule(alone), r.request_id
        assert final(batch[r.request_id]).token_ids == final(alone).token_ids, r.request_id


def test_every_policy_runs_without_fallbacks(make_engine):
    """The whole policy matrix through the engine: a scorer that built a tensor on the wrong device, or failed
    in any other way, would show up as a fallback."""
    engine = make_engine()
    # golden (eval only) needs an oracle: tests/test_golden.py; breadcrumbs needs a beacon-trained checkpoint:
    # tests/test_breadcrumbs.py runs it on one (budget and all).
    policies = [p for p in serving_policies() if p not in ("full", "breadcrumbs")]
    events = collect(engine, [greedy(p, policy=p, budget=40, n=40) for p in policies])
    for p in policies:
        done = final(events[p])
        assert done.usage.compression_events > 0 and done.usage.fallbacks == 0, (p, done.usage)


def test_scorers_build_tensors_on_the_frame_device():
    """Static check: every tensor factory in a scorer names its device (on a GPU a CPU tensor would fail
    and every frame would fall back silently)."""
    factories = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm", "tensor",
                 "Generator", "eye", "linspace"}
    offenders = []
    for path in pathlib.Path("policy_service/scorers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                offenders.append(f"{path}:{node.lineno} torch.{node.func.attr}")
    assert not offenders, offenders


def test_policy_service_scorer_cache_is_bounded():
    from policy_service.server import PolicyCore

    core = PolicyCore()
    for i in range(InProcessPolicy.MAX_CACHED_SCORERS + 50):
        core.scorer("rkv", {"lam": str(i / 1000)})
    assert len(core.local._scorers) == InProcessPolicy.MAX_CACHED_SCORERS


def test_session_ttl_frees_parked_kv_without_redis(make_engine):
    engine = make_engine()
    engine.store.ttl_s = 0.2
    collect(engine, [greedy("t", n=4, create=True, session_id="short")])
    assert engine.resident
    time.sleep(0.3)
    engine.expire_sessions()
    assert not engine.resident and engine.pool.reserved_slots == 0
    with pytest.raises(engine_module.SessionNotFound):
        engine.get_session("short")


# ---- over the wire -----------------------------------------------------------------------------------------

@pytest.fixture
def server(make_engine):
    with BackgroundServer(make_engine(kv_pool_bytes=1 << 20)) as srv:
        yield srv


def run_stream(stub, request, results, key, timeout=60):
    try:
        results[key] = ("OK", list(stub.Generate(request, timeout=timeout)))
    except grpc.RpcError as exc:
        results[key] = (exc.code().name, exc.details())


def test_bad_stream_gets_its_status_and_innocents_finish(server):
    """Over gRPC: the faulty stream ends with INTERNAL and a message, never OK + ABORT; 4 others finish."""
    stub = connect(server.address)
    engine = server.server.async_engine

    def poison():
        seq = next(s for s in engine.engine.running if s.id == "victim")
        seq.kv.pool.v[:, :, seq.kv.slot_map[:seq.kv.n]] = float("nan")

    results = {}
    requests = {rid: build_request(token_ids=PROMPT, max_new_tokens=60, temperature=0.7, request_id=rid)
                for rid in ["victim", "i0", "i1", "i2", "i3"]}
    for r in requests.values():
        r.stopping.ignore_eos = True
    threads = [threading.Thread(target=run_stream, args=(stub, r, results, rid)) for rid, r in requests.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    import asyncio

    while time.monotonic() < deadline:
        running = asyncio.run_coroutine_threadsafe(engine.call(lambda: [s.id for s in engine.engine.running]),
                                                   server.loop).result()
        if "victim" in running:
            asyncio.run_coroutine_threadsafe(engine.call(poison), server.loop).result()
            break
        time.sleep(0.01)
    for t in threads:
        t.join()
    code, details = results["victim"]
    assert code == "INTERNAL" and "non-finite logits" in details
    for rid in ["i0", "i1", "i2", "i3"]:
        code, responses = results[rid]
        assert code == "OK" and responses[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.failures["INTERNAL"] == 1 and info.pool_reserved_slots == 0 and info.engine_alive


def test_session_id_reaches_the_client_before_any_token(server):
    stub = connect(server.address)
    call = stub.Generate(build_request(token_ids=[5] * 30, max_new_tokens=300, temperature=0.0, new_session=True))
    sid = dict(call.initial_metadata())[SESSION_ID_METADATA]
    call.cancel()  # hung up before reading a single message
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
            break
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
            time.sleep(0.05)
    assert info.session_id == sid
    for _ in range(100):
        try:
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION  # still retiring
            time.sleep(0.05)
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.pool_reserved_slots == 0 and info.parked_sessions == 0


def test_huge_prompt_is_refused_without_stalling_others(server):
    stub = connect(server.address)
    gaps, results = [], {}

    def innocent():
        last = time.monotonic()
        for response in stub.Generate(build_request(token_ids=PROMPT, max_new_tokens=150, temperature=0.0)):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    t = threading.Thread(target=innocent)
    t.start()
    time.sleep(0.2)
    started = time.monotonic()
    run_stream(stub, build_request("word " * (2 << 20), max_new_tokens=4), results, "huge")
    refused_after = time.monotonic() - started
    t.join()
    code, details = results["huge"]
    assert code == "INVALID_ARGUMENT" and "characters" in details
    assert refused_after < 2.0 and max(gaps) < 1.0, (refused_after, max(gaps))


def test_session_ids_are_validated(server):
    stub = connect(server.address)
    for bad in ["", "a" * 129, "has space", "semi;colon"]:
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetSession(pb.GetSessionRequest(session_id=bad))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.Generate(build_request(token_ids=[5], max_new_tokens=2, session_id="no spaces please",
                                         new_session=True)))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session id" in exc.value.details()
    # Invalid UTF-8 in the id (a hand-made message: field 1, length 2, bytes ff fe).
    channel = grpc.insecure_channel(server.address)
    for method in ("GetSession", "DeleteSession"):
        call = channel.unary_unary(f"/kvpilot.v1.Decoder/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as exc:
            call(b"\x0a\x02\xff\xfe", timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


def test_queued_request_leaves_when_its_deadline_passes(server):
    stub = connect(server.address)
    engine = server.server.async_engine
    import asyncio

    blocker = asyncio.run_coroutine_threadsafe(
        engine.call(lambda: engine.engine.pool.allocate("blocker", engine.engine.pool.capacity_slots - 5)),
        server.loop).result()
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.Generate(build_request(token_ids=PROMPT, max_new_tokens=8), timeout=0.5))
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while stub.GetServerInfo(pb.GetServerInfoRequest()).waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.GetServerInfo(pb.GetServerInfoRequest()).waiting == 0
    asyncio.run_coroutine_threadsafe(engine.call(lambda: engine.engine.pool.free(blocker.owner)), server.loop).result()
    final_msg = list(stub.Generate(build_request(token_ids=[5, 6], max_new_tokens=3, temperature=0.0)))[-1]
    assert final_msg.complete.usage.generated_tokens == 3


def test_a_step_fault_outside_any_request_fails_running_streams_with_a_status(make_engine, monkeypatch):
    """The last line of defence in the engine thread: a bug outside per-sequence containment ends what was
    running with INTERNAL (never OK + ABORT), and the server keeps serving."""
    engine = make_engine()
    with BackgroundServer(engine) as srv:
        stub = connect(srv.address)
        real_schedule = engine._schedule
        calls = {"n": 0}

        def flaky_schedule():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected scheduler bug")
            return real_schedule()

        monkeypatch.setattr(engine, "_schedule", flaky_schedule)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Generate(build_request(token_ids=PROMPT, max_new_tokens=30, temperature=0.0), timeout=30))
        assert exc.value.code() == grpc.StatusCode.INTERNAL and "injected scheduler bug" in exc.value.details()
        after = list(stub.Generate(build_request(token_ids=[5, 6], max_new_tokens=3, temperature=0.0), timeout=30))
        assert after[-1].complete.usage.generated_tokens == 3
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.step_failures == 1 and info.pool_reserved_slots == 0


def test_health_reports_not_serving_once_the_engine_thread_is_gone(make_engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with BackgroundServer(make_engine()) as srv:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        srv.server.async_engine._stopped = True  # the engine thread ends as if it had died
        srv.server.async_engine._wake.set()
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = connect(srv.address)
        assert not stub.GetServerInfo(pb.GetServerInfoRequest()).engine_alive
        with pytest.raises(grpc.RpcError) as exc:  # answered at once, not left hanging
            list(stub.Generate(build_request(token_ids=[5], max_new_tokens=2), timeout=10))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- every new setting has a range ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("stats_memory_bytes", 0), ("max_bypass_s", -1.0)])
def test_engine_settings_out_of_range_are_refused(make_engine, field, value):
    with pytest.raises(ValueError, match=field):
        make_engine(**{field: value})


@pytest.mark.parametrize("option,value,message", [
    ("decision_timeout_s", 0.0, "--decision-timeout"), ("circuit_failures", 0, "failure_threshold"),
    ("circuit_cool_down_s", 0.0, "cool_down_s"), ("fallback_policy", "h2o", "needs statistics")])
def test_runtime_settings_out_of_range_are_refused_before_the_model_loads(option, value, message):
    from kvpilot.runtime import RuntimeOptions, build_engine

    # A model path that does not exist: reaching the load would be a different error.
    with pytest.raises(ValueError, match=message):
        build_engine(RuntimeOptions(model="/nonexistent-model", **{option: value}))


def test_serve_refuses_a_non_positive_session_ttl():
    from kvpilot import cli

    with pytest.raises(SystemExit, match="--session-ttl must be > 0"):
        cli.main(["serve", "--session-ttl", "0"])


def test_remote_policy_needs_a_stream():
    from decoder_service.remote_policy import RemotePolicy

    with pytest.raises(ValueError, match="policy streams must be >= 1"):
        RemotePolicy("127.0.0.1:1", streams=0)


def test_a_malformed_kv_snapshot_leaks_no_blocks(make_engine):
    """A snapshot whose values do not match its keys (or whose metadata is incomplete) is refused: the session
    re-prefills from its history and the blocks taken for it go back at once."""
    from decoder_service.sessions import Session

    engine = make_engine()
    c = engine.model_config
    k = torch.randn(c.num_layers, c.num_kv_heads, 20, c.head_dim)
    bad = {"k": k, "v": k[:, :, :5], "positions": torch.arange(20).expand(*k.shape[:2], 20)}
    meta = {"model": engine.loaded.name, "num_computed": 20}
    assert not engine.import_session(Session(id="broken", token_ids=list(range(3, 24))), bad, meta)
    good = dict(bad, v=k.clone())
    assert not engine.import_session(Session(id="no-meta", token_ids=list(range(3, 24))), good, {"model": engine.loaded.name})
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_slots == 0 and not engine.resident
    engine.pool.check_consistency()
