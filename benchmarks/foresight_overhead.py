"""ForesightKV's overhead beside R-KV, in one run on the bundled reasoner (whose foresight weights ship beside it):
decode tokens/s and its ratio to the full cache, mean planning time per compression event, the share of the
run spent planning, and the wire bytes of one statistics frame with the 16-wide kv_features projection against
the same frame carrying raw keys and values (2D numbers per slot) instead.

    python benchmarks/foresight_overhead.py [--batch 8] [--prompt-len 256] [--new-tokens 256] [--budget 128]

Writes benchmarks/results/foresight_overhead_<device>.csv. On a CPU quote the ratios only.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, add_device_arguments, apply_device_arguments, write_csv  # noqa: E402
from decoder_service.checkpoint import load_checkpoint  # noqa: E402
from decoder_service.engine import Engine, EngineConfig  # noqa: E402
from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams  # noqa: E402
from kvpilot.models import resolve_model  # noqa: E402
from kvpilot_protocol.wire import frame_to_pb  # noqa: E402
from policy_service.local import InProcessPolicy  # noqa: E402


def run_policy(loaded, prompts, args, policy: str) -> dict:
    engine = Engine(loaded, EngineConfig(max_running=len(prompts), max_batch_tokens=4096, prefill_chunk=512,
                                         kv_pool_bytes=512 << 20), policy=InProcessPolicy())
    plan_s, frames = [], []
    decide = engine.compressor.policy.decide

    def timed_decide(frame, *a, **k):
        start = time.perf_counter()
        out = decide(frame, *a, **k)
        plan_s.append(time.perf_counter() - start)
        frames.append(frame)
        return out

    engine.compressor.policy.decide = timed_decide
    # foresight reads the weights file beside the model (each file names the weights it was trained for).
    params = {"weights": str(loaded.path / "foresight.safetensors")} if policy == "foresight" else {}
    compression = CompressionConfig() if policy == "full" else CompressionConfig(
        policy=policy, budget=args.budget, interval=args.interval, window=args.window, sinks=4, params=params)
    requests = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0, max_new_tokens=args.new_tokens,
                                                             ignore_eos=True, seed=i), compression=compression)
                for i, p in enumerate(prompts)]
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    row = dict(policy=policy, tokens_per_s=len(prompts) * args.new_tokens / elapsed, seconds=elapsed,
               events=sum(r.usage.compression_events for r in results),
               plan_ms=1e3 * sum(plan_s) / max(1, len(plan_s)), plan_share=sum(plan_s) / elapsed,
               frame_bytes=0, raw_kv_frame_bytes=0)
    if frames:
        frame = frames[-1]
        row["frame_bytes"] = frame_to_pb(frame, policy, {}).ByteSize()
        if "kv_features" in frame.stats:
            L, H, n, r = frame.stats["kv_features"].shape
            row["raw_kv_frame_bytes"] = row["frame_bytes"] + L * H * n * (2 * loaded.config.head_dim - r) * 4
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint with foresight.safetensors beside it, or a bundled model's name "
                                        "(default: the default bundled model, reasoner-v2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    add_device_arguments(parser)
    args = parser.parse_args()
    dtype, device_name = apply_device_arguments(args)
    loaded = load_checkpoint(resolve_model(args.model), device=args.device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, loaded.config.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
    run_policy(loaded, prompts[:1], argparse.Namespace(**{**vars(args), "new_tokens": 8}), "full")  # warm-up
    rows = [run_policy(loaded, prompts, args, p) for p in ("full", "rkv", "foresight")]
    full = rows[0]
    print(f"{'policy':>10} {'tok/s':>8} {'vs full':>8} {'events':>7} {'plan ms':>8} {'plan %':>7} {'frame B':>9} "
          f"{'raw-KV frame B':>15}")
    for r in rows:
        r["ratio_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
        r.update(device=args.device, device_name=device_name, model=loaded.name, batch=args.batch,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, budget=args.budget, interval=args.interval)
        print(f"{r['policy']:>10} {r['tokens_per_s']:>8.1f} {r['ratio_vs_full']:>8.2f} {r['events']:>7} "
              f"{r['plan_ms']:>8.2f} {100 * r['plan_share']:>6.1f}% {r['frame_bytes']:>9} {r['raw_kv_frame_bytes']:>15}")
    out = write_csv(RESULTS / f"foresight_overhead_{loaded.name}_{args.device.split(':')[0]}.csv", rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
