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
import uuid
from typing import AsyncIterator, Callable, TypeVar

from decoder_service.engine import Engine
from decoder_service.requests import Event, FinishEvent, GenerationRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        if hasattr(engine.compressor.policy, "on_result"):
            engine.compressor.policy.on_result = self._wake.set  # a remote decision wakes a waiting engine
        self._thread = threading.Thread(target=self._run, name="kvpilot-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands()
            try:
                worked = self.engine.step() if self.engine.has_work() else False
            except Exception:  # a bug in a step must not take the server down: fail the batch, keep serving
                log.exception("engine step failed; aborting the running requests")
                for seq in list(self.engine.running):
                    self.engine.abort(seq.id)
                worked = False
            if not worked:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

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
        return await asyncio.wrap_future(future)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submit a request and yield its events; the last one is a FinishEvent.

        Request errors (RequestError) are raised before the first event. If the consumer stops early
        (client cancelled), the request is aborted and its KV slots are freed."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        await self.call(lambda: self.engine.add_request(request, emit))
        finished = False
        try:
            while True:
                event = await events.get()
                finished = isinstance(event, FinishEvent)
                yield event
                if finished:
                    return
        finally:
            if not finished:
                # Shielded: the abort must reach the engine even though this task is being cancelled.
                await asyncio.shield(self.call(lambda: self.engine.abort(request.request_id)))

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        close_policy = getattr(self.engine.compressor.policy, "close", None)
        if close_policy is not None:
            close_policy()
