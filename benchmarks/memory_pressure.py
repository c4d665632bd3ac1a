"""Throughput under memory pressure: a fixed KV pool, the full cache vs compressing policies, side by side.

    python -m benchmarks.memory_pressure [--lengths 1024 2048] [--requests 16] [--budget 128] [--threads 1]

The pool holds exactly two full sequences (prompt + generation) of the longest length run, so the full cache
runs two requests at a time while a bounded policy (budget + interval + max_lag slots each) fits many more:
this is where KV compression pays in a server (the seeds' headline speed-ups come from this effect). For each
generation length and policy it reports decode tokens/s over all requests, the ratio to `full`, the most
sequences running at once, compaction events and the peak KV slots of one sequence; writes
benchmarks/results/memory_pressure_<device>.csv and .png. Quote the ratios on a CPU; absolute numbers mean
something only on a GPU.
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
from benchmarks.decode_throughput import SHAPES, make_model, sync
from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams
from policy_service.local import InProcessPolicy

POLICIES = ["full", "rkv", "snapkv", "streaming_llm"]


def run(loaded, prompts, new_tokens: int, pool_slots: int, policy: str, args) -> dict:
    c = loaded.config
    dtype = next(loaded.model.parameters()).dtype
    slot_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()
    engine = Engine(loaded, EngineConfig(max_running=len(prompts), max_waiting=len(prompts),
                                         max_batch_tokens=max(512, len(prompts) + args.prompt_len),
                                         prefill_chunk=512, kv_pool_bytes=pool_slots * slot_bytes,
                                         # Statistics live outside the KV pool with their own budget (default: a
                                         # quarter of the pool, tiny here): give them room, this measures KV.
                                         stats_memory_bytes=256 << 20),
                    policy=InProcessPolicy())
    compression = CompressionConfig() if policy == "full" else CompressionConfig(
        policy=policy, budget=args.budget, interval=args.interval, window=args.window, sinks=4)
    requests = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True),
                                  compression=compression) for i, p in enumerate(prompts)]
    concurrent = []
    engine.step_hooks.insert(0, lambda e, seq: concurrent.append(len(e.running)))
    sync(args.device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(args.device)
    elapsed = time.perf_counter() - start
    assert all(r.usage.generated_tokens == new_tokens for r in results), [r.error for r in results]
    assert engine.pool.used_blocks == 0, "blocks leaked"
    return dict(policy=policy, new_tokens=new_tokens, tokens_per_s=len(prompts) * new_tokens / elapsed,
                seconds=elapsed, max_concurrent=max(concurrent), pool_slots=engine.pool.capacity_slots,
                events=sum(r.usage.compression_events for r in results),
                fallbacks=sum(r.usage.fallbacks for r in results),
                peak_kv_slots=max(r.usage.peak_kv_slots for r in results))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["new_tokens"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        ratios = [next(r["ratio_vs_full"] for r in rows if r["policy"] == policy and r["new_tokens"] == n)
                  for n in lengths]
        ax.bar([x + i * width for x in range(len(lengths))], ratios, width, label=policy)
    ax.set_xticks([x + width * (len(policies) - 1) / 2 for x in range(len(lengths))], [str(n) for n in lengths])
    ax.set_xlabel("generated tokens per request")
    ax.set_ylabel("tokens/s vs full cache")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title("Throughput under memory pressure (pool = 2 full sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    add_device_arguments(parser)
    args = parser.parse_args()
    dtype, device_name = apply_device_arguments(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_checkpoint(make_model(args.shape, Path(tmp), dtype), device=args.device, dtype=dtype)
        print(f"model {args.shape}, {args.device} ({device_name}), {args.dtype}, {args.requests} requests of "
              f"{args.prompt_len} prompt tokens, budget {args.budget}, interval {args.interval}")
        print(f"{'tokens':>6} {'policy':>14} {'tok/s':>9} {'ratio':>6} {'concurrent':>10} {'events':>7} {'peak KV':>8}")
        for new_tokens in args.lengths:
            gen = torch.Generator().manual_seed(new_tokens)
            prompts = torch.randint(3, 512, (args.requests, args.prompt_len), generator=gen).tolist()
            full_blocks = -(-(args.prompt_len + new_tokens + 1) // 16)  # +1: the BOS token; blocks of 16 slots
            pool_slots = 2 * full_blocks * 16  # exactly two full sequences
            base = None
            for policy in args.policies:
                row = run(loaded, prompts, new_tokens, pool_slots, policy, args)
                base = base or (row["tokens_per_s"] if policy == "full" else None)
                row["ratio_vs_full"] = row["tokens_per_s"] / base if base else float("nan")
                row.update(device=args.device, device_name=device_name, shape=args.shape, dtype=args.dtype,
                           requests=args.requests, prompt_len=args.prompt_len, budget=args.budget,
                           interval=args.interval)
                rows.append(row)
                print(f"{new_tokens:>6} {policy:>14} {row['tokens_per_s']:>9.1f} {row['ratio_vs_full']:>6.2f} "
                      f"{row['max_concurrent']:>10} {row['events']:>7} {row['peak_kv_slots']:>8}", flush=True)
    device = args.device.split(":")[0]
    out = write_csv(RESULTS / f"memory_pressure_{device}.csv", rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
