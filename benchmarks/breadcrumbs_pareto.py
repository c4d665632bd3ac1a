"""Breadcrumbs against TOVA, StreamingLLM and the rest at the same peak KV, on the single-pass tasks (variables and
graph, the analogues of the paper's LinSys and StarGraph): accuracy per beacon interval c, the teacher's (the
full-cache model the student was trained from), and the area under the accuracy-vs-KV curve (AUAC).

For each task and c: the student under policy `breadcrumbs:c=C` (a beacon every C generated tokens replaces them);
then each baseline with the budget that gives the same mean peak KV (a budget policy peaks at budget + interval).

    python benchmarks/breadcrumbs_pareto.py --model runs/breadcrumbs-export --teacher reasoner-v2 [--cs 4,8,16]

Writes benchmarks/results/breadcrumbs_pareto_<device>.csv and prints the table.
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

BASELINES = ("tova", "streaming_llm", "h2o", "rkv")


def run_cell(loaded, episodes, compression: CompressionConfig, args) -> dict:
    engine = Engine(loaded, EngineConfig(max_running=args.batch, max_batch_tokens=2048, prefill_chunk=512,
                                         kv_pool_bytes=256 << 20), policy=InProcessPolicy())
    start = time.perf_counter()
    results = EpisodeRunner(engine, compression=compression).run(episodes)
    n = len(results)
    return dict(accuracy=sum(r.correct for r in results) / n, peak_kv=sum(r.peak_kv_slots for r in results) / n,
                kv_reads=sum(r.kv_reads for r in results) / n, seconds=time.perf_counter() - start)


def auac(points: list[tuple[float, float]], full_kv: float) -> float:
    """Area under accuracy vs KV fraction (trapezoids over the measured points, from KV 0 at accuracy 0 to the
    largest point), normalised by that largest fraction: 1.0 is perfect accuracy at every KV size."""
    pts = sorted((kv / full_kv, acc) for kv, acc in points)
    xs, ys = [0.0] + [x for x, _ in pts], [0.0] + [y for _, y in pts]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / xs[-1] if xs[-1] else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the beacon-trained student")
    p.add_argument("--teacher", default="reasoner-v2", help="the full-cache model the student was trained from")
    p.add_argument("--tasks", default="variables,graph")
    p.add_argument("--difficulty", default="default")
    p.add_argument("--cs", default="4,8,16", help="beacon intervals to run the student at")
    p.add_argument("--episodes", type=int, default=20, help="held-out episodes per task (seeds 0..N-1)")
    p.add_argument("--interval", type=int, default=4, help="the baselines' compression interval")
    p.add_argument("--window", type=int, default=4, help="the baselines' protected recent window")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    add_device_arguments(p)
    args = p.parse_args(argv)
    dtype, device_name = apply_device_arguments(args)
    student = load_checkpoint(resolve_model(args.model), device=args.device, dtype=dtype)
    teacher = load_checkpoint(resolve_model(args.teacher), device=args.device, dtype=dtype)
    rows = []
    for task in args.tasks.split(","):
        episodes = [make_episode(task, seed, args.difficulty) for seed in range(args.episodes)]
        full = run_cell(teacher, episodes, CompressionConfig(), args)
        rows.append(dict(task=task, policy="teacher (full cache)", c=0, budget=0, **full))
        own = run_cell(student, episodes, CompressionConfig(), args)
        rows.append(dict(task=task, policy="student (full cache)", c=0, budget=0, **own))
        curves: dict[str, list[tuple[float, float]]] = {}
        for c in [int(x) for x in args.cs.split(",")]:
            m = run_cell(student, episodes, CompressionConfig(policy="breadcrumbs", params={"c": str(c)}), args)
            rows.append(dict(task=task, policy="breadcrumbs", c=c, budget=0, **m))
            curves.setdefault("breadcrumbs", []).append((m["peak_kv"], m["accuracy"]))
            budget = max(args.window + 4 + 1, round(m["peak_kv"]) - args.interval)
            for name in BASELINES:
                b = run_cell(teacher, episodes, CompressionConfig(policy=name, budget=budget, interval=args.interval,
                                                                  window=args.window, sinks=4), args)
                rows.append(dict(task=task, policy=name, c=c, budget=budget, **b))
                curves.setdefault(name, []).append((b["peak_kv"], b["accuracy"]))
            print(f"{task} c={c}: breadcrumbs {m['accuracy']:.2f} at peak {m['peak_kv']:.0f}; "
                  + ", ".join(f"{r['policy']} {r['accuracy']:.2f}" for r in rows[-len(BASELINES):]), flush=True)
        for row in rows:
            if row["task"] == task:
                row["auac"] = auac(curves[row["policy"]], full["peak_kv"]) if row["policy"] in curves else None
                row["of_teacher"] = row["accuracy"] / full["accuracy"] if full["accuracy"] else None
                row["peak_vs_full"] = row["peak_kv"] / full["peak_kv"]
                row.update(student=Path(student.path).name, device=device_name)
    out = args.out or RESULTS / f"breadcrumbs_pareto_{'cpu' if args.device == 'cpu' else 'gpu'}.csv"
    write_csv(out, rows)
    print_table([{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["task", "policy", "c", "budget", "accuracy", "of_teacher", "peak_kv", "peak_vs_full", "auac"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
