from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_USER: _ClassVar[InputKind]
    INPUT_KIND_TOOL_OUTPUT: _ClassVar[InputKind]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_USER: InputKind
INPUT_KIND_TOOL_OUTPUT: InputKind
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("id", "create")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    create: bool
    def __init__(self, id: _Optional[str] = ..., create: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "session", "input_kind", "sampling", "stopping", "compression", "add_bos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    session: SessionRef
    input_kind: InputKind
    sampling: SamplingParams
    stopping: StoppingCriteria
    compression: CompressionConfig
    add_bos: bool
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., session: _Optional[_Union[SessionRef, _Mapping]] = ..., input_kind: _Optional[_Union[InputKind, str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., compression: _Optional[_Union[CompressionConfig, _Mapping]] = ..., add_bos: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "n")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logprobs: int
    n: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "include_stop")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    min_tokens: int
    include_stop: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., include_stop: _Optional[bool] = ...) -> None: ...

class CompressionConfig(_message.Message):
    __slots__ = ("policy", "budget", "interval", "window", "sinks", "max_lag", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    budget: int
    interval: int
    window: int
    sinks: int
    max_lag: int
    params: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[str] = ..., budget: _Optional[int] = ..., interval: _Optional[int] = ..., window: _Optional[int] = ..., sinks: _Optional[int] = ..., max_lag: _Optional[int] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "chunk", "eviction", "complete", "index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: TokenChunk
    eviction: EvictionEvent
    complete: GenerationComplete
    index: int
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., eviction: _Optional[_Union[EvictionEvent, _Mapping]] = ..., complete: _Optional[_Union[GenerationComplete, _Mapping]] = ..., index: _Optional[int] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class EvictionEvent(_message.Message):
    __slots__ = ("step", "frame_id", "policy", "slots_before", "slots_after", "evicted", "merged", "policy_latency_ms", "staleness_steps", "fallback", "reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    POLICY_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_STEPS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    frame_id: int
    policy: str
    slots_before: int
    slots_after: int
    evicted: int
    merged: int
    policy_latency_ms: float
    staleness_steps: int
    fallback: bool
    reason: str
    def __init__(self, step: _Optional[int] = ..., frame_id: _Optional[int] = ..., policy: _Optional[str] = ..., slots_before: _Optional[int] = ..., slots_after: _Optional[int] = ..., evicted: _Optional[int] = ..., merged: _Optional[int] = ..., policy_latency_ms: _Optional[float] = ..., staleness_steps: _Optional[int] = ..., fallback: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "generated_tokens", "peak_kv_slots", "peak_kv_bytes", "reserved_kv_bytes", "evicted_tokens", "merged_tokens", "compression_events", "fallbacks", "dropped_decisions", "seed", "time_to_first_token_ms", "duration_ms", "side_threads", "side_tokens", "side_cut", "dropped_tool_outputs", "side_ignored", "kv_reads", "beacons")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEAK_KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PEAK_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MERGED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_EVENTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    SIDE_THREADS_FIELD_NUMBER: _ClassVar[int]
    SIDE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SIDE_CUT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOOL_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SIDE_IGNORED_FIELD_NUMBER: _ClassVar[int]
    KV_READS_FIELD_NUMBER: _ClassVar[int]
    BEACONS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    peak_kv_slots: int
    peak_kv_bytes: int
    reserved_kv_bytes: int
    evicted_tokens: int
    merged_tokens: int
    compression_events: int
    fallbacks: int
    dropped_decisions: int
    seed: int
    time_to_first_token_ms: float
    duration_ms: float
    side_threads: int
    side_tokens: int
    side_cut: int
    dropped_tool_outputs: int
    side_ignored: int
    kv_reads: int
    beacons: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., peak_kv_slots: _Optional[int] = ..., peak_kv_bytes: _Optional[int] = ..., reserved_kv_bytes: _Optional[int] = ..., evicted_tokens: _Optional[int] = ..., merged_tokens: _Optional[int] = ..., compression_events: _Optional[int] = ..., fallbacks: _Optional[int] = ..., dropped_decisions: _Optional[int] = ..., seed: _Optional[int] = ..., time_to_first_token_ms: _Optional[float] = ..., duration_ms: _Optional[float] = ..., side_threads: _Optional[int] = ..., side_tokens: _Optional[int] = ..., side_cut: _Optional[int] = ..., dropped_tool_outputs: _Optional[int] = ..., side_ignored: _Optional[int] = ..., kv_reads: _Optional[int] = ..., beacons: _Optional[int] = ...) -> None: ...

class GenerationComplete(_message.Message):
    __slots__ = ("finish_reason", "usage", "text", "stop_string", "stop_token_id", "session_id", "warnings")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    usage: Usage
    text: str
    stop_string: str
    stop_token_id: int
    session_id: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., text: _Optional[str] = ..., stop_string: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., session_id: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_tokens: bool
    def __init__(self, session_id: _Optional[str] = ..., include_tokens: _Optional[bool] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("start", "end", "kind", "index", "dropped")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    kind: str
    index: int
    dropped: bool
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., kind: _Optional[str] = ..., index: _Optional[int] = ..., dropped: _Optional[bool] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "num_tokens", "resident_kv_slots", "turns", "generated_tokens", "evicted_tokens", "segments", "compression", "token_ids", "created_at", "updated_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_tokens: int
    resident_kv_slots: int
    turns: int
    generated_tokens: int
    evicted_tokens: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    compression: CompressionConfig
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    created_at: float
    updated_at: float
    def __init__(self, session_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., resident_kv_slots: _Optional[int] = ..., turns: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., evicted_tokens: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., compression: _Optional[_Union[CompressionConfig, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_type", "vocab_size", "num_layers", "num_kv_heads", "head_dim", "max_context", "kv_pool_bytes", "kv_bytes_per_slot", "policies", "device")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_type: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    kv_pool_bytes: int
    kv_bytes_per_slot: int
    policies: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, model_name: _Optional[str] = ..., model_type: _Optional[str] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., max_context: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ..., kv_bytes_per_slot: _Optional[int] = ..., policies: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("pool_capacity_slots", "pool_reserved_slots", "pool_used_slots", "pool_free_slots", "pool_largest_free_region", "pool_capacity_bytes", "pool_reserved_bytes", "pool_used_bytes", "pool_free_bytes", "kv_bytes_per_slot", "stats_capacity_bytes", "stats_reserved_bytes", "running", "waiting", "parked_sessions", "parked_slots", "busy_sessions", "steps", "failures", "step_failures", "engine_alive", "policy_circuit_state", "policy_circuit_opened", "pool_block_size", "pool_blocks", "pool_free_blocks", "pool_promised_blocks")
    class FailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POOL_CAPACITY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_RESERVED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_LARGEST_FREE_REGION_FIELD_NUMBER: _ClassVar[int]
    POOL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    STATS_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATS_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PARKED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PARKED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    STEP_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ALIVE_FIELD_NUMBER: _ClassVar[int]
    POLICY_CIRCUIT_STATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_CIRCUIT_OPENED_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    POOL_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    POOL_PROMISED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    pool_capacity_slots: int
    pool_reserved_slots: int
    pool_used_slots: int
    pool_free_slots: int
    pool_largest_free_region: int
    pool_capacity_bytes: int
    pool_reserved_bytes: int
    pool_used_bytes: int
    pool_free_bytes: int
    kv_bytes_per_slot: int
    stats_capacity_bytes: int
    stats_reserved_bytes: int
    running: int
    waiting: int
    parked_sessions: int
    parked_slots: int
    busy_sessions: int
    steps: int
    failures: _containers.ScalarMap[str, int]
    step_failures: int
    engine_alive: bool
    policy_circuit_state: str
    policy_circuit_opened: int
    pool_block_size: int
    pool_blocks: int
    pool_free_blocks: int
    pool_promised_blocks: int
    def __init__(self, pool_capacity_slots: _Optional[int] = ..., pool_reserved_slots: _Optional[int] = ..., pool_used_slots: _Optional[int] = ..., pool_free_slots: _Optional[int] = ..., pool_largest_free_region: _Optional[int] = ..., pool_capacity_bytes: _Optional[int] = ..., pool_reserved_bytes: _Optional[int] = ..., pool_used_bytes: _Optional[int] = ..., pool_free_bytes: _Optional[int] = ..., kv_bytes_per_slot: _Optional[int] = ..., stats_capacity_bytes: _Optional[int] = ..., stats_reserved_bytes: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., parked_sessions: _Optional[int] = ..., parked_slots: _Optional[int] = ..., busy_sessions: _Optional[int] = ..., steps: _Optional[int] = ..., failures: _Optional[_Mapping[str, int]] = ..., step_failures: _Optional[int] = ..., engine_alive: _Optional[bool] = ..., policy_circuit_state: _Optional[str] = ..., policy_circuit_opened: _Optional[int] = ..., pool_block_size: _Optional[int] = ..., pool_blocks: _Optional[int] = ..., pool_free_blocks: _Optional[int] = ..., pool_promised_blocks: _Optional[int] = ...) -> None: ...
