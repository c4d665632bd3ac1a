"""What the engine takes and gives back: request parameters, stream events, usage, and request errors.

These are plain dataclasses; the gRPC server converts protobuf messages to and from them, so the engine can
be driven in-process (tests, benchmarks, the eval harness) without gRPC.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from decoder_service.oracle import FutureAttention


class RequestError(Exception):
    """A request the engine refuses. `code` names the gRPC status the server answers with."""

    code = "INVALID_ARGUMENT"


class InvalidRequest(RequestError):
    code = "INVALID_ARGUMENT"


# The request field an INVALID_ARGUMENT message is about, from how the message starts (messages name their field
# first): (pattern, the GenerateRequest field path, the OpenAI-compatible HTTP body field). The gRPC status carries
# it as a google.rpc.BadRequest field violation, the HTTP error object as its `param`.
FIELD_OF_MESSAGE = [
    (r"budget\b", "compression.budget", "kv_budget"), (r"interval\b", "compression.interval", "kv_interval"),
    (r"window\b", "compression.window", "kv_window"), (r"sinks\b", "compression.sinks", "kv_sinks"),
    (r"max_lag\b", "compression.max_lag", "kv_max_lag"), (r"(unknown )?policy\b", "compression.policy", "kv_policy"),
    (r"temperature\b", "sampling.temperature", "temperature"), (r"top_p\b", "sampling.top_p", "top_p"),
    (r"top_k\b", "sampling.top_k", "top_k"), (r"min_p\b", "sampling.min_p", "min_p"),
    (r"repetition_penalty\b", "sampling.repetition_penalty", "repetition_penalty"),
    (r"presence_penalty\b", "sampling.presence_penalty", "presence_penalty"),
    (r"frequency_penalty\b", "sampling.frequency_penalty", "frequency_penalty"),
    (r"logprobs\b", "sampling.logprobs", "logprobs"), (r"n\b", "sampling.n", "n"),
    (r"min_tokens\b", "stopping.min_tokens", "min_tokens"), (r"max_new_tokens\b", "stopping.max_new_tokens", "max_tokens"),
    (r"(at most \d+ )?stop token ids?\b", "stopping.stop_token_ids", "stop_token_ids"),
    (r"(at most \d+ )?stop\b", "stopping.stop", "stop"),
    (r"(unknown )?session\b", "session.id", "session_id"), (r"(prompt|text|token id)\b", "input", "prompt"),
]


def field_of_message(message: str, http: bool = False) -> str | None:
    """The field (GenerateRequest path, or with `http` the HTTP body field) a status message is about, if known."""
    return next((fields[http] for pattern, *fields in FIELD_OF_MESSAGE if re.match(pattern, message)), None)


class ResourceExhausted(RequestError):
    code = "RESOURCE_EXHAUSTED"


class SessionNotFound(RequestError):
    code = "NOT_FOUND"


class SessionStoreDown(RequestError):
    """The session is not on this decoder and the durable session store cannot be read."""

    code = "UNAVAILABLE"


class SessionConflict(RequestError):
    """The session already exists, or another request is generating in it."""

    code = "FAILED_PRECONDITION"


class DeadlineExceeded(RequestError):
    """The request's deadline passed before it finished (e.g. while it waited for KV memory)."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(RequestError):
    """The client went away before the request finished (its own doing: not a server error on its span)."""

    code = "CANCELLED"


class InternalError(RequestError):
    """A fault while serving this request (a numeric blow-up, a scorer or kernel error). Only this request ends."""

    code = "INTERNAL"


# Below this temperature sampling is greedy: logits / 1e-40 overflow float32, and the limit of a softmax at
# T -> 0 is the argmax anyway (vLLM uses the same epsilon).
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_SAMPLES = 16  # n: samples of one prompt per request
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: the engine draws one and reports it
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Logit processors (vLLM's order: penalties, then temperature, then top-k / top-p / min-p).
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability; 0 = off
    repetition_penalty: float = 1.0  # on every token of the context (HF/vLLM): > 1 discourages repeats; 1 = off
    presence_penalty: float = 0.0  # subtracted once from each generated token's logit (OpenAI); 0 = off
    frequency_penalty: float = 0.0  # subtracted per occurrence among the generated tokens (OpenAI); 0 = off
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens are generated
    include_stop: bool = False  # keep a matched stop string at the end of the text (vLLM's include_stop_str_in_output)
    # Log-probabilities: None = off; N = each token's own plus the N most likely alternatives (0-20), from the
    # distribution after the penalties and before temperature / top-k / top-p / min-p (vLLM's "processed" choice).
    logprobs: int | None = None
    # Samples of one prompt (OpenAI's n): the prompt is prefilled once; after its first token the other n - 1
    # samples fork its KV copy-on-write (no copy of the prompt), each with its own generator (seed + index).
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether the logits need the penalties or the min_tokens mask before greedy or sampled picks."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)


@dataclass
class CompressionConfig:
    """How a sequence's KV cache is kept within budget. budget == 0 means no limit (policy `full`)."""

    policy: str = "full"
    budget: int = 0  # slots per (layer, KV head) after a compression
    interval: int = 16  # compress every `interval` new tokens once the sequence holds >= budget slots
    window: int = 16  # most recent tokens always kept
    sinks: int = 4  # first tokens always kept
    max_lag: int = 4  # decode steps a remote decision may be late before it is dropped (DESIGN invariant 5)
    params: dict[str, str] = field(default_factory=dict)  # policy-specific, parsed by the policy

    @property
    def bounded(self) -> bool:
        return self.policy != "full" and self.budget > 0

    @property
    def protected(self) -> int:
        return self.sinks + self.window


class SegmentKind(str, Enum):
    USER = "user"
    TOOL = "tool"
    MODEL = "model"


@dataclass
class GenerationRequest:
    request_id: str
    input_ids: list[int]  # new tokens (for a session: appended to its history)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    session_id: str | None = None
    create_session: bool = False
    input_kind: SegmentKind = SegmentKind.USER
    add_bos: bool | None = None  # first turn only; None: as the tokenizer does (TextTokenizer.adds_bos)
    trace_parent: object = field(default=None, compare=False, repr=False)  # the `generate` span, if traced
    deadline: float | None = None  # time.monotonic() after which the request ends with DEADLINE_EXCEEDED
    principal: str | None = None  # the authenticated caller (sessions belong to their creator); None = auth off
    # The policy's description, resolved on the event loop before queueing (so the engine thread never waits
    # for a remote Describe); None: the engine asks its policy client (cached).
    policy_description: object = field(default=None, compare=False, repr=False)
    # Continue from the cache of this running request instead of a prompt of its own: the new sequence shares the
    # parent's KV blocks copy-on-write and appends its input after the parent's computed tokens (a side thread
    # that reads the main context without copying it, or several samples of one prefix). Engine-level for now.
    fork_of: str | None = None
    # With fork_of, for a fork that only appends (a side thread, no compression): lease the parent's full blocks
    # instead of being promised a private copy of each (decoder_service/kv_pool.py, KVPool.fork). If the parent
    # rewrites them (a compaction), this fork ends at once with finish reason ABORT, its answer void.
    fork_lease: bool = False
    # ---- evaluation only: set by in-process harnesses (kvpilot eval, bench pareto / fidelity), never from gRPC ----
    # Golden Eviction's oracle (decoder_service/oracle.py): the reference trace's future attention, for a policy
    # that declares the `future_attention` statistic. Its block grid must match this request's compression.
    oracle: FutureAttention | None = field(default=None, compare=False, repr=False)
    # Teacher forcing: at each step the engine records the model's distribution against the next of these
    # tokens (FinishEvent.replay) and appends it instead of sampling; the sequence ends after the last one
    # (EOS and stop conditions still apply: set ignore_eos and no stops to force them all).
    forced_tokens: list[int] | None = field(default=None, repr=False)


class FinishReason(str, Enum):
    EOS = "eos"
    STOP = "stop"  # a stop string or stop token id
    LENGTH = "length"
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # failed: FinishEvent.error says why (the server answers with its gRPC status)


@dataclass
class Usage:
    prompt_tokens: int = 0  # tokens this request added to the sequence
    cached_tokens: int = 0  # tokens of the session already in the KV cache when the request started
    generated_tokens: int = 0
    peak_kv_slots: int = 0  # max valid slots per (layer, KV head)
    peak_kv_bytes: int = 0
    reserved_kv_bytes: int = 0  # what admission control reserved for the sequence
    evicted_tokens: int = 0
    merged_tokens: int = 0
    compression_events: int = 0
    fallbacks: int = 0
    dropped_decisions: int = 0
    seed: int = 0
    time_to_first_token_s: float = 0.0
    duration_s: float = 0.0
    # Side threads (policy sidequest, decoder_service/side_threads.py): their tokens never enter the session.
    side_threads: int = 0
    side_tokens: int = 0
    side_cut: int = 0  # side threads that ran out of tokens (their answers are void)
    dropped_tool_outputs: int = 0  # tool outputs dropped at this request's turn boundary
    side_ignored: int = 0  # ids an answer named that were ignored (unknown, protected, repeated, void answers)
    kv_reads: int = 0  # KV slots attended, summed over decode steps (per layer and KV head): what decoding reads
    beacons: int = 0  # Breadcrumbs: beacons fed, each replacing a window of generated tokens


@dataclass
class TokenLogprob:
    """The log-probability of a generated token and the `top` most likely alternatives [(token id, logprob)]."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when the request asked for them
    index: int = 0  # which sample (SamplingParams.n) the tokens belong to


@dataclass
class EvictionEvent:
    step: int  # decode step (tokens generated so far) at which the plan was applied
    frame_id: int
    policy: str
    slots_before: int
    slots_after: int
    evicted: int
    merged: int = 0
    policy_latency_s: float = 0.0
    staleness_steps: int = 0
    fallback: bool = False
    reason: str = ""  # why a fallback or drop happened
    index: int = 0  # which sample (SamplingParams.n) was compressed


@dataclass
class ReplayStep:
    """One teacher-forced step (GenerationRequest.forced_tokens): the model's distribution against the reference."""

    token: int  # the forced (reference) token appended at this step
    logprob: float  # the model's log-probability of it
    argmax: int  # the model's own greedy pick
    in_top5: bool  # whether the forced token is among the model's 5 most likely
    kv_slots: int  # valid slots per (layer, KV head) the distribution was computed over


@dataclass
class FinishEvent:
    finish_reason: FinishReason
    usage: Usage
    text: str = ""  # the whole generated text (stop string excluded)
    token_ids: list[int] = field(default_factory=list)
    matched_stop: str | int | None = None
    session_id: str | None = None
    error: RequestError | None = None  # set with FinishReason.ERROR
    replay: list[ReplayStep] = field(default_factory=list)  # teacher-forced requests: one record per forced token
    index: int = 0  # which sample (SamplingParams.n) ended; a request with n samples ends after n of these


Event = TokenEvent | EvictionEvent | FinishEvent
