"""The decoder's gRPC server (grpc.aio): Generate streaming, sessions, health and reflection.

Protobuf <-> engine dataclasses conversion lives here; the engine never sees protobuf. Request errors become
gRPC status codes with a message that says what to fix; the server keeps serving every other stream.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from dataclasses import dataclass, replace

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from decoder_service.async_engine import AsyncEngine
from decoder_service.engine import Engine, check_session_id
from decoder_service.requests import (
    Cancelled,
    CompressionConfig,
    EvictionEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestError,
    SessionConflict,
    SessionNotFound,
    SessionStoreDown,
    SamplingParams,
    SegmentKind,
    TokenEvent,
    field_of_message,
)
from decoder_service.session_store import SessionStoreError, SessionVersionConflict
from kvpilot_protocol import telemetry
from kvpilot_protocol.background import BackgroundServer as _BackgroundServer
from kvpilot_protocol.background import start_grpc_server
from kvpilot_protocol.v1 import decoder_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

FINISH_REASONS = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


@dataclass
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse (bad UTF-8 in a string field, truncated message)."""

    error: str


def tolerant(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # answered with INVALID_ARGUMENT by the handler, not INTERNAL by grpc
            return UndecodableRequest(str(exc))

    return deserialize


def refuse_evaluation_only(policy: str, description) -> None:
    """A policy that needs future_attention (an evaluation-only oracle such as golden) cannot serve live traffic:
    the oracle is computed from the reference trace the request will produce, which no client can send."""
    if "future_attention" in description.spec.names:
        raise InvalidRequest(f"{policy} is an evaluation-only oracle: it needs the reference trace's future "
                             "attention; use it from kvpilot eval / bench pareto / bench fidelity")


SESSION_ID_METADATA = "kvpilot-session-id"
MAX_PROMPT_CHARS_PER_TOKEN = 64  # a text longer than context x this is refused before it is tokenized


class Generation:
    """One accepted Generate call (DecoderServicer.start_generation), whichever front end serves it (gRPC, or the
    OpenAI-compatible HTTP API): the engine request, its event stream and its `generate` span. `events()` persists
    the session when the request ends and records the serving metrics; `aclose()` (always call it) aborts the
    request in the engine if it has not finished, and persists what a cancelled session computed."""

    def __init__(self, servicer: DecoderServicer, request: GenerationRequest, stream, span, started: float,
                 api: str, operation: str):
        self.servicer = servicer
        self.request = request
        self.final: FinishEvent | None = None  # when every sample has ended: sample 0's, usage summed (merge_finals)
        self.finals: dict[int, FinishEvent] = {}  # by sample index
        self.failure: RequestError | None = None
        self._stream, self._span, self._started, self._api, self._operation = stream, span, started, api, operation
        self._events = None
        self._closed = False
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    def events(self):
        """Yields (event, warnings) in order, the last one the FinishEvent (warnings: the session could not be
        persisted). A request that fails after it was accepted raises its RequestError instead."""
        if self._events is None:
            self._events = self._run()
        return self._events

    async def _run(self):
        sid = self.request.session_id
        try:
            async for event in self._stream:
                warnings = []
                if isinstance(event, TokenEvent):
                    self._last_token_at = time.monotonic()
                    self._first_token_at = self._first_token_at or self._last_token_at
                elif isinstance(event, FinishEvent):
                    self.finals[event.index] = event
                    if len(self.finals) == self.request.sampling.n:
                        self.final = merge_finals(self.finals)
                    if event.session_id:
                        # Shielded: a client hanging up right now must not leave the store half-written.
                        warnings = await asyncio.shield(self.servicer.persist_session(event.session_id))
                yield event, warnings
                if self.final is not None:
                    return
        except RequestError as exc:
            self.failure = exc
            if sid:
                await asyncio.shield(self.servicer.persist_session(sid))  # the history up to the fault stays
            raise
        finally:
            await self._finish()

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()
        await self._finish()

    async def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stream.aclose()  # aborts the request in the engine if it has not finished
        sid = self.request.session_id
        if self.final is None and self.failure is None and sid:
            # The client went away: what was computed stays in the session, and the durable store must know it
            # too, or no other decoder could find (or delete) the session.
            await asyncio.shield(asyncio.ensure_future(self.servicer.persist_session(sid)))
        telemetry.end_generate_span(self._span, self.final,
                                    self.failure or (None if self.final else Cancelled("stream cancelled")),
                                    finish_reasons=[self.finals[i].finish_reason.value for i in sorted(self.finals)])
        telemetry.serving_metrics().request_ended(
            self.servicer.model_name, self._api, self._operation, self._started, final=self.final,
            error=self.failure, first_token_at=self._first_token_at, last_token_at=self._last_token_at)


class DecoderServicer:
    def __init__(self, engine: AsyncEngine, durable=None, persist_kv: bool = False, auth=None):
        self.engine = engine
        self.durable = durable  # SessionStore (Redis) shared by decoder processes; None = this process only
        self.persist_kv = persist_kv
        self.auth = auth  # kvpilot_protocol.security.BearerAuth: who the caller is (the interceptor already checked)
        self.versions: dict[str, int] = {}  # session -> version this process last read or wrote
        self.tokenizer = engine.engine.tokenizer
        self.model_name = engine.engine.loaded.name
        self.context = engine.engine.model_config.max_position_embeddings

    def principal(self, context) -> str | None:
        return self.auth.principal_of(context) if self.auth is not None else None

    async def Generate(self, request, context):
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request could not be parsed: {request.error} "
                                "(text must be valid UTF-8)")
        try:
            generation = await self.start_generation(request, self.principal(context), context.time_remaining(),
                                                     trace_context=telemetry.extract_context(context.invocation_metadata()))
        except RequestError as exc:
            await abort_with(context, exc)
        failure: RequestError | None = None
        try:
            if generation.request.session_id:
                await context.send_initial_metadata(((SESSION_ID_METADATA, generation.request.session_id),))
            async for event, warnings in generation.events():
                yield to_response(generation.request.request_id, event, warnings)
        except RequestError as exc:  # the request failed after it was accepted: its status, its stream only
            failure = exc
        finally:
            await generation.aclose()  # aborts the request in the engine if it has not finished
        if failure is not None:
            await abort_with(context, failure)

    async def start_generation(self, request: pb.GenerateRequest, principal: str | None = None,
                               time_remaining: float | None = None, api: str = "grpc",
                               operation: str = "text_completion", trace_context=None) -> Generation:
        """Everything Generate does before the first event, shared by the gRPC and the HTTP front end
        (http_api.py): parse, validate, resolve the policy, load the session, submit. `trace_context`: the
        caller's (W3C traceparent), the parent of the generation's span. Raises RequestError (its
        `code` names the status, its message says what to fix); the caller must `aclose()` what it returns."""
        started = time.monotonic()
        span = None
        try:
            gen = await self.to_engine_request(request)
            gen.principal = principal
            if time_remaining is not None:
                gen.deadline = time.monotonic() + time_remaining
            gen.request_id = gen.request_id or uuid.uuid4().hex  # named here so the span carries it
            if gen.create_session and not gen.session_id:
                gen.session_id = uuid.uuid4().hex  # chosen here so the client learns it before any token
            span = gen.trace_parent = telemetry.start_generate_span(self.model_name, gen, operation, trace_context)
            gen.policy_description = await self.engine.describe(gen.compression.policy, gen.compression.params)
            refuse_evaluation_only(gen.compression.policy, gen.policy_description)
            if gen.session_id:
                check_session_id(gen.session_id)
                if gen.create_session:
                    await self.check_new_session(gen.session_id)
                else:
                    await self.load_session(gen.session_id)
            stream = await self.engine.submit(gen)
        except RequestError as exc:
            if span is not None:
                telemetry.end_generate_span(span, error=exc)
            telemetry.serving_metrics().request_ended(self.model_name, api, operation, started, error=exc)
            raise
        return Generation(self, gen, stream, span, started, api, operation)

    async def to_engine_request(self, request: pb.GenerateRequest) -> GenerationRequest:
        which = request.WhichOneof("input")
        if which == "text":
            limit = self.context * MAX_PROMPT_CHARS_PER_TOKEN
            if len(request.text) > limit:
                raise InvalidRequest(f"prompt text has {len(request.text)} characters; this model's context of "
                                     f"{self.context} tokens accepts at most {limit}")
            # Off the event loop: other streams keep flowing while a long prompt is tokenized.
            input_ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
            if request.text and not input_ids:
                raise InvalidRequest("text encodes to no tokens")
        elif which == "token_ids":
            input_ids = list(request.token_ids.ids)
        else:
            input_ids = []
        s, st, c = request.sampling, request.stopping, request.compression
        sampling = SamplingParams(
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            seed=s.seed if s.HasField("seed") else None,
            max_new_tokens=st.max_new_tokens if st.HasField("max_new_tokens") else 256,
            stop=list(st.stop),
            stop_token_ids=list(st.stop_token_ids),
            ignore_eos=st.ignore_eos,
            min_p=s.min_p if s.HasField("min_p") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
            frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
            min_tokens=st.min_tokens if st.HasField("min_tokens") else 0,
            logprobs=s.logprobs if s.HasField("logprobs") else None,
            include_stop=st.include_stop,
            n=s.n if s.HasField("n") else 1,
        )
        defaults = CompressionConfig()
        compression = CompressionConfig(
            policy=c.policy or defaults.policy,
            budget=c.budget,
            interval=c.interval if c.HasField("interval") else defaults.interval,
            window=c.window if c.HasField("window") else defaults.window,
            sinks=c.sinks if c.HasField("sinks") else defaults.sinks,
            max_lag=c.max_lag if c.HasField("max_lag") else defaults.max_lag,
            params=dict(c.params),
        )
        return GenerationRequest(
            request_id=request.request_id,
            input_ids=input_ids,
            sampling=sampling,
            compression=compression,
            session_id=request.session.id or None,
            create_session=request.session.create,
            input_kind=SegmentKind.TOOL if request.input_kind == pb.INPUT_KIND_TOOL_OUTPUT else SegmentKind.USER,
            add_bos=request.add_bos if request.HasField("add_bos") else None,
        )

    async def reconcile_parked(self) -> int:
        """Drop parked KV the durable store has made useless: a session deleted on another decoder
        (tombstone), or continued there (newer version; the next turn here would adopt the stored one
        anyway). A session the store merely lost stays: the next write recreates it. Returns how many."""
        if self.durable is None:
            return 0
        engine = self.engine.engine
        parked = await self.engine.call(engine.parked_sessions)
        if not parked:
            return 0
        states = await self.durable.versions(parked)
        dropped = 0
        for sid, (version, deleted) in states.items():
            if deleted and version is None:
                await self.engine.call(lambda sid=sid: engine.forget_session(sid))
                self.versions.pop(sid, None)
                dropped += 1
            elif version is not None and version > self.versions.get(sid, 0):
                dropped += await self.engine.call(lambda sid=sid: engine.drop_stale_parked(sid))
        return dropped

    async def check_new_session(self, session_id: str) -> None:
        """A client-chosen id must be new everywhere, not only on this decoder."""
        if self.durable is None:
            return
        try:
            found = await self.durable.get_with_version(session_id)
        except SessionStoreError:
            return  # generation still serves; the final message warns that the session was not persisted
        if found is not None:
            raise SessionConflict(f"session {session_id!r} already exists; omit create to continue it")

    async def load_session(self, session_id: str) -> None:
        """Make this decoder's copy of a session the latest one. The durable store is the source of truth:
        the parked KV here is used only when its version is the store's; otherwise the session (and its KV
        snapshot, when persisted and of the same version) is adopted from the store. A key the store lost
        (restart, FLUSH, expiry) is recreated from the local copy on the next write; a deleted one is not."""
        if self.durable is None:
            return
        engine = self.engine.engine
        known = await self.engine.call(lambda: engine.knows_session(session_id))
        try:
            found = await self.durable.get_with_version(session_id)
            if found is None:
                if known and await self.durable.deleted(session_id):
                    await self.engine.call(lambda: engine.forget_session(session_id))
                elif known:
                    self.versions[session_id] = 0  # lost by the store: the next write creates it again
                return  # unknown everywhere: the engine answers NOT_FOUND
            session, version = found
            if known and self.versions.get(session_id) == version:
                return  # the copy parked here is the latest
            snapshot = await self.durable.get_kv_snapshot(session_id) if self.persist_kv else None
        except SessionStoreError as exc:
            if known:
                return  # serve from the local copy; persisting will warn
            raise SessionStoreDown(f"session {session_id!r} is not on this decoder and the session store "
                                   f"failed: {exc}") from None
        tensors, meta = snapshot if snapshot else (None, None)
        if meta and meta.get("session_version") != version:
            tensors = meta = None  # the snapshot lags the session (its write failed): re-prefill instead
        await self.engine.call(lambda: engine.import_session(session, tensors, meta))
        self.versions[session_id] = version

    async def persist_session(self, session_id: str) -> list[str]:
        """Write the session (and its KV snapshot) to the durable store; failures become warnings."""
        if self.durable is None:
            return []
        try:
            session, tensors, meta = await self.engine.call(
                lambda: self.engine.engine.export_session(session_id, self.persist_kv))
            expected = self.versions.get(session_id, 0)
            try:
                version = await self.durable.put(session, expected)
            except SessionVersionConflict as exc:
                if exc.actual != 0:
                    raise
                version = await self.durable.put(session, 0)  # the key vanished during the turn: recreate it
            self.versions[session_id] = version
            if tensors is not None:
                await self.durable.put_kv_snapshot(session_id, tensors, meta | {"session_version": version})
        except SessionVersionConflict as exc:
            return [f"session {session_id!r} was not persisted: another decoder changed it ({exc})"]
        except (SessionStoreError, RequestError) as exc:
            log.warning("session %s not persisted: %s", session_id, exc)
            return [f"session {session_id!r} was not persisted: {exc}"]
        return []

    async def GetSession(self, request, context):
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request could not be parsed: {request.error} "
                                "(session ids are ASCII)")
        principal = self.principal(context)
        try:
            check_session_id(request.session_id)
            await self.load_session(request.session_id)
            session, resident = await self.engine.call(
                lambda: self.engine.engine.get_session(request.session_id, principal))
        except RequestError as exc:
            await abort_with(context, exc)
        info = pb.SessionInfo(
            session_id=session.id, num_tokens=len(session.token_ids), resident_kv_slots=resident,
            turns=session.turns, generated_tokens=session.generated_tokens, evicted_tokens=session.evicted_tokens,
            segments=[pb.Segment(start=s.start, end=s.end, kind=s.kind, index=s.index, dropped=s.dropped)
                      for s in session.segments],
            created_at=session.created_at, updated_at=session.updated_at,
        )
        if session.compression:
            c = session.compression
            info.compression.CopyFrom(pb.CompressionConfig(
                policy=c["policy"], budget=c["budget"], interval=c["interval"], window=c["window"],
                sinks=c["sinks"], max_lag=c["max_lag"], params=c["params"]))
        if request.include_tokens:
            info.token_ids.extend(session.token_ids)
        return info

    async def DeleteSession(self, request, context):
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request could not be parsed: {request.error} "
                                "(session ids are ASCII)")
        sid = request.session_id
        principal = self.principal(context)
        engine = self.engine.engine
        try:
            check_session_id(sid)
            await self.load_session(sid)
            # Ownership first: another principal's session is "unknown" and stays untouched.
            await self.engine.call(lambda: engine.check_deletable(sid, principal))
            deleted_durably = False
            if self.durable is not None:
                try:
                    deleted_durably = await self.durable.delete(sid)
                except SessionStoreError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store failed: {exc}")
                self.versions.pop(sid, None)
            try:
                await self.engine.call(lambda: engine.delete_session(sid, principal))
            except SessionNotFound:
                if not deleted_durably:
                    raise
        except RequestError as exc:
            await abort_with(context, exc)
        return pb.DeleteSessionResponse()

    async def GetModelInfo(self, request, context):
        e = self.engine.engine
        c = e.model_config
        return pb.ModelInfo(
            model_name=e.loaded.name, model_type=c.model_type, vocab_size=c.vocab_size, num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, max_context=c.max_position_embeddings,
            kv_pool_bytes=e.pool.capacity_bytes, kv_bytes_per_slot=e.pool.slot_bytes,
            policies=await self.engine.policies(), device=str(e.device),
        )

    async def GetServerInfo(self, request, context):
        # Read on the engine thread; if it is gone, read as is: an operator needs this most exactly then.
        alive = self.engine.alive
        info = await self.engine.call(self.engine.engine.server_info) if alive else self.engine.engine.server_info()
        info["kv_bytes_per_slot"] = info.pop("slot_bytes")
        info["policy_circuit_state"] = info.pop("circuit_state")
        info["policy_circuit_opened"] = info.pop("circuit_opened")
        return pb.ServerInfo(step_failures=self.engine.step_failures, engine_alive=alive, **info)


async def abort_with(context, error: RequestError) -> None:
    """End the call with the error's status and message; an INVALID_ARGUMENT whose message names a request field
    also carries it as a google.rpc.BadRequest field violation (grpcio-status rich details), so clients can
    point at the field without parsing the message."""
    code, message = getattr(grpc.StatusCode, error.code), str(error)
    field = field_of_message(message) if error.code == "INVALID_ARGUMENT" else None
    if field is None:
        await context.abort(code, message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    await context.abort_with_status(rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])))


def merge_finals(finals: dict[int, FinishEvent]) -> FinishEvent:
    """One request's outcome over its samples (for its span and metrics): sample 0's final event with the
    generated tokens and evictions of all samples added up, the peak KV the largest."""
    first = finals[0]
    if len(finals) == 1:
        return first
    usage = replace(first.usage)
    for f in finals.values():
        if f is not first:
            for name in ("generated_tokens", "evicted_tokens", "merged_tokens", "compression_events", "fallbacks",
                         "dropped_decisions"):
                setattr(usage, name, getattr(usage, name) + getattr(f.usage, name))
            usage.peak_kv_slots = max(usage.peak_kv_slots, f.usage.peak_kv_slots)
            usage.peak_kv_bytes = max(usage.peak_kv_bytes, f.usage.peak_kv_bytes)
    return replace(first, usage=usage)


def to_response(request_id: str, event, warnings: list[str] = ()) -> pb.GenerateResponse:
    response = _to_response(request_id, event, warnings)
    response.index = event.index
    return response


def _to_response(request_id: str, event, warnings: list[str] = ()) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        logprobs = [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                    top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                    for lp in event.logprobs]
        return pb.GenerateResponse(request_id=request_id, chunk=pb.TokenChunk(token_ids=event.token_ids, text=event.text,
                                                                               logprobs=logprobs))
    if isinstance(event, EvictionEvent):
        return pb.GenerateResponse(request_id=request_id, eviction=pb.EvictionEvent(
            step=event.step, frame_id=event.frame_id, policy=event.policy, slots_before=event.slots_before,
            slots_after=event.slots_after, evicted=event.evicted, merged=event.merged,
            policy_latency_ms=event.policy_latency_s * 1e3, staleness_steps=event.staleness_steps,
            fallback=event.fallback, reason=event.reason))
    u = event.usage
    complete = pb.GenerationComplete(
        finish_reason=FINISH_REASONS[event.finish_reason], text=event.text, session_id=event.session_id or "",
        warnings=list(warnings),
        usage=pb.Usage(
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, generated_tokens=u.generated_tokens,
            peak_kv_slots=u.peak_kv_slots, peak_kv_bytes=u.peak_kv_bytes, reserved_kv_bytes=u.reserved_kv_bytes,
            evicted_tokens=u.evicted_tokens, merged_tokens=u.merged_tokens, compression_events=u.compression_events,
            fallbacks=u.fallbacks, dropped_decisions=u.dropped_decisions, seed=u.seed,
            time_to_first_token_ms=u.time_to_first_token_s * 1e3, duration_ms=u.duration_s * 1e3,
            side_threads=u.side_threads, side_tokens=u.side_tokens, side_cut=u.side_cut,
            dropped_tool_outputs=u.dropped_tool_outputs, side_ignored=u.side_ignored, kv_reads=u.kv_reads,
            beacons=u.beacons),
    )
    if isinstance(event.matched_stop, str):
        complete.stop_string = event.matched_stop
    elif isinstance(event.matched_stop, int):
        complete.stop_token_id = event.matched_stop
    return pb.GenerateResponse(request_id=request_id, complete=complete)


def add_decoder_service(server: grpc.aio.Server, servicer: DecoderServicer) -> None:
    """Register the Decoder service with a deserializer that turns unparsable requests into INVALID_ARGUMENT."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=tolerant(pb.GenerateRequest.FromString),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetSession": grpc.unary_unary_rpc_method_handler(
            servicer.GetSession, request_deserializer=tolerant(pb.GetSessionRequest.FromString),
            response_serializer=pb.SessionInfo.SerializeToString),
        "DeleteSession": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteSession, request_deserializer=tolerant(pb.DeleteSessionRequest.FromString),
            response_serializer=pb.DeleteSessionResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo, request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.ServerInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class DecoderServer:
    """A running decoder: engine thread + grpc.aio server + health + reflection (+ TLS and bearer auth), and with
    `http_address` the OpenAI-compatible HTTP API (http_api.py) over the same engine, in the same event loop."""

    def __init__(self, engine: Engine, address: str = "127.0.0.1:50051", session_store=None, persist_kv: bool = False,
                 security=None, http_address: str | None = None):
        self.async_engine = AsyncEngine(engine)
        self.session_store = session_store
        self.persist_kv = persist_kv
        self.security = security  # kvpilot_protocol.security.TransportSecurity or None (plaintext, no auth)
        self.address = address
        self.http_address = http_address  # host:port (port 0 = any free port); None = no HTTP API
        self.http = None
        self.server: grpc.aio.Server | None = None
        self.health = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> str:
        from kvpilot_protocol.security import server_interceptors

        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors(self.security))
        auth = self.security.auth if self.security is not None else None
        self.servicer = DecoderServicer(self.async_engine, self.session_store, self.persist_kv, auth)
        add_decoder_service(self.server, self.servicer)
        self.address, self.health = await start_grpc_server(self.server, self.address, SERVICE_NAME, self.security)
        telemetry.serving_metrics().watch(self, self.gauge_state)
        if self.http_address is not None:
            from decoder_service.http_api import HttpServer

            self.http = HttpServer(self.servicer, self.security)
            self.http_address = await self.http.start(self.http_address)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_engine()), loop.create_task(self._reconcile())]
        return self.address

    async def _reconcile(self, every_s: float = 1.0) -> None:
        """Keep parked KV in step with the durable store (sessions deleted or continued on other decoders)."""
        while self.session_store is not None:
            await asyncio.sleep(every_s)
            try:
                await self.servicer.reconcile_parked()
            except SessionStoreError as exc:
                log.debug("parked-session reconciliation skipped: %s", exc)
            except Exception:
                log.exception("parked-session reconciliation failed")

    async def _watch_engine(self) -> None:
        """Health says NOT_SERVING once the engine thread is gone (a load balancer stops sending traffic)."""
        from grpc_health.v1 import health_pb2

        while self.async_engine.alive:
            await asyncio.sleep(0.5)
        log.error("the engine thread stopped; reporting NOT_SERVING")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def gauge_state(self) -> dict:
        """What the serving gauges read (plain reads of the engine's counters, from the metrics reader's thread)."""
        engine = self.async_engine.engine
        return dict(running=len(engine.running), waiting=len(engine.waiting), pool_blocks=engine.pool.num_blocks,
                    pool_free_blocks=engine.pool.free_blocks)

    async def stop(self, grace: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        telemetry.serving_metrics().unwatch(self)
        if self.http is not None:
            await self.http.stop(grace)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        self.async_engine.close()
        if self.session_store is not None:
            await self.session_store.close()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await stop.wait()
        await self.stop()


class BackgroundServer(_BackgroundServer):
    """A DecoderServer on its own event-loop thread (the demo, tests, benchmarks)."""

    def __init__(self, engine: Engine, address: str = "127.0.0.1:0", session_store=None, persist_kv: bool = False,
                 security=None, http_address: str | None = None):
        super().__init__(DecoderServer(engine, address, session_store, persist_kv, security, http_address),
                         name="kvpilot-grpc")

    @property
    def http_address(self) -> str | None:
        return self.server.http_address
