"""OpenAI-compatible HTTP API beside the gRPC port: FastAPI served by uvicorn in the decoder's event loop, over the
same AsyncEngine (`kvpilot serve --http-port PORT`).

Endpoints: POST /v1/completions, POST /v1/chat/completions (non-streaming, or SSE with "stream": true),
GET /v1/models (and /v1/models/{id}), GET /health, GET /metrics (Prometheus text).

Every generation request is turned into the gRPC GenerateRequest and goes through
`DecoderServicer.start_generation`, so validation, status codes and messages are the gRPC ones: an error is an
OpenAI-style object {"error": {"message", "type", "param", "code"}} whose message is the gRPC status message,
whose code is the gRPC status name and whose param is the HTTP field the message is about (best effort), with
the HTTP status of HTTP_STATUS (400 invalid argument, 404 unknown session, 409 session busy or existing, 429
resource exhausted, 503 unavailable, 504 deadline, 500 internal). An unknown model is 404 with code
"model_not_found"; a body that is not a JSON object is 400 (413 over 64 MiB).

Fields (as vLLM, whose `extra_body` fields kvpilot's extensions also are):
- OpenAI: model, prompt (a string, token ids, or a list of one of those) / messages, max_tokens
  (max_completion_tokens for chat; default 256 as on gRPC), temperature, top_p, seed, stop (a string or a list),
  stream, stream_options.include_usage, n (only 1).
- vLLM extras: top_k (-1 or 0 = off), stop_token_ids, ignore_eos, add_special_tokens (= gRPC add_bos),
  request_id (or the X-Request-Id header).
- kvpilot extras, mirroring GenerateRequest: kv_policy, kv_budget, kv_interval, kv_window, kv_sinks, kv_max_lag,
  kv_params (an object; values become strings), session_id, create_session, input_kind ("user" | "tool").
- Known OpenAI fields that would change the output are refused with 400 until supported (n > 1, best_of, echo,
  logprobs, suffix, penalties, logit_bias, tools, non-text response_format, ...); fields nobody knows are
  ignored and logged, as vLLM does.
Usage: prompt_tokens (session history included), completion_tokens, total_tokens,
prompt_tokens_details.cached_tokens (history already in the KV cache), seed, and the KV accounting under
`usage.kv`. finish_reason: "stop" (EOS or a stop string / token; stop_reason says which), "length".

With bearer auth on (--auth-token-file), /v1/* needs `Authorization: Bearer <token>` (the OpenAI client's api_key);
/health and /metrics do not. /metrics shows the OpenTelemetry metrics when the process's MeterProvider has
`telemetry.prometheus_reader()` (`kvpilot serve` installs it with --http-port).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoder_service.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from decoder_service.requests import FinishEvent, FinishReason, RequestError, TokenEvent, field_of_message
from kvpilot_protocol import telemetry
from kvpilot_protocol.v1 import decoder_pb2 as pb

log = logging.getLogger(__name__)

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409,
               "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.ABORT: "abort"}
MAX_BODY_BYTES = 64 << 20  # as the gRPC server's largest message
UINT32, INT32, UINT64 = (0, 2**32 - 1), (-2**31, 2**31 - 1), (0, 2**64 - 1)
COMPRESSION_FIELDS = {"kv_budget": "budget", "kv_interval": "interval", "kv_window": "window", "kv_sinks": "sinks",
                      "kv_max_lag": "max_lag"}
# Known OpenAI / vLLM fields that would change the answer if ignored: refused until supported.
# field -> (is the value neutral?, message)
UNSUPPORTED = {
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported yet"),
    "use_beam_search": (lambda v: not v, "beam search is not supported"),
    "echo": (lambda v: not v, "echo is not supported yet"),
    "prompt_logprobs": (lambda v: v is None, "prompt_logprobs are not supported yet"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported yet"),
    "tools": (lambda v: not v, "tools (function calling) are not supported yet"),
    "functions": (lambda v: not v, "functions (function calling) are not supported yet"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool_choice is not supported yet"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        "response_format other than text is not supported yet"),
    "guided_json": (lambda v: v is None, "guided decoding is not supported yet"),
    "guided_regex": (lambda v: v is None, "guided decoding is not supported yet"),
    "guided_choice": (lambda v: v is None, "guided decoding is not supported yet"),
    "guided_grammar": (lambda v: v is None, "guided decoding is not supported yet"),
    "structured_outputs": (lambda v: v is None, "structured outputs are not supported yet"),
}
# Accepted and used, or harmless to ignore (bookkeeping fields of the OpenAI API).
KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
         "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs", "top_logprobs",
         "include_stop_str_in_output", "n",
         "seed", "stop", "stop_token_ids", "ignore_eos", "add_special_tokens", "stream", "stream_options",
         "request_id", "kv_policy", "kv_params", "session_id", "create_session", "input_kind", "user", "metadata",
         "store", "service_tier", "parallel_tool_calls", *COMPRESSION_FIELDS, *UNSUPPORTED}


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or ("authentication_error" if status == 401 else
                              "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, exc: RequestError) -> ApiError:
        """The HTTP form of a gRPC status: same message, the status name as code, and the HTTP field the message
        starts with as param (best effort)."""
        message = str(exc)
        param = field_of_message(message, http=True)
        return cls(HTTP_STATUS.get(exc.code, 500), message, code=exc.code, param=param)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="INVALID_ARGUMENT", param=param)


# ---- request fields ---------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, bounds: tuple[int, int]) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise bad_request(f"{name} must be an integer (got {v!r:.60})", name)
    if not bounds[0] <= v <= bounds[1]:
        lower = f">= {bounds[0]}" if bounds[0] == 0 else f"in [{bounds[0]}, {bounds[1]}]"
        raise bad_request(f"{name} must be an integer {lower} (got {v})", name)
    return v


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad_request(f"{name} must be a number (got {v!r:.60})", name)
    return float(v)


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false (got {v!r:.60})", name)
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad_request(f"{name} must be a string (got {v!r:.60})", name)
    return v


def _strings(body: dict, name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f"{name} must be a string or a list of strings", name)
    return v


def _param_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)
    raise bad_request(f"kv_params values must be strings, numbers or booleans (got {v!r:.60})", "kv_params")


def check_fields(body: dict) -> None:
    """Refuse what would be silently wrong if ignored; log (as vLLM) what nobody here knows."""
    for name, (neutral, message) in UNSUPPORTED.items():
        if not neutral(body.get(name)):
            raise bad_request(message, name)
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(unknown))


def build_request(body: dict, text: str | None, token_ids: list[int] | None, input_kind: str | None,
                  request_id: str, max_tokens_field: str = "max_tokens", chat: bool = False) -> pb.GenerateRequest:
    """The gRPC GenerateRequest an HTTP body stands for (type checks here; value checks in the shared path)."""
    sampling = pb.SamplingParams()
    logprobs = requested_logprobs(body, chat)
    if logprobs is not None:
        sampling.logprobs = logprobs
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(sampling, name, value)
    top_k = _int(body, "top_k", INT32)
    if top_k is not None:
        sampling.top_k = 0 if top_k == -1 else top_k  # vLLM's -1 = off
    seed = _int(body, "seed", UINT64)
    if seed is not None:
        sampling.seed = seed
    n = _int(body, "n", UINT32)
    if n is not None:
        sampling.n = n
    stopping = pb.StoppingCriteria(stop=_strings(body, "stop"), ignore_eos=bool(_bool(body, "ignore_eos")),
                                   include_stop=bool(_bool(body, "include_stop_str_in_output")))
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise bad_request("stop_token_ids must be a list of integers", "stop_token_ids")
        stopping.stop_token_ids.extend(_int({"stop_token_ids": t}, "stop_token_ids", UINT32) for t in ids)
    min_tokens = _int(body, "min_tokens", INT32)
    if min_tokens is not None:
        stopping.min_tokens = min_tokens
    max_tokens = _int(body, max_tokens_field, INT32)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _int(body, "max_tokens", INT32)  # chat: the older name
    if max_tokens is not None:
        stopping.max_new_tokens = max_tokens
    compression = pb.CompressionConfig(policy=_str(body, "kv_policy") or "")
    for field, proto_name in COMPRESSION_FIELDS.items():
        value = _int(body, field, UINT32)
        if value is not None:
            setattr(compression, proto_name, value)
    params = body.get("kv_params")
    if params is not None:
        if not isinstance(params, dict):
            raise bad_request("kv_params must be an object of policy parameters", "kv_params")
        compression.params.update({str(k): _param_value(v) for k, v in params.items()})
    if input_kind not in (None, "user", "tool"):
        raise bad_request(f"input_kind must be \"user\" or \"tool\" (got {input_kind!r:.60})", "input_kind")
    request = pb.GenerateRequest(
        request_id=request_id, sampling=sampling, stopping=stopping, compression=compression,
        session=pb.SessionRef(id=_str(body, "session_id") or "", create=bool(_bool(body, "create_session"))),
        input_kind=pb.INPUT_KIND_TOOL_OUTPUT if input_kind == "tool" else pb.INPUT_KIND_USER,
    )
    add_bos = _bool(body, "add_special_tokens")
    if add_bos is not None:
        request.add_bos = add_bos
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        request.text = text
    return request


def requested_logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token, or None: completions take `logprobs: N`; chat takes `logprobs: true` with
    `top_logprobs: N` (OpenAI's two shapes)."""
    if not chat:
        return _int(body, "logprobs", INT32)
    top = _int(body, "top_logprobs", INT32)
    if not _bool(body, "logprobs"):
        if top:
            raise bad_request("top_logprobs needs \"logprobs\": true", "top_logprobs")
        return None
    return top or 0


def logprobs_json(events: list, tokenizer, chat: bool, offset: int = 0) -> dict:
    """OpenAI's logprobs object for these TokenLogprobs: chat's `content` list, or the completions columns."""
    def token(i: int) -> str:
        return tokenizer.inner.decode([i], skip_special_tokens=False)

    if chat:
        def entry(i: int, lp: float) -> dict:
            text = token(i)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in events]}
    tokens = [token(lp.token_id) for lp in events]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in events],
            "top_logprobs": [{token(t): v for t, v in lp.top} for lp in events], "text_offset": offsets}


def completion_prompt(body: dict, vocab: int) -> tuple[str | None, list[int] | None]:
    """A completion prompt: text, or token ids (a list of ints), or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not UINT32[0] <= t <= UINT32[1]]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        return None, prompt
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("batched prompts are not supported yet: send one prompt per request", "prompt")
    raise bad_request("prompt must be a string or a list of token ids", "prompt")


def message_text(message: dict) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request("only text content parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request("a message's content must be a string or a list of text parts", "messages")
    return content


def chat_prompt(body: dict, template: ChatTemplate | None = None) -> tuple[str, str, bool]:
    """Render the messages as the prompt: (text, the last message's role, whether the chat template rendered it).

    With the checkpoint's chat template (decoder_service/chat_template.py) every message is rendered, unless the
    request continues a session (`session_id` without `create_session`): the session already holds the earlier
    turns, so only the last message's content is appended, as without a template. Without a template the prompt
    is the content of the last message, which must come from the user (a new turn) or a tool (input_kind tool)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant",
                                                                          "tool"):
            raise bad_request("each message must be an object with a role (system, developer, user, assistant, "
                              "tool) and a content", "messages")
    last = messages[-1]
    continues_session = bool(body.get("session_id")) and not body.get("create_session")
    if template is not None and not continues_session:
        rendered = [{**m, "content": message_text(m)} for m in messages]
        try:
            return template.render(rendered, add_generation_prompt=True), last["role"], True
        except ChatTemplateError as exc:
            raise bad_request(str(exc), "messages") from None
    if last["role"] not in ("user", "tool"):
        raise bad_request(f"the last message must come from the user or a tool (got {last['role']}): without a "
                          "chat template the prompt is the last message's content", "messages")
    return message_text(last), last["role"], False


# ---- responses --------------------------------------------------------------------------------------------
def usage_json(final: FinishEvent) -> dict:
    u = final.usage
    return {
        "prompt_tokens": u.prompt_tokens + u.cached_tokens, "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.cached_tokens + u.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens}, "seed": u.seed,
        "kv": {"peak_kv_slots": u.peak_kv_slots, "peak_kv_bytes": u.peak_kv_bytes,
               "reserved_kv_bytes": u.reserved_kv_bytes, "evicted_tokens": u.evicted_tokens,
               "merged_tokens": u.merged_tokens, "compression_events": u.compression_events,
               "fallbacks": u.fallbacks, "dropped_decisions": u.dropped_decisions},
    }


def finish_fields(final: FinishEvent) -> dict:
    return {"finish_reason": FINISH_REASONS.get(final.finish_reason, final.finish_reason.value),
            "stop_reason": final.matched_stop if final.finish_reason == FinishReason.STOP else None}


def sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class _GenerationStream(StreamingResponse):
    """An SSE response that closes its generation however the response ends (even before its first chunk)."""

    def __init__(self, content, generation, headers):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.aclose()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(servicer, auth=None) -> FastAPI:
    """The FastAPI app over a DecoderServicer (its engine, sessions and durable store); `auth` a BearerAuth."""
    from kvpilot_protocol.security import INVALID_TOKEN, MISSING_TOKEN

    app = FastAPI(title="kvpilot", docs_url=None, redoc_url=None, openapi_url=None)
    engine = servicer.engine
    model_name = servicer.model_name
    vocab = engine.engine.model_config.vocab_size
    tokenizer = servicer.tokenizer
    loaded = engine.engine.loaded
    special = lambda ids: tokenizer.inner.decode(ids[:1], skip_special_tokens=False) if ids else ""  # noqa: E731
    template = load_chat_template(loaded.path, bos_token=special([tokenizer.bos_token_id] if tokenizer.bos_token_id
                                                                 is not None else []),
                                  eos_token=special(tokenizer.eos_token_ids))
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def principal(request: Request) -> str | None:
        if auth is None:
            return None
        header = request.headers.get("authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, MISSING_TOKEN, code="UNAUTHENTICATED")
        found = auth.principal([("authorization", header)])
        if found is None:
            raise ApiError(401, INVALID_TOKEN, code="UNAUTHENTICATED")
        return found

    async def read_body(request: Request) -> dict:
        """The JSON body, its model checked (404), unsupported fields refused and types of the shared ones checked."""
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", code="INVALID_ARGUMENT")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", code="INVALID_ARGUMENT")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        check_fields(body)
        _bool(body, "stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        return body

    async def start(request: Request, who: str | None, grpc_request: pb.GenerateRequest, operation: str):
        # The caller's W3C trace context (traceparent / tracestate headers) parents the generation's span.
        parent = telemetry.extract({k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")})
        try:
            return await servicer.start_generation(grpc_request, who, None, api="http", operation=operation,
                                                   trace_context=parent)
        except RequestError as exc:
            raise ApiError.of(exc) from None

    def request_id_of(request: Request, body: dict) -> str:
        return _str(body, "request_id") or request.headers.get("x-request-id") or uuid.uuid4().hex

    async def respond(request: Request, body: dict, generation, chat: bool):
        """The answer to an accepted generation: an SSE stream, or one JSON object (the generation is closed either
        way, and aborted if the client goes away first)."""
        try:
            return await _respond(request, body, generation, chat)
        except BaseException:
            await generation.aclose()
            raise

    async def _respond(request: Request, body: dict, generation, chat: bool):
        gen = generation.request
        wants_logprobs = gen.sampling.logprobs is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + gen.request_id
        headers = {"x-request-id": gen.request_id}
        if gen.session_id:
            headers[SESSION_HEADER] = gen.session_id
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if _bool(body, "stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _GenerationStream(stream_events(generation, head, chat, include_usage, wants_logprobs), generation,
                                     headers)
        task = asyncio.ensure_future(collect(generation))
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client went away: abort the request
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            return Response(status_code=499)
        finals, warnings, logprobs = task.result()
        choices = []
        for index, final in sorted(finals.items()):
            choice = {"index": index, "logprobs": logprobs_json(logprobs.get(index, []), tokenizer, chat)
                      if wants_logprobs else None, **finish_fields(final)}
            if chat:
                choice["message"] = {"role": "assistant", "content": final.text}
            else:
                choice["text"] = final.text
            choices.append(choice)
        if chat:
            head["object"] = "chat.completion"
        out = head | {"choices": choices, "usage": usage_json(generation.final)}
        if gen.session_id:
            out["session_id"] = gen.session_id
        if warnings:
            out["warnings"] = warnings
        return JSONResponse(out, headers=headers)

    async def collect(generation):
        """Every sample's final event and token logprobs (by sample index) and the warnings."""
        finals, logprobs, warned = {}, {}, []
        try:
            async for event, warnings in generation.events():
                if isinstance(event, TokenEvent):
                    logprobs.setdefault(event.index, []).extend(event.logprobs)
                elif isinstance(event, FinishEvent):
                    finals[event.index] = event
                    warned += warnings
                    if generation.final is not None:
                        return finals, warned, logprobs
        except RequestError as exc:
            raise ApiError.of(exc) from None
        finally:
            await generation.aclose()
        raise ApiError(500, "the request ended without a final message", code="INTERNAL")

    async def stream_events(generation, head: dict, chat: bool, include_usage: bool, wants_logprobs: bool = False):
        samples = range(generation.request.sampling.n)
        # Per sample: logprobs of tokens whose text has not been sent yet (a multi-byte char, a stop prefix), and
        # the text sent so far.
        pending: dict[int, list] = {i: [] for i in samples}
        sent: dict[int, str] = {i: "" for i in samples}

        def chunk(index: int, text: str | None = None, role: bool = False, final: FinishEvent | None = None) -> dict:
            choice = {"index": index, "logprobs": None, "finish_reason": None}
            if wants_logprobs and not role:
                choice["logprobs"] = logprobs_json(pending[index], tokenizer, chat, offset=len(sent[index]))
                pending[index].clear()
            if chat:
                choice["delta"] = {"role": "assistant"} if role else {}
                if text is not None:
                    choice["delta"]["content"] = text
            else:
                choice["text"] = text or ""
            if final is not None:
                choice |= finish_fields(final)
            return head | {"choices": [choice]}

        try:
            if chat:
                for index in samples:
                    yield sse(chunk(index, "", role=True))
            async for event, warnings in generation.events():
                if isinstance(event, TokenEvent):
                    pending[event.index] += event.logprobs
                if isinstance(event, TokenEvent) and event.text:
                    piece = chunk(event.index, event.text)
                    sent[event.index] += event.text
                    yield sse(piece)
                elif isinstance(event, FinishEvent):
                    done = sent[event.index]
                    rest = event.text[len(done):] if event.text.startswith(done) else ""
                    last = chunk(event.index, rest if rest or not chat else None, final=event)
                    if generation.request.session_id:
                        last["session_id"] = generation.request.session_id
                    if warnings:
                        last["warnings"] = warnings
                    yield sse(last)
                    if include_usage and generation.final is not None:  # after the last sample
                        yield sse(head | {"choices": [], "usage": usage_json(generation.final)})
        except RequestError as exc:  # failed after the stream started: an error event, as vLLM
            yield sse(ApiError.of(exc).body())
        yield sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Text completion (OpenAI Completions API), streaming with "stream": true."""
        who = principal(request)
        body = await read_body(request)
        text, ids = completion_prompt(body, vocab)
        grpc_request = build_request(body, text, ids, _str(body, "input_kind"), request_id_of(request, body))
        generation = await start(request, who, grpc_request, "text_completion")
        return await respond(request, body, generation, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """Chat completion (OpenAI Chat Completions API); messages rendered by the checkpoint's chat template."""
        who = principal(request)
        body = await read_body(request)
        text, role, templated = chat_prompt(body, template)
        kind = "user" if templated else "tool" if role == "tool" else _str(body, "input_kind")
        grpc_request = build_request(body, text, None, kind, request_id_of(request, body),
                                     max_tokens_field="max_completion_tokens", chat=True)
        if templated and body.get("add_special_tokens") is None:
            grpc_request.add_bos = False  # the template writes BOS itself where the model wants one
        generation = await start(request, who, grpc_request, "chat")
        return await respond(request, body, generation, chat=True)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "kvpilot", "root": model_name,
                "parent": None, "max_model_len": servicer.context}

    @app.get("/v1/models")
    async def models(request: Request):
        """The served model (one per decoder)."""
        principal(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        principal(request)
        if model != model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        return model_card()

    @app.get("/health")
    async def health():
        """200 while the engine thread runs, 503 once it is gone (as the gRPC health service's NOT_SERVING)."""
        if engine.alive:
            return {"status": "ok"}
        raise ApiError(503, "the decoder's engine is not running; retry on another decoder", code="UNAVAILABLE")

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus text: the OpenTelemetry metrics (serving, KV, policy) and process metrics."""
        content, content_type = await asyncio.to_thread(telemetry.prometheus_text)
        return Response(content, media_type=content_type)

    return app


SESSION_HEADER = "kvpilot-session-id"  # as the gRPC initial metadata: a client learns the session before any token


# ---- the server -------------------------------------------------------------------------------------------
def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise ValueError(f"HTTP address {address!r} must be host:port") from None


class HttpServer:
    """uvicorn serving create_app() on the running event loop (the gRPC server's); signals stay with the caller."""

    def __init__(self, servicer, security=None):
        self.security = security
        self.app = create_app(servicer, security.auth if security is not None else None)
        self._server = None
        self._task: asyncio.Task | None = None

    async def start(self, address: str) -> str:
        """Bind `address` (port 0 = any free port; TLS with the gRPC server's certificate), start, return host:port."""
        host, port = split_address(address)
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"could not bind the HTTP API to {address}: {exc}") from None
        tls = self.security is not None and self.security.tls
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ws="none", timeout_graceful_shutdown=2.0,
                                ssl_certfile=self.security.tls_cert if tls else None,
                                ssl_keyfile=self.security.tls_key if tls else None)
        self._server = _Uvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the HTTP API did not start on {address}")
            await asyncio.sleep(0.01)
        bound = sock.getsockname()[1]
        return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        self._server.config.timeout_graceful_shutdown = max(grace, 0.1)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, grace + 5)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the decoder's serve_forever owns SIGINT / SIGTERM
        yield
