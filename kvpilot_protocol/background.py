"""Run an asyncio server on its own event-loop thread, for callers that are synchronous (the demo, tests,
benchmarks, `kvpilot up`)."""
from __future__ import annotations

import asyncio
import threading


class BackgroundServer:
    """`server` has `async start()`, `async stop(grace)` and an `address`; it runs on a private loop."""

    def __init__(self, server, name: str = "kvpilot-server", grace_s: float = 0.5):
        self.server = server
        self.grace_s = grace_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(self.grace_s), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def start_grpc_server(server, address: str, service_name: str, security=None):
    """Add the standard grpc.health.v1 service and (unless `security.reflection` is off) server reflection,
    bind `address` (port 0 = any free port; TLS when `security` has a certificate), start, and report
    SERVING. Returns (bound address, health servicer)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from kvpilot_protocol.security import bind

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if security is None or security.reflection:
        reflection.enable_server_reflection(
            (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = bind(server, address, security)
    await server.start()
    for service in ("", service_name):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return f"{address.rsplit(':', 1)[0]}:{port}", servicer
