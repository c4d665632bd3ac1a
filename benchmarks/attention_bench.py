"""Paged decode attention (kernels.paged_decode_attention) against torch SDPA on contiguous KV.

For each (batch, context): a paged pool holding `batch` sequences of `context` slots each in shuffled blocks
of --block-size (as a pool hands them out after churn), one decode query per sequence, and

    paged_ms     the Triton paged kernel, without statistics
    stats_ms     the same, with slot_attention (the log-sum-exp second pass over K)
    sdpa_ms      torch.nn.functional.scaled_dot_product_attention on contiguous [B, H, context, D] KV of
                 the same lengths (enable_gqa=True): the cost the paged layout has to compete with
    speed_vs_sdpa  sdpa_ms / paged_ms     target >= 0.8 (no more than 25% slower than SDPA without stats)
    stats_vs_sdpa  stats_ms / sdpa_ms     target <= 1.3 (statistics cost at most 30% over plain SDPA)
    max_err      max |paged - SDPA| of the outputs (a sanity check, not a test)
    (all best of N interleaved runs; on CUDA each run times a loop of --inner calls)

Default shapes: the attention of Qwen2.5-1.5B (Hq 12, H 2, D 128), batch 1/8/32, context 1024/4096/8192,
block size 16, bfloat16. The small shapes fit in the GPU's L2 cache across repeated calls, for SDPA and the
kernel alike.

Without CUDA the Triton kernel can only run in its interpreter, whose timings mean nothing, so `--smoke`
(the default there) times the torch reference path (the engine's CPU path) against SDPA at tiny shapes in
float32: it checks that the script and both paths run and agree. Its rows are labelled
impl=torch-reference; the Triton figures and the targets need a GPU.

Usage:  python benchmarks/attention_bench.py [--device cpu|cuda] [--smoke] [--batch 1,8,32]
            [--context 1024,4096,8192] [--block-size 16] [--dtype bfloat16] [--repeats N] [--inner N]
Writes benchmarks/results/attention_<device>[_smoke].csv and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from anywhere
from benchmarks.common import RESULTS, print_table, write_csv  # noqa: E402
from benchmarks.compaction_bench import best_ms, device_name  # noqa: E402
import kvpilot_kernels as kernels  # noqa: E402
from kvpilot_kernels import paged_attention  # noqa: E402

SPEED_TARGET = 0.8  # sdpa_ms / paged_ms, without statistics
STATS_TARGET = 1.3  # stats_ms / sdpa_ms

SMOKE = dict(hq=4, h=2, d=32, batch=[1, 2], context=[64, 256], block_size=16, dtype="float32")


def build(batch, context, hq, h, d, block_size, dtype, device, seed=0):
    """Pool [H, S, D] with every sequence's blocks shuffled over it, block tables, lengths, queries, and the
    same KV as contiguous [B, H, context, D] for SDPA."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // block_size)
    num_blocks = batch * per_seq
    tables = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(torch.int32)
    k = torch.randn(h, num_blocks * block_size, d, generator=g).to(dtype)
    v = torch.randn(h, num_blocks * block_size, d, generator=g).to(dtype)
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    slots = torch.stack([kernels.slot_map_from_block_table(tables[b], context, block_size) for b in range(batch)])
    k_dense = k[:, slots].permute(1, 0, 2, 3).contiguous()  # [B, H, context, D]
    v_dense = v[:, slots].permute(1, 0, 2, 3).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k, v, tables, lens, k_dense, v_dense))


def sdpa(q, k_dense, v_dense):
    # [B, Hq, 1, D] against [B, H, n, D]: grouped-query attention in SDPA itself.
    return F.scaled_dot_product_attention(q.unsqueeze(2), k_dense, v_dense, enable_gqa=True).squeeze(2)


def bench_shape(batch, context, hq, h, d, block_size, dtype, device, repeats, inner, impl_name):
    q, k, v, tables, lens, k_dense, v_dense = build(batch, context, hq, h, d, block_size, dtype, device)
    impl = (paged_attention.paged_decode_attention_triton if impl_name == "triton"
            else paged_attention.paged_decode_attention_reference)

    def loop(fn):
        def run():
            for _ in range(inner):
                fn()
        return run

    fns = {
        "paged": loop(lambda: impl(q, k, v, tables, lens, block_size)),
        "stats": loop(lambda: impl(q, k, v, tables, lens, block_size, with_stats=True)),
        "sdpa": loop(lambda: sdpa(q, k_dense, v_dense)),
    }
    t = {name: ms / inner for name, ms in best_ms(fns, device, repeats).items()}
    out, stats = impl(q, k, v, tables, lens, block_size, with_stats=True)
    err = (out.float() - sdpa(q, k_dense, v_dense).float()).abs().max().item()
    stats_err = (stats.sum(-1) - hq // h).abs().max().item()  # every sequence's group sums to G
    return {
        "device": device_name(device), "impl": impl_name, "dtype": str(dtype).replace("torch.", ""),
        "batch": batch, "context": context, "Hq": hq, "H": h, "D": d, "block_size": block_size,
        "paged_ms": round(t["paged"], 4), "stats_ms": round(t["stats"], 4), "sdpa_ms": round(t["sdpa"], 4),
        "speed_vs_sdpa": round(t["sdpa"] / t["paged"], 3), "stats_vs_sdpa": round(t["stats"] / t["sdpa"], 3),
        "meets_targets": (t["sdpa"] / t["paged"] >= SPEED_TARGET and t["stats"] / t["sdpa"] <= STATS_TARGET)
        if impl_name == "triton" else "n/a (needs GPU)",
        "max_err": f"{err:.2e}", "stats_sum_err": f"{stats_err:.2e}",
        "load_avg_1m": round(os.getloadavg()[0], 2) if device.type == "cpu" else "",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", default=None,
                    help="tiny shapes, torch reference vs SDPA (default without CUDA)")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="1024,4096,8192")
    ap.add_argument("--hq", type=int, default=12)
    ap.add_argument("--h", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (float32 with --smoke)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (best of)")
    ap.add_argument("--inner", type=int, default=None, help="calls per timed run (default 20 on CUDA, 1 on CPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    smoke = args.smoke if args.smoke is not None else device.type != "cuda"
    if os.environ.get("KVPILOT_FORCE_TRITON") == "1" and device.type == "cpu":
        sys.exit("KVPILOT_FORCE_TRITON=1 would time the Triton interpreter; unset it for the CPU benchmark")
    if smoke:
        hq, h, d, block_size = SMOKE["hq"], SMOKE["h"], SMOKE["d"], SMOKE["block_size"]
        batches, contexts, dtype_name = SMOKE["batch"], SMOKE["context"], args.dtype or SMOKE["dtype"]
    else:
        hq, h, d, block_size = args.hq, args.h, args.d, args.block_size
        batches = [int(x) for x in args.batch.split(",")]
        contexts = [int(x) for x in args.context.split(",")]
        dtype_name = args.dtype or "bfloat16"
    dtype = getattr(torch, dtype_name)
    impl_name = "triton" if device.type == "cuda" else "torch-reference"
    repeats = args.repeats or (30 if device.type == "cuda" else 5)
    inner = args.inner or (20 if device.type == "cuda" else 1)

    rows = [bench_shape(b, c, hq, h, d, block_size, dtype, device, repeats, inner, impl_name)
            for b in batches for c in contexts]

    cols = ["batch", "context", "paged_ms", "stats_ms", "sdpa_ms", "speed_vs_sdpa", "stats_vs_sdpa", "meets_targets", "max_err"]
    print(f"paged decode attention ({impl_name}, {dtype_name}, Hq {hq}, H {h}, D {d}, block {block_size}) on "
          f"{rows[0]['device']}, best of {repeats} interleaved runs x {inner} calls")
    print(f"targets: speed_vs_sdpa >= {SPEED_TARGET} (no stats), stats_vs_sdpa <= {STATS_TARGET}")
    if impl_name != "triton":
        print("NOTE: no CUDA: this times the kernel's torch reference against SDPA at smoke shapes; the "
              "Triton figures and the targets need a GPU.")
    print_table(rows, cols)

    out = RESULTS / f"attention_{device.type}{'_smoke' if smoke else ''}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
