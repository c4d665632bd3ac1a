"""Decode throughput with compression vs the full cache, and time per compaction event, in one run.

    python benchmarks/compression_throughput.py [--batch 8] [--prompt-len 256] [--new-tokens 512] [--budget 128]
                                                [--shape small | --model reasoner-v2]

Every policy runs the same greedy requests on the same model (random weights of --shape, or --model) through the
engine. Reported per
policy: decode tokens/s and its ratio to `full`, compaction events, mean time per event split into the
policy's planning and the plan's application (kernel + bookkeeping), and peak KV bytes per sequence.
Writes benchmarks/results/compression_throughput_<device>.csv. On a CPU quote the ratios; absolute numbers
mean something only on a GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, add_device_arguments, apply_device_arguments, write_csv

from benchmarks.decode_throughput import add_model_arguments, model_under_test, sync
from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from policy_service.local import InProcessPolicy
from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams



def run_policy(loaded, prompts, args, policy: str) -> dict:
    engine = Engine(loaded, EngineConfig(max_running=len(prompts), max_batch_tokens=4096, prefill_chunk=512,
                                         kv_pool_bytes=1 << 30), policy=InProcessPolicy())
    compressor = engine.compressor
    plan_s, apply_s = [], []
    decide, apply = compressor.policy.decide, compressor.apply

    def timed_decide(*a, **k):
        start = time.perf_counter()
        out = decide(*a, **k)
        plan_s.append(time.perf_counter() - start)
        return out

    def timed_apply(*a, **k):
        start = time.perf_counter()
        out = apply(*a, **k)
        apply_s.append(time.perf_counter() - start)
        return out

    compressor.policy.decide, compressor.apply = timed_decide, timed_apply
    compression = CompressionConfig() if policy == "full" else CompressionConfig(
        policy=policy, budget=args.budget, interval=args.interval, window=args.window, sinks=4)
    requests = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0, max_new_tokens=args.new_tokens,
                                                             ignore_eos=True), compression=compression)
                for i, p in enumerate(prompts)]
    sync(args.device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(args.device)
    elapsed = time.perf_counter() - start
    events = sum(r.usage.compression_events for r in results)
    return dict(policy=policy, tokens_per_s=len(prompts) * args.new_tokens / elapsed, seconds=elapsed,
                events=events, plan_ms=1e3 * sum(plan_s) / max(1, len(plan_s)),
                apply_ms=1e3 * sum(apply_s) / max(1, len(apply_s)),
                peak_kv_kib=max(r.usage.peak_kv_bytes for r in results) / 1024,
                reserved_kv_kib=max(r.usage.reserved_kv_bytes for r in results) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--policies", nargs="+", default=["full", "streaming_llm", "h2o", "tova", "snapkv", "knorm",
                                                           "rkv", "vase", "random"])
    add_device_arguments(parser)
    args = parser.parse_args()
    dtype, device_name = apply_device_arguments(args)
    with tempfile.TemporaryDirectory() as tmp:
        path, label = model_under_test(args, Path(tmp), dtype)
        loaded = load_checkpoint(path, device=args.device, dtype=dtype)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, loaded.config.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        print(f"model {label} on {args.device} ({device_name}), batch {args.batch}, prompt {args.prompt_len}, "
              f"new {args.new_tokens}, budget {args.budget}, interval {args.interval}, threads {torch.get_num_threads()}")
        run_policy(loaded, prompts[:1], argparse.Namespace(**{**vars(args), "new_tokens": 8}), "full")  # warm-up
        rows = [run_policy(loaded, prompts, args, p) for p in args.policies]
    full = next(r for r in rows if r["policy"] == "full")
    print(f"{'policy':>14} {'tok/s':>8} {'vs full':>8} {'events':>7} {'plan ms':>8} {'apply ms':>9} {'peak KV KiB':>12}")
    for r in rows:
        r["ratio_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
        r.update(device=args.device, device_name=device_name, shape=label, batch=args.batch,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, budget=args.budget, interval=args.interval)
        print(f"{r['policy']:>14} {r['tokens_per_s']:>8.1f} {r['ratio_vs_full']:>8.2f} {r['events']:>7} "
              f"{r['plan_ms']:>8.2f} {r['apply_ms']:>9.2f} {r['peak_kv_kib']:>12.0f}")
    out = RESULTS / f"compression_throughput_{'' if label == 'small' else label + '_'}{args.device.split(':')[0]}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
