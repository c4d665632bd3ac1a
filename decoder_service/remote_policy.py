"""Client of the policy service, used by the decoder's Compressor from the engine thread.

`submit` queues a frame and returns at once; decisions stream back on a long-lived `Policy.Decide` stream
and are picked up by `poll` in a later engine step. The gRPC side runs on its own event loop thread.
A pool of streams (frames hashed by session) lets a load balancer that routes per stream (Ray Serve's proxy)
spread sessions over replicas. When the service is down, `submit` answers None and in-flight frames fail at
once, so the decoder falls back without waiting; the client reconnects with exponential backoff and resumes
when the service is back.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import zlib
from typing import Callable

import grpc

from kvpilot_protocol.policy import PolicyDescription, PolicyRejected, PolicyUnavailable
from kvpilot_protocol.security import secure_channel
from kvpilot_protocol.v1 import policy_pb2 as pb
from kvpilot_protocol.v1 import policy_pb2_grpc
from kvpilot_protocol.frame import Decision, StatsFrame
from kvpilot_protocol.wire import decision_from_pb, description_from_pb, frame_to_pb

log = logging.getLogger(__name__)
APP_METADATA = (("application", "kvpilot-policy"),)


class RemotePolicy:
    asynchronous = True

    def __init__(self, url: str, streams: int = 1, backoff_s: tuple[float, float] = (0.05, 2.0),
                 connect_timeout_s: float = 2.0, tls_ca: str | None = None, token: str | None = None):
        if streams < 1:
            raise ValueError(f"policy streams must be >= 1 (got {streams})")
        self.url = url
        self.tls_ca, self._token = tls_ca, token
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.on_result: Callable[[], None] | None = None  # wakes the engine loop when a decision lands
        self._lock = threading.Lock()
        self._results: dict[tuple[str, int], Decision | Exception] = {}  # (request id, frame id) -> result
        self._in_flight: dict[tuple[str, int], int] = {}  # key -> stream index
        self._connected = [False] * streams
        self._queues: list[asyncio.Queue | None] = [None] * streams
        self.reconnects = 0
        self.sent = 0
        self.received = 0
        self._closing = False
        self._describe_channel = None  # unary Describe calls (their own channel: the Decide streams are long-lived)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvpilot-policy-client", daemon=True)
        self._thread.start()
        self._tasks = [asyncio.run_coroutine_threadsafe(self._stream(i), self._loop) for i in range(streams)]

    # ---- engine-thread side -------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return any(self._connected)

    def wait_until_available(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.available and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.available

    def submit(self, frame: StatsFrame, policy: str, params: dict[str, str], trace_context: dict,
               request_id: str = "") -> object:
        """Queue a frame; returns a key for `poll`, or None when the service is unreachable right now.

        The key is (request id, frame id): frame ids restart with every request, so a decision for an earlier
        turn of the same session can never be taken for this one."""
        index = zlib.crc32(frame.session_id.encode()) % len(self._connected)
        if not self._connected[index]:
            up = [i for i, ok in enumerate(self._connected) if ok]
            if not up:
                return None
            index = up[index % len(up)]
        message = frame_to_pb(frame, policy, dict(params), request_id=request_id)
        message.trace_context.update(trace_context)
        key = (request_id, frame.frame_id)
        with self._lock:
            self._in_flight[key] = index
        queue = self._queues[index]
        self._loop.call_soon_threadsafe(queue.put_nowait, message)
        self.sent += 1
        return key

    def describe(self, policy: str, params: dict[str, str], timeout_s: float = 5.0) -> PolicyDescription:
        """`Policy.Describe`, blocking (callers off the event loop: tests, eval). Raises PolicyRejected for an
        unknown policy or bad parameters, PolicyUnavailable when the service cannot answer."""
        future = asyncio.run_coroutine_threadsafe(self._describe(policy, params), self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PolicyUnavailable(f"policy service at {self.url} did not describe {policy!r} in {timeout_s} s") from None

    async def describe_async(self, policy: str, params: dict[str, str]) -> PolicyDescription:
        """The same from any event loop (the decoder's gRPC server warms the engine's cache with it)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._describe(policy, params), self._loop))

    def policies(self, timeout_s: float = 5.0) -> list[str]:
        return asyncio.run_coroutine_threadsafe(self._policies(), self._loop).result(timeout_s)

    async def policies_async(self) -> list[str]:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._policies(), self._loop))

    async def _policies(self) -> list[str]:
        return sorted(d.policy for d in (await self._describe_call(pb.DescribeRequest())).policies)

    async def _describe(self, policy: str, params: dict[str, str]) -> PolicyDescription:
        response = await self._describe_call(pb.DescribeRequest(policy=policy, params=dict(params)))
        return description_from_pb(response.policies[0])

    async def _describe_call(self, request: pb.DescribeRequest) -> pb.DescribeResponse:
        if self._describe_channel is None:
            self._describe_channel = secure_channel(self.url, tls_ca=self.tls_ca, token=self._token, aio=True)
        stub = policy_pb2_grpc.PolicyStub(self._describe_channel)
        try:
            return await stub.Describe(request, metadata=APP_METADATA, timeout=self.connect_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PolicyRejected(exc.details()) from None
            raise PolicyUnavailable(f"policy service at {self.url}: {exc.code().name}: {exc.details()}") from None

    def poll(self, key) -> Decision | Exception | None:
        with self._lock:
            return self._results.pop(key, None)

    def forget(self, key) -> None:
        """The decoder gave up on this frame: drop its decision if it still arrives."""
        with self._lock:
            self._in_flight.pop(key, None)
            self._results.pop(key, None)

    def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # ---- event-loop side ----------------------------------------------------------------------------
    async def _stream(self, index: int) -> None:
        delay = self.backoff_s[0]
        while not self._closing:
            channel = secure_channel(self.url, tls_ca=self.tls_ca, token=self._token, aio=True,
                                     options=[("grpc.max_receive_message_length", 256 << 20),
                                              ("grpc.max_send_message_length", 256 << 20)])
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=self.connect_timeout_s)
                queue: asyncio.Queue = asyncio.Queue()
                self._queues[index] = queue
                # Ray Serve's proxy routes by the `application` metadata; a plain policy server ignores it.
                call = policy_pb2_grpc.PolicyStub(channel).Decide(self._frames(queue), metadata=APP_METADATA)
                self._connected[index] = True
                delay = self.backoff_s[0]
                log.info("policy stream %d connected to %s", index, self.url)
                async for decision in call:
                    self._deliver(decision)
                raise PolicyUnavailable("policy service closed the stream")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._connected[index]:
                    log.warning("policy stream %d to %s lost: %s", index, self.url, exc)
                self._connected[index] = False
                self._fail_in_flight(index, PolicyUnavailable(f"policy service at {self.url} unavailable: "
                                                              f"{getattr(exc, 'code', lambda: exc)()}"))
                self.reconnects += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])
            finally:
                self._connected[index] = False
                await channel.close(grace=None)

    @staticmethod
    async def _frames(queue: asyncio.Queue):
        while True:
            yield await queue.get()

    def _deliver(self, message: pb.Decision) -> None:
        key = (message.request_id, message.frame_id)
        with self._lock:
            if self._in_flight.pop(key, None) is None:
                return  # given up on, or a duplicate
            self._results[key] = decision_from_pb(message)
        self.received += 1
        if self.on_result is not None:
            self.on_result()

    def _fail_in_flight(self, index: int, error: Exception) -> None:
        with self._lock:
            for key in [k for k, i in self._in_flight.items() if i == index]:
                del self._in_flight[key]
                self._results[key] = error
        if self.on_result is not None:
            self.on_result()
