"""The decoder and the policy service behind TLS and bearer tokens: sessions belong to their creator,
health stays open, reflection can be switched off, Redis credentials never reach a message."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoder_service.remote_policy import RemotePolicy
from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams
from decoder_service.server import BackgroundServer
from decoder_service.session_store import make_session_store
from kvpilot.client import build_request, connect
from kvpilot_protocol.security import BearerAuth, TransportSecurity, make_self_signed_cert, secure_channel
from kvpilot_protocol.v1 import decoder_pb2 as pb
from kvpilot_protocol.v1 import policy_pb2
from kvpilot_protocol.v1 import policy_pb2_grpc
from policy_service.server import BackgroundPolicyServer

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-fedcba9876543210"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def secured(make_engine, cert):
    security = TransportSecurity(tls_cert=cert[0], tls_key=cert[1],
                                 auth=BearerAuth({ALICE: "alice", BOB: "bob"}), reflection=False)
    with BackgroundServer(make_engine(), security=security) as server:
        yield server


def final(stub, request):
    return list(stub.Generate(request, timeout=60))[-1].complete


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


def test_sessions_belong_to_their_creator(secured, cert):
    alice = connect(secured.address, tls_ca=cert[0], token=ALICE)
    bob = connect(secured.address, tls_ca=cert[0], token=BOB)
    created = final(alice, build_request(token_ids=[5, 6, 7], max_new_tokens=4, temperature=0.0, new_session=True))
    sid = created.session_id
    assert alice.GetSession(pb.GetSessionRequest(session_id=sid)).turns == 1
    # For bob the session does not exist: the same answer as for an id nobody created.
    assert code_of(lambda: bob.GetSession(pb.GetSessionRequest(session_id=sid))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: final(bob, build_request(token_ids=[8], max_new_tokens=2, session_id=sid))) \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: bob.DeleteSession(pb.DeleteSessionRequest(session_id=sid))) == grpc.StatusCode.NOT_FOUND
    assert final(alice, build_request(token_ids=[8], max_new_tokens=2, session_id=sid)).usage.cached_tokens > 0
    alice.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    assert code_of(lambda: alice.GetSession(pb.GetSessionRequest(session_id=sid))) == grpc.StatusCode.NOT_FOUND


def test_server_made_session_ids_are_unguessable(secured, cert):
    alice = connect(secured.address, tls_ca=cert[0], token=ALICE)
    ids = {final(alice, build_request(token_ids=[5], max_new_tokens=1, new_session=True)).session_id for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 and int(i, 16) for i in ids)  # 128-bit random (uuid4)


def test_calls_without_a_valid_token_are_unauthenticated_but_health_is_open(secured, cert):
    anonymous = connect(secured.address, tls_ca=cert[0])
    assert code_of(lambda: final(anonymous, build_request(token_ids=[5], max_new_tokens=2))) \
        == grpc.StatusCode.UNAUTHENTICATED
    wrong = connect(secured.address, tls_ca=cert[0], token="not-a-valid-token-at-all")
    assert code_of(lambda: wrong.GetServerInfo(pb.GetServerInfoRequest())) == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(secure_channel(secured.address, tls_ca=cert[0]))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_clients_cannot_reach_a_tls_server(secured):
    plain = connect(secured.address, token=ALICE)
    assert code_of(lambda: plain.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_reflection_can_be_switched_off(secured, cert):
    stub = reflection_pb2_grpc.ServerReflectionStub(secure_channel(secured.address, tls_ca=cert[0], token=ALICE))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    with pytest.raises(grpc.RpcError) as exc:
        list(responses)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_policy_service_behind_tls_and_a_token(make_engine, cert):
    security = TransportSecurity(tls_cert=cert[0], tls_key=cert[1], auth=BearerAuth({ALICE: "decoder"}))
    with BackgroundPolicyServer(security=security) as policy:
        anonymous = policy_pb2_grpc.PolicyStub(secure_channel(policy.address, tls_ca=cert[0]))
        assert code_of(lambda: anonymous.Describe(policy_pb2.DescribeRequest(policy="h2o"), timeout=10)) \
            == grpc.StatusCode.UNAUTHENTICATED
        remote = RemotePolicy(policy.address, tls_ca=cert[0], token=ALICE)
        try:
            assert remote.wait_until_available(10)
            engine = make_engine(prefill_chunk=64)
            engine.compressor.policy = remote
            [done] = engine.generate([GenerationRequest(
                "r", list(range(3, 103)), SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True),
                compression=CompressionConfig(policy="h2o", budget=40, interval=8, window=8))])
            assert done.usage.compression_events > 0 and done.usage.fallbacks == 0
        finally:
            remote.close()


def test_redis_credentials_never_reach_a_message():
    store = make_session_store("rediss://kvuser:s3cret-pass@127.0.0.1:1/0")  # TLS Redis, nothing listens there

    async def read():
        try:
            await store.get("x")
        finally:
            await store.close()

    from decoder_service.session_store import SessionStoreUnavailable

    with pytest.raises(SessionStoreUnavailable) as exc:
        asyncio.run(read())
    assert "s3cret-pass" not in str(exc.value) and "127.0.0.1:1" in str(exc.value)
