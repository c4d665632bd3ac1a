"""The policy service as a Ray Serve app on a real local Ray cluster: replicas share load, autoscaling up
does not break a session, and per-session decision state lands in Redis from whichever replica decided."""
from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from decoder_service.remote_policy import APP_METADATA, RemotePolicy
from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot_protocol.v1 import policy_pb2 as pb
from kvpilot_protocol.v1 import policy_pb2_grpc

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_policy(redis_url):
    from policy_service import ray_app

    prefix_port = free_port()
    config = ray_app.RayPolicyConfig(grpc_port=prefix_port, http_port=free_port(), redis_url=redis_url,
                                     min_replicas=1, max_replicas=2, initial_replicas=1,
                                     target_ongoing_requests=1.0, max_ongoing_requests=4,
                                     upscale_delay_s=1.0, downscale_delay_s=600.0, num_cpus=0.25)
    ray_app.start(config, num_cpus=4)
    yield f"127.0.0.1:{prefix_port}"
    ray_app.shutdown()


def decide_frame(stub, i: int, session: str) -> pb.Decision:
    return stub.DecideFrame(pb.StatsFrame(frame_id=i, session_id=session, policy="streaming_llm", n=400, keep=100,
                                          sinks=4, window=16, num_layers=2, num_kv_heads=2, num_heads=4),
                            metadata=APP_METADATA, timeout=60)


def running_replicas() -> int:
    from ray import serve

    from policy_service.ray_app import APP_NAME

    deployment = serve.status().applications[APP_NAME].deployments["Policy"]
    return deployment.replica_states.get("RUNNING", 0)


def test_scale_up_keeps_sessions_and_replicas_share_load(ray_policy, make_engine, redis_url):
    from policy_service.state import make_policy_state_store

    client = RemotePolicy(ray_policy, streams=2)
    assert client.wait_until_available(60), "decoder could not reach the Ray Serve gRPC proxy"
    engine = make_engine(prefill_chunk=64)
    engine.compressor.policy = client
    sid = f"ray-{uuid.uuid4().hex}"
    with BackgroundServer(engine) as decoder:
        stub = connect(decoder.address)

        def turn(tokens, new):
            req = build_request(token_ids=tokens, max_new_tokens=40, temperature=0.0, policy="h2o", budget=40,
                                interval=8, window=8, session_id=sid, new_session=new)
            req.compression.max_lag = 0  # wait for every decision: any failure would show as a fallback
            return list(stub.Generate(req, timeout=120))[-1].complete

        first = turn(list(range(3, 103)), True)
        assert first.usage.compression_events > 0 and first.usage.fallbacks == 0
        assert running_replicas() == 1
        # Load: many concurrent unary decisions push ongoing requests over the target -> a second replica.
        policy = policy_pb2_grpc.PolicyStub(grpc.insecure_channel(ray_policy))
        replicas: dict[str, int] = {}
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline and (running_replicas() < 2 or len(replicas) < 2):
                for d in pool.map(lambda i: decide_frame(policy, i, f"load-{i % 4}"), range(32)):
                    replicas[d.replica] = replicas.get(d.replica, 0) + 1
        assert running_replicas() == 2, "Serve did not scale up under load"
        assert len(replicas) >= 2 and min(replicas.values()) > 0, f"load not shared: {replicas}"
        # The session goes on after the scale-up; its decisions may come from either replica.
        second = turn(list(range(150, 200)), False)
        assert second.usage.compression_events > 0 and second.usage.fallbacks == 0
        assert second.usage.cached_tokens > 0
    client.close()

    async def check_state() -> None:
        store = make_policy_state_store(redis_url)
        try:
            state = await store.get_state(sid)
            assert state["frames"] == first.usage.compression_events + second.usage.compression_events
            log = await store.decision_log(sid, 1000)
            assert log and all(entry["policy"] == "h2o" and entry["replica"].startswith("ray-") for entry in log)
            await store.delete(sid)
        finally:
            await store.close()

    asyncio.run(check_state())


def test_health_describe_errors_and_status_through_the_serve_proxy(ray_policy):
    """grpc.health.v1 answers through Serve's proxy as on the plain server; a bad Describe is INVALID_ARGUMENT
    with the policy's message (not INTERNAL with a traceback); `kvpilot policy status` reads the app's state."""
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from policy_service.server import SERVICE_NAME

    channel = grpc.insecure_channel(ray_policy)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    policy = policy_pb2_grpc.PolicyStub(channel)
    assert "h2o" in [p.policy for p in policy.Describe(pb.DescribeRequest(), metadata=APP_METADATA, timeout=60).policies]
    with pytest.raises(grpc.RpcError) as info:
        policy.Describe(pb.DescribeRequest(policy="no_such_policy"), metadata=APP_METADATA, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_such_policy" in info.value.details() and "Traceback" not in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        policy.Describe(pb.DescribeRequest(policy="h2o", params={"no_such_param": "1"}), metadata=APP_METADATA, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_param" in info.value.details()

    out = subprocess.run([sys.executable, "-m", "kvpilot.cli", "policy", "status"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kvpilot-policy: RUNNING" in out.stdout and "deployment Policy: HEALTHY" in out.stdout, out.stdout
