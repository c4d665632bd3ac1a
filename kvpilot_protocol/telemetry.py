"""OpenTelemetry for both services: spans `{operation} {model}` (a generation), `compaction`, `decide`, and the decoder's metrics.

Providers come from the standard OTEL_* environment (`setup_telemetry` installs OTLP exporters when
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER=otlp is set);
otherwise the API's no-op providers make every call here free. Tests install SDK providers with in-memory
exporters. The compaction span's context travels inside each StatsFrame (W3C traceparent), so the policy's
`decide` span is its child across the gRPC hop even on a long-lived stream that carries many requests.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "kvpilot"
LATENCY_BUCKETS_S = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]
_propagator = TraceContextTextMapPropagator()


_instances: dict[type, object] = {}
_instances_lock = threading.Lock()


def _process_wide(cls):
    """One instance of a metrics holder per process (instruments are created once, in the global provider)."""
    with _instances_lock:
        if cls not in _instances:
            _instances[cls] = cls()
        return _instances[cls]


def setup_telemetry(service_name: str, prometheus: bool = False) -> bool:
    """Install OTLP trace and metric exporters if the environment asks for them, and with `prometheus` a
    Prometheus reader of every metric here (rendered by `prometheus_text()`: the HTTP API's /metrics). Returns
    whether it installed a provider (the global providers are set-once)."""
    wanted = any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) \
        or os.environ.get("OTEL_TRACES_EXPORTER") == "otlp"
    if not wanted and not prometheus:
        return False
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    readers = [prometheus_reader()] if prometheus else []
    if wanted:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    return True


_prometheus_reader = None


def prometheus_reader():
    """The process's one OpenTelemetry -> Prometheus reader (it registers itself in prometheus_client's default
    registry); give it to the MeterProvider (setup_telemetry does) and /metrics shows every OTel metric."""
    global _prometheus_reader
    if _prometheus_reader is None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        _prometheus_reader = PrometheusMetricReader()
    return _prometheus_reader


def prometheus_text() -> tuple[bytes, str]:
    """The Prometheus exposition of prometheus_client's default registry (the OTel metrics when the provider has
    `prometheus_reader()`, plus process and Python metrics) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# ---- context propagation ------------------------------------------------------------------------------
def inject(span: trace.Span | None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    if span is not None:
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def extract(carrier) -> otel_context.Context | None:
    carrier = dict(carrier or {})
    return _propagator.extract(carrier) if carrier else None


def extract_context(metadata) -> otel_context.Context | None:
    """A parent context from gRPC invocation metadata (unary calls)."""
    return extract({k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate")})


# ---- decoder spans -----------------------------------------------------------------------------------
# OpenTelemetry's gRPC conventions: these statuses are the server's fault and mark its span as an error; the rest
# (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...) are the caller's and leave the status unset.
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS"})
PROVIDER = "kvpilot"


def start_generate_span(model: str, request, operation: str = "text_completion",
                        parent: otel_context.Context | None = None) -> trace.Span:
    """The server span of one generation, named `{gen_ai.operation.name} {gen_ai.request.model}` (GenAI
    conventions), a child of the caller's `traceparent` when there is one."""
    c, sampling = request.compression, request.sampling
    attributes = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.response.id": request.request_id,
        "gen_ai.request.max_tokens": sampling.max_new_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "kvpilot.policy": c.policy,
        "kvpilot.budget": c.budget,
        "kvpilot.interval": c.interval,
    }
    if sampling.top_k:
        attributes["gen_ai.request.top_k"] = sampling.top_k
    if sampling.seed is not None:
        attributes["gen_ai.request.seed"] = sampling.seed
    if sampling.n > 1:
        attributes["gen_ai.request.choice.count"] = sampling.n
    if request.session_id:
        attributes["gen_ai.conversation.id"] = request.session_id
    return tracer().start_span(f"{operation} {model}", context=parent, kind=trace.SpanKind.SERVER,
                               attributes=attributes)


def end_generate_span(span: trace.Span, final=None, error: Exception | None = None,
                      finish_reasons: list[str] | None = None) -> None:
    """`finish_reasons`: one per sample of an n > 1 request (default: the final event's)."""
    if final is not None:
        u = final.usage
        span.set_attributes({
            "gen_ai.usage.input_tokens": u.prompt_tokens,
            "gen_ai.usage.output_tokens": u.generated_tokens,
            "gen_ai.usage.cache_read.input_tokens": u.cached_tokens,
            "gen_ai.response.finish_reasons": finish_reasons or [final.finish_reason.value],
            "kvpilot.kv.peak_slots": u.peak_kv_slots,
            "kvpilot.kv.peak_bytes": u.peak_kv_bytes,
            "kvpilot.evicted_tokens": u.evicted_tokens,
            "kvpilot.compression_events": u.compression_events,
            "kvpilot.fallbacks": u.fallbacks,
            "kvpilot.seed": u.seed,
        })
    if error is not None:
        code = getattr(error, "code", "INTERNAL")
        span.set_attribute("error.type", code if isinstance(code, str) else type(error).__name__)
        if not isinstance(code, str) or code in SERVER_ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()


def start_compaction_span(parent: trace.Span | None, frame_id: int, policy: str, slots: int) -> trace.Span:
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return tracer().start_span("compaction", context=ctx, attributes={
        "kvpilot.frame_id": frame_id, "kvpilot.policy": policy, "kvpilot.slots_before": slots})


def start_side_thread_span(parent: trace.Span | None, prompt: str, max_tokens: int) -> trace.Span:
    """A SideQuest side thread, a child of the turn's generate span (its tokens and answer are added at the end)."""
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return tracer().start_span("side_thread", context=ctx, attributes={
        "kvpilot.side.prompt": prompt, "kvpilot.side.max_tokens": max_tokens})


def end_compaction_span(span: trace.Span, *, slots_after: int, evicted: int, merged: int, latency_s: float,
                        staleness: int, fallback: bool, dropped: bool = False, reason: str = "") -> None:
    span.set_attributes({
        "kvpilot.slots_after": slots_after, "kvpilot.evicted": evicted, "kvpilot.merged": merged,
        "kvpilot.policy_latency_ms": latency_s * 1e3, "kvpilot.staleness_steps": staleness,
        "kvpilot.fallback": fallback, "kvpilot.decision_dropped": dropped,
    })
    if reason:
        span.set_attribute("kvpilot.reason", reason)
    span.end()


# ---- policy spans ------------------------------------------------------------------------------------
@contextlib.contextmanager
def decide_span(frame, replica: str, fallback_parent=None):
    """The policy's `decide` span, child of the decoder's compaction span carried in the frame."""
    parent = extract(frame.trace_context) or fallback_parent
    with tracer().start_as_current_span("decide", context=parent, kind=trace.SpanKind.SERVER, attributes={
        "kvpilot.policy": frame.policy, "kvpilot.frame_id": frame.frame_id, "kvpilot.session_id": frame.session_id,
        "kvpilot.slots": frame.n, "kvpilot.keep": frame.keep, "kvpilot.seed": frame.seed, "kvpilot.replica": replica,
    }) as span:
        yield span


def annotate_decision(span: trace.Span, decision, kept: int, n: int) -> None:
    span.set_attributes({"kvpilot.kept": kept, "kvpilot.evicted": max(0, n - kept),
                         "kvpilot.policy_latency_ms": decision.latency_s * 1e3})


def record_decide_error(span: trace.Span, exc: Exception) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)))


# ---- decoder metrics ---------------------------------------------------------------------------------
class DecoderMetrics:
    """The decoder's instruments (names match deploy/grafana's dashboard)."""

    def __init__(self, pool=None):
        meter = metrics.get_meter(TRACER_NAME)
        self.evicted = meter.create_counter("kvpilot.evicted_tokens", unit="1", description="tokens evicted")
        # Compactions and round trips take micro- to milliseconds: the SDK's default buckets (0, 5, 10 ... s)
        # would put them all in the first one.
        self.compaction = meter.create_histogram("kvpilot.compaction.duration", unit="s",
                                                 description="time to apply a plan (kernel + bookkeeping)",
                                                 explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.round_trip = meter.create_histogram("kvpilot.policy.round_trip", unit="s",
                                                 description="frame sent -> decision received",
                                                 explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.decode_tokens = meter.create_counter("kvpilot.decode.tokens", unit="1", description="tokens generated")
        self.fallbacks = meter.create_counter("kvpilot.policy.fallbacks", unit="1",
                                              description="compressions done by the local fallback policy")
        self.dropped = meter.create_counter("kvpilot.policy.decisions_dropped", unit="1",
                                            description="decisions too late or superseded")
        self.circuit = meter.create_counter("kvpilot.policy.circuit_transitions", unit="1",
                                            description="policy circuit breaker state changes (attribute: new state)")
        self.request_failures = meter.create_counter("kvpilot.request.failures", unit="1",
                                                     description="requests ended by a fault (attribute: status code)")
        if pool is not None:
            meter.create_observable_gauge(
                "kvpilot.kv.memory.usage", unit="By", description="KV bytes held by valid slots",
                callbacks=[lambda options: [metrics.Observation(pool.used_bytes, {"kvpilot.kind": "used"}),
                                            metrics.Observation(pool.reserved_bytes, {"kvpilot.kind": "reserved"})]])


# ---- policy service metrics -------------------------------------------------------------------------------
class PolicyMetrics:
    """What a policy replica exports: decisions by policy and outcome (ok / error), and how long deciding took."""

    def __init__(self):
        meter = metrics.get_meter(TRACER_NAME)
        self.decisions = meter.create_counter("kvpilot.policy.decisions", unit="{decision}",
                                              description="frames decided, by policy and outcome (ok, error)")
        self.decide = meter.create_histogram("kvpilot.policy.decide.duration", unit="s",
                                             description="frame received -> plan (scorer time, on the replica)",
                                             explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)

    def decided(self, policy: str, seconds: float, error: Exception | None = None) -> None:
        attributes = {"kvpilot.policy": policy, "outcome": "error" if error is not None else "ok"}
        if error is not None:
            attributes["error.type"] = type(error).__name__
        self.decisions.add(1, attributes)
        self.decide.record(seconds, attributes)


def policy_metrics() -> PolicyMetrics:
    return _process_wide(PolicyMetrics)


# ---- serving metrics (both front ends: gRPC Generate and the OpenAI-compatible HTTP API) -----------------------
# Bucket boundaries of the OpenTelemetry GenAI semantic conventions (time per output token with finer low buckets:
# a small model decodes a token in about a millisecond).
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
DURATION_BUCKETS_S = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
# gauge name, key of the watched state, unit, description
SERVING_GAUGES = (
    ("kvpilot.requests.running", "running", "{request}", "sequences being decoded or prefilled"),
    ("kvpilot.requests.waiting", "waiting", "{request}", "requests queued for admission (KV memory, batch room)"),
    ("kvpilot.kv.pool.blocks", "pool_blocks", "{block}", "KV pool blocks in all"),
    ("kvpilot.kv.pool.free_blocks", "pool_free_blocks", "{block}", "KV pool blocks no sequence or session holds"),
)


class ServingMetrics:
    """Per-request serving metrics (OpenTelemetry GenAI server names where they exist: gen_ai.server.request.duration,
    .time_to_first_token, .time_per_output_token) and the scheduler / KV pool gauges of the watched decoders. One per
    process (`serving_metrics()`): the SDK keeps the first instrument of a name, so instruments are made once."""

    def __init__(self):
        meter = metrics.get_meter(TRACER_NAME)
        self.requests = meter.create_counter(
            "kvpilot.requests", unit="{request}",
            description="requests ended, by outcome (eos, stop, length, abort, error) and API (grpc, http)")
        self.tokens = meter.create_counter(
            "kvpilot.tokens", unit="{token}",
            description="prompt (gen_ai.token.type=input) and generated (output) tokens of finished requests")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
            description="request received -> last token or error (refused requests included, with error.type)")
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S,
            description="request received -> first generated token (queueing and prefill included)")
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S,
            description="time per generated token after the first")
        self._sources: dict[object, object] = {}
        self._lock = threading.Lock()
        for name, key, unit, description in SERVING_GAUGES:
            meter.create_observable_gauge(name, unit=unit, description=description, callbacks=[self._observer(key)])
        meter.create_observable_gauge("kvpilot.kv.pool.usage", unit="1", callbacks=[self._usage],
                                      description="fraction of the KV pool's blocks in use")

    def watch(self, key, state) -> None:
        """Add a decoder to the gauges: `state()` returns a dict with the SERVING_GAUGES keys (summed over decoders)."""
        with self._lock:
            self._sources[key] = state

    def unwatch(self, key) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def _states(self) -> list[dict]:
        with self._lock:
            sources = list(self._sources.values())
        return [state() for state in sources]

    def _observer(self, key: str):
        def observe(options):
            states = self._states()
            return [metrics.Observation(sum(s[key] for s in states))] if states else []
        return observe

    def _usage(self, options):
        states = self._states()
        total = sum(s["pool_blocks"] for s in states)
        if not total:
            return []
        return [metrics.Observation(1.0 - sum(s["pool_free_blocks"] for s in states) / total)]

    def request_ended(self, model: str, api: str, operation: str, started: float, *, final=None, error=None,
                      first_token_at: float | None = None, last_token_at: float | None = None) -> None:
        """Record one request: `final` is its FinishEvent, `error` its RequestError (code = the gRPC status);
        neither means the client went away. Times are time.monotonic()."""
        attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": model, "kvpilot.api": api}
        ended = dict(attributes)
        if error is not None:
            ended["error.type"] = getattr(error, "code", type(error).__name__)
        self.duration.record(time.monotonic() - started, ended)
        outcome = "error" if error is not None else final.finish_reason.value if final is not None else "abort"
        self.requests.add(1, ended | {"outcome": outcome})
        if final is None or error is not None:
            return
        usage = final.usage
        self.tokens.add(usage.prompt_tokens, attributes | {"gen_ai.token.type": "input"})
        self.tokens.add(usage.generated_tokens, attributes | {"gen_ai.token.type": "output"})
        if first_token_at is not None:
            self.ttft.record(first_token_at - started, attributes)
            if usage.generated_tokens > 1 and last_token_at is not None:
                self.tpot.record((last_token_at - first_token_at) / (usage.generated_tokens - 1), attributes)


def serving_metrics() -> ServingMetrics:
    return _process_wide(ServingMetrics)
