"""Shared fixtures: tiny random-weight checkpoints of each model family, engines built on them."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton can only run through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("KVPILOT_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "kvpilot_home"))
torch.set_num_threads(min(2, torch.get_num_threads()))

# One OpenTelemetry SDK setup for the whole run (the global providers are set-once): spans go to an
# in-memory exporter, metrics to an in-memory reader (and to the Prometheus reader the HTTP API's /metrics renders,
# as `kvpilot serve --http-port` sets it up); tests read them through the fixtures below.
from opentelemetry import metrics as otel_metrics  # noqa: E402
from opentelemetry import trace as otel_trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

SPANS = InMemorySpanExporter()
_tracer_provider = TracerProvider()
_tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
otel_trace.set_tracer_provider(_tracer_provider)
METRICS = InMemoryMetricReader()
from kvpilot_protocol.telemetry import prometheus_reader  # noqa: E402

otel_metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS, prometheus_reader()]))

from decoder_service import calibration  # noqa: E402
from decoder_service.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from decoder_service.engine import Engine, EngineConfig  # noqa: E402
from decoder_service.model import ModelConfig, Transformer  # noqa: E402
from decoder_service.tokenizer import build_byte_level_tokenizer  # noqa: E402

FAMILY_OVERRIDES = {
    "llama": dict(model_type="llama", qkv_bias=True, o_bias=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, rope_theta=1_000_000.0),
    "qwen3": dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=True),
}


def tiny_config(vocab_size: int, family: str = "llama", **overrides) -> ModelConfig:
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=0, eos_token_ids=[1])
    fields.update(FAMILY_OVERRIDES[family])
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_byte_level_tokenizer(vocab_size=300).save(str(path))
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_json):
    """make_checkpoint(family, seed=0, calibrate=True, **config overrides) -> directory of a saved random-weight
    model; with calibrate, its TriAttention calibration (from random tokens) beside it, so every policy runs."""
    cache = {}

    def make(family: str = "llama", seed: int = 0, shard_bytes: int | None = None, calibrate: bool = True,
             **overrides):
        key = (family, seed, shard_bytes, calibrate, tuple(sorted(overrides.items())))
        if key not in cache:
            config = tiny_config(300, family, **overrides)
            model = Transformer(config).init_random(seed, std=0.1)
            out = tmp_path_factory.mktemp(f"{family}-{seed}")
            cache[key] = save_checkpoint(model, tokenizer_json, out, max_shard_bytes=shard_bytes)
            if calibrate:
                tokens = torch.randint(2, 300, (4, 96), generator=torch.Generator().manual_seed(seed)).tolist()
                calibration.calibrate(model, tokens, weights_sha256=calibration.weights_fingerprint(out)).save(
                    out / calibration.CALIBRATION_FILE)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(make_checkpoint):
    return load_checkpoint(make_checkpoint("llama"))


def random_foresight(config: ModelConfig, seed: int = 0, fingerprint: str = "", hidden: int = 16):
    """ForesightKV scorer weights of the right shape for `config`, random (the pipeline, not the training)."""
    from policy_service.scorers.foresight import ATTENTION_STATS, CARRIED, ForesightWeights

    g = torch.Generator().manual_seed(seed)
    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
    inputs = ATTENTION_STATS * (config.num_heads // H) + len(CARRIED)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    return ForesightWeights(w_key=r(L, H, D, hidden), w_value=r(L, H, D, hidden), w_attention=r(L, H, inputs, hidden),
                            b1=r(L, H, hidden), w2=r(L, H, hidden), b2=r(L, H),
                            metadata={"model_fingerprint": fingerprint, "model": "test"})


@pytest.fixture(scope="session", autouse=True)
def foresight_weights(make_checkpoint, tmp_path_factory):
    """The shared policy matrix runs `foresight` on the tiny llama model: weights made for it, as the default."""
    path = make_checkpoint("llama")
    out = tmp_path_factory.mktemp("foresight") / "foresight.safetensors"
    random_foresight(load_checkpoint(path).config, fingerprint=calibration.weights_fingerprint(path)).save(out)
    previous = os.environ.get("KVPILOT_FORESIGHT_WEIGHTS")
    os.environ["KVPILOT_FORESIGHT_WEIGHTS"] = str(out)
    yield out
    if previous is None:
        os.environ.pop("KVPILOT_FORESIGHT_WEIGHTS", None)
    else:
        os.environ["KVPILOT_FORESIGHT_WEIGHTS"] = previous


@pytest.fixture
def make_engine(tiny_model):
    """make_engine(**EngineConfig fields) -> an engine with the in-process policy (as `kvpilot serve` composes it)."""
    from policy_service.local import InProcessPolicy

    def make(**config) -> Engine:
        config.setdefault("kv_pool_bytes", 2 << 20)
        return Engine(tiny_model, EngineConfig(**config), policy=InProcessPolicy())

    return make


@pytest.fixture
def spans():
    SPANS.clear()
    yield SPANS
    SPANS.clear()


@pytest.fixture
def metric_reader():
    return METRICS


REDIS_URL = os.environ.get("KVPILOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url():
    """The real Redis the integration tests use. Missing Redis is a failure, never a skip."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        pytest.fail(f"Redis not reachable at {REDIS_URL} ({exc}): start it "
                    "(redis-server --daemonize yes --port 6379 --save '') or run .ci/run")
    return REDIS_URL
