"""SideQuest at the same peak KV as the token-level policies: accuracy, peak KV, KV reads and side-thread overhead.

For each panel (held-out episodes, seeds below the training range):
  full              the reference: its accuracy and peak KV;
  sidequest         the fine-tuned model deletes obsolete tool outputs in side threads (no budget);
  baselines         h2o / snapkv / rkv / streaming_llm with a budget that gives the same mean peak as sidequest
                    (peak = budget + interval: they compress when the cache reaches it);
  sidequest + rkv   the hybrid: side-thread deletions and R-KV under that same budget.
Panels: the long multihop variant (the agentic workload), today's multihop at the hard difficulty (in distribution),
the same with 8 documents per tool output instead of 12 (meant as out of distribution; measured: the main model
itself fails there, full cache 0%, as at 10, 11 or 14 documents and at 10 hops), and the default difficulty (4 hops:
too short for deletions to lower the peak).

    python benchmarks/sidequest_peak.py [--model reasoner-v2-sidequest] [--episodes 10] [--panels long,hard,hard-docs8]

Writes benchmarks/results/sidequest_peak_<device>.csv (one row per panel and policy) and prints the table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make the repository root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, add_device_arguments, apply_device_arguments, print_table, write_csv  # noqa: E402
from decoder_service.checkpoint import load_checkpoint  # noqa: E402
from decoder_service.engine import Engine, EngineConfig  # noqa: E402
from decoder_service.requests import CompressionConfig  # noqa: E402
from kvpilot.agent import EpisodeRunner  # noqa: E402
from kvpilot.models import resolve_model  # noqa: E402
from kvpilot.tasks import make_episode  # noqa: E402
from policy_service.local import InProcessPolicy  # noqa: E402

PANELS = {  # name -> (difficulty, task knobs)
    "long": ("long", {}),  # the agentic variant: 16-24 hops, documents needed again later
    "hard": ("hard", {}),  # today's multihop at its hardest: 8 hops, 12 documents per output
    "hard-docs8": ("hard", {"docs": 8}),  # out of distribution: 8 hops of 8 documents, a pairing never trained
    "default": ("default", {}),
}
BASELINES = ("h2o", "snapkv", "rkv", "streaming_llm")


def run_cell(loaded, episodes, compression: CompressionConfig, args, pool_mb: float = 512) -> dict:
    engine = Engine(loaded, EngineConfig(max_running=args.batch, max_batch_tokens=2048, prefill_chunk=512,
                                         kv_pool_bytes=int(pool_mb * 2**20)), policy=InProcessPolicy())
    start = time.perf_counter()
    results = EpisodeRunner(engine, compression=compression).run(episodes)
    seconds = time.perf_counter() - start
    n = len(results)
    mean = lambda name: sum(getattr(r, name) for r in results) / n  # noqa: E731
    return dict(accuracy=sum(r.correct for r in results) / n, peak_kv=mean("peak_kv_slots"),
                kv_reads=mean("kv_reads"), sequence=mean("total_tokens"), generated=mean("generated_tokens"),
                side_threads=mean("side_threads"), side_tokens=mean("side_tokens"), side_cut=mean("side_cut"),
                dropped_outputs=mean("dropped_tool_outputs"), side_ignored=mean("side_ignored"),
                reissued=mean("reissued"), evicted=mean("evicted_tokens"), seconds=seconds,
                tokens_per_s=sum(r.generated_tokens + r.side_tokens for r in results) / seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reasoner-v2-sidequest")
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per panel (seeds 0..N-1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="episodes use seeds first..first+N-1 (0: the held-out evaluation seeds; e.g. 500 for a "
                        "validation set that picks between checkpoints without touching them)")
    p.add_argument("--panels", default="long,hard,hard-docs8")
    p.add_argument("--policies", default=None,
                   help="comma-separated subset of full,sidequest,h2o,snapkv,rkv,streaming_llm,sidequest+rkv (default all; "
                        "full and sidequest always run: the others' budget comes from sidequest's peak)")
    p.add_argument("--every", type=int, default=1, help="sidequest: tool outputs between side threads")
    p.add_argument("--protect-latest", type=int, default=0,
                   help="sidequest: the newest tool outputs it never drops (0 lets the side thread name the output "
                        "the turn just read: it drops when that turn ends)")
    p.add_argument("--interval", type=int, default=16)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="episodes in flight (continuous batching)")
    p.add_argument("--pressure-mb", type=float, default=None,
                   help="also run full, sidequest, rkv and the hybrid with a KV pool of this many MiB (memory-pressure "
                        "throughput: each turn reserves what its session holds now, so deletions admit more episodes)")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/sidequest_peak_<device>.csv)")
    add_device_arguments(p)
    args = p.parse_args(argv)
    if args.pressure_mb is not None and args.pressure_mb <= 0:
        p.error(f"--pressure-mb must be > 0 MiB (got {args.pressure_mb})")
    known = {"full", "sidequest", "sidequest+rkv", *BASELINES}
    wanted = None if args.policies is None else set(args.policies.split(","))
    if wanted is not None and not wanted <= known:
        p.error(f"--policies: unknown {sorted(wanted - known)}; choose from {sorted(known)}")
    if not 0 <= args.first_seed < 1_000_000:
        p.error(f"--first-seed must be in [0, 1000000) (training episodes use seeds >= 1,000,000; got {args.first_seed})")
    if not 0 <= args.protect_latest <= 8:
        p.error(f"--protect-latest must be in [0, 8] (got {args.protect_latest})")
    dtype, device_name = apply_device_arguments(args)
    path = resolve_model(args.model)
    loaded = load_checkpoint(path, device=args.device, dtype=dtype)
    rows = []
    for panel in args.panels.split(","):
        difficulty, knobs = PANELS[panel]
        episodes = [make_episode("multihop", seed, difficulty, **knobs)
                    for seed in range(args.first_seed, args.first_seed + args.episodes)]
        side = {"every": str(args.every), "protect_latest": str(args.protect_latest)}
        cells = [("full", CompressionConfig()), ("sidequest", CompressionConfig(policy="sidequest", params=side))]
        measured = {}
        for name, compression in cells:
            measured[name] = run_cell(loaded, episodes, compression, args)
            print(f"{panel} {name}: {measured[name]['accuracy']:.2f}, peak {measured[name]['peak_kv']:.0f}", flush=True)
        # The same mean peak as sidequest: a budget policy peaks at budget + interval.
        budget = max(args.window + 4 + 1, round(measured["sidequest"]["peak_kv"]) - args.interval)
        bounded = dict(budget=budget, interval=args.interval, window=args.window, sinks=4)
        cells = [(b, CompressionConfig(policy=b, **bounded)) for b in BASELINES]
        cells.append(("sidequest+rkv", CompressionConfig(policy="sidequest", params={**side, "base": "rkv"}, **bounded)))
        cells = [(name, compression) for name, compression in cells if wanted is None or name in wanted]
        for name, compression in cells:
            measured[name] = run_cell(loaded, episodes, compression, args)
            print(f"{panel} {name}: {measured[name]['accuracy']:.2f}, peak {measured[name]['peak_kv']:.0f}", flush=True)
        if args.pressure_mb:
            for name in ("full", "sidequest", "rkv", "sidequest+rkv"):
                compression = CompressionConfig(policy=name.split("+")[0], params=side if "sidequest" in name else {},
                                                **({} if name in ("full", "sidequest") else bounded))
                if name == "sidequest+rkv":
                    compression.params = {**side, "base": "rkv"}
                measured[f"{name}@{args.pressure_mb:g}MiB"] = run_cell(loaded, episodes, compression, args,
                                                                     pool_mb=args.pressure_mb)
        full = measured["full"]
        for name, m in measured.items():
            rows.append(dict(panel=panel, policy=name, budget=0 if name.split("@")[0] in ("full", "sidequest") else budget,
                             episodes=len(episodes), first_seed=args.first_seed, **m, peak_vs_full=m["peak_kv"] / full["peak_kv"],
                             reads_vs_full=m["kv_reads"] / full["kv_reads"],
                             accuracy_drop_points=100 * (full["accuracy"] - m["accuracy"]),
                             model=path.name, device=device_name))
    out = args.out or RESULTS / f"sidequest_peak_{'cpu' if args.device == 'cpu' else 'gpu'}.csv"
    write_csv(out, rows)
    print_table([{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["panel", "policy", "budget", "accuracy", "peak_kv", "peak_vs_full", "reads_vs_full", "side_tokens",
                 "dropped_outputs", "reissued", "tokens_per_s"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
