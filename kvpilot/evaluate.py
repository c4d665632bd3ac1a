"""Accuracy harness: `kvpilot eval --task multihop --n 100 --policy full` runs episodes through the real engine.

Reports exact-match accuracy, answered rate, mean trace length (tokens of the whole episode sequence: prompt,
tool outputs, model text), peak KV slots and evictions; appends a row to a CSV. A budget can be given in
slots (`--budget`) or as a fraction of the task's mean reference sequence length (`--budget-frac`).

Policy `golden` (the evaluation-only oracle, decoder_service/oracle.py) needs each episode's future: every
episode first runs with the full cache (greedy: the model's own answer), the oracle is computed from that
reference trace, and then the golden run generates with it. In free generation the oracle is exact only while
the golden run follows the reference token for token; once it diverges, it reads the reference's attention
at the same positions (and past the reference's end it has none; see policy_service/scorers/golden.py).
"""
from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from decoder_service.engine import Engine, validate_compression
from decoder_service.oracle import reference_oracle
from decoder_service.requests import CompressionConfig, RequestError
from kvpilot.agent import EpisodeResult, EpisodeRunner
from kvpilot.models import CACHE_DIR
from kvpilot.tasks import DIFFICULTIES, TASKS, make_episode

# Held-out episodes use seeds 0 .. < 1e6; the training script draws its episodes from seeds >= 1e6
# (kvpilot.training.train_model.TRAIN_SEED_BASE), so evaluation never sees a training episode.
EVAL_SEED_OFFSET = 0


@dataclass
class EvalRow:
    task: str
    difficulty: str
    policy: str
    budget: int
    budget_frac: float
    n: int
    accuracy: float
    answered: float
    mean_trace_tokens: float
    mean_generated_tokens: float
    mean_peak_kv_slots: float
    mean_evicted: float
    compression_events: int
    fallbacks: int
    seconds: float


def episodes_for(task: str, n: int, difficulty: str = "default", seed: int = 0):
    return [make_episode(task, EVAL_SEED_OFFSET + seed + i, difficulty) for i in range(n)]


def mean_reference_tokens(episodes, tokenizer) -> float:
    """Mean length of the episodes' full reference sequences (with <bos>): what a full cache would hold."""
    return statistics.mean(len(tokenizer.encode(e.training_text)) + 1 for e in episodes)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name` or `name:key=value:key=value` (a policy with parameters, as the sweeps take it)."""
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy spec {spec!r}: parameters are key=value, separated by ':'")
        params[key] = value
    return name, params


def compression_for(policy: str, budget: int, interval: int = 8, window: int = 8, sinks: int = 4,
                    params: dict[str, str] | None = None) -> CompressionConfig:
    if policy == "full":
        return CompressionConfig(policy="full")
    return CompressionConfig(policy=policy, budget=budget, interval=interval, window=window, sinks=sinks,
                             params=dict(params or {}))


def evaluate(engine: Engine, task: str, episodes, compression: CompressionConfig, budget_frac: float = 1.0,
             progress=None, references: list[EpisodeResult] | None = None) -> tuple[EvalRow, list[EpisodeResult]]:
    """Run the episodes under `compression`. A policy that declares future_attention (golden) gets each
    episode's oracle from its full-cache reference: `references` (the same episodes' full-cache results,
    e.g. pareto's full row) or, without them, a full-cache run made here first (counted in `seconds`)."""
    description = validate_compression(compression, engine.model_config.max_position_embeddings, engine.describe)
    start = time.monotonic()
    oracle = None
    if "future_attention" in description.spec.names:
        if references is None:
            references = EpisodeRunner(engine, compression_for("full", 0)).run(episodes)
        traces = [r.token_ids for r in references]
        if len(traces) != len(episodes) or not all(traces):
            raise ValueError("golden needs one full-cache reference trace per episode")
        oracle = lambda i: reference_oracle(engine.model, traces[i], compression.interval,  # noqa: E731
                                            compression.budget)
    results = EpisodeRunner(engine, compression, oracle=oracle).run(episodes, progress=progress)
    n = len(results)
    row = EvalRow(
        task=task, difficulty=episodes[0].difficulty, policy=compression.policy, budget=compression.budget,
        budget_frac=budget_frac, n=n,
        accuracy=sum(r.correct for r in results) / n,
        answered=sum(r.answered for r in results) / n,
        mean_trace_tokens=statistics.mean(r.total_tokens for r in results),
        mean_generated_tokens=statistics.mean(r.generated_tokens for r in results),
        mean_peak_kv_slots=statistics.mean(r.peak_kv_slots for r in results),
        mean_evicted=statistics.mean(r.evicted_tokens for r in results),
        compression_events=sum(r.compression_events for r in results),
        fallbacks=sum(r.fallbacks for r in results),
        seconds=time.monotonic() - start,
    )
    return row, results


def append_csv(path: Path, rows: list[EvalRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        if new:
            writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def add_arguments(p) -> None:
    from kvpilot.runtime import add_runtime_arguments

    add_runtime_arguments(p)
    p.add_argument("--task", choices=sorted(TASKS), default="multihop")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="default")
    p.add_argument("--n", type=int, default=100, help="episodes")
    p.add_argument("--policy", default="full")
    p.add_argument("--budget", type=int, default=0, help="KV slots kept (or use --budget-frac)")
    p.add_argument("--budget-frac", type=float, help="budget as a fraction of the mean reference sequence length")
    p.add_argument("--interval", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--csv", type=Path, default=CACHE_DIR / "results" / "eval.csv",
                   help="CSV the row is appended to (default outside the source tree)")


def run(args) -> int:
    from rich.progress import Progress

    from kvpilot.runtime import build_engine, runtime_options

    engine = build_engine(runtime_options(args))
    episodes = episodes_for(args.task, args.n, args.difficulty)
    frac = args.budget_frac if args.budget_frac is not None else 1.0
    budget = args.budget or (round(frac * mean_reference_tokens(episodes, engine.tokenizer)) if args.budget_frac else 0)
    params = dict(item.partition("=")[::2] for item in args.param)
    compression = compression_for(args.policy, budget, args.interval, args.window, args.sinks, params)
    try:
        with Progress() as bar:
            job = bar.add_task(f"{args.task} {args.policy} budget {budget or 'full'}", total=len(episodes))
            row, _ = evaluate(engine, args.task, episodes, compression, frac,
                              progress=lambda done: bar.update(job, completed=done))
    except RequestError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{row.task}/{row.difficulty} policy {row.policy} budget {row.budget or 'full'}: accuracy {row.accuracy:.1%}, "
          f"answered {row.answered:.1%}, mean trace {row.mean_trace_tokens:.0f} tokens "
          f"({row.mean_generated_tokens:.0f} generated), peak KV {row.mean_peak_kv_slots:.0f} slots, "
          f"{row.seconds:.1f} s")
    append_csv(args.csv, [row])
    print(f"appended to {args.csv}")
    return 0
