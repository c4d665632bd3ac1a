from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ToolSegment(_message.Message):
    __slots__ = ("start", "end", "index")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    index: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class StatsFrame(_message.Message):
    __slots__ = ("frame_id", "session_id", "policy", "params", "n", "keep", "sinks", "window", "num_layers", "num_kv_heads", "num_heads", "step", "seed", "stats", "tool_segments", "trace_context", "request_id", "prompt_len", "side_event", "side_answer", "side_cut", "turn")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TOOL_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    SIDE_EVENT_FIELD_NUMBER: _ClassVar[int]
    SIDE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SIDE_CUT_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    session_id: str
    policy: str
    params: _containers.ScalarMap[str, str]
    n: int
    keep: int
    sinks: int
    window: int
    num_layers: int
    num_kv_heads: int
    num_heads: int
    step: int
    seed: int
    stats: _containers.MessageMap[str, Tensor]
    tool_segments: _containers.RepeatedCompositeFieldContainer[ToolSegment]
    trace_context: _containers.ScalarMap[str, str]
    request_id: str
    prompt_len: int
    side_event: str
    side_answer: str
    side_cut: bool
    turn: int
    def __init__(self, frame_id: _Optional[int] = ..., session_id: _Optional[str] = ..., policy: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., n: _Optional[int] = ..., keep: _Optional[int] = ..., sinks: _Optional[int] = ..., window: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., num_heads: _Optional[int] = ..., step: _Optional[int] = ..., seed: _Optional[int] = ..., stats: _Optional[_Mapping[str, Tensor]] = ..., tool_segments: _Optional[_Iterable[_Union[ToolSegment, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., prompt_len: _Optional[int] = ..., side_event: _Optional[str] = ..., side_answer: _Optional[str] = ..., side_cut: _Optional[bool] = ..., turn: _Optional[int] = ...) -> None: ...

class KeepSet(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: Tensor
    def __init__(self, indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class MergePlan(_message.Message):
    __slots__ = ("group_offsets", "sources", "weights", "anchors")
    GROUP_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    group_offsets: Tensor
    sources: Tensor
    weights: Tensor
    anchors: Tensor
    def __init__(self, group_offsets: _Optional[_Union[Tensor, _Mapping]] = ..., sources: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., anchors: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class SpanDrop(_message.Message):
    __slots__ = ("spans",)
    SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class KeepAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SideThread(_message.Message):
    __slots__ = ("prompt", "max_tokens", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    stop: str
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("frame_id", "session_id", "policy", "seed", "latency_ms", "replica", "keep", "merge", "span_drop", "keep_all", "side_thread", "error", "request_id", "guards")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    SPAN_DROP_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALL_FIELD_NUMBER: _ClassVar[int]
    SIDE_THREAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    session_id: str
    policy: str
    seed: int
    latency_ms: float
    replica: str
    keep: KeepSet
    merge: MergePlan
    span_drop: SpanDrop
    keep_all: KeepAll
    side_thread: SideThread
    error: str
    request_id: str
    guards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, frame_id: _Optional[int] = ..., session_id: _Optional[str] = ..., policy: _Optional[str] = ..., seed: _Optional[int] = ..., latency_ms: _Optional[float] = ..., replica: _Optional[str] = ..., keep: _Optional[_Union[KeepSet, _Mapping]] = ..., merge: _Optional[_Union[MergePlan, _Mapping]] = ..., span_drop: _Optional[_Union[SpanDrop, _Mapping]] = ..., keep_all: _Optional[_Union[KeepAll, _Mapping]] = ..., side_thread: _Optional[_Union[SideThread, _Mapping]] = ..., error: _Optional[str] = ..., request_id: _Optional[str] = ..., guards: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("policy", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, policy: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Parameter(_message.Message):
    __slots__ = ("name", "type", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[str] = ...) -> None: ...

class PolicyDescription(_message.Message):
    __slots__ = ("policy", "summary", "statistics", "window_queries", "decay", "parameters", "projection_rank", "feature_weights", "model_fingerprint", "beacon_interval")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_QUERIES_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_RANK_FIELD_NUMBER: _ClassVar[int]
    FEATURE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BEACON_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    policy: str
    summary: str
    statistics: _containers.RepeatedScalarFieldContainer[str]
    window_queries: int
    decay: float
    parameters: _containers.RepeatedCompositeFieldContainer[Parameter]
    projection_rank: int
    feature_weights: bytes
    model_fingerprint: str
    beacon_interval: int
    def __init__(self, policy: _Optional[str] = ..., summary: _Optional[str] = ..., statistics: _Optional[_Iterable[str]] = ..., window_queries: _Optional[int] = ..., decay: _Optional[float] = ..., parameters: _Optional[_Iterable[_Union[Parameter, _Mapping]]] = ..., projection_rank: _Optional[int] = ..., feature_weights: _Optional[bytes] = ..., model_fingerprint: _Optional[str] = ..., beacon_interval: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyDescription]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyDescription, _Mapping]]] = ...) -> None: ...
