"""`kvpilot up`: Redis-backed decoder + Ray-served policy service on this machine, in one command.

Uses the Redis at --redis-url when it answers, else starts a private redis-server (if the binary is
installed); starts `kvpilot policy serve --ray` as a child process and waits until it answers; then runs the
decoder in this process with --policy-url and --redis-url. Ctrl-C stops everything it started.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

import grpc

from kvpilot.runtime import add_runtime_arguments, build_engine, runtime_options


def add_arguments(p) -> None:
    add_runtime_arguments(p)
    p.set_defaults(policy_url=None, policy_streams=2)
    p.add_argument("--address", default="127.0.0.1:50051", help="decoder gRPC address")
    p.add_argument("--policy-address", default="127.0.0.1:50052", help="Ray Serve gRPC proxy address")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--persist-kv", action="store_true")
    p.set_defaults(func=run)


def redis_alive(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except Exception:
        return False


def ensure_redis(url: str) -> subprocess.Popen | None:
    if redis_alive(url):
        print(f"redis: using {url}")
        return None
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(f"redis at {url} does not answer and redis-server is not installed "
                         "(apt-get install redis-server, or pass --redis-url)")
    port = urlsplit(url).port or 6379
    workdir = tempfile.mkdtemp(prefix="kvpilot-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(100):
        if redis_alive(url):
            print(f"redis: started redis-server on port {port}")
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"redis-server did not start on port {port}")


def start_policy(args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvpilot.cli", "policy", "serve", "--ray", "--address", args.policy_address,
           "--redis-url", args.redis_url, "--min-replicas", str(args.min_replicas),
           "--max-replicas", str(args.max_replicas)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, env=env)
    from kvpilot_protocol.v1 import policy_pb2 as pb
    from kvpilot_protocol.v1 import policy_pb2_grpc
    from decoder_service.remote_policy import APP_METADATA

    stub = policy_pb2_grpc.PolicyStub(grpc.insecure_channel(args.policy_address))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the policy service exited during start-up")
        try:
            stub.Describe(pb.DescribeRequest(policy="full"), metadata=APP_METADATA, timeout=2)
            print(f"policy: Ray Serve app on {args.policy_address}")
            return proc
        except grpc.RpcError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit("the policy service did not answer within 180 s")


def run(args) -> int:
    from decoder_service.server import DecoderServer
    from decoder_service.session_store import make_session_store

    redis_proc = ensure_redis(args.redis_url)
    policy_proc = start_policy(args)
    args.policy_url = args.policy_address
    try:
        engine = build_engine(runtime_options(args))

        async def main() -> None:
            server = DecoderServer(engine, args.address, session_store=make_session_store(args.redis_url),
                                   persist_kv=args.persist_kv)
            await server.start()
            print(f"decoder: {server.address} (policy {args.policy_address}, sessions {args.redis_url})\n"
                  f"try: kvpilot generate \"Q: start k42 hops 4 .\" --url {server.address} --policy h2o --budget 64",
                  flush=True)
            await server.serve_forever()

        asyncio.run(main())
    finally:
        policy_proc.terminate()
        policy_proc.wait(timeout=60)
        if redis_proc is not None:
            redis_proc.terminate()
    return 0
