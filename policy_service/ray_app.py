"""The policy service as a Ray Serve application behind Serve's gRPC proxy, with autoscaling.

Each replica wraps the same PolicyCore as the plain server. Replicas keep no session state of their own
(frames are self-contained; the decision log and counters go to Redis), so Serve may route any frame of any
session to any replica and scale the deployment up and down freely. Defaults suit a laptop or CI box
(fractional CPUs per replica; see ecosystem.md's notes on Ray Serve on 2 cores).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve.grpc_util import gRPCInputStream

from kvpilot_protocol.v1 import policy_pb2 as pb
from policy_service.server import PolicyCore

log = logging.getLogger(__name__)
APP_NAME = "kvpilot-policy"
SERVICER_FUNCTIONS = ["kvpilot_protocol.v1.policy_pb2_grpc.add_PolicyServicer_to_server"]


@dataclass
class RayPolicyConfig:
    grpc_port: int = 50052
    http_port: int = 8052
    redis_url: str | None = None
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8  # keep well above the target or Serve never scales up
    num_cpus: float = 0.25  # per replica: fractional so controller + proxy + replicas fit on 2 cores
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0


@serve.deployment(name="Policy")
class PolicyDeployment:
    def __init__(self, redis_url: str | None = None):
        from kvpilot_protocol.telemetry import setup_telemetry

        setup_telemetry("kvpilot-policy")  # replicas export their own `decide` spans when OTEL_* asks
        state = None
        if redis_url:
            from policy_service.state import make_policy_state_store

            state = make_policy_state_store(redis_url)
        replica = serve.get_replica_context().replica_id.unique_id
        self.core = PolicyCore(state, replica=f"ray-{replica}")

    async def Decide(self, request_stream: gRPCInputStream):
        async for frame in request_stream:
            yield await self.core.decide(frame)

    async def DecideFrame(self, request: pb.StatsFrame) -> pb.Decision:
        return await self.core.decide(request)

    async def Describe(self, request: pb.DescribeRequest) -> pb.DescribeResponse:
        return self.core.describe(request)


def build_app(config: RayPolicyConfig | dict):
    """The Serve application. A Serve config file (KubeRay's RayService) passes its `args:` as a dict."""
    if isinstance(config, dict):
        config = RayPolicyConfig(**config)
    autoscaling = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": 12.0,  # must exceed the (deprecated, fixed 10 s) metrics interval
    }
    if config.initial_replicas is not None:
        autoscaling["initial_replicas"] = config.initial_replicas
    return PolicyDeployment.options(
        autoscaling_config=autoscaling,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus},
    ).bind(config.redis_url)


def start(config: RayPolicyConfig, ray_address: str | None = None, num_cpus: int = 4) -> None:
    """Start (or join) a Ray cluster, the Serve gRPC proxy on `grpc_port`, and the policy application."""
    import ray
    from ray.serve.config import gRPCOptions, HTTPOptions

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, namespace="kvpilot", log_to_driver=False)
        else:
            # Logical CPUs may exceed physical ones: Serve's controller and proxy need a slot each.
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="kvpilot", log_to_driver=False,
                     object_store_memory=128 << 20)
    serve.start(
        http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    # A route prefix registers the ingress endpoint that the gRPC proxy routes by (no HTTP app is served).
    serve.run(build_app(config), name=APP_NAME, route_prefix=f"/{APP_NAME}")


def replica_count() -> int:
    status = serve.status().applications[APP_NAME].deployments["Policy"]
    return sum(status.replica_states.values()) if hasattr(status, "replica_states") else 0


def shutdown() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
