"""Transport security for the decoder and policy gRPC servers and their clients: bearer-token auth and TLS.

Tokens map to principals (who a caller is; sessions are owned by principals). They come from a file or an
environment variable, never from the command line (argv is visible to every local user), and are never
logged or put in error messages.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVER_TOKENS_ENV = "KVPILOT_AUTH_TOKENS"
CLIENT_TOKEN_ENV = "KVPILOT_AUTH_TOKEN"
DEFAULT_PRINCIPAL = "default"
MIN_TOKEN_LENGTH = 16
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MISSING_TOKEN = "missing bearer token: send metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"

_PRINCIPAL = re.compile(r"[A-Za-z0-9_.@-]+")
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII without spaces: what a gRPC metadata value can carry intact
_GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


# ---- token loading -------------------------------------------------------------------------------------------

def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _entries(text: str, source: str, split_commas: bool) -> Iterator[tuple[str, str]]:
    """(location for error messages, entry) for each non-blank, non-comment entry."""
    n = 0
    for line in text.splitlines():
        # Comments are whole lines, so a '#' inside a token stays part of it.
        if line.strip().startswith("#"):
            continue
        for entry in line.split(",") if split_commas else [line]:
            if entry.strip():
                n += 1
                yield f"{source} entry {n}", entry.strip()


def _parse_entry(entry: str, location: str) -> tuple[str, str]:
    """`principal:token` or a bare `token` -> (principal, token)."""
    principal, sep, token = entry.partition(":")
    principal, token = (principal.strip(), token.strip()) if sep else (DEFAULT_PRINCIPAL, entry)
    # The principal is not echoed: with a misplaced ':' it may be the first part of a token.
    if not _PRINCIPAL.fullmatch(principal):
        raise ValueError(f"{location}: the principal before ':' must be one or more of A-Z a-z 0-9 _ . @ -")
    if not token:
        raise ValueError(f"{location}: empty token for principal {principal!r}; write `principal:token`")
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{location}: the token of principal {principal!r} has spaces or non-ASCII characters")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{location}: the token of principal {principal!r} is shorter than {MIN_TOKEN_LENGTH} "
                         f"characters; generate one with {_GENERATE_HINT}")
    return principal, token


def load_server_tokens(path: str | None = None, env: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """token -> principal, from the file at `path`, else $KVPILOT_AUTH_TOKENS, else None (auth off).

    One entry per line (in the environment variable, commas separate entries too): `principal:token`, or a
    bare `token` for the principal "default". Blank lines and lines starting with '#' are ignored.
    """
    if path is not None:
        text, source, split_commas = _read_text(path, "auth token file"), str(path), False
    elif SERVER_TOKENS_ENV in env:
        text, source, split_commas = env[SERVER_TOKENS_ENV], SERVER_TOKENS_ENV, True
    else:
        return None
    tokens: dict[str, str] = {}
    seen_at: dict[str, str] = {}
    for location, entry in _entries(text, source, split_commas):
        principal, token = _parse_entry(entry, location)
        if token in tokens:
            raise ValueError(f"{location} repeats the token of {seen_at[token]}; every token must be unique")
        tokens[token], seen_at[token] = principal, location
    if not tokens:
        # Set but empty must not silently mean "auth off".
        raise ValueError(f"{source} holds no tokens; add `principal:token` entries, "
                         f"or {'drop the file option' if path is not None else 'unset it'} to turn auth off")
    return tokens


def load_client_token(path: str | None = None, env_var: str = CLIENT_TOKEN_ENV,
                      env: Mapping[str, str] = os.environ) -> str | None:
    """One bearer token: the first entry of the file at `path` (same format as the server's, so a server's
    token file works), else $`env_var`, else None."""
    if path is not None:
        for location, entry in _entries(_read_text(path, "auth token file"), str(path), split_commas=False):
            return _parse_entry(entry, location)[1]
        raise ValueError(f"auth token file {path} holds no token")
    value = env.get(env_var, "").strip()
    return _parse_entry(value, env_var)[1] if value else None


# ---- server side: authentication -----------------------------------------------------------------------------

def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class BearerAuth:
    """Maps the bearer token a call carries to its principal."""

    def __init__(self, tokens: Mapping[str, str]):
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        # Compare fixed-length digests: compare_digest on the raw strings would reveal a token's length.
        self._digests = [(hashlib.sha256(t.encode()).digest(), p) for t, p in tokens.items()]

    def __repr__(self) -> str:
        return f"BearerAuth({len(self._digests)} tokens)"

    def _lookup(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._digests:  # every token, no early exit: time does not tell which matched
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    def principal(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The principal of the call's bearer token, or None when it is missing or unknown."""
        token = _bearer_token(metadata)
        return None if token is None else self._lookup(token)

    def principal_of(self, context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
        return self.principal(context.invocation_metadata())


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and (de)serializers that fails the call with UNAUTHENTICATED."""
    async def reject(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(reject, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Fails every call to a non-exempt method that lacks a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, auth: BearerAuth, exempt: Iterable[str] = HEALTH_METHODS):
        self.auth = auth
        self.exempt = frozenset(exempt)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        # An unknown method (None) stays UNIMPLEMENTED: there is no handler kind to mirror.
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        metadata = handler_call_details.invocation_metadata
        if _bearer_token(metadata) is None:
            return _rejecting_handler(handler, MISSING_TOKEN)
        if self.auth.principal(metadata) is None:
            return _rejecting_handler(handler, INVALID_TOKEN)
        return handler


# ---- TLS and server wiring -----------------------------------------------------------------------------------

def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read_pem(key_file, "TLS key file"),
                                         _read_pem(cert_file, "TLS certificate file"))])


def channel_credentials(ca_file: str | None) -> grpc.ChannelCredentials:
    """SSL credentials trusting `ca_file`'s certificates, or the system roots when it is None."""
    return grpc.ssl_channel_credentials(None if ca_file is None else _read_pem(ca_file, "TLS CA file"))


@dataclass
class TransportSecurity:
    """How a server is exposed: TLS when both cert and key are set, bearer auth when `auth` is set, and
    whether to serve reflection (which needs a token too when auth is on)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    auth: BearerAuth | None = None
    reflection: bool = True

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate file and a key file (or neither for plaintext)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def bind(server: grpc.Server | grpc.aio.Server, address: str, security: TransportSecurity | None) -> int:
    """Add a TLS port when `security` has a certificate, else a plaintext one; returns the bound port."""
    if security is not None and security.tls:
        port = server.add_secure_port(address, server_credentials(security.tls_cert, security.tls_key))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return port


def server_interceptors(security: TransportSecurity | None) -> list[grpc.aio.ServerInterceptor]:
    return [BearerAuthInterceptor(security.auth)] if security is not None and security.auth is not None else []


# ---- client side ---------------------------------------------------------------------------------------------

class _SyncCallDetails(
        collections.namedtuple(
            "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _SyncBearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _intercept(self, continuation, details: grpc.ClientCallDetails, request_or_iterator):
        return continuation(_SyncCallDetails(details.method, details.timeout,
                                             (*(details.metadata or ()), self._entry), details.credentials,
                                             details.wait_for_ready, details.compression), request_or_iterator)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


class _AioBearer:
    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    async def _intercept(self, continuation, details: grpc.aio.ClientCallDetails, request_or_iterator):
        metadata = grpc.aio.Metadata.from_tuple((*(details.metadata or ()), self._entry))
        return await continuation(grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                                             details.credentials, details.wait_for_ready),
                                  request_or_iterator)


# grpc.aio files each interceptor under the first call kind it matches, so each kind needs its own class.
class _AioUnaryUnary(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioBearer._intercept


class _AioUnaryStream(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioBearer._intercept


class _AioStreamUnary(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioBearer._intercept


class _AioStreamStream(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioBearer._intercept


def secure_channel(address: str, *, tls_ca: str | None = None, token: str | None = None,
                   options: Sequence[tuple[str, Any]] = (), aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `address`: TLS trusting `tls_ca` ("system": the default roots) when it is set, and
    `authorization: Bearer <token>` on every call when `token` is set.

    Over TLS the token travels as call credentials (gRPC's access-token credentials, composed with the SSL
    ones). gRPC refuses call credentials on plaintext channels, so without TLS client interceptors add the
    metadata instead; the token is then readable by anyone on the network path.
    """
    options = list(options)
    if tls_ca:
        credentials = channel_credentials(None if tls_ca == "system" else tls_ca)
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return (grpc.aio.secure_channel if aio else grpc.secure_channel)(address, credentials, options=options)
    if aio:
        interceptors = ([cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
                        if token else None)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _SyncBearerInterceptor(token)) if token else channel


# ---- command-line wiring (decoder and policy servers, their clients) ---------------------------------------

def add_server_arguments(parser) -> None:
    parser.add_argument("--tls-cert", help="PEM certificate: serve TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--auth-token-file", help="bearer tokens, one 'principal:token' per line (or set "
                        f"${SERVER_TOKENS_ENV}); health checks need none")
    parser.add_argument("--no-reflection", action="store_true", help="do not serve gRPC server reflection")


def server_security(args) -> TransportSecurity | None:
    """TransportSecurity from add_server_arguments' flags (None: plaintext, no auth, reflection on)."""
    tokens = load_server_tokens(args.auth_token_file)
    security = TransportSecurity(tls_cert=args.tls_cert, tls_key=args.tls_key,
                                 auth=BearerAuth(tokens) if tokens else None, reflection=not args.no_reflection)
    if not security.tls and security.auth is None and security.reflection:
        return None
    return security


def add_client_arguments(parser, prefix: str = "", env_var: str = CLIENT_TOKEN_ENV) -> None:
    """--[prefix]tls-ca and --[prefix]auth-token-file (the token itself: a file or the environment)."""
    dest = prefix.replace("-", "_")
    parser.add_argument(f"--{prefix}tls-ca", dest=f"{dest}tls_ca",
                        help="PEM CA to trust: connect with TLS ('system' for the default roots)")
    parser.add_argument(f"--{prefix}auth-token-file", dest=f"{dest}auth_token_file",
                        help=f"file holding the bearer token to send (or set ${env_var})")


# ---- test helper ---------------------------------------------------------------------------------------------

def make_self_signed_cert(directory: str | os.PathLike, hostname: str = "localhost") -> tuple[str, str]:
    """Write cert.pem/key.pem into `directory`: a self-signed certificate (its own CA, so clients can trust
    it directly) for `hostname`, DNS localhost and IP 127.0.0.1. Returns (cert path, key path)."""
    # Imported here: `cryptography` is only needed by tests and benchmarks, not by the servers.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def san(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([san(n) for n in dict.fromkeys((hostname, "localhost",
                                                                                       "127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Owner-only from creation: the key is never readable by others, even briefly.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return str(cert_path), str(key_path)
