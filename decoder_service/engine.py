"""The engine: continuous batching over the KV pool.

One `step()`:
  1. end waiting requests past their deadline, admit waiting requests whose KV footprint (and statistics
     memory) can be reserved now; a request that cannot be admitted yet does not hold up smaller ones behind
     it, until it has waited `max_bypass_s` (then nothing overtakes it, so it cannot starve),
  2. schedule tokens: one decode token per running sequence, then prefill chunks up to the step's budget,
     cut where the sequence's next compression is due (invariant 10),
  3. run the model once over all scheduled tokens (flattened), one attention call per layer for every
     sequence through the block tables of the paged pool (attention.py),
  4. sample where a sequence has consumed all its known tokens, stream text, check stop conditions,
  5. run step hooks (compression lives there), retire finished sequences and free their slots.

Containment (invariant 9): a fault that belongs to one sequence (a numeric blow-up in sampling, a scorer or
kernel error, a failed allocation) ends that sequence alone through `fail()`, with a status and a message;
a failing batched forward is retried sequence by sequence to find the one at fault. `_retire` is the one
place where a sequence's KV blocks, statistics memory, decision in flight and spans are released.

The engine is synchronous and single-threaded: `AsyncEngine` (async_engine.py) runs it on its own thread and
feeds it requests from the gRPC event loop.
"""
from __future__ import annotations

import functools
import logging
import random
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from decoder_service.attention import PoolAttention, Segment
from decoder_service.calibration import CALIBRATION_FILE, weights_fingerprint
from decoder_service.compression import CompressionState, Compressor
from decoder_service.checkpoint import LoadedModel
from decoder_service.kv_pool import KVPool, PoolExhausted, SequenceKV
from decoder_service.requests import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_LOGPROBS,
    MAX_SAMPLES,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    CompressionConfig,
    DeadlineExceeded,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InternalError,
    InvalidRequest,
    ReplayStep,
    RequestError,
    ResourceExhausted,
    SegmentKind,
    SessionConflict,
    SessionNotFound,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from decoder_service.sampling import (NON_FINITE, SamplingError, apply_penalties, forced_steps, greedy_tokens,
                                      sample_token, token_logprob)
from decoder_service.sessions import InMemorySessionStore, Session
from decoder_service.side_threads import SideThreads
from decoder_service.beacons import Beacons
from decoder_service.statistics import SequenceStatistics, feature_weights, statistics_bytes
from kvpilot_protocol.telemetry import DecoderMetrics
from kvpilot_protocol.policy import FULL, PolicyDescription, PolicyRejected, PolicyUnavailable, StatsSpec

log = logging.getLogger(__name__)
# Client-chosen session ids: short, printable, safe in Redis keys and logs. Server-made ids are uuid4 hex.
SESSION_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def provisional_description(policy: str, error: Exception) -> PolicyDescription:
    """Never stall, never die: a policy the service cannot describe right now is served with no statistics,
    so every compression of the request falls back (counted, reported). Never cached."""
    log.warning("policy %r could not be described (%s): its compressions will use the fallback", policy, error)
    return PolicyDescription(policy=policy, provisional=True)


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest(f"session id {session_id[:64]!r} is invalid: use 1-128 characters of A-Z a-z 0-9 _ . : -")


@dataclass
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per step over all sequences: decode tokens first, then prefill chunks
    prefill_chunk: int = 256  # most prompt tokens one sequence prefills in one step
    max_running: int = 32  # sequences decoding at once
    max_waiting: int = 64  # admitted-but-not-yet-running bound; beyond it requests get RESOURCE_EXHAUSTED
    kv_pool_bytes: int = 256 << 20
    kv_dtype: torch.dtype | None = None  # default: the model's dtype
    max_resident_sessions: int = 256  # idle sessions whose KV stays in the pool (LRU beyond that)
    stats_memory_bytes: int | None = None  # statistics held outside the pool, all sequences; None: pool / 4
    max_bypass_s: float = 2.0  # how long a request that does not fit yet lets later (smaller) ones overtake it
    block_size: int = 16  # KV slots per pool block (a power of two)


@dataclass
class Cursor:
    """Where a sequence's cache stands: history tokens computed, the next logical position (apart from the
    history index once input-only tokens were fed), the token at every position, and each computed history
    token's position. Parked with a session's KV, so the next turn continues from it."""

    num_computed: int = 0
    next_position: int = 0
    position_tokens: list[int] = field(default_factory=list)
    history_positions: list[int] = field(default_factory=list)

    @classmethod
    def of_history(cls, history: list[int], num_computed: int) -> "Cursor":
        """A cache holding exactly the first `num_computed` history tokens at their own indices."""
        return cls(num_computed, num_computed, list(history[:num_computed]), list(range(num_computed)))


@dataclass
class Sequence:
    """A request in flight: its tokens, its KV blocks and its output stream."""

    request: GenerationRequest
    emit: Callable[[Event], None]
    token_ids: list[int]  # whole history: earlier turns + this request's input + generated tokens
    num_computed: int  # history tokens whose K/V is in the cache
    input_start: int  # index in token_ids where this request's input begins
    kv: SequenceKV | None = None
    stats: SequenceStatistics | None = None
    spec: StatsSpec = field(default_factory=lambda: FULL.spec)  # what the policy needs (from its description)
    compression_state: CompressionState = field(default_factory=CompressionState)
    session: Session | None = None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    detok: object = None
    text: str = ""  # generated text so far
    text_sent: int = 0  # characters of `text` already streamed
    usage: Usage = field(default_factory=Usage)
    started_at: float = field(default_factory=time.monotonic)
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    reserved_slots: int = 0
    stats_bytes: int = 0  # statistics memory admission control counted for this sequence
    steps: int = 0  # engine steps this sequence took part in (staleness is counted in these)
    blocked_since: float | None = None  # when admission first failed for lack of memory
    input_only: list[int] = field(default_factory=list)  # fed after the pending history; never sampled/streamed
    fork_parent: "Sequence | None" = None  # the running sequence whose cache this one shares (GenerationRequest.fork_of)
    next_position: int = 0  # logical position of the next fed token
    position_tokens: list[int] = field(default_factory=list)  # token fed at each logical position
    # History ranges [start, end) not to prefill: a session's dropped tool outputs (SideQuest) when its parked KV
    # was lost and the turn re-prefills from the history. Skipped as if prefilled and evicted: positions kept.
    skip: list[tuple[int, int]] = field(default_factory=list)
    history_positions: list[int] = field(default_factory=list)  # position of each computed history token
    error: RequestError | None = None
    replay: list[ReplayStep] = field(default_factory=list)  # teacher forcing (request.forced_tokens): one per step
    index: int = 0  # which of the request's samples this is (SamplingParams.n); 0 prefills the shared prompt
    group: str | None = None  # samples 1..n-1: the request id of sample 0, whose prompt KV they fork

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def pending(self) -> int:
        """Known tokens not yet in the KV cache (prompt left to prefill, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed + len(self.input_only)

    def cursor(self) -> Cursor:
        return Cursor(self.num_computed, self.next_position, self.position_tokens, self.history_positions)

    def restore(self, cursor: Cursor) -> None:
        self.num_computed, self.next_position = cursor.num_computed, cursor.next_position
        self.position_tokens, self.history_positions = list(cursor.position_tokens), list(cursor.history_positions)

    def feed(self, n: int) -> tuple[list[int], int]:
        """The next n tokens to feed (pending history first, then input-only ones) and how many are history."""
        history = min(n, len(self.token_ids) - self.num_computed)
        return self.token_ids[self.num_computed:self.num_computed + history] + self.input_only[:n - history], history

    @property
    def in_prefill(self) -> bool:
        return self.pending > 1 or not self.generated


StepHook = Callable[["Engine", Sequence], None]


def _indexed(emit: Callable[[Event], None], index: int) -> Callable[[Event], None]:
    """The event stream of sample `index` of a request: the request's own stream, each event marked."""
    def emit_indexed(event: Event) -> None:
        event.index = index
        emit(event)
    return emit_indexed


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, store: InMemorySessionStore | None = None,
                 policy=None, fallback=None):
        """`policy`: the policy client (in-process or remote; None serves the full cache only); `fallback`: the
        local policy used when no decision is there in time (default: the built-in StreamingLLM keep set)."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.config = config or EngineConfig()
        if self.config.stats_memory_bytes is not None and self.config.stats_memory_bytes <= 0:
            raise ValueError(f"stats_memory_bytes must be > 0 (got {self.config.stats_memory_bytes}); None: pool / 4")
        if self.config.max_bypass_s < 0:
            raise ValueError(f"max_bypass_s must be >= 0 seconds (got {self.config.max_bypass_s})")
        self.device = next(self.model.parameters()).device
        dtype = self.config.kv_dtype or next(self.model.parameters()).dtype
        self.pool = KVPool.for_model(self.model_config, self.config.kv_pool_bytes, dtype, self.device,
                                     self.config.block_size)
        self.store = store or InMemorySessionStore()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.resident: OrderedDict[str, tuple[SequenceKV, SequenceStatistics | None, Cursor]] = OrderedDict()
        self.busy_sessions: set[str] = set()
        self.metrics = DecoderMetrics(self.pool)
        self.compressor = Compressor(policy=policy, fallback=fallback, metrics=self.metrics)
        self.side_threads = SideThreads()  # SideQuest: forks that name tool outputs to drop (side_threads.py)
        self.beacons = Beacons()  # Breadcrumbs: a beacon folds every c generated tokens (beacons.py)
        self.step_hooks: list[StepHook] = [self.compressor, self.side_threads, self.beacons]
        self.steps = 0
        self.stats_capacity_bytes = self.config.stats_memory_bytes or max(1 << 20, self.pool.capacity_bytes // 4)
        self.stats_reserved_bytes = 0  # running sequences' statistics + parked sessions' (parked_stats_bytes)
        self.parked_stats_bytes: dict[str, int] = {}
        self.failures: dict[str, int] = {}  # gRPC status code -> requests ended by a fault
        self._descriptions: OrderedDict[tuple, PolicyDescription] = OrderedDict()
        self._descriptions_lock = threading.Lock()

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Sequence:
        """Validate and queue a request. Raises a RequestError (nothing is queued then)."""
        description = self._validate(request)
        if request.fork_lease and (request.fork_of is None or request.compression.policy != "full"
                                   or request.compression.bounded):
            raise InvalidRequest("fork_lease is for a fork that only appends: it needs fork_of and no compression "
                                 f"(got fork_of={request.fork_of!r}, policy {request.compression.policy!r})")
        parent = self._fork_parent(request) if request.fork_of is not None else None
        session = self._open_session(request)
        history = session.token_ids if session else []
        if parent is not None:
            history = parent.token_ids[:parent.num_computed]
        input_ids = list(request.input_ids)
        add_bos = self.tokenizer.adds_bos if request.add_bos is None else request.add_bos
        if not history and parent is None and add_bos and self.model_config.bos_token_id is not None:
            if not input_ids or input_ids[0] != self.model_config.bos_token_id:
                input_ids = [self.model_config.bos_token_id] + input_ids
        total = len(history) + len(input_ids)
        self._check_lengths(total, request)
        if len(self.waiting) >= self.config.max_waiting:
            raise ResourceExhausted(f"server busy: {len(self.waiting)} requests are already waiting; retry later")
        if any(s.id == request.request_id for s in list(self.waiting) + self.running):
            raise InvalidRequest(f"request_id {request.request_id!r} is already in flight; use a unique id")
        # num_computed is settled at admission: a parked session KV may be dropped while this waits.
        seq = Sequence(request=request, emit=emit, token_ids=history + input_ids, num_computed=0,
                       input_start=len(history), session=session, spec=description.spec,
                       fork_parent=parent)
        seq.reserved_slots = self._footprint(seq)
        if seq.reserved_slots > self.pool.capacity_slots:
            raise ResourceExhausted(
                f"request needs {seq.reserved_slots} KV slots ({seq.reserved_slots * self.pool.slot_bytes / 2**20:.1f} MiB) "
                f"but the whole KV pool holds {self.pool.capacity_slots}; lower max_new_tokens"
                f"{', n' if request.sampling.n > 1 else ''} or set a compression budget"
            )
        need = self._stats_bytes(seq, seq.reserved_slots)
        if need > self.stats_capacity_bytes:
            raise ResourceExhausted(
                f"policy {request.compression.policy!r} needs {need / 2**20:.1f} MiB of attention statistics for this "
                f"request but the decoder holds {self.stats_capacity_bytes / 2**20:.1f} MiB for all of them; "
                "lower window_queries or the budget")
        if session:
            if request.create_session:
                self.store.put(session)  # visible (GetSession, conflicts) from now on
            self.busy_sessions.add(session.id)
        seq.usage.prompt_tokens = len(input_ids)
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        seq.usage.seed = seed
        seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        seq.detok = self.tokenizer.detokenizer(seq.token_ids)
        self.waiting.append(seq)
        return seq

    def _fork_parent(self, request: GenerationRequest) -> "Sequence":
        """The running request a fork continues from (raises InvalidRequest with what to fix)."""
        if request.session_id or request.create_session:
            raise InvalidRequest("a fork continues a running request's cache; it cannot also use a session")
        parent = next((s for s in self.running if s.id == request.fork_of and s.kv is not None
                       and s.finish_reason is None), None)
        if parent is None:
            raise InvalidRequest(f"fork_of: no running request {request.fork_of!r} (it must be admitted and not "
                                 "finished)")
        return parent

    def fail(self, seq: Sequence, exc: BaseException) -> None:
        """End one sequence because of a fault that belongs to it; every other sequence goes on."""
        if seq not in self.running and seq not in self.waiting:
            return  # already retired
        if isinstance(exc, RequestError):
            error = exc
        elif isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            error = ResourceExhausted(f"out of memory while serving this request: {exc}")
        else:
            log.error("request %s failed", seq.id, exc_info=exc)
            error = InternalError(f"request failed: {type(exc).__name__}: {exc}")
        seq.error = error
        seq.finish_reason = FinishReason.ERROR
        self.failures[error.code] = self.failures.get(error.code, 0) + 1
        self.metrics.request_failures.add(1, {"rpc.grpc.status_code": error.code})
        self._retire(seq)

    def _end_broken_leases(self) -> None:
        """End the lease forks whose parent rewrote a leased block last step (before they read it again)."""
        broken = self.pool.take_broken()
        if not broken:
            return
        for seq in [s for s in self.running if s.kv is not None and s.kv.owner in broken]:
            seq.finish_reason = FinishReason.ABORT
            self._retire(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request, all its samples: their slots are freed now (a session keeps what was computed)."""
        aborted = False
        for seq in list(self.waiting) + self.running:
            if request_id in (seq.id, seq.group) and seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
                self._retire(seq)
                aborted = True
        return aborted

    def feed_input_only(self, request_id: str, token_ids: list[int]) -> None:
        """Queue tokens to feed after the sequence's pending history: each gets a KV slot and the next logical
        position, but is never sampled, streamed, shown or added to the history (Breadcrumbs' beacons).
        The next sampled token follows them. Engine thread only (a step hook, or through AsyncEngine.call).
        They are not in the session history: a session whose parked KV was dropped re-prefills without them."""
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"input-only token id {bad[0]} is outside the vocabulary [0, {vocab})")
        seq = next((s for s in self.running + list(self.waiting) if s.id == request_id and s.finish_reason is None),
                   None)
        if seq is None:
            raise InvalidRequest(f"no request {request_id!r} is in flight")
        s = seq.request.sampling
        to_feed = seq.pending + len(token_ids) + max(0, s.max_new_tokens - len(seq.generated) - 1)
        if seq.next_position + to_feed > self.model_config.max_position_embeddings:
            raise InvalidRequest(f"input-only tokens would take request {request_id!r} past the model's context")
        if not seq.request.compression.bounded:  # an unbounded sequence has exactly the room it reserved
            if seq.kv is None:
                seq.reserved_slots += len(token_ids)
            elif seq.kv.n + to_feed > seq.kv.capacity:
                raise ResourceExhausted(f"request {request_id!r} has no reserved KV room for {len(token_ids)} more "
                                        "tokens; set a compression budget")
        seq.input_only.extend(token_ids)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- validation ---------------------------------------------------------------------------------
    def describe(self, policy: str, params: dict[str, str]) -> PolicyDescription:
        """The policy's description, cached per (policy, params) (thread-safe: the event loop warms the cache
        for remote policies so the engine thread never waits on the network). Raises PolicyRejected."""
        if policy == "full":
            if params:
                raise PolicyRejected(f"policy 'full' takes no parameters (got {sorted(params)})")
            return FULL
        key = (policy, tuple(sorted(params.items())))
        with self._descriptions_lock:
            if key in self._descriptions:
                self._descriptions.move_to_end(key)
                return self._descriptions[key]
        try:
            description = self.compressor.policy.describe(policy, dict(params))
        except PolicyUnavailable as exc:
            return provisional_description(policy, exc)
        self.remember_description(policy, params, description)
        return description

    def remember_description(self, policy: str, params: dict[str, str], description: PolicyDescription) -> None:
        if description.provisional:
            return
        key = (policy, tuple(sorted(params.items())))
        with self._descriptions_lock:
            self._descriptions[key] = description
            while len(self._descriptions) > 256:
                self._descriptions.popitem(last=False)

    def _validate(self, request: GenerationRequest) -> PolicyDescription:
        s, c = request.sampling, request.compression
        if not request.input_ids and not request.session_id:
            raise InvalidRequest("prompt is empty: send text or token_ids")
        vocab = self.model_config.vocab_size
        bad = [t for t in request.input_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if s.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1 (got {s.max_new_tokens})")
        if not 0 <= s.temperature <= MAX_TEMPERATURE:  # NaN fails this too
            raise InvalidRequest(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (got {s.temperature}); 0 means greedy")
        if not 0 < s.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1] (got {s.top_p})")
        if s.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (got {s.top_k}); 0 disables it")
        if not 0 <= s.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1] (got {s.min_p}); 0 disables it")
        if not 0 < s.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (got "
                                 f"{s.repetition_penalty}); 1 disables it")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(s, name) <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2] (got {getattr(s, name)}); 0 disables it")
        if s.logprobs is not None and not 0 <= s.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}] alternatives per token (got {s.logprobs})")
        if not 1 <= s.n <= MAX_SAMPLES:
            raise InvalidRequest(f"n must be in [1, {MAX_SAMPLES}] samples per request (got {s.n})")
        if s.n > 1 and (request.session_id or request.create_session):
            raise InvalidRequest(f"n = {s.n} samples cannot continue or create a session (a session keeps one "
                                 "history): send n = 1 with a session, or no session")
        if s.n > 1 and (request.fork_of is not None or request.forced_tokens is not None):
            raise InvalidRequest(f"n = {s.n} samples cannot be combined with fork_of or forced_tokens")
        if not 0 <= s.min_tokens <= s.max_new_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_new_tokens = {s.max_new_tokens}] (got {s.min_tokens})")
        if any(not stop for stop in s.stop):
            raise InvalidRequest("stop strings must not be empty")
        if len(s.stop) > MAX_STOP_STRINGS or any(len(stop) > MAX_STOP_STRING_CHARS for stop in s.stop):
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_CHARS} "
                                 f"characters each (got {len(s.stop)}, longest {max(map(len, s.stop))})")
        if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop token ids (got {len(s.stop_token_ids)})")
        bad = [t for t in s.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if request.session_id:
            check_session_id(request.session_id)
        resolved = request.policy_description
        describe = self.describe if resolved is None else (lambda policy, params: resolved)
        description = validate_compression(c, self.model_config.max_position_embeddings, describe)
        if "trig_scores" in description.spec.names and self.loaded.calibration is None:
            path = self.loaded.path
            raise InvalidRequest(f"policy {c.policy!r} needs the model's TriAttention calibration ({CALIBRATION_FILE} "
                                 f"beside the checkpoint), which {path} lacks: run `kvpilot calibrate --model {path}` "
                                 "and restart the decoder")
        if "kv_features" in description.spec.names:
            self._validate_feature_weights(c.policy, description.spec)
        if description.spec.beacon_interval and self.loaded.beacon_token_id is None:
            raise InvalidRequest(f"policy {c.policy!r} needs a beacon-trained checkpoint (breadcrumbs.json beside it "
                                 f"naming its beacon token); {self.loaded.path} is not one: train one with "
                                 "`kvpilot train-model --breadcrumbs C` or pick another policy")
        self._validate_evaluation_fields(request, description)
        return description

    def _validate_feature_weights(self, policy: str, spec) -> None:
        """A learned scorer's first layer must fit this model: shapes always, weights when the scorer names them
        (a scorer trained on another model would rank slots by meaningless projections, with no sign of it)."""
        try:
            w_key, _ = feature_weights(spec.feature_weights)
        except ValueError as exc:
            raise InvalidRequest(f"policy {policy!r}: {exc}") from None
        m = self.model_config
        expected = (m.num_layers, m.num_kv_heads, m.head_dim)
        if tuple(w_key.shape[:3]) != expected:
            raise InvalidRequest(f"policy {policy!r} ships key/value weights for [layers, KV heads, head dim] = "
                                 f"{list(w_key.shape[:3])}, but this decoder's model is {list(expected)}: use a "
                                 "scorer trained for this model (kvpilot train-scorer foresight --model DIR)")
        if spec.model_fingerprint and spec.model_fingerprint != self.weights_fingerprint:
            raise InvalidRequest(f"policy {policy!r} was trained for the model with weights sha256 "
                                 f"{spec.model_fingerprint[:12]}..., but this decoder serves {self.loaded.path} "
                                 f"(sha256 {self.weights_fingerprint[:12]}...): train a scorer for this model "
                                 f"(kvpilot train-scorer foresight --model {self.loaded.path}) or pass its weights=")

    @functools.cached_property
    def weights_fingerprint(self) -> str:
        return weights_fingerprint(self.loaded.path)

    def _validate_evaluation_fields(self, request: GenerationRequest, description: PolicyDescription) -> None:
        """The eval-only fields (GenerationRequest.oracle, forced_tokens), set by in-process harnesses only."""
        c = request.compression
        if "future_attention" in description.spec.names and c.bounded:
            oracle = request.oracle
            if oracle is None:
                raise InvalidRequest(f"policy {c.policy!r} declares future_attention, which only a reference trace's "
                                     "oracle gives: set GenerationRequest.oracle (decoder_service.oracle."
                                     "reference_oracle); it is evaluation-only (kvpilot eval / bench pareto / bench "
                                     "fidelity)")
            if not oracle.matches(c.interval, c.budget):
                raise InvalidRequest(f"the oracle's blocks ({oracle.block} queries from {oracle.origin} mod "
                                     f"{oracle.block}) are not this request's compression points (every "
                                     f"{c.interval} tokens at {c.budget % c.interval} mod {c.interval}): compute it "
                                     f"with interval={c.interval}, budget={c.budget}")
        forced = request.forced_tokens
        if forced is not None:
            if not forced:
                raise InvalidRequest("forced_tokens is empty: give at least one token to force (or None)")
            bad = [t for t in forced if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequest(f"forced token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.model_config.vocab_size})")
            if len(forced) > request.sampling.max_new_tokens:
                raise InvalidRequest(f"{len(forced)} forced tokens exceed max_new_tokens "
                                     f"({request.sampling.max_new_tokens}), which sizes the reservation")

    def _check_lengths(self, total: int, request: GenerationRequest) -> None:
        context = self.model_config.max_position_embeddings
        if total >= context:
            raise InvalidRequest(f"prompt has {total} tokens (session history included); the model's context is {context}")
        if total + request.sampling.max_new_tokens > context:
            raise InvalidRequest(
                f"prompt ({total} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds the model's "
                f"context of {context}; set max_new_tokens <= {context - total}"
            )

    def _open_session(self, request: GenerationRequest) -> Session | None:
        sid = request.session_id
        if request.create_session:
            sid = sid or uuid.uuid4().hex
            if self.store.get(sid) is not None:
                raise SessionConflict(f"session {sid!r} already exists; omit session.create (create_session in-process) to continue it")
            session = Session(id=sid, owner=request.principal or "")
            request.session_id = sid
            return session
        if not sid:
            return None
        session = self.store.get(sid)
        if session is None or not session.visible_to(request.principal):
            raise SessionNotFound(f"unknown session id {sid!r} (expired or deleted); set session.create (create_session in-process) to start one")
        if sid in self.busy_sessions:
            raise SessionConflict(f"session {sid!r} is generating; wait for its stream to finish")
        return session

    def _footprint(self, seq: Sequence, samples: int | None = None) -> int:
        """Slots to reserve: the whole sequence, or for a bounded policy budget + interval + max_lag. With n > 1
        samples, sample 0 reserves for all of them until they fork (_spawn_samples): its own blocks and n - 1
        times as many for the forks, whose promise covers their growth and a private copy of each shared block."""
        samples = seq.request.sampling.n if samples is None else samples
        if samples > 1:
            return samples * self.pool.blocks_for(self._footprint(seq, samples=1)) * self.pool.block_size
        total = len(seq.token_ids) + seq.request.sampling.max_new_tokens
        c = seq.request.compression
        parent = seq.fork_parent
        if parent is not None:  # a fork holds the parent's slots (compressed or not), then its own tokens
            new = total - seq.input_start
            return max(c.budget + c.interval + c.max_lag, parent.kv.n) if c.bounded else parent.kv.n + new
        if c.bounded:
            return min(total, c.budget + c.interval + c.max_lag)
        return total

    def _rebase_fork(self, seq: Sequence, parent: Sequence) -> int:
        """Fork the parent's cache as it stands now (it moved on since the request arrived): its computed tokens,
        then this request's input. Checks the fork against it and returns the slots to reserve."""
        if parent.finish_reason is not None or parent.kv is None:
            raise InvalidRequest(f"fork_of: request {parent.id!r} ended before this fork could start")
        seq.token_ids = parent.token_ids[:parent.num_computed] + seq.token_ids[seq.input_start:]
        seq.input_start = parent.num_computed
        seq.reserved_slots = slots = self._footprint(seq)
        context = self.model_config.max_position_embeddings
        new = len(seq.token_ids) - seq.input_start + seq.request.sampling.max_new_tokens
        if parent.next_position + new > context:
            raise InvalidRequest(f"fork_of: the parent is at position {parent.next_position}; {new} more tokens "
                                 f"exceed the model's context of {context}; lower max_new_tokens")
        # Its growth + a copy of every shared block (a lease: of the partly filled last one only).
        worst = self.pool.blocks_for(slots) + (1 if seq.request.fork_lease else len(parent.kv.blocks))
        if worst > self.pool.num_blocks:
            raise ResourceExhausted(f"fork_of: the fork may need {worst} KV blocks but the pool holds "
                                    f"{self.pool.num_blocks}; lower max_new_tokens or set a compression budget")
        return slots

    def _stats_bytes(self, seq: Sequence, capacity: int) -> int:
        c = self.model_config
        return statistics_bytes(seq.spec, c.num_layers, c.num_kv_heads, c.num_heads, c.head_dim, capacity)

    # ---- scheduling ---------------------------------------------------------------------------------
    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.request.deadline is not None and s.request.deadline <= now]:
            self.fail(seq, DeadlineExceeded(
                f"deadline exceeded after {now - seq.started_at:.1f} s waiting for KV memory "
                f"({seq.reserved_slots} slots needed, {self.pool.available_slots} can be promised now)"))

    def _admit(self) -> None:
        """Admit in arrival order, letting later requests overtake one that does not fit yet, unless it has
        waited `max_bypass_s` (then it is next: nothing else is admitted until it fits)."""
        now = time.monotonic()
        for seq in list(self.waiting):
            # A fork (a side thread) must start while its parent runs: max_running does not hold it back (memory does).
            if len(self.running) >= self.config.max_running and seq.fork_parent is None:
                continue
            try:
                admitted = self._reserve(seq)
            except Exception as exc:  # a failed allocation ends this request; it is never retried forever
                self.fail(seq, exc)
                continue
            if admitted:
                self.waiting.remove(seq)
                self.running.append(seq)
                continue
            if seq.blocked_since is None:
                seq.blocked_since = now
            if now - seq.blocked_since >= self.config.max_bypass_s:
                return

    def _reserve(self, seq: Sequence) -> bool:
        """Reserve the sequence's KV (growing its session's parked reservation, nothing copied) and its statistics memory.
        Returns False when memory is short right now; any other failure raises with nothing left taken."""
        sid = seq.session.id if seq.session else None
        resident = self.resident.get(sid) if sid else None
        slots = max(seq.reserved_slots, resident[0].n) if resident else seq.reserved_slots
        parent = seq.fork_parent
        if parent is not None:
            slots = self._rebase_fork(seq, parent)
        stats_bytes = self._stats_bytes(seq, slots)
        own_parked = self.parked_stats_bytes.get(sid, 0) if resident else 0  # released when this turn takes over
        while self.stats_reserved_bytes - own_parked + stats_bytes > self.stats_capacity_bytes:
            if not self._drop_idle_session(keep=sid):
                return False
        while True:
            try:
                if resident is not None:
                    seq.kv = self.pool.resize(resident[0].owner, slots)
                elif parent is not None:
                    seq.kv = self.pool.fork(parent.kv.owner, uuid.uuid4().hex, slots, lease=seq.request.fork_lease)
                else:
                    seq.kv = self.pool.allocate(uuid.uuid4().hex, slots)
                break
            except PoolExhausted:
                if not self._drop_idle_session(keep=sid):
                    return False
        if resident is not None:
            del self.resident[sid]
            self.stats_reserved_bytes -= self.parked_stats_bytes.pop(sid, 0)
        try:
            stats = None
            if resident is not None:
                _, stats, cursor = resident
                seq.restore(cursor)
                seq.usage.cached_tokens = seq.num_computed
                if stats is not None and stats.spec != seq.spec:
                    stats = None  # the policy changed between turns: start its statistics afresh
                if stats is not None:
                    stats.resize(seq.kv.capacity, seq.kv.n)
            elif parent is not None:
                seq.restore(parent.cursor())  # copies: the two cursors move apart from here
                seq.usage.cached_tokens = seq.num_computed
                seq.detok = self.tokenizer.detokenizer(seq.token_ids)
                if parent.stats is not None and parent.stats.spec == seq.spec:
                    stats = parent.stats.clone(seq.kv.capacity, seq.kv.n)  # the inherited slots keep their evidence
            else:
                seq.restore(Cursor())
                if seq.session is not None:  # re-prefilling a session from its history: its deletions stand
                    seq.skip = sorted((g.start, g.end) for g in seq.session.segments if g.dropped)
            spec = seq.spec
            if stats is None and spec.names:
                c = self.model_config
                stats = SequenceStatistics(spec, c.num_layers, c.num_kv_heads, c.num_heads, c.head_dim,
                                           seq.kv.capacity, self.device)
            seq.stats = stats
        except BaseException:
            self.pool.free(seq.kv.owner)  # the parked KV goes too: this turn re-prefills if ever retried
            seq.kv, seq.stats = None, None
            seq.restore(Cursor())
            raise
        seq.fork_parent = None  # forked: nothing of the parent is needed any more
        seq.stats_bytes = stats_bytes
        self.stats_reserved_bytes += stats_bytes
        seq.usage.reserved_kv_bytes = seq.kv.capacity * self.pool.slot_bytes
        return True

    def _drop_idle_session(self, keep: str | None = None) -> bool:
        """Free the least recently used idle session's KV (its history stays; it re-prefills later).
        `keep`: a session about to continue, whose own parked KV is the last to go."""
        victim = next((sid for sid in self.resident if sid != keep), None)
        if victim is None:
            return False
        self.drop_resident(victim)
        return True

    def drop_resident(self, session_id: str) -> bool:
        """Forget a session's parked KV here (its history stays in the store)."""
        resident = self.resident.pop(session_id, None)
        if resident is None:
            return False
        self.pool.free(resident[0].owner)
        self.stats_reserved_bytes -= self.parked_stats_bytes.pop(session_id, 0)
        return True

    def expire_sessions(self) -> None:
        """Free the parked KV of sessions the store no longer has (TTL expired, deleted elsewhere)."""
        for sid in [sid for sid in self.resident if self.store.get(sid) is None]:
            self.drop_resident(sid)
        for sid in [sid for sid in self.side_threads.sessions if sid not in self.busy_sessions
                    and self.store.get(sid) is None]:
            self.side_threads.forget(sid)  # what its side threads left for a next turn that will never come

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        compressing = self.compressor in self.step_hooks  # tests may drive the cadence by hand
        for seq in list(self.running):
            state = seq.compression_state
            if state.pending is not None or seq.kv.free_slots == 0 or (compressing and self.compressor.due(self, seq)):
                # Pick up a remote decision that arrived, or compress a sequence that reached its point (a parked
                # session continued under a smaller budget has no room at all).
                self._run_hooks(seq, (self.compressor,))
        ready = [seq for seq in self.running if not self.compressor.blocked(seq)]
        for seq in ready:  # decode first: one token each keeps streams flowing
            if not seq.in_prefill and budget > 0 and seq.kv.free_slots > 0:
                batch.append((seq, 1))
                budget -= 1
        for seq in ready:
            if seq.in_prefill and budget > 0:
                upto = self._skip_dropped(seq)
                room = self.compressor.room(seq) if compressing else seq.kv.free_slots
                chunk = min(seq.pending, self.config.prefill_chunk, budget, room, upto)
                if chunk > 0:
                    batch.append((seq, chunk))
                    budget -= chunk
        return batch

    @staticmethod
    def _skip_dropped(seq: Sequence) -> int:
        """Pass over the dropped history ranges the prefill has reached (as if fed and evicted: the positions
        move on, no slot is written); returns how many tokens may be fed before the next one."""
        while seq.skip and seq.num_computed >= seq.skip[0][0]:
            start, end = seq.skip.pop(0)
            if seq.num_computed != start or seq.next_position != seq.num_computed:
                continue  # not where the range begins (or positions apart from history): feed it as usual
            seq.history_positions.extend(range(seq.next_position, seq.next_position + end - start))
            seq.position_tokens.extend(seq.token_ids[start:end])
            seq.num_computed, seq.next_position = end, seq.next_position + end - start
        return seq.skip[0][0] - seq.num_computed if seq.skip else seq.pending

    def _run_hooks(self, seq: Sequence, hooks=None) -> None:
        """Run step hooks for one sequence; a hook's fault ends this sequence only."""
        for hook in hooks or self.step_hooks:
            if seq.finish_reason is not None:
                return
            try:
                hook(self, seq)
            except Exception as exc:
                self.fail(seq, exc)

    # ---- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        self._end_broken_leases()
        self._expire_waiting()
        self._admit()
        batch = self._schedule()
        if not batch:
            return False
        try:
            logits = self._forward(batch)
        except Exception as exc:
            # Find the sequence at fault: run each alone (nothing was committed, so nothing is fed twice).
            log.warning("batched forward of %d sequences failed (%s); retrying them one by one", len(batch), exc)
            rows, kept = [], []
            for item in batch:
                try:
                    rows.append(self._forward([item]))
                except Exception as one_exc:
                    self.fail(item[0], one_exc)
                    continue
                kept.append(item)
            batch = kept
            logits = torch.cat(rows) if rows else None
        samplers, row = [], 0  # (logits row, sequence) of those that sample this step
        for seq, n in batch:
            samples = n == seq.pending
            row += samples
            fed, history = seq.feed(n)
            start = seq.next_position
            try:
                seq.kv.advance(n)  # positions were written with the K/V (PoolAttention)
            except Exception as exc:
                self.fail(seq, exc)
                continue
            seq.history_positions.extend(range(start, start + history))
            seq.position_tokens.extend(fed)
            del seq.input_only[:n - history]
            seq.num_computed += history
            seq.next_position += n
            seq.steps += 1
            if samples:
                samplers.append((row - 1, seq))
        batch = [(seq, n) for seq, n in batch if seq.finish_reason is None]
        forced = self._force(samplers, logits)  # teacher-forced rows (eval only): recorded, token given
        for row, seq in samplers:
            s = seq.request.sampling
            if s.penalized and seq.id not in forced:
                end_ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(self.model_config.eos_token_ids))
                logits[row] = apply_penalties(logits[row], s, seq.token_ids, seq.generated, end_ids)
        greedy = [(row, seq) for row, seq in samplers if seq.request.sampling.greedy and seq.id not in forced]
        picks = dict(zip((seq.id for _, seq in greedy),
                         greedy_tokens(logits[[row for row, _ in greedy]]) if greedy else []))
        for row, seq in samplers:
            try:
                if seq.id in forced:
                    token = forced[seq.id]
                    if token is None:
                        raise SamplingError(NON_FINITE)
                elif seq.id in picks:  # greedy rows: one argmax for the whole step
                    token = picks[seq.id]
                    if token is None:
                        raise SamplingError(NON_FINITE)
                else:
                    token = sample_token(logits[row], seq.request.sampling, seq.generator)
            except Exception as exc:
                self.fail(seq, exc)
                continue
            wanted = seq.request.sampling.logprobs
            self._append_token(seq, token, None if wanted is None else token_logprob(logits[row], token, wanted))
            if seq.request.sampling.n > 1 and seq.group is None and len(seq.generated) == 1:
                self._spawn_samples(seq, logits[row])
        self.metrics.decode_tokens.add(len(samplers))
        self.steps += 1
        for seq, n in batch:
            seq.usage.peak_kv_slots = max(seq.usage.peak_kv_slots, seq.kv.n)  # before compression: the true peak
            if n == 1:
                seq.usage.kv_reads += seq.kv.n  # this decode token attended every slot the sequence holds
            if seq.finish_reason is None:
                self._run_hooks(seq)
        for seq, _ in batch:
            if seq.finish_reason is not None and seq.finish_reason is not FinishReason.ERROR:
                self._retire(seq)
        if self.steps % 64 == 0:
            self.expire_sessions()
        return True

    def _spawn_samples(self, first: Sequence, logits: torch.Tensor) -> None:
        """n > 1: the prompt was prefilled once, by sample 0, which just drew its first token from `logits`.
        Samples 1..n-1 fork its KV now (copy-on-write: the prompt's blocks are shared, not copied), before it feeds
        that token, and draw their own first tokens from the same distribution with their own generators (seed +
        index). Sample 0 hands back the reservation it held for them. Each sample then runs as its own sequence."""
        s = first.request.sampling
        own = first.reserved_slots // s.n  # its share of what it reserved for all of them
        first.kv = self.pool.resize(first.kv.owner, max(own, first.kv.n))
        if first.stats is not None:
            first.stats.resize(first.kv.capacity, first.kv.n)
        own_stats = self._stats_bytes(first, first.kv.capacity)
        self.stats_reserved_bytes -= first.stats_bytes - own_stats
        first.stats_bytes = own_stats
        first.usage.reserved_kv_bytes = first.kv.capacity * self.pool.slot_bytes
        prompt, cursor = first.token_ids[:first.num_computed], first.cursor()
        for index in range(1, s.n):
            seed = (first.usage.seed + index) % 2**63
            request = replace(first.request, request_id=f"{first.id}/{index}", sampling=replace(s, n=1, seed=seed))
            child = Sequence(request=request, emit=_indexed(first.emit, index), token_ids=list(prompt),
                             num_computed=0, input_start=first.input_start, spec=first.spec, index=index,
                             group=first.id, started_at=first.started_at)
            child.usage.prompt_tokens = first.usage.prompt_tokens
            child.usage.cached_tokens = len(prompt)  # computed once, by sample 0
            child.usage.seed = seed
            child.generator = torch.Generator(device=self.device).manual_seed(seed)
            self.running.append(child)
            try:
                child.kv = self.pool.fork(first.kv.owner, uuid.uuid4().hex, own)
                child.restore(cursor)
                child.detok = self.tokenizer.detokenizer(prompt)
                if first.stats is not None:
                    child.stats = first.stats.clone(child.kv.capacity, child.kv.n)
                child.stats_bytes = self._stats_bytes(child, child.kv.capacity)
                self.stats_reserved_bytes += child.stats_bytes
                child.usage.reserved_kv_bytes = child.kv.capacity * self.pool.slot_bytes
                child.usage.peak_kv_slots = child.kv.n
                token = first.generated[0] if s.greedy else sample_token(logits, request.sampling, child.generator)
            except Exception as exc:
                self.fail(child, exc)
                continue
            self._append_token(child, token, None if s.logprobs is None else token_logprob(logits, token, s.logprobs))
            if child.finish_reason is not None:
                self._retire(child)

    def _force(self, samplers: list[tuple[int, Sequence]], logits: torch.Tensor) -> dict[str, int | None]:
        """Teacher forcing (GenerationRequest.forced_tokens, evaluation only): for each forced sequence among
        this step's samplers, record the model's distribution against its next forced token (a ReplayStep: the
        token's log-probability, the greedy pick, top-5 membership, the slots it was computed over) and return
        that token to append instead of a sampled one. One batched computation for all of them. None: the
        row cannot be sampled (the request fails as a sampled one would)."""
        rows = [(row, seq) for row, seq in samplers if seq.request.forced_tokens is not None]
        if not rows:
            return {}
        tokens = [seq.request.forced_tokens[len(seq.generated)] for _, seq in rows]
        out: dict[str, int | None] = {}
        for (_, seq), token, seen in zip(rows, tokens, forced_steps(logits[[row for row, _ in rows]], tokens)):
            if seen is not None:
                logprob, argmax, in_top5 = seen
                seq.replay.append(ReplayStep(token=token, logprob=logprob, argmax=argmax, in_top5=in_top5,
                                             kv_slots=seq.kv.n))
            out[seq.id] = None if seen is None else token
        return out

    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One model call over the batch's tokens (their K/V written past each sequence's `n`, not yet
        committed). Returns the logits of the rows to sample, in batch order: one per sequence whose known
        tokens are all fed after this step."""
        ids, positions, sample_rows = [], [], []
        for seq, n in batch:
            start = seq.next_position
            ids.extend(seq.feed(n)[0])
            positions.extend(range(start, start + n))
            if n == seq.pending:
                sample_rows.append(len(ids) - 1)
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        segments, cursor = [], 0
        for seq, n in batch:
            segments.append(Segment(kv=seq.kv, stats=seq.stats, start=cursor, length=n,
                                    positions=pos[0, cursor:cursor + n]))
            cursor += n
        rows = torch.tensor(sample_rows, device=self.device, dtype=torch.long)
        attention = PoolAttention(segments, self.pool)
        logits = self.model(input_ids, pos, attention, logits_at=rows)
        attention.apply_statistics()  # only now: a failed forward is retried without counting anything twice
        return logits

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        s = seq.request.sampling
        now = time.monotonic()
        if not seq.generated:
            seq.usage.time_to_first_token_s = now - seq.started_at
        seq.generated.append(token)
        seq.token_ids.append(token)
        seq.text += seq.detok.push(token)
        if token in self.model_config.eos_token_ids and not s.ignore_eos:
            seq.finish_reason = FinishReason.EOS
        elif token in s.stop_token_ids:
            seq.finish_reason, seq.matched_stop = FinishReason.STOP, token
        else:
            for stop in s.stop:
                at = seq.text.find(stop, max(0, seq.text_sent - len(stop)))
                if at >= 0:
                    seq.text = seq.text[:at + len(stop) if s.include_stop else at]
                    seq.finish_reason, seq.matched_stop = FinishReason.STOP, stop
                    break
        forced = seq.request.forced_tokens  # a teacher-forced sequence ends after its last forced token
        if seq.finish_reason is None and (len(seq.generated) >= s.max_new_tokens
                                          or (forced is not None and len(seq.generated) >= len(forced))
                                          or len(seq.token_ids) >= self.model_config.max_position_embeddings):
            seq.finish_reason = FinishReason.LENGTH
        # Hold back a tail that could still become a stop string, so stop text is never streamed.
        holdback = 0 if seq.finish_reason else max((len(stop) - 1 for stop in s.stop), default=0)
        upto = max(seq.text_sent, len(seq.text) - holdback)
        seq.emit(TokenEvent(token_ids=[token], text=seq.text[seq.text_sent:upto],
                            logprobs=[logprob] if logprob is not None else []))
        seq.text_sent = upto

    def _retire(self, seq: Sequence) -> None:
        """Finish a sequence: the one place where everything it holds is released (invariant 9): its decision in
        flight and that frame's span, its statistics memory, its KV blocks (freed, or parked for its session),
        then the final message."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.compressor.release(seq, reason=f"request ended ({seq.finish_reason.value})")
        self.beacons.release(seq)
        try:
            self.side_threads.turn_ended(self, seq)  # a turn boundary: its side threads' drops apply now
        except Exception:
            log.exception("side-thread drops of %s not applied", seq.id)
        self.stats_reserved_bytes -= seq.stats_bytes
        seq.stats_bytes = 0
        seq.usage.generated_tokens = len(seq.generated)
        seq.usage.duration_s = time.monotonic() - seq.started_at
        seq.usage.peak_kv_bytes = seq.usage.peak_kv_slots * self.pool.slot_bytes
        session = seq.session
        if session is not None:
            try:
                self._save_session(seq, session)
            except Exception:
                log.exception("session %s of request %s could not be saved", session.id, seq.id)
                self.busy_sessions.discard(session.id)
                if seq.kv is not None:
                    self.pool.free(seq.kv.owner)
        elif seq.kv is not None:
            self.pool.free(seq.kv.owner)
        seq.emit(FinishEvent(finish_reason=seq.finish_reason, usage=seq.usage, text=seq.text,
                             token_ids=list(seq.generated), matched_stop=seq.matched_stop,
                             session_id=session.id if session else None, error=seq.error, replay=seq.replay))

    def _save_session(self, seq: Sequence, session: Session) -> None:
        self.busy_sessions.discard(session.id)
        # An aborted request that never ran adds nothing; otherwise the history keeps what was computed.
        keep = seq.num_computed + (1 if seq.generated else 0) if seq.kv is not None else seq.input_start
        keep = max(keep, seq.input_start)
        session.token_ids = seq.token_ids[:keep]
        kind = seq.request.input_kind.value if isinstance(seq.request.input_kind, SegmentKind) else str(seq.request.input_kind)
        gen_start = min(len(session.token_ids), seq.input_start + seq.usage.prompt_tokens)
        session.add_segment(seq.input_start, gen_start, kind)
        session.add_segment(gen_start, len(session.token_ids), SegmentKind.MODEL.value)
        self.side_threads.mark_segments(session)
        session.turns += 1
        session.generated_tokens += len(seq.generated)
        session.evicted_tokens += seq.usage.evicted_tokens
        session.compression = asdict(seq.request.compression)
        self.store.put(session)
        if seq.kv is None:
            return
        if seq.error is not None:
            # After a fault the cache may be half-updated: the history is kept, the next turn re-prefills it.
            self.pool.free(seq.kv.owner)
            return
        # Park the KV, shrunk to what it holds, so the next turn continues without re-prefill.
        kv = self.pool.resize(seq.kv.owner, max(seq.kv.n, 1))
        if seq.stats is not None:
            seq.stats.resize(kv.capacity, kv.n)
            self.parked_stats_bytes[session.id] = seq.stats.nbytes  # still counted while parked
            self.stats_reserved_bytes += seq.stats.nbytes
        self.resident[session.id] = (kv, seq.stats, seq.cursor())
        self.resident.move_to_end(session.id)
        while len(self.resident) > self.config.max_resident_sessions:
            self._drop_idle_session()

    # ---- sessions -----------------------------------------------------------------------------------
    def get_session(self, session_id: str, principal: str | None = None) -> tuple[Session, int]:
        """The session and how many of its tokens have KV resident here (0 if it would re-prefill).
        Another principal's session is reported as unknown, never as forbidden (ids do not leak)."""
        check_session_id(session_id)
        session = self.store.get(session_id)
        if session is None or not session.visible_to(principal):
            raise SessionNotFound(f"unknown session id {session_id!r}")
        resident = self.resident.get(session_id)
        return session, (resident[0].n if resident else 0)

    def check_deletable(self, session_id: str, principal: str | None = None) -> None:
        """Raise what deleting would answer before anything is deleted: another principal's session is
        unknown, a generating one is busy. An id unknown here passes (the durable store may hold it)."""
        check_session_id(session_id)
        session = self.store.get(session_id)
        if session is not None and not session.visible_to(principal):
            raise SessionNotFound(f"unknown session id {session_id!r}")
        if session_id in self.busy_sessions:
            raise SessionConflict(f"session {session_id!r} is generating; cancel its stream first")

    def delete_session(self, session_id: str, principal: str | None = None) -> None:
        self.check_deletable(session_id, principal)
        self.side_threads.forget(session_id)
        had_kv = self.drop_resident(session_id)
        if not self.store.delete(session_id) and not had_kv:
            raise SessionNotFound(f"unknown session id {session_id!r}")

    def knows_session(self, session_id: str) -> bool:
        return self.store.get(session_id) is not None

    def parked_sessions(self) -> list[str]:
        return [sid for sid in self.resident if sid not in self.busy_sessions]

    def drop_stale_parked(self, session_id: str) -> bool:
        """Free a parked copy another decoder has superseded (not while a turn of it waits here)."""
        return session_id not in self.busy_sessions and self.drop_resident(session_id)

    def forget_session(self, session_id: str) -> None:
        """Drop this decoder's copy (it was deleted elsewhere); an idle session only."""
        if session_id not in self.busy_sessions:
            self.drop_resident(session_id)
            self.side_threads.forget(session_id)
            self.store.delete(session_id)

    def server_info(self) -> dict:
        """Pool and scheduler state: what an operator (and a leak test) reads."""
        pool = self.pool
        return dict(
            pool_capacity_slots=pool.capacity_slots, pool_reserved_slots=pool.reserved_slots,
            pool_used_slots=pool.used_slots, pool_free_slots=pool.free_slots,
            pool_largest_free_region=pool.largest_free_region, pool_capacity_bytes=pool.capacity_bytes,
            pool_block_size=pool.block_size, pool_blocks=pool.num_blocks, pool_free_blocks=pool.free_blocks,
            pool_promised_blocks=pool.promised_blocks,
            pool_reserved_bytes=pool.reserved_bytes, pool_used_bytes=pool.used_bytes,
            pool_free_bytes=pool.free_slots * pool.slot_bytes, slot_bytes=pool.slot_bytes,
            stats_capacity_bytes=self.stats_capacity_bytes, stats_reserved_bytes=self.stats_reserved_bytes,
            running=len(self.running), waiting=len(self.waiting), parked_sessions=len(self.resident),
            parked_slots=sum(kv.capacity for kv, _, _ in self.resident.values()),
            busy_sessions=len(self.busy_sessions), steps=self.steps, failures=dict(self.failures),
            circuit_state=self.compressor.breaker.state, circuit_opened=self.compressor.breaker.times_opened,
        )

    def export_session(self, session_id: str, with_kv: bool) -> tuple[Session, dict | None, dict]:
        """The session, and (optionally) a copy of its parked KV: k, v [L, H, n, D], positions [L, H, n]."""
        session, _ = self.get_session(session_id)
        session = Session.from_dict(session.to_dict())  # a copy: the loop thread serialises it while we run
        resident = self.resident.get(session_id)
        if not with_kv or resident is None:
            return session, None, {}
        kv, _, cursor = resident
        tensors = kv.dense()._asdict()
        meta = {"num_computed": cursor.num_computed, "next_position": cursor.next_position,
                "position_tokens": cursor.position_tokens, "history_positions": cursor.history_positions,
                "model": self.loaded.name, "dtype": str(tensors["k"].dtype), "shape": list(tensors["k"].shape)}
        return session, tensors, meta

    def import_session(self, session: Session, tensors: dict | None = None, meta: dict | None = None) -> bool:
        """Adopt a session from the durable store (another decoder wrote it). With a KV snapshot that fits
        this model and pool, the next turn continues without re-prefill; returns whether the KV was adopted."""
        self.store.put(session)
        self.drop_resident(session.id)  # a parked copy here is older than what the durable store holds
        if not tensors:
            return False
        k = tensors["k"]
        expected = (self.model_config.num_layers, self.model_config.num_kv_heads, self.model_config.head_dim)
        if (k.shape[0], k.shape[1], k.shape[3]) != expected or meta.get("model") != self.loaded.name:
            return False  # another model's cache: re-prefill from the history instead
        n = k.shape[2]
        try:
            region = self.pool.allocate(uuid.uuid4().hex, max(n, 1))
        except PoolExhausted:
            return False
        try:
            region.load(k, tensors["v"], tensors["positions"])
            computed = int(meta["num_computed"])
            cursor = Cursor.of_history(session.token_ids, computed)
            if "next_position" in meta:  # snapshots written before positions had their own counter lack it
                cursor = Cursor(computed, int(meta["next_position"]), list(meta["position_tokens"]),
                                list(meta["history_positions"]))
        except Exception as exc:  # a malformed snapshot: give its blocks back, re-prefill from the history
            log.warning("KV snapshot of session %s is unusable (%s); it will re-prefill", session.id, exc)
            self.pool.free(region.owner)
            return False
        self.resident[session.id] = (region, None, cursor)
        return True

    # ---- convenience for tests, benchmarks and the eval harness ------------------------------------
    def run_until_done(self) -> None:
        while self.has_work():
            if not self.step():
                if self.waiting and not self.running:
                    raise RuntimeError("requests are waiting but none can be admitted")
                time.sleep(0.001)  # sequences are waiting for remote decisions

    def generate(self, requests: list[GenerationRequest]) -> list[FinishEvent]:
        """Run requests to completion in one batch; returns their final events in order."""
        results: dict[str, FinishEvent] = {}
        for r in requests:
            self.add_request(r, lambda ev, rid=r.request_id: isinstance(ev, FinishEvent) and results.__setitem__(rid, ev))
        self.run_until_done()
        return [results[r.request_id] for r in requests]


def validate_compression(c: CompressionConfig, context: int | None, describe) -> PolicyDescription:
    """Check a compression config against the policy's description (raises InvalidRequest with what to fix).

    `describe(policy, params)` is the policy client's (cached); `context` (the model's) bounds the policy's
    query window: its ring is allocated up front, and no more queries than the context can ever be observed.
    Budget, interval and lag need no such bound: the footprint is min(sequence, budget + interval + max_lag),
    so a budget past the context just never compresses."""
    try:
        description = describe(c.policy, c.params)
    except PolicyRejected as exc:
        raise InvalidRequest(str(exc)) from None
    if c.budget < 0 or c.interval < 1 or c.window < 0 or c.sinks < 0 or c.max_lag < 0:
        raise InvalidRequest("compression budget, window, sinks and max_lag must be >= 0 and interval >= 1")
    queries = description.spec.window_queries
    if context is not None and queries > context:
        raise InvalidRequest(f"policy {c.policy!r}: window_queries {queries} exceeds the model's context of "
                             f"{context} (no more queries can ever be observed)")
    # Span and beacon policies evict on their own schedule: a budget is optional for them.
    if c.policy != "full" and c.budget == 0 and not ("side_thread" in description.spec.names
                                                     or description.spec.beacon_interval):
        raise InvalidRequest(f"policy {c.policy!r} needs a budget (KV slots to keep) > 0")
    if c.budget and c.budget <= c.protected:
        raise InvalidRequest(
            f"budget {c.budget} must exceed the protected sinks + window ({c.sinks} + {c.window} = {c.protected})"
        )
    return description
