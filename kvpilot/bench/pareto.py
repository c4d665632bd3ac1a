"""Accuracy vs KV budget for every policy on the bundled tasks (also `kvpilot bench pareto`).

    python benchmarks/pareto.py [--tasks multihop variables graph] [--n 50] [--fracs 0.1 0.25 0.5 0.75]
    python benchmarks/pareto.py --from-csv a/pareto.csv b/pareto.csv     (tables + plot of finished runs)

Budgets are fractions of each task's mean reference sequence length (what a full cache holds at the end of an
episode). Every policy runs the same episodes through the real engine with greedy decoding; the full cache
is the reference line; `golden` (the evaluation-only oracle) reads each episode's future from that full-cache
run's trace (kvpilot/evaluate.py). Writes benchmarks/results/pareto.csv, pareto.png (one panel per task and
difficulty) and pareto_auc.csv: the area under the accuracy-budget curve per policy and task, normalised to
the fraction range (1.0 = full accuracy at every budget). pareto.csv is rewritten after every finished run, so an
interrupted sweep keeps what it measured; sweeps split over processes (e.g. one task each, with --out) are
joined with --from-csv.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import asdict, fields
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpilot.runtime import add_runtime_arguments, build_engine, runtime_options
from kvpilot.evaluate import EvalRow, compression_for, episodes_for, evaluate, mean_reference_tokens, parse_policy_spec
from kvpilot.models import CACHE_DIR
from policy_service.registry import available_policies

# Outside the source tree by default: committed figures change only when --out benchmarks/results asks for it.
RESULTS = CACHE_DIR / "results" / "pareto"
DEFAULT_POLICIES = [p for p in available_policies() if p != "full"]


def area_under_curve(fracs: list[float], accs: list[float]) -> float:
    """Trapezoid area over the budget fractions, divided by their range."""
    pairs = sorted(zip(fracs, accs))
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pairs, pairs[1:]))
    return area / (pairs[-1][0] - pairs[0][0]) if len(pairs) > 1 else pairs[0][1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--tasks", nargs="+", default=["multihop", "variables", "graph"])
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                   help="policy names; parameters as name:key=value:key=value (e.g. vase:window_queries=64)")
    p.add_argument("--fracs", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75])
    p.add_argument("--n", type=int, default=50, help="episodes per (task, policy, budget)")
    p.add_argument("--difficulty", default="default")
    p.add_argument("--interval", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"results folder (default {RESULTS}; the committed figures: benchmarks/results)")
    p.add_argument("--from-csv", type=Path, nargs="+", metavar="CSV",
                   help="skip running: join these pareto.csv files and write the AUC table and plot to --out")


def run(args) -> int:
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = [row for path in args.from_csv for row in read_rows(path)]
        fracs = sorted({r.budget_frac for r in rows if r.policy != "full"})
        return report(console, rows, fracs, args.out)
    engine = build_engine(runtime_options(args))
    rows = []
    jobs = [(t, p, f) for t in args.tasks for p in args.policies for f in args.fracs]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("all runs", total=len(jobs) + len(args.tasks))
        for task in args.tasks:
            episodes = episodes_for(task, args.n, args.difficulty)
            mean_len = mean_reference_tokens(episodes, engine.tokenizer)
            bar = progress.add_task(f"{task} full", total=len(episodes))
            # The full-cache results double as golden's references (its oracle is computed from their traces).
            row, references = evaluate(engine, task, episodes, compression_for("full", 0), 1.0,
                                       progress=lambda d: progress.update(bar, completed=d))
            rows.append(row)
            write_csv(args.out / "pareto.csv", [asdict(r) for r in rows])
            progress.remove_task(bar)
            progress.advance(overall)
            for policy in args.policies:
                for frac in args.fracs:
                    budget = max(round(frac * mean_len), args.sinks + args.window + 1)
                    bar = progress.add_task(f"{task} {policy} {frac:.0%} ({budget} slots)", total=len(episodes))
                    name, params = parse_policy_spec(policy)  # e.g. vase:window_queries=64
                    compression = compression_for(name, budget, args.interval, args.window, args.sinks, params)
                    row, _ = evaluate(engine, task, episodes, compression, frac,
                                      progress=lambda d, b=bar: progress.update(b, completed=d),
                                      references=references)
                    row.policy = policy
                    rows.append(row)
                    write_csv(args.out / "pareto.csv", [asdict(r) for r in rows])
                    progress.remove_task(bar)
                    progress.advance(overall)
    return report(console, rows, args.fracs, args.out)


def report(console: Console, rows: list[EvalRow], fracs: list[float], out: Path) -> int:
    write_csv(out / "pareto.csv", [asdict(r) for r in rows])
    aucs = auc_table(rows, fracs)
    write_csv(out / "pareto_auc.csv", aucs)
    plot(rows, out / "pareto.png")
    show(console, rows, aucs, fracs)
    console.print(f"wrote {out / 'pareto.csv'}, {out / 'pareto_auc.csv'}, {out / 'pareto.png'}")
    return 0


def read_rows(path: Path) -> list[EvalRow]:
    """EvalRows back from a pareto.csv (fields converted with the dataclass's annotations)."""
    types = {f.name: {"int": int, "float": float}.get(f.type, str) for f in fields(EvalRow)}
    with path.open(newline="") as f:
        return [EvalRow(**{k: types[k](v) for k, v in record.items()}) for record in csv.DictReader(f)]


def panels(rows: list[EvalRow]) -> dict[str, tuple[EvalRow, dict[str, list[EvalRow]]]]:
    """Rows by table / plot panel, a task at one difficulty ("multihop", "multihop/hard"): the panel's
    full-cache row and each policy's rows, in the order they were run."""
    full: dict[str, EvalRow] = {}
    by_panel: dict[str, dict[str, list[EvalRow]]] = {}
    for r in rows:
        name = r.task if r.difficulty == "default" else f"{r.task}/{r.difficulty}"
        policies = by_panel.setdefault(name, {})
        if r.policy == "full":
            full[name] = r
        else:
            policies.setdefault(r.policy, []).append(r)
    missing = [name for name in by_panel if name not in full]
    if missing:
        raise ValueError(f"no full-cache row for {missing}: every panel needs its reference run")
    return {name: (full[name], policies) for name, policies in by_panel.items()}


def auc_table(rows, fracs) -> list[dict]:
    out = []
    for task, (full, by_policy) in panels(rows).items():
        for policy, runs in by_policy.items():
            points = [(r.budget_frac, r.accuracy) for r in runs]
            out.append(dict(task=task, policy=policy, auc=round(area_under_curve(*zip(*points)), 4),
                            full_accuracy=full.accuracy))
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def show(console: Console, rows, aucs, fracs) -> None:
    grouped = panels(rows)
    for task, (full, by_policy) in grouped.items():
        table = Table(title=f"{task}: accuracy by budget (full cache {full.accuracy:.0%}, "
                            f"mean sequence {full.mean_trace_tokens:.0f} tokens)")
        table.add_column("policy")
        for f in fracs:
            table.add_column(f"{f:.0%}", justify="right")
        table.add_column("AUC", justify="right")
        for a in sorted((a for a in aucs if a["task"] == task), key=lambda a: -a["auc"]):
            accs = {r.budget_frac: r.accuracy for r in by_policy[a["policy"]]}
            table.add_row(a["policy"], *[f"{accs[f]:.0%}" for f in fracs], f"{a['auc']:.3f}")
        console.print(table)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = panels(rows)
    fig, axes = plt.subplots(1, len(grouped), figsize=(5.5 * len(grouped), 4.2), squeeze=False)
    for ax, (task, (full, by_policy)) in zip(axes[0], grouped.items()):
        ax.axhline(full.accuracy, color="black", linestyle="--", label="full cache")
        for policy, runs in by_policy.items():
            pts = sorted((r.budget_frac, r.accuracy) for r in runs)
            ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set_title(f"{task} (mean {full.mean_trace_tokens:.0f} tokens)")
        ax.set_xlabel("KV budget / mean sequence length")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
