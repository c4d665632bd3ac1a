"""Build an engine from command-line style settings (shared by `kvpilot serve`, `demo`, `eval` and benchmarks).

This is where the services are composed: the decoder gets a policy client (the in-process one, or a remote
policy service) and a local fallback; neither service imports the other."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoder_service.checkpoint import DTYPES, load_checkpoint
from decoder_service.circuit_breaker import CircuitBreaker
from decoder_service.engine import Engine, EngineConfig
from kvpilot.models import resolve_model
from policy_service.local import InProcessPolicy
from policy_service.scorers.base import Scorer


def fallback_scorer(name: str, policy: InProcessPolicy | None = None) -> Scorer:
    """The local fallback must work from the cache alone: it runs exactly when statistics may be missing."""
    scorer = (policy or InProcessPolicy()).scorer(name, {})
    if scorer.spec().names:
        raise ValueError(f"fallback policy {name!r} needs statistics {sorted(scorer.spec().names)}; choose one that "
                         "needs none (streaming_llm, random)")
    return scorer


@dataclass
class RuntimeOptions:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # float32 | float16 | bfloat16; default: the checkpoint's
    kv_pool_mb: int = 256
    max_batch_tokens: int = 512
    prefill_chunk: int = 256
    max_running: int = 32
    threads: int | None = None
    policy_url: str | None = None  # remote policy service (host:port); None = in-process
    policy_streams: int = 1
    fallback_policy: str = "streaming_llm"
    decision_timeout_s: float = 2.0
    circuit_failures: int = 3  # consecutive remote-policy failures that open the circuit
    circuit_cool_down_s: float = 5.0
    policy_tls_ca: str | None = None
    policy_auth_token_file: str | None = None


def build_engine(opts: RuntimeOptions) -> Engine:
    """Raises ValueError for settings that cannot work (checked before the model loads)."""
    local = InProcessPolicy()
    fallback = fallback_scorer(opts.fallback_policy, local)  # refuses a fallback that needs statistics
    if opts.decision_timeout_s <= 0:
        raise ValueError(f"--decision-timeout must be > 0 seconds (got {opts.decision_timeout_s})")
    breaker = CircuitBreaker(opts.circuit_failures, opts.circuit_cool_down_s)  # raises for bad settings
    if opts.threads:
        torch.set_num_threads(opts.threads)
    path = resolve_model(opts.model)
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    loaded = load_checkpoint(path, device=opts.device, dtype=dtype)
    config = EngineConfig(max_batch_tokens=opts.max_batch_tokens, prefill_chunk=opts.prefill_chunk,
                          max_running=opts.max_running, kv_pool_bytes=opts.kv_pool_mb << 20)
    engine = Engine(loaded, config, policy=local, fallback=fallback)
    engine.compressor.decision_timeout_s = opts.decision_timeout_s
    breaker.on_change = engine.compressor.breaker.on_change
    engine.compressor.breaker = breaker
    if opts.policy_url:
        from decoder_service.remote_policy import RemotePolicy
        from kvpilot_protocol.security import load_client_token

        engine.compressor.policy = RemotePolicy(opts.policy_url, streams=opts.policy_streams, tls_ca=opts.policy_tls_ca,
                                                token=load_client_token(opts.policy_auth_token_file,
                                                                        env_var="KVPILOT_POLICY_AUTH_TOKEN"))
    return engine


def add_runtime_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face-format checkpoint directory, or a bundled model by name: reasoner-v2 (the default), reasoner (v1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights/KV dtype (default: the checkpoint's)")
    parser.add_argument("--kv-pool-mb", type=int, default=256, help="KV pool size in MiB (preallocated)")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens one sequence prefills per step")
    parser.add_argument("--max-running", type=int, default=32, help="sequences decoding at once")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--policy-url", help="remote policy service host:port (default: the in-process policy)")
    parser.add_argument("--policy-streams", type=int, default=1,
                        help="parallel Decide streams to the policy service (spreads sessions over replicas)")
    parser.add_argument("--fallback-policy", default="streaming_llm", help="local policy when no decision arrives")
    parser.add_argument("--decision-timeout", type=float, default=2.0,
                        help="seconds a sequence out of room waits for a remote decision before falling back")
    parser.add_argument("--circuit-failures", type=int, default=3,
                        help="consecutive remote-policy decisions too late (timeouts) that open the circuit")
    parser.add_argument("--circuit-cool-down", type=float, default=5.0,
                        help="seconds the circuit stays open (local fallback) before one probe frame")


def runtime_options(args) -> RuntimeOptions:
    return RuntimeOptions(model=args.model, device=args.device, dtype=args.dtype, kv_pool_mb=args.kv_pool_mb,
                          max_batch_tokens=args.max_batch_tokens, prefill_chunk=args.prefill_chunk,
                          max_running=args.max_running, threads=args.threads,
                          policy_url=getattr(args, "policy_url", None), policy_streams=getattr(args, "policy_streams", 1),
                          fallback_policy=getattr(args, "fallback_policy", "streaming_llm"),
                          decision_timeout_s=getattr(args, "decision_timeout", 2.0),
                          circuit_failures=getattr(args, "circuit_failures", 3),
                          circuit_cool_down_s=getattr(args, "circuit_cool_down", 5.0),
                          policy_tls_ca=getattr(args, "policy_tls_ca", None),
                          policy_auth_token_file=getattr(args, "policy_auth_token_file", None))
