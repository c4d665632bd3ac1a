"""The policy service: scores statistics frames and answers with plans (plain grpc.aio; Ray Serve in ray_app.py).

Stateless by design: a frame names its policy, parameters and seed, so any replica can decide it. Per-session
bookkeeping (the decision log, counters) goes to a PolicyStateStore (Redis when distributed); a store
failure is logged and counted but never blocks a decision. Scoring runs in a worker thread so the event loop
keeps reading frames while torch works.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import grpc

from kvpilot_protocol.v1 import policy_pb2 as pb
from kvpilot_protocol.v1 import policy_pb2_grpc
from kvpilot_protocol import telemetry
from kvpilot_protocol.background import BackgroundServer, start_grpc_server
from kvpilot_protocol.frame import Decision, KeepSet
from kvpilot_protocol.policy import CAPABILITIES
from kvpilot_protocol.wire import decision_to_pb, description_to_pb, frame_from_pb
from policy_service.local import InProcessPolicy

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Policy"].full_name


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class PolicyCore:
    """Decide frames. Shared by the plain gRPC servicer and the Ray Serve deployment."""

    def __init__(self, state=None, replica: str | None = None, policies: dict | None = None):
        self.state = state
        self.replica = replica or replica_name()
        self.decided = 0
        self.state_errors = 0
        self.local = InProcessPolicy(policies)  # the scorers, cached per (policy, params)

    def scorer(self, policy: str, params: dict[str, str]):
        return self.local.scorer(policy, params)

    async def decide(self, message: pb.StatsFrame, parent_context=None) -> pb.Decision:
        with telemetry.decide_span(message, self.replica, parent_context) as span:
            start = time.perf_counter()
            try:
                scorer = self.scorer(message.policy, dict(message.params))
                frame = frame_from_pb(message)
                # Side frames (SideQuest's "turn" / "answer") carry no statistics by design.
                missing = scorer.spec().names - set(frame.stats) - {"positions"} - CAPABILITIES
                if missing and not frame.side_event:
                    raise ValueError(f"frame lacks statistics {sorted(missing)} that policy {message.policy!r} needs")
                plan = await asyncio.to_thread(scorer.plan, frame)
            except Exception as exc:  # answered in-band: the decoder falls back and reports it
                log.warning("frame %d of %s: %s", message.frame_id, message.session_id, exc)
                telemetry.record_decide_error(span, exc)
                telemetry.policy_metrics().decided(message.policy, time.perf_counter() - start, exc)
                return pb.Decision(frame_id=message.frame_id, session_id=message.session_id,
                                   request_id=message.request_id, policy=message.policy,
                                   seed=message.seed, replica=self.replica, error=f"{type(exc).__name__}: {exc}")
            decision = Decision(frame_id=message.frame_id, plan=plan, policy=message.policy, seed=message.seed,
                                latency_s=time.perf_counter() - start)
            telemetry.policy_metrics().decided(message.policy, decision.latency_s)
            kept = plan.count if isinstance(plan, KeepSet) else (message.n if plan is None else getattr(plan, "count", 0))
            telemetry.annotate_decision(span, decision, kept, message.n)
        self.decided += 1
        await self.record(message, decision, kept)
        return decision_to_pb(decision, session_id=message.session_id, replica=self.replica,
                              request_id=message.request_id)

    async def record(self, message: pb.StatsFrame, decision: Decision, kept: int) -> None:
        if self.state is None:
            return
        try:
            await self.state.record_decision(message.session_id, message.frame_id, message.policy, message.seed,
                                             decision.latency_s, kept, max(0, message.n - kept), self.replica)
        except Exception as exc:
            self.state_errors += 1
            log.warning("could not record decision %d of %s in the state store: %s", message.frame_id,
                        message.session_id, exc)

    def describe(self, request: pb.DescribeRequest) -> pb.DescribeResponse:
        """Raises PolicyRejected (unknown policy, invalid parameters): answered INVALID_ARGUMENT."""
        if request.policy:
            return pb.DescribeResponse(policies=[description_to_pb(self.local.describe(request.policy,
                                                                                        dict(request.params)))])
        return pb.DescribeResponse(policies=[description_to_pb(self.local.listing(n)) for n in self.local.policies()])


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, core: PolicyCore):
        self.core = core

    async def Decide(self, request_iterator, context):
        """Frames are decided concurrently; decisions stream back as they finish (matched by frame_id)."""
        parent = telemetry.extract_context(context.invocation_metadata())
        done: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        reader_finished = asyncio.Event()

        async def read() -> None:
            try:
                async for frame in request_iterator:
                    task = asyncio.create_task(self.core.decide(frame, parent))
                    pending.add(task)
                    task.add_done_callback(lambda t: (pending.discard(t), done.put_nowait(t)))
            finally:
                reader_finished.set()
                done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while not (reader_finished.is_set() and not pending and done.empty()):
                task = await done.get()
                if task is not None:
                    yield task.result()
        finally:
            reader.cancel()
            for task in pending:
                task.cancel()

    async def DecideFrame(self, request, context):
        return await self.core.decide(request, telemetry.extract_context(context.invocation_metadata()))

    async def Describe(self, request, context):
        try:
            return self.core.describe(request)
        except (KeyError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).strip('"'))


class PolicyServer:
    def __init__(self, address: str = "127.0.0.1:50052", state=None, security=None, policies: dict | None = None):
        self.address = address
        self.core = PolicyCore(state, policies=policies)
        self.security = security  # kvpilot_protocol.security.TransportSecurity or None
        self.server: grpc.aio.Server | None = None
        self.health = None

    async def start(self) -> str:
        from kvpilot_protocol.security import server_interceptors

        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                               ("grpc.max_send_message_length", 256 << 20)],
                                      interceptors=server_interceptors(self.security))
        policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(self.core), self.server)
        self.address, self.health = await start_grpc_server(self.server, self.address, SERVICE_NAME, self.security)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)


class BackgroundPolicyServer(BackgroundServer):
    """A PolicyServer on its own event-loop thread (tests, benchmarks)."""

    def __init__(self, address: str = "127.0.0.1:0", state=None, security=None, policies: dict | None = None):
        super().__init__(PolicyServer(address, state=state, security=security, policies=policies),
                         name="kvpilot-policy", grace_s=0.2)
