"""End to end over real gRPC on loopback: streaming, concurrency, cancellation, sessions, bad input, health."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import decoder_pb2 as pb


@pytest.fixture
def server(make_engine):
    with BackgroundServer(make_engine(kv_pool_bytes=1 << 20)) as srv:
        yield srv


@pytest.fixture
def stub(server):
    return connect(server.address)


def run(stub, request, timeout=60):
    return list(stub.Generate(request, timeout=timeout))


def test_stream_tokens_then_one_final_message(stub, server):
    responses = run(stub, build_request(token_ids=list(range(20, 40)), max_new_tokens=12, temperature=0.0))
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds == ["chunk"] * 12 + ["complete"]
    final = responses[-1].complete
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert final.usage.generated_tokens == 12 and final.usage.prompt_tokens == 21
    assert final.usage.peak_kv_slots == 21 + 11
    assert final.usage.peak_kv_bytes == final.usage.peak_kv_slots * server.server.async_engine.engine.pool.slot_bytes
    assert "".join(r.chunk.text for r in responses[:-1]) == final.text
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id


def test_same_result_as_in_process_engine(stub, make_engine):
    from decoder_service.requests import GenerationRequest, SamplingParams

    prompt = "Question: which document"
    [local] = make_engine().generate([GenerationRequest("l", make_engine().tokenizer.encode(prompt),
                                                        SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))])
    request = build_request(prompt, max_new_tokens=10, temperature=0.0)
    request.stopping.ignore_eos = True
    final = run(stub, request)[-1].complete
    assert final.text == local.text


def test_concurrent_streams(stub):
    results = {}

    def worker(i):
        results[i] = run(stub, build_request(token_ids=[5 + i] * (3 + i), max_new_tokens=10 + i, temperature=0.0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert results[i][-1].complete.usage.generated_tokens <= 10 + i
        assert results[i][-1].WhichOneof("event") == "complete"


def test_client_cancel_frees_slots_and_server_keeps_serving(stub, server):
    engine = server.server.async_engine.engine
    call = stub.Generate(build_request(token_ids=[5] * 10, max_new_tokens=400, temperature=0.0))
    first = next(call)
    assert first.WhichOneof("event") == "chunk"
    assert engine.pool.reserved_slots > 0
    call.cancel()
    deadline = time.monotonic() + 10
    while engine.pool.reserved_slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pool.reserved_slots == 0 and not engine.running
    assert run(stub, build_request(token_ids=[6, 7], max_new_tokens=3))[-1].complete.usage.generated_tokens >= 1


def test_sessions_over_grpc(stub):
    first = run(stub, build_request(token_ids=[5, 6, 7], max_new_tokens=5, temperature=0.0, new_session=True))[-1].complete
    sid = first.session_id
    assert sid
    second = run(stub, build_request("tool says hi", max_new_tokens=5, temperature=0.0, session_id=sid,
                                     tool_output=True))[-1].complete
    assert second.usage.cached_tokens > 0 and second.session_id == sid
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid, include_tokens=True))
    assert info.turns == 2 and info.num_tokens == len(info.token_ids) and info.resident_kv_slots > 0
    assert [s.kind for s in info.segments] == ["user", "model", "tool", "model"]
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def expect_status(stub, request, code, fragment):
    with pytest.raises(grpc.RpcError) as err:
        run(stub, request)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


BAD_REQUESTS = [
    (lambda: build_request(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (lambda: build_request(token_ids=[3] * 600), grpc.StatusCode.INVALID_ARGUMENT, "context is 512"),
    (lambda: build_request("hi", policy="bogus", budget=64), grpc.StatusCode.INVALID_ARGUMENT, "unknown policy 'bogus'"),
    (lambda: build_request("hi", policy="full", budget=8, window=16), grpc.StatusCode.INVALID_ARGUMENT, "must exceed the protected"),
    (lambda: build_request("hi", max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be >= 1"),
    (lambda: build_request("hi", max_new_tokens=2_000_000_000), grpc.StatusCode.INVALID_ARGUMENT, "set max_new_tokens <="),
    (lambda: build_request("hi", session_id="missing"), grpc.StatusCode.NOT_FOUND, "unknown session id 'missing'"),
    (lambda: build_request(token_ids=[70000]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    # The oracle needs the reference trace's future attention, which no client can send.
    (lambda: build_request("hi", policy="golden", budget=64), grpc.StatusCode.INVALID_ARGUMENT,
     "golden is an evaluation-only oracle: it needs the reference trace's future attention; use it from kvpilot "
     "eval / bench pareto / bench fidelity"),
]


@pytest.mark.parametrize("make_request, code, fragment", BAD_REQUESTS)
def test_bad_input_gets_a_clear_status_and_server_keeps_serving(stub, make_request, code, fragment):
    expect_status(stub, make_request(), code, fragment)
    assert run(stub, build_request(token_ids=[5, 6], max_new_tokens=2))[-1].WhichOneof("event") == "complete"


@pytest.mark.parametrize("make_request, field", [
    (lambda: build_request("hi", temperature=-1.0), "sampling.temperature"),
    (lambda: build_request("hi", n=40), "sampling.n"),
    (lambda: build_request("hi", max_new_tokens=-3), "stopping.max_new_tokens"),
    (lambda: build_request("hi", stop_token_ids=[70000]), "stopping.stop_token_ids"),
    (lambda: build_request("hi", policy="bogus", budget=64), "compression.policy"),
    (lambda: build_request("hi", policy="h2o", budget=8, window=16), "compression.budget"),
    (lambda: build_request(""), "input"),
    (lambda: build_request("hi", policy="h2o", budget=64, interval=0), None),  # names no single field: no details
])
def test_invalid_argument_names_its_field_in_rich_error_details(stub, make_request, field):
    """google.rpc.BadRequest (grpcio-status): the field a client must fix, beside the message that says how."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.RpcError) as err:
        run(stub, make_request())
    status = rpc_status.from_call(err.value)
    if field is None:
        assert status is None and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert status is not None and status.message == err.value.details()
    [detail] = status.details
    violation = error_details_pb2.BadRequest()
    assert detail.Unpack(violation)
    [one] = violation.field_violations
    assert one.field == field and one.description == err.value.details()


def test_invalid_utf8_is_invalid_argument(server, stub):
    good = build_request("ab", max_new_tokens=2).SerializeToString()
    bad = good.replace(b"ab", b"\xff\xfe")
    channel = grpc.insecure_channel(server.address)
    raw = channel.unary_stream("/kvpilot.v1.Decoder/Generate", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    assert run(stub, build_request("ab", max_new_tokens=2))[-1].WhichOneof("event") == "complete"


def test_resource_exhausted_when_request_can_never_fit(make_engine):
    with BackgroundServer(make_engine(kv_pool_bytes=32 * 1024)) as srv:  # 64 slots
        expect_status(connect(srv.address), build_request(token_ids=[5] * 40, max_new_tokens=100),
                      grpc.StatusCode.RESOURCE_EXHAUSTED, "whole KV pool holds 64")


def test_health_reflection_and_model_info(server, stub):
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvpilot.v1.Decoder"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"kvpilot.v1.Decoder", "grpc.health.v1.Health"} <= names
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_context == 512 and "full" in info.policies and info.kv_bytes_per_slot == 512
