"""The engine: continuous batching over the KV pool.

One `step()`:
  1. apply aborts, admit waiting requests while their KV footprint can be reserved (admission control),
  2. schedule tokens: one decode token per running sequence, then prefill chunks up to the step's budget,
  3. run the model once over all scheduled tokens (flattened), attention per sequence over its pool region,
  4. sample where a sequence has consumed all its known tokens, stream text, check stop conditions,
  5. run step hooks (compression lives there), retire finished sequences and free their slots.

The engine is synchronous and single-threaded: `AsyncEngine` (async_engine.py) runs it on its own thread and
feeds it requests from the gRPC event loop.
"""
from __future__ import annotations

import random
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from decoder_service.attention import PoolAttention, Segment
from decoder_service.compression import CompressionState, Compressor
from decoder_service.checkpoint import LoadedModel
from decoder_service.kv_pool import KVPool, PoolExhausted, SequenceKV
from decoder_service.requests import (
    CompressionConfig,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ResourceExhausted,
    SegmentKind,
    SessionConflict,
    SessionNotFound,
    TokenEvent,
    Usage,
)
from decoder_service.sampling import sample_token
from decoder_service.sessions import InMemorySessionStore, Session
from decoder_service.statistics import SequenceStatistics
from kvpilot.telemetry import DecoderMetrics
from policy_service.registry import available_policies, make_scorer
from policy_service.scorers.base import ParameterError, Scorer


@dataclass
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per step over all sequences: decode tokens first, then prefill chunks
    prefill_chunk: int = 256  # most prompt tokens one sequence prefills in one step
    max_running: int = 32  # sequences decoding at once
    max_waiting: int = 64  # admitted-but-not-yet-running bound; beyond it requests get RESOURCE_EXHAUSTED
    kv_pool_bytes: int = 256 << 20
    kv_dtype: torch.dtype | None = None  # default: the model's dtype
    max_resident_sessions: int = 256  # idle sessions whose KV stays in the pool (LRU beyond that)


@dataclass
class Sequence:
    """A request in flight: its tokens, its pool region and its output stream."""

    request: GenerationRequest
    emit: Callable[[Event], None]
    token_ids: list[int]  # whole history: earlier turns + this request's input + generated tokens
    num_computed: int  # tokens whose K/V is in the cache; the next fed token has this logical position
    input_start: int  # index in token_ids where this request's input begins
    kv: SequenceKV | None = None
    stats: SequenceStatistics | None = None
    scorer: Scorer | None = None
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
    steps: int = 0  # engine steps this sequence took part in (staleness is counted in these)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def pending(self) -> int:
        """Known tokens not yet in the KV cache (prompt left to prefill, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.pending > 1 or not self.generated


StepHook = Callable[["Engine", Sequence], None]


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, store: InMemorySessionStore | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.config = config or EngineConfig()
        self.device = next(self.model.parameters()).device
        dtype = self.config.kv_dtype or next(self.model.parameters()).dtype
        self.pool = KVPool.for_model(self.model_config, self.config.kv_pool_bytes, dtype, self.device)
        self.store = store or InMemorySessionStore()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.resident: OrderedDict[str, tuple[SequenceKV, SequenceStatistics | None, int]] = OrderedDict()
        self.busy_sessions: set[str] = set()
        self.metrics = DecoderMetrics(self.pool)
        self.compressor = Compressor(metrics=self.metrics)
        self.step_hooks: list[StepHook] = [self.compressor]
        self.steps = 0

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Sequence:
        """Validate and queue a request. Raises a RequestError (nothing is queued then)."""
        scorer = self._validate(request)
        session = self._open_session(request)
        history = session.token_ids if session else []
        input_ids = list(request.input_ids)
        if not history and request.add_bos and self.model_config.bos_token_id is not None:
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
                       input_start=len(history), session=session, scorer=scorer)
        seq.reserved_slots = self._footprint(seq)
        if seq.reserved_slots > self.pool.capacity_slots:
            raise ResourceExhausted(
                f"request needs {seq.reserved_slots} KV slots ({seq.reserved_slots * self.pool.slot_bytes / 2**20:.1f} MiB) "
                f"but the whole KV pool holds {self.pool.capacity_slots}; lower max_new_tokens or set a compression budget"
            )
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

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its slots are freed now (a session keeps what was computed)."""
        for seq in list(self.waiting) + self.running:
            if seq.id == request_id and seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
                self._retire(seq)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- validation ---------------------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> Scorer:
        s, c = request.sampling, request.compression
        if not request.input_ids and not request.session_id:
            raise InvalidRequest("prompt is empty: send text or token_ids")
        vocab = self.model_config.vocab_size
        bad = [t for t in request.input_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if s.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1 (got {s.max_new_tokens})")
        if s.temperature < 0 or s.temperature != s.temperature:
            raise InvalidRequest(f"temperature must be >= 0 (got {s.temperature}); 0 means greedy")
        if not 0 < s.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1] (got {s.top_p})")
        if s.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (got {s.top_k}); 0 disables it")
        if any(not stop for stop in s.stop):
            raise InvalidRequest("stop strings must not be empty")
        return validate_compression(c)

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
                raise SessionConflict(f"session {sid!r} already exists; omit create_session to continue it")
            session = Session(id=sid)
            request.session_id = sid
            return session
        if not sid:
            return None
        session = self.store.get(sid)
        if session is None:
            raise SessionNotFound(f"unknown session id {sid!r} (expired or deleted); set create_session to start one")
        if sid in self.busy_sessions:
            raise SessionConflict(f"session {sid!r} is generating; wait for its stream to finish")
        return session

    def _footprint(self, seq: Sequence) -> int:
        """Slots to reserve: the whole sequence, or for a bounded policy budget + interval + max_lag."""
        total = len(seq.token_ids) + seq.request.sampling.max_new_tokens
        c = seq.request.compression
        if c.bounded:
            return min(total, c.budget + c.interval + c.max_lag)
        return total

    # ---- scheduling ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if not self._reserve(seq):
                break  # FIFO: later requests wait behind the head rather than starve it
            self.waiting.popleft()
            self.running.append(seq)

    def _reserve(self, seq: Sequence) -> bool:
        sid = seq.session.id if seq.session else None
        resident = self.resident.pop(sid, None) if sid else None
        while True:
            try:
                if resident is not None:
                    kv, stats, num_computed = resident
                    seq.kv = self.pool.resize(kv.owner, max(seq.reserved_slots, kv.n))
                    seq.num_computed = seq.usage.cached_tokens = num_computed
                    if stats is not None and stats.spec != seq.scorer.spec():
                        stats = None  # the policy changed between turns: start its statistics afresh
                    seq.stats = stats
                    if stats is not None:
                        stats.resize(seq.kv.capacity, seq.kv.n)
                else:
                    seq.kv = self.pool.allocate(uuid.uuid4().hex, seq.reserved_slots)
                    seq.num_computed = 0
                break
            except PoolExhausted:
                if not self._drop_idle_session():
                    if resident is not None:
                        self.resident[sid] = resident  # still resident; try again next step
                    return False
        spec = seq.scorer.spec()
        if seq.stats is None and spec.names:
            c = self.model_config
            seq.stats = SequenceStatistics(spec, c.num_layers, c.num_kv_heads, c.num_heads, c.head_dim,
                                           seq.kv.capacity, self.device)
        seq.usage.reserved_kv_bytes = seq.kv.capacity * self.pool.slot_bytes
        return True

    def _drop_idle_session(self) -> bool:
        """Free the least recently used idle session's KV (its history stays; it re-prefills later)."""
        if not self.resident:
            return False
        _, (kv, _, _) = self.resident.popitem(last=False)
        self.pool.free(kv.owner)
        return True

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if seq.compression_state.pending is not None or seq.kv.free_slots == 0:
                # Pick up a remote decision that arrived, or make room for a sequence that has none left
                # (a parked session continued under a smaller budget, a late decision).
                self.compressor(self, seq)
        ready = [seq for seq in self.running if not self.compressor.blocked(seq)]
        for seq in ready:  # decode first: one token each keeps streams flowing
            if not seq.in_prefill and budget > 0 and seq.kv.free_slots > 0:
                batch.append((seq, 1))
                budget -= 1
        for seq in ready:
            if seq.in_prefill and budget > 0:
                chunk = min(seq.pending, self.config.prefill_chunk, budget, seq.kv.free_slots)
                if chunk > 0:
                    batch.append((seq, chunk))
                    budget -= chunk
        return batch

    # ---- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        self._admit()
        batch = self._schedule()
        if not batch:
            return False
        ids, positions, segments, sample_rows, samplers = [], [], [], [], []
        cursor = 0
        for seq, n in batch:
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            segments.append(Segment(kv=seq.kv, stats=seq.stats, start=cursor, length=n,
                                    positions=torch.arange(start, start + n, device=self.device)))
            cursor += n
            if start + n == len(seq.token_ids):
                sample_rows.append(cursor - 1)
                samplers.append(seq)
        input_ids = torch.tensor([ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        rows = torch.tensor(sample_rows, device=self.device, dtype=torch.long)
        logits = self.model(input_ids, pos, PoolAttention(segments), logits_at=rows)
        for (seq, n), seg in zip(batch, segments):
            seq.kv.commit(pos[0, seg.start:seg.start + n])
            seq.num_computed += n
            seq.steps += 1
        for row, seq in enumerate(samplers):
            self._append_token(seq, sample_token(logits[row], seq.request.sampling, seq.generator))
        self.metrics.decode_tokens.add(len(samplers))
        self.steps += 1
        for seq, _ in batch:
            seq.usage.peak_kv_slots = max(seq.usage.peak_kv_slots, seq.kv.n)  # before compression: the true peak
            if seq.finish_reason is None:
                for hook in self.step_hooks:
                    hook(self, seq)
        for seq, _ in batch:
            if seq.finish_reason is not None:
                self._retire(seq)
        return True

    def _append_token(self, seq: Sequence, token: int) -> None:
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
                    seq.text = seq.text[:at]
                    seq.finish_reason, seq.matched_stop = FinishReason.STOP, stop
                    break
        if seq.finish_reason is None and (len(seq.generated) >= s.max_new_tokens
                                          or len(seq.token_ids) >= self.model_config.max_position_embeddings):
            seq.finish_reason = FinishReason.LENGTH
        # Hold back a tail that could still become a stop string, so stop text is never streamed.
        holdback = 0 if seq.finish_reason else max((len(stop) - 1 for stop in s.stop), default=0)
        upto = max(seq.text_sent, len(seq.text) - holdback)
        seq.emit(TokenEvent(token_ids=[token], text=seq.text[seq.text_sent:upto]))
        seq.text_sent = upto

    def _retire(self, seq: Sequence) -> None:
        """Finish a sequence: send the final message, free or park its KV, update its session."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.usage.generated_tokens = len(seq.generated)
        seq.usage.duration_s = time.monotonic() - seq.started_at
        seq.usage.peak_kv_bytes = seq.usage.peak_kv_slots * self.pool.slot_bytes
        session = seq.session
        if session is not None:
            self._save_session(seq, session)
        elif seq.kv is not None:
            self.pool.free(seq.kv.owner)
        seq.emit(FinishEvent(finish_reason=seq.finish_reason, usage=seq.usage, text=seq.text,
                             token_ids=list(seq.generated), matched_stop=seq.matched_stop,
                             session_id=session.id if session else None))

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
        session.turns += 1
        session.generated_tokens += len(seq.generated)
        session.evicted_tokens += seq.usage.evicted_tokens
        session.compression = asdict(seq.request.compression)
        self.store.put(session)
        if seq.kv is not None:
            # Park the KV, shrunk to what it holds, so the next turn continues without re-prefill.
            kv = self.pool.resize(seq.kv.owner, max(seq.kv.n, 1))
            if seq.stats is not None:
                seq.stats.resize(kv.capacity, kv.n)
            self.resident[session.id] = (kv, seq.stats, seq.num_computed)
            self.resident.move_to_end(session.id)
            while len(self.resident) > self.config.max_resident_sessions:
                self._drop_idle_session()

    # ---- sessions -----------------------------------------------------------------------------------
    def get_session(self, session_id: str) -> tuple[Session, int]:
        """The session and how many of its tokens have KV resident here (0 if it would re-prefill)."""
        session = self.store.get(session_id)
        if session is None:
            raise SessionNotFound(f"unknown session id {session_id!r}")
        resident = self.resident.get(session_id)
        return session, (resident[0].n if resident else 0)

    def delete_session(self, session_id: str) -> None:
        if session_id in self.busy_sessions:
            raise SessionConflict(f"session {session_id!r} is generating; cancel its stream first")
        resident = self.resident.pop(session_id, None)
        if resident is not None:
            self.pool.free(resident[0].owner)
        if not self.store.delete(session_id) and resident is None:
            raise SessionNotFound(f"unknown session id {session_id!r}")

    def knows_session(self, session_id: str) -> bool:
        return self.store.get(session_id) is not None

    def export_session(self, session_id: str, with_kv: bool) -> tuple[Session, dict | None, dict]:
        """The session, and (optionally) a copy of its parked KV: k, v [L, H, n, D], positions [L, H, n]."""
        session, _ = self.get_session(session_id)
        session = Session.from_dict(session.to_dict())  # a copy: the loop thread serialises it while we run
        resident = self.resident.get(session_id)
        if not with_kv or resident is None:
            return session, None, {}
        kv, _, num_computed = resident
        tensors = {"k": kv.k[:, :, :kv.n].clone(), "v": kv.v[:, :, :kv.n].clone(),
                   "positions": kv.positions[:, :, :kv.n].clone()}
        meta = {"num_computed": num_computed, "model": self.loaded.name, "dtype": str(kv.k.dtype),
                "shape": list(kv.k.shape[:2]) + [kv.n, kv.k.shape[-1]]}
        return session, tensors, meta

    def import_session(self, session: Session, tensors: dict | None = None, meta: dict | None = None) -> bool:
        """Adopt a session from the durable store (another decoder wrote it). With a KV snapshot that fits
        this model and pool, the next turn continues without re-prefill; returns whether the KV was adopted."""
        self.store.put(session)
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
        region.k[:, :, :n] = k.to(region.k.device, region.k.dtype)
        region.v[:, :, :n] = tensors["v"].to(region.v.device, region.v.dtype)
        region.positions[:, :, :n] = tensors["positions"].to(region.positions.device)
        region.n = n
        self.resident[session.id] = (region, None, int(meta["num_computed"]))
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


def validate_compression(c: CompressionConfig) -> Scorer:
    """Check a compression config and build its scorer (raises InvalidRequest with what to fix)."""
    try:
        scorer = make_scorer(c.policy, c.params)
    except KeyError:
        raise InvalidRequest(f"unknown policy {c.policy!r}; available: {', '.join(available_policies())}") from None
    except ParameterError as exc:
        raise InvalidRequest(str(exc)) from None
    if c.budget < 0 or c.interval < 1 or c.window < 0 or c.sinks < 0 or c.max_lag < 0:
        raise InvalidRequest("compression budget, window, sinks and max_lag must be >= 0 and interval >= 1")
    if c.policy != "full" and c.budget == 0:
        raise InvalidRequest(f"policy {c.policy!r} needs a budget (KV slots to keep) > 0")
    if c.budget and c.budget <= c.protected:
        raise InvalidRequest(
            f"budget {c.budget} must exceed the protected sinks + window ({c.sinks} + {c.window} = {c.protected})"
        )
    return scorer
