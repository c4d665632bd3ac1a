"""Breadcrumbs against TOVA, StreamingLLM and the rest at the same peak KV, on the single-pass tasks (variables and
graph, the analogues of the paper's LinSys and StarGraph): accuracy per beacon interval c, the teacher's (the
full-cache model the student was trained from), and the area under the accuracy-vs-KV curve (AUAC).

For each task and c: the student under policy `breadcrumbs:c=C` (a beacon every C generated tokens replaces them);
then each baseline with the budget that gives the same mean peak KV (a budget policy peaks at budget + interval).

    python benchmarks/breadcrumbs_pareto.py --model runs/breadcrumbs-export --teacher reasoner-v2 [--cs 4,8,16]
        [--per-c 4:DIR,8:DIR,16:DIR] [--also rl:DIR]

With --per-c, students trained at one c each run at their own c beside the main (variable-c) student, so the
table compares the two at equal c; --also adds students run at every c (the RL'd student).

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
from policy_service.registry import POLICIES  # noqa: E402

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


def parse_students(text: str | None, flag: str) -> list[tuple[str, str]]:
    """`A:DIR,B:DIR` -> [(A, DIR), (B, DIR)]."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        key, sep, path = item.partition(":")
        if not sep or not key or not path:
            raise SystemExit(f"error: {flag} takes KEY:DIR pairs, comma-separated (got {item!r})")
        pairs.append((key, path))
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the beacon-trained student (the variable-c one when --per-c is given)")
    p.add_argument("--label", default=None, help="its name in the table (default: variable-c with --per-c, else student)")
    p.add_argument("--per-c", default=None, metavar="C:DIR[,C:DIR...]",
                   help="students trained at one c each, run at their own c beside the main student")
    p.add_argument("--also", default=None, metavar="NAME:DIR[,...]",
                   help="more students run at every c (e.g. the main student after the RL stage)")
    p.add_argument("--teacher", default="reasoner-v2", help="the full-cache model the student was trained from")
    p.add_argument("--tasks", default="variables,graph")
    p.add_argument("--difficulty", default="default")
    p.add_argument("--cs", default="4,8,16", help="beacon intervals to run the student at")
    p.add_argument("--episodes", type=int, default=20, help="held-out episodes per task (seeds 0..N-1)")
    p.add_argument("--baselines", default=",".join(BASELINES), help="budget policies run on the teacher at each peak")
    p.add_argument("--interval", type=int, default=4, help="the baselines' compression interval")
    p.add_argument("--window", type=int, default=4, help="the baselines' protected recent window")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    add_device_arguments(p)
    args = p.parse_args(argv)
    try:
        cs = [int(x) for x in args.cs.split(",")]
    except ValueError:
        raise SystemExit(f"error: --cs takes comma-separated integers (got {args.cs!r})") from None
    per_c = parse_students(args.per_c, "--per-c")
    if any(not key.isdigit() or int(key) not in cs for key, _ in per_c):
        raise SystemExit(f"error: --per-c keys must be beacon intervals listed in --cs {cs} (got {args.per_c!r})")
    baselines = args.baselines.split(",") if args.baselines else []
    unknown = [b for b in baselines if b not in POLICIES]
    if unknown:
        raise SystemExit(f"error: --baselines: unknown policies {unknown}; see `kvpilot policies`")
    if args.episodes < 1:
        raise SystemExit(f"error: --episodes must be >= 1 (got {args.episodes})")
    dtype, device_name = apply_device_arguments(args)
    load = lambda name: load_checkpoint(resolve_model(name), device=args.device, dtype=dtype)  # noqa: E731
    label = args.label or ("variable-c" if per_c else "student")
    students = [(label, load(args.model), cs)]  # (name in the table, checkpoint, the c it runs at)
    students += [(f"per-c {key}", load(path), [int(key)]) for key, path in per_c]
    students += [(name, load(path), cs) for name, path in parse_students(args.also, "--also")]
    teacher = load(args.teacher)
    rows = []
    for task in args.tasks.split(","):
        episodes = [make_episode(task, seed, args.difficulty) for seed in range(args.episodes)]
        full = run_cell(teacher, episodes, CompressionConfig(), args)
        rows.append(dict(task=task, policy="teacher (full cache)", student="", c=0, budget=0, **full))
        own = run_cell(students[0][1], episodes, CompressionConfig(), args)
        rows.append(dict(task=task, policy="student (full cache)", student=label, c=0, budget=0, **own))
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for c in cs:
            first = None
            for name, student, its_cs in students:
                if c not in its_cs:
                    continue
                m = run_cell(student, episodes, CompressionConfig(policy="breadcrumbs", params={"c": str(c)}), args)
                rows.append(dict(task=task, policy="breadcrumbs", student=name, c=c, budget=0, **m))
                curves.setdefault(("breadcrumbs", name), []).append((m["peak_kv"], m["accuracy"]))
                first = first or m
            # The baselines run on the teacher at the main student's peak (every student's peak at one c is
            # prompt + beacons + a window: the same to within a token or two).
            budget = max(args.window + 4 + 1, round(first["peak_kv"]) - args.interval)
            for name in baselines:
                b = run_cell(teacher, episodes, CompressionConfig(policy=name, budget=budget, interval=args.interval,
                                                                  window=args.window, sinks=4), args)
                rows.append(dict(task=task, policy=name, student="", c=c, budget=budget, **b))
                curves.setdefault((name, ""), []).append((b["peak_kv"], b["accuracy"]))
            print(f"{task} c={c}: " + ", ".join(f"{r['policy']}{' ' + r['student'] if r['student'] else ''} "
                                                 f"{r['accuracy']:.2f}" for r in rows if r["task"] == task
                                                 and r["c"] == c), flush=True)
        for row in rows:
            if row["task"] == task:
                curve = curves.get((row["policy"], row["student"]))
                # AUAC needs a curve: a per-c student has one point, so it gets none.
                row["auac"] = auac(curve, full["peak_kv"]) if curve and len(curve) > 1 else None
                row["of_teacher"] = row["accuracy"] / full["accuracy"] if full["accuracy"] else None
                row["peak_vs_full"] = row["peak_kv"] / full["peak_kv"]
                row.update(checkpoint=next((Path(s.path).name for n, s, _ in students if n == row["student"]), ""),
                           difficulty=args.difficulty, device=device_name)
    suffix = "" if args.difficulty == "default" else f"_{args.difficulty}"
    out = args.out or RESULTS / f"breadcrumbs_pareto{suffix}_{'cpu' if args.device == 'cpu' else 'gpu'}.csv"
    write_csv(out, rows)
    plot(rows, out.with_suffix(".png"))
    print_table([{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["task", "policy", "student", "c", "budget", "accuracy", "of_teacher", "peak_kv", "peak_vs_full", "auac"])
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs peak KV (fraction of the teacher's full cache), a panel per task, a line per policy/student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["task"] == task and r["c"]:
                name = f"{r['policy']} ({r['student']})" if r["student"] else r["policy"]
                lines.setdefault(name, []).append((r["peak_vs_full"], r["accuracy"]))
        for name, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o" if name.startswith("breadcrumbs") else ".",
                    linewidth=2 if name.startswith("breadcrumbs") else 1, label=name)
        ax.set(title=f"{task} ({rows[0]['difficulty']})", xlabel="peak KV / teacher's full cache", ylabel="accuracy",
               ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
