"""`kvpilot policy serve [--ray]` and `kvpilot policy describe`."""
from __future__ import annotations

import asyncio
import signal
import time


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="policy_command", required=True)
    p = sub.add_parser("serve", help="run the policy service (plain gRPC, or a Ray Serve app with --ray)")
    p.add_argument("--address", default="127.0.0.1:50052", help="host:port of the gRPC endpoint")
    p.add_argument("--redis-url", help="per-session decision log and counters in Redis (stateless replicas)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus /metrics on this port (decisions by policy and outcome, decide seconds)")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment with autoscaling")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--initial-replicas", type=int)
    p.add_argument("--target-ongoing-requests", type=float, default=2.0)
    p.add_argument("--replica-cpus", type=float, default=0.25)
    from kvpilot_protocol.security import add_server_arguments

    add_server_arguments(p)  # plain gRPC only: Ray Serve's gRPC proxy is secured by the cluster's own config
    p.set_defaults(func=serve_cmd)
    p = sub.add_parser("status", help="the Ray Serve policy application's state and replicas (`serve status` without "
                       "Ray's dashboard)")
    p.add_argument("--ray-address", default="auto",
                   help="the Ray cluster (default: the local one `kvpilot policy serve --ray` started, or RAY_ADDRESS)")
    p.set_defaults(func=status_cmd)
    p = sub.add_parser("describe", help="what each policy needs from the decoder and its parameters")
    p.add_argument("name", nargs="?", default="")
    p.set_defaults(func=describe_cmd)


def serve_cmd(args) -> int:
    from kvpilot_protocol.telemetry import setup_telemetry

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"error: --metrics-port must be in [0, 65535] (got {args.metrics_port})")
    if args.metrics_port is not None and args.ray:
        raise SystemExit("error: --metrics-port serves this process's metrics; Ray Serve replicas run in their own "
                         "processes: read them through Ray's metrics export (or OTLP with OTEL_EXPORTER_OTLP_ENDPOINT)")
    setup_telemetry("kvpilot-policy", prometheus=args.metrics_port is not None)
    host, _, port = args.address.rpartition(":")
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        # The OTel Prometheus reader registered itself in prometheus_client's default registry.
        start_http_server(args.metrics_port, addr=host or "127.0.0.1")
        print(f"policy metrics on http://{host or '127.0.0.1'}:{args.metrics_port}/metrics", flush=True)
    from kvpilot_protocol.security import server_security

    try:
        security = server_security(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.ray:
        if security is not None:
            raise SystemExit("error: --tls-cert/--auth-token-file/--no-reflection apply to the plain gRPC server; "
                             "secure a Ray Serve gRPC proxy through the cluster's configuration")
        from policy_service import ray_app

        if host not in ray_app.WILDCARD_HOSTS:
            print(f"note: Ray Serve's gRPC proxy binds every interface on port {port}, not only {host}; the HTTP "
                  f"proxy binds {host}. Restrict the port with the network, or serve without --ray.", flush=True)
        config = ray_app.RayPolicyConfig(grpc_port=int(port), host=host, redis_url=args.redis_url,
                                         min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                         initial_replicas=args.initial_replicas,
                                         target_ongoing_requests=args.target_ongoing_requests,
                                         num_cpus=args.replica_cpus)
        ray_app.start(config, ray_address=args.ray_address, num_cpus=args.ray_cpus)
        print(f"kvpilot policy service (Ray Serve, {args.min_replicas}-{args.max_replicas} replicas) on port {port}",
              flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        ray_app.shutdown()
        return 0

    from policy_service.server import PolicyServer

    async def main() -> None:
        state = None
        if args.redis_url:
            from policy_service.state import make_policy_state_store

            state = make_policy_state_store(args.redis_url)
        server = PolicyServer(args.address, state=state, security=security)
        await server.start()
        print(f"kvpilot policy service on {server.address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(main())
    return 0


def status_cmd(args) -> int:
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from policy_service import ray_app

    try:
        ray.init(address=args.ray_address, namespace="kvpilot", log_to_driver=False, logging_level="ERROR")
    except ConnectionError as exc:
        raise SystemExit(f"error: no Ray cluster at {args.ray_address!r} ({exc}); start one with "
                         "`kvpilot policy serve --ray`, or pass --ray-address") from None
    try:
        lines = ray_app.status_lines()
    finally:
        ray.shutdown()
    print("\n".join(lines))
    return 0 if not lines[0].startswith("no ") else 1


def describe_cmd(args) -> int:
    from kvpilot_protocol.v1 import policy_pb2 as pb
    from policy_service.server import PolicyCore

    for d in PolicyCore().describe(pb.DescribeRequest(policy=args.name)).policies:
        params = ", ".join(f"{p.name}={p.default}" for p in d.parameters) or "none"
        print(f"{d.policy}: {d.summary}\n  statistics: {', '.join(d.statistics) or 'none'}"
              f"{f' (last {d.window_queries} queries)' if d.window_queries else ''}\n  parameters: {params}")
    return 0
