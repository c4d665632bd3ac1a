"""Replay fidelity (CASK's main metric): how closely a compressed cache reproduces the full cache's next-token
predictions along the same trace (also `kvpilot bench fidelity`).

    kvpilot bench fidelity --tasks multihop --episodes 3 --policies full,streaming_llm,rkv,golden --fracs 0.25,0.5

1. References: each episode (evaluation seeds 0..N-1: kvpilot/evaluate.py episodes_for) runs with the full
   cache and greedy decoding through the agent loop: the model's own answer, tool outputs included.
2. Replay: every reference is fed back teacher-forced through the real engine under each (policy, budget):
   one request whose prompt is the episode's prompt and whose `forced_tokens` are the rest of the trace. At
   each step the engine records the model's distribution against the reference token, then appends that
   token instead of sampling (decoder_service/engine.py `_force`), so the cache always holds the reference's
   own tokens and every step is judged on the same context. Tool outputs are forced too (one token per step
   compresses at the same points as a prefill would: invariant 10) but only the tokens the model wrote are
   scored. `golden` gets its oracle from the replayed trace itself, so in replay it is exact.
3. Metrics per (task, policy, budget), pooled over the scored tokens of all episodes:
     top1           fraction of steps where the model's greedy pick is the reference token
     top5           fraction of steps where the reference token is among the 5 most likely
     nll            mean negative log-likelihood of the reference tokens (policy `full`: the reference's own)
     first_mismatch mean over the episodes that have one of the first scored step (0 = the first token the
                    model wrote) whose greedy pick differs; `mismatched` is the fraction of episodes with one
     saved_end      1 - cache slots at the last step / tokens in the sequence then (mean over episodes)
     saved_peak     1 - peak cache slots / tokens in the sequence at the last step
   Budgets are fractions (--fracs) of the mean reference sequence length of the task's episodes, computed as
   `kvpilot bench pareto` does, with the same compression settings (kvpilot/evaluate.py compression_for), so
   a fidelity row and a pareto row at the same fraction describe the same cache; or slots (--budgets).
Writes fidelity.csv (one row per task, policy and budget), fidelity_episodes.csv (one per episode) and
fidelity.png (top-1 agreement and NLL against the budget, one column per task) under --out.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from decoder_service.engine import Engine, validate_compression
from decoder_service.oracle import reference_oracle
from decoder_service.requests import CompressionConfig, FinishEvent, FinishReason, GenerationRequest, SamplingParams
from kvpilot.agent import EpisodeResult, EpisodeRunner
from kvpilot.evaluate import compression_for, episodes_for, mean_reference_tokens, parse_policy_spec
from kvpilot.models import CACHE_DIR
from kvpilot.runtime import add_runtime_arguments, build_engine, runtime_options

# Outside the source tree by default: committed figures change only when --out benchmarks/results asks for it.
RESULTS = CACHE_DIR / "results" / "fidelity"
DEFAULT_POLICIES = ["full", "streaming_llm", "h2o", "snapkv", "rkv", "golden"]
TOP = 5  # top-k coverage (decoder_service.sampling.forced_steps)


@dataclass
class ReplayCase:
    """A reference trace to replay: <bos> + prompt (the first `prompt_len` tokens), then the forced tokens."""

    episode_seed: int
    trace: list[int]
    prompt_len: int
    scored: list[bool]  # per forced token: written by the model (scored) or a tool output (forced only)

    @property
    def forced(self) -> list[int]:
        return self.trace[self.prompt_len:]


def case_of(result: EpisodeResult) -> ReplayCase:
    """The replay of one full-cache episode: its session's history, the first (user) segment as the prompt."""
    trace, segments = result.token_ids, result.segments
    if not trace or not segments or segments[0][2] != "user":
        raise ValueError(f"episode {result.episode.seed}: no reference trace (did it finish?)")
    prompt_len = segments[0][1]
    model = [False] * len(trace)
    for start, end, kind in segments:
        if kind == "model":
            model[start:end] = [True] * (end - start)
    return ReplayCase(result.episode.seed, list(trace), prompt_len, model[prompt_len:])


def references(engine: Engine, episodes, progress=None) -> list[ReplayCase]:
    """Full-cache greedy runs of the episodes through the agent loop, as replay cases."""
    results = EpisodeRunner(engine, compression_for("full", 0)).run(episodes, progress=progress)
    return [case_of(r) for r in results]


def replay(engine: Engine, cases: list[ReplayCase], compression: CompressionConfig, progress=None,
           tag: str = "replay", seed: int = 0) -> list[FinishEvent]:
    """Replay every case teacher-forced under `compression`, at most `max_running` at a time (a golden oracle is
    built when its case is submitted and dropped with the request). Returns the final events in case order;
    `progress(done)` after each engine step. Case i's request seed (a stochastic policy's frames) is seed + i."""
    description = validate_compression(compression, engine.model_config.max_position_embeddings, engine.describe)
    needs_oracle = "future_attention" in description.spec.names and compression.bounded
    done: dict[int, FinishEvent] = {}
    queued = list(range(len(cases)))[::-1]
    while queued or engine.has_work():
        while queued and len(engine.running) + len(engine.waiting) < engine.config.max_running:
            i = queued.pop()
            case = cases[i]
            request = GenerationRequest(
                request_id=f"{tag}-{i}", input_ids=case.trace[:case.prompt_len],
                sampling=SamplingParams(temperature=0.0, seed=seed + i, max_new_tokens=len(case.forced), ignore_eos=True),
                compression=compression, forced_tokens=case.forced,
                oracle=reference_oracle(engine.model, case.trace, compression.interval, compression.budget)
                if needs_oracle else None)
            engine.add_request(request, lambda ev, i=i: isinstance(ev, FinishEvent) and done.__setitem__(i, ev))
        if not engine.step() and engine.waiting and not engine.running:
            raise RuntimeError("replay requests are waiting but none can be admitted: raise --kv-pool-mb")
        if progress is not None:
            progress(len(done))
    for i, event in sorted(done.items()):
        if event.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"replay of case {i} ({compression.policy}) failed: {event.error}")
    return [done[i] for i in range(len(cases))]


@dataclass
class EpisodeFidelity:
    task: str
    difficulty: str
    policy: str
    budget: int
    budget_frac: float
    episode_seed: int
    scored_tokens: int
    top1: float
    top5: float
    nll: float
    first_mismatch: int | None  # scored step index, None: the greedy pick matched the reference throughout
    saved_end: float
    saved_peak: float
    compression_events: int
    fallbacks: int


def episode_fidelity(case: ReplayCase, event: FinishEvent, **labels) -> EpisodeFidelity:
    steps = [s for s, scored in zip(event.replay, case.scored) if scored]
    if len(event.replay) != len(case.forced) or not steps:
        raise ValueError(f"episode {case.episode_seed}: {len(event.replay)} replay records for "
                         f"{len(case.forced)} forced tokens ({len(steps)} scored)")
    matches = [s.argmax == s.token for s in steps]
    tokens = len(case.trace) - 1  # fed by the last step: the last forced token is appended, never fed
    return EpisodeFidelity(
        **labels, episode_seed=case.episode_seed, scored_tokens=len(steps),
        top1=sum(matches) / len(steps), top5=sum(s.in_top5 for s in steps) / len(steps),
        nll=-sum(s.logprob for s in steps) / len(steps),
        first_mismatch=next((k for k, ok in enumerate(matches) if not ok), None),
        saved_end=1 - event.replay[-1].kv_slots / tokens, saved_peak=1 - event.usage.peak_kv_slots / tokens,
        compression_events=event.usage.compression_events, fallbacks=event.usage.fallbacks)


@dataclass
class FidelityRow:
    task: str
    difficulty: str
    policy: str
    budget: int
    budget_frac: float
    episodes: int
    scored_tokens: int
    top1: float
    top5: float
    nll: float
    first_mismatch: float  # mean over the mismatched episodes; NaN when none mismatched
    mismatched: float  # fraction of episodes with a mismatch
    saved_end: float
    saved_peak: float
    compression_events: int
    fallbacks: int
    seconds: float


def aggregate(episodes: list[EpisodeFidelity], seconds: float) -> FidelityRow:
    """Pool the scored tokens of all episodes (a long episode weighs more than a short one)."""
    e0 = episodes[0]
    total = sum(e.scored_tokens for e in episodes)
    pooled = lambda field: sum(getattr(e, field) * e.scored_tokens for e in episodes) / total  # noqa: E731
    firsts = [e.first_mismatch for e in episodes if e.first_mismatch is not None]
    return FidelityRow(
        task=e0.task, difficulty=e0.difficulty, policy=e0.policy, budget=e0.budget, budget_frac=e0.budget_frac,
        episodes=len(episodes), scored_tokens=total, top1=pooled("top1"), top5=pooled("top5"), nll=pooled("nll"),
        first_mismatch=statistics.mean(firsts) if firsts else math.nan, mismatched=len(firsts) / len(episodes),
        saved_end=statistics.mean(e.saved_end for e in episodes),
        saved_peak=statistics.mean(e.saved_peak for e in episodes),
        compression_events=sum(e.compression_events for e in episodes),
        fallbacks=sum(e.fallbacks for e in episodes), seconds=seconds)


def measure(engine: Engine, task: str, difficulty: str, cases: list[ReplayCase], compression: CompressionConfig,
            budget_frac: float, progress=None, label: str | None = None) -> tuple[FidelityRow, list[EpisodeFidelity]]:
    """Replay the cases under one compression setting and score them (`label`: the row's policy name, e.g.
    `vase:window_queries=64` for a policy with parameters)."""
    start = time.monotonic()
    tag = f"{task}-{compression.policy}-{compression.budget}"
    events = replay(engine, cases, compression, progress=progress, tag=tag)
    labels = dict(task=task, difficulty=difficulty, policy=label or compression.policy, budget=compression.budget,
                  budget_frac=budget_frac)
    per_episode = [episode_fidelity(c, e, **labels) for c, e in zip(cases, events)]
    return aggregate(per_episode, time.monotonic() - start), per_episode


# ---- command line ------------------------------------------------------------------------------------
def listed(items: list[str]) -> list[str]:
    """Accept both `--policies a b` and `--policies a,b`."""
    return [part for item in items for part in item.split(",") if part]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    p.add_argument("--tasks", nargs="+", default=["multihop", "variables", "graph"])
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                   help="policies to replay, space or comma separated (`full` once per task: the reference row); "
                        "parameters as name:key=value:key=value")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--fracs", nargs="+", default=["0.1", "0.25", "0.5", "0.75"],
                        help="budgets as fractions of the task's mean reference sequence length (as pareto's)")
    budget.add_argument("--budgets", nargs="+", help="budgets in KV slots per (layer, KV head)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (evaluation seeds 0..N-1)")
    p.add_argument("--difficulty", default="default")
    p.add_argument("--interval", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"results folder (default {RESULTS}; the committed figures: benchmarks/results)")


def budgets_for(args, mean_len: float) -> list[tuple[int, float]]:
    """(slots, fraction of the mean reference length) per budget; at least one slot past the protected ones."""
    floor = args.sinks + args.window + 1
    if args.budgets:
        return [(max(int(b), floor), int(b) / mean_len) for b in listed(args.budgets)]
    return [(max(round(float(f) * mean_len), floor), float(f)) for f in listed(args.fracs)]


def run(args) -> int:
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = build_engine(runtime_options(args))
    policies = listed(args.policies)
    rows: list[FidelityRow] = []
    per_episode: list[EpisodeFidelity] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        for task in listed(args.tasks):
            episodes = episodes_for(task, args.episodes, args.difficulty)
            mean_len = mean_reference_tokens(episodes, engine.tokenizer)
            budgets = budgets_for(args, mean_len)
            jobs = [("full", 0, 1.0)] * ("full" in policies) + [
                (p, b, f) for p in policies if p != "full" for b, f in budgets]
            overall = progress.add_task(f"{task}: {len(jobs)} replays", total=len(jobs) + 1)
            bar = progress.add_task(f"{task} full-cache references", total=len(episodes))
            cases = references(engine, episodes, progress=lambda d, b=bar: progress.update(b, completed=d))
            progress.remove_task(bar)
            progress.advance(overall)
            for policy, budget, frac in jobs:
                label = "full" if policy == "full" else f"{policy} {frac:.0%} ({budget} slots)"
                bar = progress.add_task(f"{task} {label}", total=len(cases))
                name, params = parse_policy_spec(policy)
                compression = compression_for(name, budget, args.interval, args.window, args.sinks, params)
                row, eps = measure(engine, task, args.difficulty, cases, compression, frac,
                                   progress=lambda d, b=bar: progress.update(b, completed=d), label=policy)
                rows.append(row)
                per_episode.extend(eps)
                write_csv(args.out / "fidelity.csv", [asdict(r) for r in rows])  # an interrupted sweep keeps it
                progress.remove_task(bar)
                progress.advance(overall)
    write_csv(args.out / "fidelity_episodes.csv", [asdict(e) for e in per_episode])
    plot(rows, args.out / "fidelity.png")
    show(console, rows)
    console.print(f"wrote {args.out / 'fidelity.csv'}, {args.out / 'fidelity_episodes.csv'}, "
                  f"{args.out / 'fidelity.png'}")
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def panels(rows: list[FidelityRow]) -> dict[str, list[FidelityRow]]:
    """Rows by task at one difficulty ("multihop", "multihop/hard"), in the order they were run."""
    out: dict[str, list[FidelityRow]] = {}
    for r in rows:
        out.setdefault(r.task if r.difficulty == "default" else f"{r.task}/{r.difficulty}", []).append(r)
    return out


def show(console: Console, rows: list[FidelityRow]) -> None:
    for task, task_rows in panels(rows).items():
        table = Table(title=f"{task}: teacher-forced replay fidelity ({task_rows[0].episodes} episodes, "
                            f"{task_rows[0].scored_tokens} scored tokens)", box=box.SIMPLE_HEAD)
        # 1st miss: mean first mismatch step of the episodes that have one; missed: the share of those episodes;
        # saved: 1 - slots / tokens at the end / at the peak.
        table.add_column("policy", no_wrap=True, min_width=max(len(r.policy) for r in task_rows))
        table.add_column("budget", justify="right", no_wrap=True)
        for name in ("top-1", "top-5", "NLL", "1st miss", "missed", "saved"):
            table.add_column(name, justify="right")
        for r in sorted(task_rows, key=lambda r: (r.policy != "full", r.budget_frac, -r.top1, r.nll)):
            budget = "full" if r.policy == "full" else f"{r.budget_frac:.0%} ({r.budget})"
            first = "none" if math.isnan(r.first_mismatch) else f"{r.first_mismatch:.1f}"
            table.add_row(r.policy, budget, f"{r.top1:.3f}", f"{r.top5:.3f}", f"{r.nll:.3f}", first,
                          f"{r.mismatched:.0%}", f"{r.saved_end * 100:.0f}/{r.saved_peak:.0%}")
        console.print(table)


def plot(rows: list[FidelityRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = panels(rows)
    fig, axes = plt.subplots(2, len(grouped), figsize=(5.5 * len(grouped), 7.5), squeeze=False)
    for col, (task, task_rows) in enumerate(grouped.items()):
        full = next((r for r in task_rows if r.policy == "full"), None)
        by_policy: dict[str, list[FidelityRow]] = {}
        for r in task_rows:
            if r.policy != "full":
                by_policy.setdefault(r.policy, []).append(r)
        for row, (metric, label) in enumerate((("top1", "top-1 agreement"), ("nll", "NLL of the reference tokens"))):
            ax = axes[row][col]
            if full is not None:
                ax.axhline(getattr(full, metric), color="black", linestyle="--", label="full cache")
            for policy, runs in by_policy.items():
                pts = sorted((r.budget_frac, getattr(r, metric)) for r in runs)
                ax.plot(*zip(*pts), marker="o", label=policy)
            ax.set_title(f"{task}: {label}")
            ax.set_xlabel("KV budget / mean sequence length")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][col].set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
