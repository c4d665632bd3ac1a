"""Build an engine from command-line style settings (shared by `kvpilot serve`, `demo`, `eval` and benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoder_service.checkpoint import DTYPES, load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from kvpilot.models import default_model_path


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


def build_engine(opts: RuntimeOptions) -> Engine:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    path = opts.model or default_model_path()
    dtype = DTYPES[opts.dtype] if opts.dtype else None
    loaded = load_checkpoint(path, device=opts.device, dtype=dtype)
    config = EngineConfig(max_batch_tokens=opts.max_batch_tokens, prefill_chunk=opts.prefill_chunk,
                          max_running=opts.max_running, kv_pool_bytes=opts.kv_pool_mb << 20)
    return Engine(loaded, config)


def add_runtime_arguments(parser) -> None:
    parser.add_argument("--model", help="Hugging Face-format checkpoint directory (default: the bundled model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights/KV dtype (default: the checkpoint's)")
    parser.add_argument("--kv-pool-mb", type=int, default=256, help="KV pool size in MiB (preallocated)")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens one sequence prefills per step")
    parser.add_argument("--max-running", type=int, default=32, help="sequences decoding at once")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def runtime_options(args) -> RuntimeOptions:
    return RuntimeOptions(model=args.model, device=args.device, dtype=args.dtype, kv_pool_mb=args.kv_pool_mb,
                          max_batch_tokens=args.max_batch_tokens, prefill_chunk=args.prefill_chunk,
                          max_running=args.max_running, threads=args.threads)
