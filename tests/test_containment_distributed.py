"""Containment across processes: sessions on two decoders sharing a real Redis, a remote policy whose
decision is still out when a turn ends, a policy-service process stopped by pid (circuit breaker), and a
fallback that cannot work refused at start-up."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import redis

from decoder_service.circuit_breaker import CircuitBreaker
from decoder_service.remote_policy import RemotePolicy
from decoder_service.requests import CompressionConfig, EvictionEvent, GenerationRequest, SamplingParams
from decoder_service.server import BackgroundServer
from decoder_service.session_store import make_session_store
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import decoder_pb2 as pb
from policy_service.server import BackgroundPolicyServer

TURNS = [[5, 6, 7, 8], [40, 41, 42], [9, 10], [50, 51, 52, 53]]


def turn(i: int, sid: str, **kw) -> pb.GenerateRequest:
    request = build_request(token_ids=TURNS[i], max_new_tokens=8, temperature=0.0, session_id=sid,
                            new_session=(i == 0), tool_output=(i % 2 == 1), **kw)
    request.stopping.ignore_eos = True
    return request


def complete(stub, request) -> pb.GenerationComplete:
    return list(stub.Generate(request, timeout=120))[-1].complete


@pytest.fixture
def reference_texts(make_engine):
    with BackgroundServer(make_engine()) as alone:
        stub = connect(alone.address)
        return [complete(stub, turn(i, "reference")).text for i in range(len(TURNS))]


@pytest.fixture
def two_decoders(make_engine, redis_url, request):
    persist_kv = getattr(request, "param", True)
    with BackgroundServer(make_engine(), session_store=make_session_store(redis_url), persist_kv=persist_kv) as a, \
            BackgroundServer(make_engine(), session_store=make_session_store(redis_url), persist_kv=persist_kv) as b:
        yield connect(a.address), connect(b.address)


@pytest.mark.parametrize("two_decoders", [True, False], indirect=True, ids=["persist_kv", "history_only"])
def test_alternating_turns_on_two_decoders_match_one_process(two_decoders, reference_texts):
    """A -> B -> A -> B: each decoder uses its parked KV only when its version is the store's latest."""
    a, b = two_decoders
    sid = f"alt-{uuid.uuid4().hex}"
    got = [complete((a, b)[i % 2], turn(i, sid)) for i in range(len(TURNS))]
    assert [g.text for g in got] == reference_texts
    assert not any(g.warnings for g in got)
    infos = [stub.GetSession(pb.GetSessionRequest(session_id=sid, include_tokens=True)) for stub in (a, b)]
    assert infos[0].turns == infos[1].turns == 4 and list(infos[0].token_ids) == list(infos[1].token_ids)
    a.DeleteSession(pb.DeleteSessionRequest(session_id=sid))


def test_a_lost_key_is_recreated_on_the_next_write(two_decoders, reference_texts, redis_url):
    a, b = two_decoders
    sid = f"lost-{uuid.uuid4().hex}"
    first = complete(a, turn(0, sid))
    store = redis.Redis.from_url(redis_url)
    assert store.delete(f"kvpilot:session:{{{sid}}}", f"kvpilot:session:{{{sid}}}:kv") >= 1  # a FLUSH or restart
    second = complete(a, turn(1, sid))
    assert not second.warnings  # not "another decoder changed it (version 0, expected 1)" forever
    assert store.hget(f"kvpilot:session:{{{sid}}}", "version") == b"1"
    third = complete(b, turn(2, sid))  # B adopts the recreated session
    fourth = complete(a, turn(3, sid))  # A's parked copy is stale now (B wrote): it adopts B's
    assert [first.text, second.text, third.text, fourth.text] == reference_texts
    assert not third.warnings and not fourth.warnings
    a.DeleteSession(pb.DeleteSessionRequest(session_id=sid))


def test_a_session_deleted_elsewhere_is_not_resurrected(two_decoders):
    a, b = two_decoders
    sid = f"gone-{uuid.uuid4().hex}"
    complete(a, turn(0, sid))
    b.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    with pytest.raises(grpc.RpcError) as exc:
        complete(a, turn(1, sid))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    info = a.GetServerInfo(pb.GetServerInfoRequest())
    assert info.parked_sessions == 0 and info.pool_reserved_slots == 0


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def parked(stub):
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    return info.parked_sessions, info.pool_reserved_slots


def test_parked_copies_follow_the_store(two_decoders):
    """A copy superseded by a turn on the other decoder, or deleted there, is freed within a reconcile tick
    (found by the soak benchmark: each decoder kept its copy until the id was used again)."""
    a, b = two_decoders
    sid = f"follow-{uuid.uuid4().hex}"
    complete(a, turn(0, sid))
    complete(b, turn(1, sid))  # A's parked copy is one version behind now
    assert wait_for(lambda: parked(a) == (0, 0)), parked(a)
    assert parked(b)[0] == 1
    complete(a, turn(2, sid))  # A adopts the stored session; now B's copy is stale
    assert wait_for(lambda: parked(b) == (0, 0)), parked(b)
    a.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    assert parked(a) == (0, 0)


def test_a_cancelled_create_can_be_found_and_deleted_on_the_other_decoder(two_decoders):
    a, b = two_decoders
    call = a.Generate(build_request(token_ids=[5] * 30, max_new_tokens=400, temperature=0.0, new_session=True))
    sid = dict(call.initial_metadata())["kvpilot-session-id"]
    next(call)
    call.cancel()

    def found_on_b():
        try:
            return b.GetSession(pb.GetSessionRequest(session_id=sid)).turns == 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return False

    assert wait_for(found_on_b)
    b.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    assert wait_for(lambda: parked(a) == (0, 0) and parked(b) == (0, 0)), (parked(a), parked(b))


def test_a_client_chosen_id_must_be_new_on_every_decoder(two_decoders):
    a, b = two_decoders
    sid = f"dup-{uuid.uuid4().hex}"
    complete(a, turn(0, sid))
    with pytest.raises(grpc.RpcError) as exc:
        complete(b, turn(0, sid))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already exists" in exc.value.details()
    a.DeleteSession(pb.DeleteSessionRequest(session_id=sid))


# ---- a decision in flight when its turn ends -----------------------------------------------------------------

def compressing(rid, prompt, sid=None, create=False, n=40, budget=40, max_lag=4):
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, seed=3),
                             compression=CompressionConfig(policy="h2o", budget=budget, interval=8, window=8, sinks=4,
                                                           max_lag=max_lag),
                             session_id=sid, create_session=create)


def test_a_decision_out_at_cancel_never_reaches_the_next_turn(make_engine, spans):
    with BackgroundPolicyServer() as policy:
        remote = RemotePolicy(policy.address)
        assert remote.wait_until_available(10)
        try:
            engine = make_engine(prefill_chunk=64)
            engine.compressor.policy = remote
            events1 = []
            engine.add_request(compressing("turn-1", range(3, 123), sid="stale", create=True), events1.append)
            seq = None
            while seq is None or seq.compression_state.pending is None:
                engine.step()
                seq = next((s for s in engine.running if s.id == "turn-1"), None)
            frames_1 = seq.compression_state.frames
            engine.abort("turn-1")  # the decision is still out (or landed unpolled)
            time.sleep(0.3)  # let a late decision arrive: it must be dropped, not kept for anyone
            with remote._lock:
                assert not [k for k in list(remote._in_flight) + list(remote._results) if k[0] == "turn-1"]
            ended = [s for s in spans.get_finished_spans() if s.name == "compaction"]
            assert len(ended) == frames_1  # the frame in flight had its span closed at retire
            assert ended[-1].attributes["kvpilot.reason"] == "request ended (abort)"
            # Turn 2 numbers its frames from 1 again; the key includes the request id, so nothing crosses.
            events2 = []
            engine.add_request(compressing("turn-2", [7, 8, 9], sid="stale"), events2.append)
            engine.run_until_done()
            applied = [e for e in events2 if isinstance(e, EvictionEvent)]
            assert applied and all(not e.fallback for e in applied)
            assert events2[-1].usage.generated_tokens == 40
        finally:
            remote.close()


def test_remote_keys_are_request_scoped(make_engine):
    """Two requests' frame 1 in flight at once get their own decisions."""
    with BackgroundPolicyServer() as policy:
        remote = RemotePolicy(policy.address)
        assert remote.wait_until_available(10)
        try:
            engine = make_engine(prefill_chunk=64)
            frames = []
            decide = engine.compressor.policy.decide
            engine.compressor.policy.decide = lambda f, name, p=None: (frames.append((f, name)), decide(f, name, p))[1]
            engine.generate([compressing("x", range(3, 90), sid=None)])
            engine.generate([compressing("y", range(100, 190), sid=None, budget=50)])
            (fx, _), (fy, _) = frames[0], next(f for f in frames if f[0].keep == 50)
            assert fx.frame_id == fy.frame_id == 1
            kx = remote.submit(fx, "h2o", {}, {}, request_id="x")
            ky = remote.submit(fy, "h2o", {}, {}, request_id="y")
            deadline = time.monotonic() + 10
            got = {}
            while len(got) < 2 and time.monotonic() < deadline:
                for name, key in (("x", kx), ("y", ky)):
                    result = remote.poll(key)
                    if result is not None:
                        got[name] = result
                time.sleep(0.01)
            assert got["x"].plan.count == 40 and got["y"].plan.count == 50
        finally:
            remote.close()


# ---- a hung policy service ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def policy_process():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.cli", "policy", "serve", "--address", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    line = proc.stdout.readline()
    assert "policy service on" in line, f"policy service did not start: {line}"
    yield proc, f"127.0.0.1:{port}"
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=30)


def timed_run(engine, request):
    start = time.monotonic()
    [done] = engine.generate([request])
    return time.monotonic() - start, done


def test_circuit_breaker_keeps_a_stopped_policy_service_from_throttling(make_engine, policy_process, metric_reader):
    proc, address = policy_process
    remote = RemotePolicy(address)
    assert remote.wait_until_available(20)
    engine = make_engine(prefill_chunk=64)
    engine.compressor.policy = remote
    engine.compressor.decision_timeout_s = 0.4
    try:
        warm_s, warm = timed_run(engine, compressing("warm", range(3, 63), n=30))
        assert warm.usage.fallbacks == 0 and warm.usage.compression_events >= 4
        os.kill(proc.pid, signal.SIGSTOP)
        # Without a breaker every compression waits out the timeout.
        engine.compressor.breaker = CircuitBreaker(failure_threshold=10_000, cool_down_s=60)
        slow_s, slow = timed_run(engine, compressing("no-breaker", range(3, 63), n=60))
        engine.compressor.breaker = CircuitBreaker(failure_threshold=2, cool_down_s=30.0,
                                                   on_change=engine.compressor._breaker_changed)
        fast_s, fast = timed_run(engine, compressing("breaker", range(3, 63), n=60))
        for done in (slow, fast):  # every compression was the fallback's, and the stream finished
            assert done.usage.fallbacks == done.usage.compression_events >= 6 and done.usage.generated_tokens == 60
        # Every compression waited out its timeout without the breaker; with it, only the first two did.
        assert slow.usage.dropped_decisions == slow.usage.compression_events and fast.usage.dropped_decisions == 2
        assert engine.compressor.breaker.times_opened == 1 and engine.compressor.breaker.rejected > 0
        assert fast_s < slow_s, (fast_s, slow_s)  # the counts above are the exact claim; seconds vary with load
        engine.compressor.breaker.cool_down_s = 1.0
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(1.2)  # cool-down over: the next frame is the probe
        _, recovered = timed_run(engine, compressing("recovered", range(3, 63), n=30))
        assert engine.compressor.breaker.state == "closed"
        assert recovered.usage.fallbacks < recovered.usage.compression_events
    finally:
        remote.close()
    states = [dp.attributes["kvpilot.circuit.state"]
              for rm in metric_reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "kvpilot.policy.circuit_transitions" for dp in m.data.data_points]
    assert {"open", "half_open", "closed"} <= set(states)


def test_serve_refuses_a_fallback_that_needs_statistics(make_checkpoint):
    out = subprocess.run([sys.executable, "-m", "kvpilot.cli", "serve", "--model", str(make_checkpoint("llama")),
                          "--fallback-policy", "h2o", "--address", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "needs statistics" in out.stderr
