"""A small synchronous client for the Decoder service: build requests, stream answers to a terminal."""
from __future__ import annotations

import sys
from typing import TextIO

from kvpilot_protocol.v1 import decoder_pb2 as pb
from kvpilot_protocol.v1 import decoder_pb2_grpc


def connect(address: str, tls_ca: str | None = None, token: str | None = None) -> decoder_pb2_grpc.DecoderStub:
    """A Decoder stub; TLS when `tls_ca` is set, `authorization: Bearer` when `token` is."""
    from kvpilot_protocol.security import secure_channel

    return decoder_pb2_grpc.DecoderStub(secure_channel(address, tls_ca=tls_ca, token=token))


def build_request(
    text: str | None = None,
    token_ids: list[int] | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    min_tokens: int | None = None,
    logprobs: int | None = None,
    n: int | None = None,
    stop: list[str] = (),
    stop_token_ids: list[int] = (),
    policy: str = "",
    budget: int = 0,
    interval: int | None = None,
    window: int | None = None,
    sinks: int | None = None,
    params: dict[str, str] | None = None,
    session_id: str = "",
    new_session: bool = False,
    tool_output: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams()
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("min_p", min_p), ("repetition_penalty", repetition_penalty),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("logprobs", logprobs), ("n", n)):
        if value is not None:
            setattr(sampling, name, value)
    compression = pb.CompressionConfig(policy=policy, budget=budget, params=params or {})
    for name, value in (("interval", interval), ("window", window), ("sinks", sinks)):
        if value is not None:
            setattr(compression, name, value)
    request = pb.GenerateRequest(
        request_id=request_id,
        sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop=list(stop), stop_token_ids=list(stop_token_ids)),
        compression=compression,
        session=pb.SessionRef(id=session_id, create=new_session),
        input_kind=pb.INPUT_KIND_TOOL_OUTPUT if tool_output else pb.INPUT_KIND_USER,
    )
    if min_tokens is not None:
        request.stopping.min_tokens = min_tokens
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif text is not None:
        request.text = text
    return request


def stream_to_terminal(stub, request: pb.GenerateRequest, out: TextIO = sys.stdout, show_evictions: bool = True,
                       timeout: float | None = None) -> pb.GenerationComplete:
    """Print text as it streams (eviction events on their own lines) and return the final message."""
    complete = None
    for response in stub.Generate(request, timeout=timeout):
        kind = response.WhichOneof("event")
        if kind == "chunk":
            out.write(response.chunk.text)
            out.flush()
        elif kind == "eviction" and show_evictions:
            e = response.eviction
            tag = " FALLBACK" if e.fallback else ""
            out.write(f"\n  [evict{tag} {e.policy}: {e.slots_before} -> {e.slots_after} slots, "
                      f"{e.policy_latency_ms:.1f} ms]\n")
        elif kind == "complete":
            complete = response.complete
    out.write("\n")
    if complete is None:
        raise RuntimeError("stream ended without a final message")
    return complete


def format_usage(complete: pb.GenerationComplete) -> str:
    u = complete.usage
    reason = pb.FinishReason.Name(complete.finish_reason).removeprefix("FINISH_REASON_").lower()
    lines = [
        f"finish: {reason}" + (f" (session {complete.session_id})" if complete.session_id else ""),
        f"tokens: prompt {u.prompt_tokens}, cached {u.cached_tokens}, generated {u.generated_tokens}",
        f"KV: peak {u.peak_kv_slots} slots ({u.peak_kv_bytes / 1024:.1f} KiB), reserved {u.reserved_kv_bytes / 1024:.1f} KiB",
        f"compression: {u.compression_events} events, {u.evicted_tokens} evicted, {u.merged_tokens} merged, "
        f"{u.fallbacks} fallbacks",
        f"time: first token {u.time_to_first_token_ms:.0f} ms, total {u.duration_ms:.0f} ms, seed {u.seed}",
    ]
    return "\n".join(lines)
