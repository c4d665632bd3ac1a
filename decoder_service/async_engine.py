"""Runs the synchronous engine on its own thread and exposes it to asyncio (the gRPC server's event loop).

Everything that touches engine state runs on the engine thread: the loop thread submits closures through
`call()` and receives stream events through an asyncio queue per request. Model steps therefore never block
the event loop, and cancellation (a client going away) reaches the engine within one step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, TypeVar

from decoder_service.engine import Engine, provisional_description
from decoder_service.requests import Event, FinishEvent, GenerationRequest, InternalError, InvalidRequest, RequestError
from kvpilot_protocol.policy import PolicyRejected, PolicyUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStopped(RequestError):
    """The engine thread is not running (shut down, or died): nothing can be served."""

    code = "UNAVAILABLE"

    def __init__(self, message: str = "the decoder's engine is not running; retry on another decoder"):
        super().__init__(message)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self.step_failures = 0
        if hasattr(engine.compressor.policy, "on_result"):
            engine.compressor.policy.on_result = self._wake.set  # a remote decision wakes a waiting engine
        self._thread = threading.Thread(target=self._run, name="kvpilot-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._fail_commands(EngineStopped())

    def _fail_commands(self, error: Exception) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while not self._stopped:
            self._drain_commands()
            try:
                worked = self.engine.step() if self.engine.has_work() else False
            except Exception as exc:
                # The engine contains faults per sequence; reaching here is a bug outside that. End what was
                # running with a status (never OK + ABORT), keep the waiting queue, keep serving.
                self.step_failures += 1
                log.exception("engine step failed; failing the running requests")
                error = InternalError(f"engine step failed: {type(exc).__name__}: {exc}")
                for seq in list(self.engine.running):
                    self.engine.fail(seq, error)
                worked = False
            if time.monotonic() - last_sweep >= 1.0:
                self.engine.expire_sessions()  # idle servers too: an expired session's parked KV goes
                last_sweep = time.monotonic()
            if not worked:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # delivered to the caller
                    future.set_exception(exc)

    # ---- event-loop side ----------------------------------------------------------------------------
    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn() on the engine thread between steps and return its result (or raise its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        self._wake.set()
        if not self.alive:  # it may have stopped before or while the command was queued
            self._fail_commands(EngineStopped())
        return await asyncio.wrap_future(future)

    async def describe(self, policy: str, params: dict[str, str]):
        """The policy's description without blocking the event loop or the engine thread: a remote client
        answers over its own loop, an in-process one in a worker thread (building a scorer may load weights).
        Raises InvalidRequest for an unknown policy or bad parameters."""
        client = self.engine.compressor.policy
        try:
            if policy == "full" or not hasattr(client, "describe_async"):
                return await asyncio.to_thread(self.engine.describe, policy, dict(params))
            description = await client.describe_async(policy, dict(params))
            self.engine.remember_description(policy, params, description)
            return description
        except PolicyRejected as exc:
            raise InvalidRequest(str(exc)) from None
        except PolicyUnavailable as exc:
            return provisional_description(policy, exc)

    async def policies(self) -> list[str]:
        client = self.engine.compressor.policy
        if hasattr(client, "policies_async"):
            try:
                return sorted(set(await client.policies_async()) | {"full"})
            except PolicyUnavailable as exc:
                log.warning("policy service cannot list its policies: %s", exc)
                return ["full"]
        return await asyncio.to_thread(client.policies)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue a request and return its event stream. Request errors (RequestError) are raised here, before
        anything is queued. The stream ends with a FinishEvent per sample (SamplingParams.n); a request that failed raises its error
        (a RequestError with its gRPC code) instead. If the consumer stops early (client cancelled), the
        request is aborted and its KV slots are freed."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        await self.call(lambda: self.engine.add_request(request, emit))
        return self._events(request.request_id, events, request.sampling.n)

    async def _events(self, request_id: str, events: asyncio.Queue, samples: int = 1) -> AsyncIterator[Event]:
        """The request's events until all its samples finished (each event's `index` says which sample)."""
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, FinishEvent):
                    if event.error is not None:
                        raise event.error  # one sample failing fails the request; the others are aborted
                    samples -= 1
                finished = samples == 0
                yield event
                if finished:
                    return
        finally:
            if not finished:
                # Shielded: the abort must reach the engine even though this task is being cancelled.
                await asyncio.shield(self.call(lambda: self.engine.abort(request_id)))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """submit() and iterate in one: yields the request's events."""
        stream = await self.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        close_policy = getattr(self.engine.compressor.policy, "close", None)
        if close_policy is not None:
            close_policy()
