"""kvpilot_protocol.security against real grpc.aio servers on 127.0.0.1: token parsing, bearer auth on every call kind,
TLS with a self-signed certificate, and the sync and aio clients of secure_channel."""
from __future__ import annotations

import asyncio
import collections
import os
import stat

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvpilot_protocol import security
from kvpilot_protocol.security import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    BearerAuth,
    BearerAuthInterceptor,
    TransportSecurity,
    bind,
    load_client_token,
    load_server_tokens,
    make_self_signed_cert,
    secure_channel,
    server_credentials,
    server_interceptors,
)

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
DEFAULT = "default-token-0123456789ab"
TOKENS = {ALICE: "alice", BOB: "bob"}
TIMEOUT = 5.0


# ---- token loading -------------------------------------------------------------------------------------------

def test_token_file_format(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# who may call\n\n  alice:{ALICE}  \nbob : {BOB}\n{DEFAULT}\nsvc.x@corp-1:{'t#' * 8}\n")
    assert load_server_tokens(str(path), env={"KVPILOT_AUTH_TOKENS": f"other:{'z' * 16}"}) == {
        ALICE: "alice", BOB: "bob", DEFAULT: "default", "t#" * 8: "svc.x@corp-1"}


def test_token_env_splits_newlines_and_commas():
    env = {"KVPILOT_AUTH_TOKENS": f"# comment, with a comma\nalice:{ALICE}, bob:{BOB},\n{DEFAULT}"}
    assert load_server_tokens(env=env) == {ALICE: "alice", BOB: "bob", DEFAULT: "default"}


def test_no_token_source_means_auth_off():
    assert load_server_tokens(env={}) is None
    assert load_client_token(env={}) is None


@pytest.mark.parametrize("text, message", [
    (f"alice:{ALICE}\nbob:\n", "entry 2: empty token for principal 'bob'"),
    (f"alice:{ALICE}\nbob:{ALICE}\n", "entry 2 repeats the token of .* entry 1"),
    (f"al ice:{ALICE}\n", "entry 1: the principal before ':' must be"),
    (f"alice/x:{ALICE}\n", "entry 1: the principal before ':' must be"),
    (f":{ALICE}\n", "entry 1: the principal before ':' must be"),
    ("alice:short-token\n", f"shorter than {security.MIN_TOKEN_LENGTH} characters"),
    (f"alice:{ALICE} {BOB}\n", "has spaces or non-ASCII characters"),
    ("# only a comment\n\n", "holds no tokens"),
])
def test_token_file_errors_say_what_to_fix_without_the_token(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_server_tokens(str(path))
    for token in (ALICE, BOB, "short-token"):
        assert token not in str(err.value)


def test_token_env_errors():
    with pytest.raises(ValueError, match="KVPILOT_AUTH_TOKENS entry 2 repeats"):
        load_server_tokens(env={"KVPILOT_AUTH_TOKENS": f"{ALICE},bob:{ALICE}"})
    with pytest.raises(ValueError, match="KVPILOT_AUTH_TOKENS holds no tokens.*unset it"):
        load_server_tokens(env={"KVPILOT_AUTH_TOKENS": " , "})


def test_missing_or_unreadable_token_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_server_tokens(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot read auth token file"):
        load_server_tokens(str(tmp_path))  # a directory
    with pytest.raises(ValueError, match="does not exist"):
        load_client_token(str(tmp_path / "nope"))


def test_client_token(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"# mine\n\nalice:{ALICE}\nbob:{BOB}\n")
    assert load_client_token(str(path), env={"KVPILOT_AUTH_TOKEN": BOB}) == ALICE
    path.write_text(f"{DEFAULT}\n")
    assert load_client_token(str(path)) == DEFAULT
    assert load_client_token(env={"KVPILOT_AUTH_TOKEN": f" {BOB}\n"}) == BOB
    assert load_client_token(env_var="POLICY_TOKEN", env={"POLICY_TOKEN": f"bob:{BOB}"}) == BOB
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        load_client_token(str(path))


def test_bearer_auth_principal():
    auth = BearerAuth(TOKENS)
    assert auth.principal([("authorization", f"Bearer {BOB}")]) == "bob"
    assert auth.principal((("x-other", "1"), ("authorization", f"bearer   {ALICE} "))) == "alice"
    assert auth.principal([("authorization", f"Bearer {ALICE}x")]) is None
    assert auth.principal([("authorization", f"Basic {ALICE}")]) is None
    assert auth.principal([]) is None and auth.principal(None) is None
    assert ALICE not in repr(auth)
    with pytest.raises(ValueError):
        BearerAuth({})


# ---- a tiny service on a real server -------------------------------------------------------------------------

def _echo_handler(auth: BearerAuth | None) -> grpc.GenericRpcHandler:
    def who(context) -> bytes:
        return (auth.principal_of(context) if auth else "anonymous").encode()

    async def unary(request: bytes, context) -> bytes:
        return who(context) + b":" + request

    async def stream(request: bytes, context):
        yield who(context)
        for part in request.split(b","):
            yield part

    async def collect(requests, context) -> bytes:
        return who(context) + b":" + b"".join([r async for r in requests])

    async def chat(requests, context):
        async for request in requests:
            yield who(context) + b":" + request

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


@pytest.fixture
async def serve():
    """serve(security, interceptors=None) -> "127.0.0.1:port" of a started echo + health server."""
    servers = []

    async def start(sec: TransportSecurity | None, interceptors=None) -> str:
        server = grpc.aio.server(interceptors=server_interceptors(sec) if interceptors is None else interceptors)
        server.add_generic_rpc_handlers((_echo_handler(sec.auth if sec else None),))
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = bind(server, "127.0.0.1:0", sec)
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


async def _all_kinds_aio(channel: grpc.aio.Channel) -> list:
    """One call of each kind; returns their results."""
    unary = await channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=TIMEOUT)
    stream = [r async for r in channel.unary_stream("/test.Echo/Stream")(b"a,b", timeout=TIMEOUT)]
    collect = await channel.stream_unary("/test.Echo/Collect")(iter([b"x", b"y"]), timeout=TIMEOUT)
    chat = [r async for r in channel.stream_stream("/test.Echo/Chat")(iter([b"1", b"2"]), timeout=TIMEOUT)]
    return [unary, stream, collect, chat]


def _all_kinds_sync(channel: grpc.Channel) -> list:
    return [channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=TIMEOUT),
            list(channel.unary_stream("/test.Echo/Stream")(b"a,b", timeout=TIMEOUT)),
            channel.stream_unary("/test.Echo/Collect")(iter([b"x", b"y"]), timeout=TIMEOUT),
            list(channel.stream_stream("/test.Echo/Chat")(iter([b"1", b"2"]), timeout=TIMEOUT))]


def _expected(principal: str) -> list:
    p = principal.encode()
    return [p + b":hi", [p, b"a", b"b"], p + b":xy", [p + b":1", p + b":2"]]


CALLS = {
    "unary": lambda ch, md: ch.unary_unary("/test.Echo/Unary")(b"hi", metadata=md, timeout=TIMEOUT),
    "unary-stream": lambda ch, md: ch.unary_stream("/test.Echo/Stream")(b"a", metadata=md, timeout=TIMEOUT),
    "stream-unary": lambda ch, md: ch.stream_unary("/test.Echo/Collect")(iter([b"x"]), metadata=md, timeout=TIMEOUT),
    "stream-stream": lambda ch, md: ch.stream_stream("/test.Echo/Chat")(iter([b"x"]), metadata=md, timeout=TIMEOUT),
}


async def _status(call) -> grpc.aio.AioRpcError:
    """Run an aio call of any kind to its end, expecting it to fail."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return err.value


# ---- bearer auth over plaintext ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("metadata, message", [
    (None, MISSING_TOKEN),
    ((("authorization", f"Basic {ALICE}"),), MISSING_TOKEN),
    ((("authorization", "Bearer not-a-known-token-at-all"),), INVALID_TOKEN),
])
async def test_calls_without_a_valid_token_are_unauthenticated(serve, kind, metadata, message):
    address = await serve(TransportSecurity(auth=BearerAuth(TOKENS)))
    async with grpc.aio.insecure_channel(address) as channel:
        err = await _status(CALLS[kind](channel, metadata))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == message


async def test_valid_token_reaches_every_call_kind_with_its_principal(serve):
    address = await serve(TransportSecurity(auth=BearerAuth(TOKENS)))
    async with grpc.aio.insecure_channel(address) as channel:
        for token, principal in TOKENS.items():
            md = (("authorization", f"Bearer {token}"),)
            assert await CALLS["unary"](channel, md) == principal.encode() + b":hi"
            assert [r async for r in CALLS["unary-stream"](channel, md)] == [principal.encode(), b"a"]
            assert await CALLS["stream-unary"](channel, md) == principal.encode() + b":x"
            assert [r async for r in CALLS["stream-stream"](channel, md)] == [principal.encode() + b":x"]


async def test_health_check_is_exempt_unless_configured_otherwise(serve):
    auth = BearerAuth(TOKENS)
    exempt = await serve(TransportSecurity(auth=auth))
    strict = await serve(TransportSecurity(auth=auth), interceptors=[BearerAuthInterceptor(auth, exempt=())])
    async with grpc.aio.insecure_channel(exempt) as a, grpc.aio.insecure_channel(strict) as b:
        reply = await health_pb2_grpc.HealthStub(a).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        err = await _status(health_pb2_grpc.HealthStub(b).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # An exempt health service does not open the other methods.
        assert (await _status(CALLS["unary"](a, None))).code() == grpc.StatusCode.UNAUTHENTICATED


class _CallDetails(collections.namedtuple("_CallDetails", "method invocation_metadata"), grpc.HandlerCallDetails):
    pass


BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


@pytest.mark.parametrize("kind", BEHAVIORS)
async def test_rejecting_handler_mirrors_the_real_handler(kind):
    # On the wire an abort looks the same whatever the handler kind, so the handler itself is checked.
    real = getattr(grpc, f"{kind}_rpc_method_handler")(
        lambda *_: None, request_deserializer=bytes.upper, response_serializer=bytes.lower)

    async def continuation(details):
        return real

    interceptor = BearerAuthInterceptor(BearerAuth(TOKENS))
    reject = await interceptor.intercept_service(continuation, _CallDetails("/test.Echo/X", ()))
    assert reject is not real
    assert [name for name in BEHAVIORS if getattr(reject, name) is not None] == [kind]
    assert (reject.request_streaming, reject.response_streaming) == (real.request_streaming, real.response_streaming)
    assert (reject.request_deserializer, reject.response_serializer) == (bytes.upper, bytes.lower)
    valid = _CallDetails("/test.Echo/X", (("authorization", f"Bearer {ALICE}"),))
    assert await interceptor.intercept_service(continuation, valid) is real


async def test_unknown_method_stays_unimplemented(serve):
    address = await serve(TransportSecurity(auth=BearerAuth(TOKENS)))
    async with grpc.aio.insecure_channel(address) as channel:
        err = await _status(channel.unary_unary("/test.Echo/Nope")(b"", timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_no_security_serves_everyone(serve):
    address = await serve(None)
    async with secure_channel(address, aio=True) as channel:
        assert await _all_kinds_aio(channel) == _expected("anonymous")


async def test_secure_channel_token_over_plaintext_aio_and_sync(serve):
    address = await serve(TransportSecurity(auth=BearerAuth(TOKENS)))
    async with secure_channel(address, token=ALICE, aio=True) as channel:
        assert await _all_kinds_aio(channel) == _expected("alice")

    def sync_calls() -> list:
        with secure_channel(address, token=BOB) as channel:
            return _all_kinds_sync(channel)
    assert await asyncio.to_thread(sync_calls) == _expected("bob")


# ---- TLS -----------------------------------------------------------------------------------------------------

def test_self_signed_cert(cert):
    from cryptography import x509
    cert_file, key_file = cert
    parsed = x509.load_pem_x509_certificate(open(cert_file, "rb").read())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_tls_configuration_errors(tmp_path, cert):
    with pytest.raises(ValueError, match="both a certificate file and a key file"):
        TransportSecurity(tls_cert=cert[0])
    with pytest.raises(ValueError, match="TLS key file .* does not exist"):
        server_credentials(cert[0], str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="TLS certificate file .* is not a PEM file"):
        server_credentials(str(tmp_path / "junk.pem"), cert[1])
    with pytest.raises(ValueError, match="TLS CA file .* does not exist"):
        secure_channel("127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem"))


async def test_tls_client_trusting_the_cert_works_and_plaintext_fails(serve, cert):
    address = await serve(TransportSecurity(tls_cert=cert[0], tls_key=cert[1]))
    async with secure_channel(address, tls_ca=cert[0], aio=True) as channel:
        assert await _all_kinds_aio(channel) == _expected("anonymous")
    async with grpc.aio.insecure_channel(address) as channel:
        assert (await _status(CALLS["unary"](channel, None))).code() == grpc.StatusCode.UNAVAILABLE
    # The system roots do not include a self-signed certificate.
    async with secure_channel(address, tls_ca="system", aio=True) as channel:
        assert (await _status(CALLS["unary"](channel, None))).code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_with_token_aio_and_sync(serve, cert):
    address = await serve(TransportSecurity(tls_cert=cert[0], tls_key=cert[1], auth=BearerAuth(TOKENS)))
    async with secure_channel(address, tls_ca=cert[0], token=ALICE, aio=True) as channel:
        assert await _all_kinds_aio(channel) == _expected("alice")
    async with secure_channel(address, tls_ca=cert[0], aio=True) as channel:
        err = await _status(CALLS["stream-stream"](channel, None))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)

    def sync_calls() -> list:
        with secure_channel(address, tls_ca=cert[0], token=BOB) as channel:
            return _all_kinds_sync(channel)
    assert await asyncio.to_thread(sync_calls) == _expected("bob")
