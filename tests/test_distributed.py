"""The distributed shape: sessions in real Redis across decoder processes, Redis failures, and the traces
that link a request's generate -> compaction spans to the policy service's decide span across gRPC."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
import pytest

from decoder_service.remote_policy import RemotePolicy
from decoder_service.server import BackgroundServer
from decoder_service.session_store import make_session_store
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import decoder_pb2 as pb
from policy_service.server import BackgroundPolicyServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final(stub, request):
    return list(stub.Generate(request, timeout=120))[-1].complete


def start_decoder_process(model_dir, redis_url: str, persist_kv: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvpilot.cli", "serve", "--model", str(model_dir), "--address", f"127.0.0.1:{port}",
           "--redis-url", redis_url, "--kv-pool-mb", "8"] + (["--persist-kv"] if persist_kv else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    line = proc.stdout.readline()
    assert "serving" in line, f"decoder did not start: {line}"
    return proc, f"127.0.0.1:{port}"


@pytest.mark.parametrize("persist_kv", [False, True])
def test_session_resumes_on_a_second_decoder_process(make_engine, make_checkpoint, redis_url, persist_kv):
    sid = f"test-{uuid.uuid4().hex}"
    turn1 = build_request(token_ids=[5, 6, 7, 8], max_new_tokens=8, temperature=0.0, session_id=sid, new_session=True)
    turn2 = build_request(token_ids=[40, 41, 42], max_new_tokens=8, temperature=0.0, session_id=sid, tool_output=True)
    # The reference: both turns on one decoder without Redis.
    with BackgroundServer(make_engine()) as alone:
        stub = connect(alone.address)
        ref1, ref2 = final(stub, turn1), final(stub, turn2)
    store = make_session_store(redis_url)
    with BackgroundServer(make_engine(), session_store=store, persist_kv=persist_kv) as first:
        got1 = final(connect(first.address), turn1)
    assert not got1.warnings
    proc, address = start_decoder_process(make_checkpoint("llama"), redis_url, persist_kv)
    try:
        stub = connect(address)
        got2 = final(stub, turn2)
        assert got1.text == ref1.text and got2.text == ref2.text  # continues exactly where it left off
        assert got2.usage.cached_tokens == (ref2.usage.cached_tokens if persist_kv else 0)
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.turns == 2 and [s.kind for s in info.segments] == ["user", "model", "tool", "model"]
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import asyncio

    async def gone() -> bool:
        check = make_session_store(redis_url)
        try:
            return await check.get(sid) is None
        finally:
            await check.close()

    assert asyncio.run(gone())


def test_unreachable_redis_still_serves_and_says_so(make_engine):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with BackgroundServer(make_engine(), session_store=make_session_store(dead)) as server:
        stub = connect(server.address)
        started = time.monotonic()
        done = final(stub, build_request(token_ids=[5, 6], max_new_tokens=4, new_session=True))
        assert done.usage.generated_tokens == 4
        assert done.warnings and "was not persisted" in done.warnings[0] and "unreachable" in done.warnings[0]
        assert time.monotonic() - started < 10
        # The session still lives on this decoder: a second turn works (with the same warning).
        again = final(stub, build_request(token_ids=[7], max_new_tokens=2, session_id=done.session_id))
        assert again.usage.cached_tokens > 0 and again.warnings
        # A session this decoder never saw cannot be read while Redis is down: UNAVAILABLE, clearly.
        with pytest.raises(grpc.RpcError) as err:
            final(stub, build_request(token_ids=[7], max_new_tokens=2, session_id="elsewhere"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "session store failed" in err.value.details()
        assert final(stub, build_request(token_ids=[9], max_new_tokens=2)).usage.generated_tokens == 2


def test_redis_stopped_mid_session(make_engine):
    binary = shutil.which("redis-server")
    assert binary, "redis-server binary needed for this test: apt-get install redis-server (.ci/run does it)"
    port = free_port()
    workdir = tempfile.mkdtemp()
    redis_proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
                                  stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        for _ in range(50):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        with BackgroundServer(make_engine(), session_store=make_session_store(url)) as server:
            stub = connect(server.address)
            turn1 = build_request(token_ids=[5, 6], max_new_tokens=4, new_session=True)
            turn1.stopping.ignore_eos = True  # an unseeded sample may be <eos>: the count below must not depend on it
            first = final(stub, turn1)
            assert not first.warnings
            redis_proc.kill()
            redis_proc.wait()
            turn2 = build_request(token_ids=[8], max_new_tokens=4, session_id=first.session_id)
            turn2.stopping.ignore_eos = True
            second = final(stub, turn2)
            assert second.usage.generated_tokens == 4 and "not persisted" in second.warnings[0]
    finally:
        redis_proc.kill()
        redis_proc.wait()


def test_traces_link_generate_compaction_and_decide_across_grpc(make_engine, spans):
    with BackgroundPolicyServer() as policy:
        client = RemotePolicy(policy.address)
        assert client.wait_until_available(10)
        engine = make_engine(prefill_chunk=64)
        engine.compressor.policy = client
        with BackgroundServer(engine) as decoder:
            done = final(connect(decoder.address), build_request(
                token_ids=list(range(3, 103)), max_new_tokens=40, temperature=0.0, policy="h2o", budget=40,
                interval=8, window=8))
    assert done.usage.compression_events > 0
    by_name = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    [generate] = by_name[f"text_completion {engine.loaded.name}"]  # GenAI span name: {operation} {model}
    compactions = by_name["compaction"]
    decides = by_name["decide"]
    assert generate.attributes["kvpilot.policy"] == "h2o" and generate.attributes["kvpilot.budget"] == 40
    assert generate.attributes["gen_ai.usage.output_tokens"] == 40
    assert generate.attributes["kvpilot.kv.peak_bytes"] == done.usage.peak_kv_bytes
    assert all(c.parent.span_id == generate.context.span_id for c in compactions)
    assert all(c.context.trace_id == generate.context.trace_id for c in compactions + decides)
    compaction_ids = {c.context.span_id for c in compactions}
    linked = [d for d in decides if d.parent is not None and d.parent.span_id in compaction_ids]
    assert linked, "no decide span is a child of a compaction span"
    applied = [c for c in compactions if not c.attributes["kvpilot.decision_dropped"]]
    assert sum(c.attributes["kvpilot.evicted"] for c in applied) == done.usage.evicted_tokens
    d = linked[0]
    assert d.attributes["kvpilot.policy"] == "h2o" and d.attributes["kvpilot.kept"] == 40


def test_decoder_metrics(make_engine, metric_reader):
    from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams

    engine = make_engine(prefill_chunk=64)
    engine.generate([GenerationRequest("m", list(range(3, 83)), SamplingParams(temperature=0, max_new_tokens=30,
                                                                               ignore_eos=True),
                                       compression=CompressionConfig(policy="tova", budget=32, interval=8, window=8))])
    names = {}
    for rm in metric_reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                names[m.name] = m
    for name in ("kvpilot.evicted_tokens", "kvpilot.compaction.duration", "kvpilot.decode.tokens",
                 "kvpilot.kv.memory.usage"):
        assert name in names, f"metric {name} missing"
    evicted = sum(p.value for p in names["kvpilot.evicted_tokens"].data.data_points
                  if p.attributes.get("kvpilot.policy") == "tova")
    assert evicted > 0


def test_generate_span_continues_the_callers_trace_and_client_errors_are_not_server_errors(make_engine, spans):
    from opentelemetry.trace import StatusCode

    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (("traceparent", f"00-{trace_id}-{parent_id}-01"),)
    engine = make_engine()
    with BackgroundServer(engine) as decoder:
        stub = connect(decoder.address)
        request = build_request(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0.0, seed=11)
        done = [r for r in stub.Generate(request, metadata=metadata) if r.WhichOneof("event") == "complete"][0]
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.Generate(build_request(token_ids=[5, 6], max_new_tokens=3, policy="no-such-policy", budget=64),
                               metadata=metadata))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = f"text_completion {engine.loaded.name}"
    ok, refused = [s for s in spans.get_finished_spans() if s.name == name]
    assert format(ok.context.trace_id, "032x") == trace_id and format(ok.parent.span_id, "016x") == parent_id
    assert ok.attributes["gen_ai.provider.name"] == "kvpilot"
    assert ok.attributes["gen_ai.response.id"] == done.request_id
    assert ok.attributes["gen_ai.request.seed"] == 11 and ok.attributes["gen_ai.usage.output_tokens"] == 3
    assert "gen_ai.usage.cache_read.input_tokens" in ok.attributes
    assert ok.status.status_code is StatusCode.UNSET
    # The caller's mistake: recorded as error.type, but the span is not an error (OpenTelemetry's gRPC rules).
    assert refused.attributes["error.type"] == "INVALID_ARGUMENT" and refused.status.status_code is StatusCode.UNSET
