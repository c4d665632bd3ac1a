"""The policy service as a Ray Serve application behind Serve's gRPC proxy, with autoscaling.

Each replica wraps the same PolicyCore as the plain server. Replicas keep no session state of their own
(frames are self-contained; the decision log and counters go to Redis), so Serve may route any frame of any
session to any replica and scale the deployment up and down freely. Defaults suit a laptop or CI box
(fractional CPUs per replica; see ecosystem.md's notes on Ray Serve on 2 cores).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from kvpilot_protocol.v1 import policy_pb2 as pb
from policy_service.server import SERVICE_NAME, PolicyCore

log = logging.getLogger(__name__)
APP_NAME = "kvpilot-policy"
# The proxy routes each method by name to the deployment: the policy service, and grpc.health.v1 answered by a replica
# (a replica answering is the application serving), so load balancers and `grpc_health_probe` work as on the plain server.
SERVICER_FUNCTIONS = ["kvpilot_protocol.v1.policy_pb2_grpc.add_PolicyServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class RayPolicyConfig:
    grpc_port: int = 50052
    http_port: int = 8052
    host: str = "127.0.0.1"  # Serve's HTTP proxy binds it; its gRPC proxy binds every interface (see start)
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

    async def Describe(self, request: pb.DescribeRequest, grpc_context: RayServegRPCContext) -> pb.DescribeResponse:
        try:
            return self.core.describe(request)
        except (KeyError, ValueError) as exc:  # an unknown policy or bad parameters: the caller's to fix
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(exc).strip('"'))
            return pb.DescribeResponse()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        # One answer, then the stream ends: a stream held open would count as an ongoing request forever and
        # skew autoscaling. Watchers re-subscribe; Check is what probes use.
        yield await self.Check(request, grpc_context)


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
    """Start (or join) a Ray cluster, the Serve gRPC proxy on `grpc_port`, and the policy application.

    Ray Serve (2.60) binds its gRPC proxy to every interface ([::]:grpc_port, fixed in ray.serve._private.grpc_util);
    `config.host` binds the HTTP proxy. Restrict the gRPC port with the network (firewall, Kubernetes
    NetworkPolicy), or run the plain `kvpilot policy serve` where one host's address must be the only one."""
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
        http_options=HTTPOptions(host=config.host or "0.0.0.0", port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    # A route prefix registers the ingress endpoint that the gRPC proxy routes by (no HTTP app is served).
    serve.run(build_app(config), name=APP_NAME, route_prefix=f"/{APP_NAME}")


def status_lines(app: str = APP_NAME) -> list[str]:
    """The application's and each deployment's state and replica counts, from the connected Ray cluster."""
    status = serve.status()
    found = status.applications.get(app)
    if found is None:
        return [f"no {app!r} application on this Ray cluster (applications: {sorted(status.applications) or 'none'})"]
    value = lambda state: getattr(state, "value", state)  # noqa: E731  (Serve's status enums print as Class.NAME)
    lines = [f"{app}: {value(found.status)}" + (f" ({found.message})" if found.message else "")]
    for name, deployment in found.deployments.items():
        replicas = ", ".join(f"{value(state)} {n}" for state, n in sorted(deployment.replica_states.items())) or "none"
        lines.append(f"  deployment {name}: {value(deployment.status)}, replicas: {replicas}")
    return lines


def replica_count() -> int:
    status = serve.status().applications[APP_NAME].deployments["Policy"]
    return sum(status.replica_states.values()) if hasattr(status, "replica_states") else 0


def shutdown() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
