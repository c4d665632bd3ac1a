"""`kvpilot train-scorer foresight`: train ForesightKV's scorer (policy_service/scorers/foresight.py) on Golden
Eviction labels, stage 1 of the paper (supervised ranking).

1. Traces: the model's own full-cache greedy runs of the task suite (training seeds >= 1,000,000 + --seed;
   evaluation seeds are below 1,000,000, so the held-out overlap is measured on episodes training never saw).
2. States on the oracle trajectory: each trace is replayed teacher-forced through the real engine under Golden
   Eviction (budget = a fraction of the mean trace, compression every `interval` tokens). At every compression
   a recorder (golden itself, declaring foresight's statistics too, with an identity kv_features projection so
   the frame holds raw keys and values) stores the features of every slot and golden's score of it.
3. Loss: pairwise rank hinge (margin 0.01) per (compression, layer, KV head) over pairs of unprotected slots
   whose golden scores differ: the slot golden would evict first must get the higher eviction score.
   Adam, lr 1e-2, cosine with 10 warmup steps, grad-clip 1.0, batches of 4 compressions (the paper's numbers).
4. Report: top-d overlap with golden's evicted set on held-out traces (d = slots evicted at that compression),
   beside what H2O's cumulative attention would pick; the curve (JSON + PNG) in --work-dir.
The weights (inputs standardised in training, standardisation folded into fc1) and the recipe are written beside
the model: `foresight.safetensors` and `foresight.json` (command, seeds, metrics, model fingerprint).

Stage 2 (GRPO, `--stage rl`) is kvpilot/training/foresight_grpo.py.
[CHOICE] the paper's chunked passes evict exactly L = interval slots from a full budget B each step; kvpilot's
         engine compresses to the budget every `interval` tokens, which is the same schedule (cache between B
         and B + interval). Pairs are sampled (up to 2,048 per compression) rather than enumerated.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from decoder_service.calibration import weights_fingerprint
from kvpilot.bench.fidelity import references, replay
from kvpilot.evaluate import compression_for, episodes_for, mean_reference_tokens
from kvpilot.models import resolve_model
from kvpilot.runtime import RuntimeOptions, build_engine
from kvpilot.tasks import DIFFICULTIES, TASKS, make_episode
from kvpilot.training.train_model import TRAIN_SEED_BASE
from kvpilot_protocol.features import encode_feature_weights
from kvpilot_protocol.frame import StatsFrame
from kvpilot_protocol.policy import StatsSpec
from policy_service.local import InProcessPolicy
from policy_service.registry import POLICIES
from policy_service.scorers.foresight import (DECAY, WEIGHTS_FILE, WINDOW_QUERIES, Foresight, ForesightWeights,
                                              attention_inputs)
from policy_service.scorers.golden import Golden

MARGIN = 0.01
PAIRS_PER_EVENT = 2048


@dataclass
class Compression:
    """One compression on the oracle trajectory: the features and golden's score of every slot."""

    kv: Tensor  # [L, H, n, 2D] float16: key then value
    attention: Tensor  # [L, H, n, 6G + 2] float32
    golden: Tensor  # [L, H, n] golden's keep score (higher = keep)
    candidates: Tensor  # [n] bool: not protected
    drop: int  # slots evicted at this compression


def identity_projection(layers: int, kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """kv_features = [k, v] exactly: W_key = [I 0], W_value = [0 I] (R = 2D)."""
    eye = torch.eye(head_dim)
    w_key = torch.cat([eye, torch.zeros(head_dim, head_dim)], dim=1).expand(layers, kv_heads, -1, -1)
    w_value = torch.cat([torch.zeros(head_dim, head_dim), eye], dim=1).expand(layers, kv_heads, -1, -1)
    return w_key.contiguous(), w_value.contiguous()


def recorder_class(sink: list[Compression], layers: int, kv_heads: int, head_dim: int,
                   record_every: int = 1) -> type[Golden]:
    """A golden policy that also records the foresight features of every `record_every`-th frame into `sink`
    (long traces: consecutive compressions are nearly the same state, and each one holds n x 2D raw floats)."""
    blob = encode_feature_weights(*identity_projection(layers, kv_heads, head_dim))

    @dataclass
    class GoldenRecorder(Golden):
        name: ClassVar[str] = "golden_recorder"
        stats: ClassVar[frozenset[str]] = Golden.stats | Foresight.stats

        def spec(self) -> StatsSpec:
            return StatsSpec(self.stats, window_queries=WINDOW_QUERIES, decay=DECAY, feature_weights=blob)

        def plan(self, frame: StatsFrame):
            if frame.n > frame.keep and frame.frame_id % record_every == 0:
                sink.append(Compression(kv=frame.stats["kv_features"].half().cpu(),
                                        attention=attention_inputs(frame).cpu(),
                                        golden=self.score(frame).float().cpu(),
                                        candidates=~frame.protected_mask("cpu"), drop=frame.n - frame.keep))
            return super().plan(frame)

    return GoldenRecorder


def collect(engine, episodes, fracs: list[float], interval: int, window: int, sinks: int,
            log=print, record_every: int = 1) -> list[Compression]:
    """Golden-trajectory compressions of the episodes' full-cache traces at each budget fraction."""
    c = engine.model_config
    sink: list[Compression] = []
    recorder = recorder_class(sink, c.num_layers, c.num_kv_heads, c.head_dim, record_every)
    engine.compressor.policy = InProcessPolicy({**POLICIES, recorder.name: recorder})
    mean_len = mean_reference_tokens(episodes, engine.tokenizer)
    cases = references(engine, episodes)
    for frac in fracs:
        budget = max(window + sinks + 1, round(frac * mean_len))
        before = len(sink)
        replay(engine, cases, compression_for(recorder.name, budget, interval, window, sinks), tag=f"golden-{frac}")
        log(f"  {len(episodes)} traces at {frac:.0%} ({budget} slots): {len(sink) - before} compressions")
    return sink


# ---- the model being trained (unfolded: standardised inputs) -------------------------------------------------
class ScorerMLP(torch.nn.Module):
    def __init__(self, layers: int, kv_heads: int, inputs: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(layers, kv_heads, inputs, hidden, generator=g) / math.sqrt(inputs))
        self.b1 = torch.nn.Parameter(torch.zeros(layers, kv_heads, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(layers, kv_heads, hidden, generator=g) / math.sqrt(hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(layers, kv_heads))

    def forward(self, x: Tensor) -> Tensor:
        """x [L, H, n, F] standardised -> eviction scores [L, H, n]."""
        hidden = torch.einsum("lhnf,lhfr->lhnr", x, self.w1) + self.b1[:, :, None]
        return torch.einsum("lhnr,lhr->lhn", F.gelu(hidden), self.w2) + self.b2[:, :, None]


def features(event: Compression) -> Tensor:
    return torch.cat([event.kv.float(), event.attention], dim=-1)


def standardisation(events: list[Compression]) -> tuple[Tensor, Tensor]:
    """Per (layer, KV head, input) mean and std over every slot of every compression."""
    total, total_sq, count = 0.0, 0.0, 0
    for e in events:
        x = features(e)
        total = total + x.sum(dim=2)
        total_sq = total_sq + x.pow(2).sum(dim=2)
        count += x.shape[2]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean, std


def fold(mlp: ScorerMLP, mean: Tensor, std: Tensor, head_dim: int, metadata: dict[str, str]) -> ForesightWeights:
    """Weights on raw features: fc1(x') with x' = (x - mean) / std is fc1 with W / std and b - (mean / std) W."""
    w = mlp.w1.detach() / std[..., None]
    b1 = mlp.b1.detach() - torch.einsum("lhf,lhfr->lhr", mean, w)
    d = head_dim
    return ForesightWeights(w_key=w[:, :, :d].contiguous(), w_value=w[:, :, d:2 * d].contiguous(),
                            w_attention=w[:, :, 2 * d:].contiguous(), b1=b1, w2=mlp.w2.detach().clone(),
                            b2=mlp.b2.detach().clone(), metadata=metadata)


def rank_hinge_loss(scores: Tensor, golden: Tensor, candidates: Tensor, pairs: int, generator: torch.Generator,
                    margin: float = MARGIN) -> Tensor:
    """Pairwise rank hinge over sampled pairs (i, j) of candidate slots, shared by every (layer, KV head) row:
    where golden keeps j over i (golden_i < golden_j), i should be evicted first: s_i - s_j >= margin.
    scores, golden [L, H, n]; pairs with equal golden scores do not count."""
    idx = candidates.nonzero().squeeze(1)
    if idx.numel() < 2:
        return scores.sum() * 0
    i = idx[torch.randint(idx.numel(), (pairs,), generator=generator)]
    j = idx[torch.randint(idx.numel(), (pairs,), generator=generator)]
    order = torch.sign(golden[..., j] - golden[..., i])  # +1: i is evicted first
    violation = F.relu(margin - order * (scores[..., i] - scores[..., j]))
    counted = order != 0
    return (violation * counted).sum() / counted.sum().clamp_min(1)


def overlap(evict_scores: Tensor, event: Compression) -> float:
    """Mean over (layer, KV head) rows of |top-d by eviction score ∩ golden's d evictions| / d."""
    blocked = ~event.candidates
    mine = torch.topk(evict_scores.masked_fill(blocked, float("-inf")), event.drop, dim=-1).indices
    golden = torch.topk((-event.golden).masked_fill(blocked, float("-inf")), event.drop, dim=-1).indices
    hit = (mine[..., :, None] == golden[..., None, :]).any(-1).float().mean(-1)
    return float(hit.mean())


def mean_overlap(events: list[Compression], score) -> float:
    return sum(overlap(score(e), e) for e in events) / max(len(events), 1)


def h2o_eviction(event: Compression) -> Tensor:
    """H2O's choice for reference: evict the lowest cumulative attention (the attention inputs' second last)."""
    return -event.attention[..., -2]


def train(events: list[Compression], held_out: list[Compression], head_dim: int, steps: int, lr: float,
          batch: int, hidden: int, seed: int, log=print, eval_every: int = 50) -> tuple[ScorerMLP, Tensor, Tensor, list]:
    mean, std = standardisation(events)
    L, H, n, f = features(events[0]).shape
    mlp = ScorerMLP(L, H, f, hidden, seed)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    warmup = 10
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(steps, 1)))))
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    standardised = lambda e: (features(e) - mean[:, :, None]) / std[:, :, None]  # noqa: E731
    curve = []
    for step in range(1, steps + 1):
        loss = sum(rank_hinge_loss(mlp(standardised(e)), e.golden, e.candidates, PAIRS_PER_EVENT, g)
                   for e in rng.sample(events, min(batch, len(events)))) / batch
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                held = mean_overlap(held_out, lambda e: mlp(standardised(e)))
            curve.append({"step": step, "loss": round(loss.item(), 5), "held_out_overlap": round(held, 4)})
            log(f"  step {step:5d}  loss {loss.item():.4f}  held-out overlap with golden {held:.3f}")
    return mlp, mean, std, curve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scorer", choices=["foresight"], help="the learned scorer to train")
    p.add_argument("--model", help="checkpoint directory, or a bundled model by name: reasoner-v2 (the default), reasoner (v1)")
    p.add_argument("--out", type=Path, help=f"weights file (default: {WEIGHTS_FILE} beside the model)")
    p.add_argument("--work-dir", type=Path, default=Path("runs") / "foresight",
                   help="collected compressions (reused by a rerun: delete to recollect) and the curve")
    p.add_argument("--tasks", default="multihop,variables,graph")
    p.add_argument("--difficulty", default="default",
                   help=f"task difficulty, or a comma-separated mix ({', '.join(DIFFICULTIES)}): traces of each")
    p.add_argument("--episodes", type=int, default=24, help="training traces per task")
    p.add_argument("--eval-episodes", type=int, default=6, help="held-out traces per task (evaluation seeds)")
    p.add_argument("--fracs", default="0.25,0.5", help="budgets as fractions of the mean trace")
    p.add_argument("--interval", type=int, default=16, help="tokens between compressions (the paper's L)")
    p.add_argument("--window", type=int, default=8, help="protected recent slots")
    p.add_argument("--sinks", type=int, default=4, help="protected first slots")
    p.add_argument("--record-every", type=int, default=1,
                   help="keep every k-th compression of a trace (long traces: memory, and near-duplicate states)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=4, help="compressions per step")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--seed", type=int, default=422, help="training seed (episodes, initialisation, pairs)")
    p.add_argument("--threads", type=int)
    rl = p.add_argument_group("stage 2 (--stage rl): GRPO on the supervised scorer (kvpilot/training/foresight_grpo.py)")
    p.add_argument("--stage", choices=["sl", "rl"], default="sl",
                   help="sl: supervised ranking on golden labels; rl: GRPO starting from the supervised weights")
    rl.add_argument("--init", type=Path, help=f"supervised weights to start from (default: {WEIGHTS_FILE} beside the model)")
    rl.add_argument("--rl-steps", type=int, default=40)
    rl.add_argument("--traces", type=int, default=4, help="reference traces per step (the paper: 32)")
    rl.add_argument("--group", type=int, default=4, help="sampled rollouts per trace (GRPO group)")
    rl.add_argument("--rl-episodes", type=int, default=16, help="training traces per task in the rollout pool")
    rl.add_argument("--rl-lr", type=float, default=3e-4)
    rl.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon")
    rl.add_argument("--kl", type=float, default=0.05, help="KL (k3) weight to the supervised scorer")
    rl.add_argument("--kl-steps", type=int, default=16, help="steps the KL term applies (the paper: 100 of 250)")
    rl.add_argument("--eval-every", type=int, default=10, help="held-out penalty every this many steps")


def validate(args) -> None:
    checks = [(1 <= args.episodes <= 10_000, "--episodes must be in [1, 10000]"),
              (1 <= args.eval_episodes <= 10_000, "--eval-episodes must be in [1, 10000]"),
              (1 <= args.interval <= 4096, "--interval must be in [1, 4096]"),
              (args.window >= 0 and args.sinks >= 0, "--window and --sinks must be >= 0"),
              (1 <= args.steps <= 1_000_000, "--steps must be in [1, 1000000]"),
              (1 <= args.record_every <= 1000, "--record-every must be in [1, 1000]"),
              (0 < args.lr <= 1, "--lr must be in (0, 1]"),
              (1 <= args.batch <= 1024, "--batch must be in [1, 1024]"),
              (1 <= args.hidden <= 256, "--hidden must be in [1, 256]"),
              (1 <= args.rl_steps <= 100_000, "--rl-steps must be in [1, 100000]"),
              (1 <= args.traces <= 1024, "--traces must be in [1, 1024]"),
              (2 <= args.group <= 64, "--group must be in [2, 64] (advantages are relative to the group)"),
              (1 <= args.rl_episodes <= 10_000, "--rl-episodes must be in [1, 10000]"),
              (0 < args.rl_lr <= 1, "--rl-lr must be in (0, 1]"),
              (0 < args.clip < 1, "--clip must be in (0, 1)"),
              (args.kl >= 0 and args.kl_steps >= 0, "--kl and --kl-steps must be >= 0"),
              (args.eval_every >= 1, "--eval-every must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"train-scorer: {message}")
    fracs = [float(f) for f in args.fracs.split(",") if f]
    if not fracs or not all(0 < f < 1 for f in fracs):
        raise SystemExit(f"train-scorer: --fracs must be fractions in (0, 1) (got {args.fracs!r})")
    difficulties = [d for d in args.difficulty.split(",") if d]
    if not difficulties or not set(difficulties) <= set(DIFFICULTIES):
        raise SystemExit(f"train-scorer: --difficulty takes {', '.join(DIFFICULTIES)} or a comma-separated mix "
                         f"(got {args.difficulty!r})")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or not set(tasks) <= set(TASKS):
        raise SystemExit(f"train-scorer: --tasks takes a comma-separated list of {', '.join(sorted(TASKS))} "
                         f"(got {args.tasks!r})")


def run(args) -> int:
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    if args.stage == "rl":
        from kvpilot.training.foresight_grpo import train_rl

        sl_path = args.init or model_dir / WEIGHTS_FILE
        if not sl_path.is_file():
            raise SystemExit(f"train-scorer: no supervised weights at {sl_path}: run --stage sl first or pass --init")
        train_rl(args, model_dir, sl_path)
        return 0
    out = args.out or model_dir / WEIGHTS_FILE
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    fracs = [float(f) for f in args.fracs.split(",") if f]
    settings = dict(model=str(model_dir), tasks=tasks, difficulty=args.difficulty, episodes=args.episodes,
                    eval_episodes=args.eval_episodes, fracs=fracs, interval=args.interval, window=args.window,
                    sinks=args.sinks, seed=args.seed, record_every=args.record_every)
    cache = args.work_dir / "compressions.pt"
    started = time.time()
    if cache.is_file() and torch.load(cache, weights_only=False)["settings"] == settings:
        data = torch.load(cache, weights_only=False)
        print(f"reusing {cache}: {len(data['train'])} training / {len(data['held_out'])} held-out compressions")
    else:
        engine = build_engine(RuntimeOptions(model=str(model_dir), threads=args.threads))
        data = {"settings": settings, "train": [], "held_out": []}
        for task in tasks:
            for difficulty in args.difficulty.split(","):  # budgets are fractions of each difficulty's mean trace
                print(f"{task}/{difficulty}: training traces (seeds from {TRAIN_SEED_BASE + args.seed})")
                train_eps = [make_episode(task, TRAIN_SEED_BASE + args.seed + i, difficulty)
                             for i in range(args.episodes)]
                data["train"] += collect(engine, train_eps, fracs, args.interval, args.window, args.sinks,
                                         record_every=args.record_every)
                print(f"{task}/{difficulty}: held-out traces (evaluation seeds 0..{args.eval_episodes - 1})")
                data["held_out"] += collect(engine, episodes_for(task, args.eval_episodes, difficulty), fracs,
                                            args.interval, args.window, args.sinks, record_every=args.record_every)
        torch.save(data, cache)
    collected_s = time.time() - started
    if not data["train"] or not data["held_out"]:
        raise SystemExit("train-scorer: no compression happened (budgets above every trace?): lower --fracs")
    head_dim = data["train"][0].kv.shape[-1] // 2
    h2o = mean_overlap(data["held_out"], h2o_eviction)
    print(f"training on {len(data['train'])} compressions; held-out overlap of H2O's choice with golden: {h2o:.3f}")
    mlp, mean, std, curve = train(data["train"], data["held_out"], head_dim, args.steps, args.lr, args.batch,
                                  args.hidden, args.seed)
    fingerprint = weights_fingerprint(model_dir)
    command = "kvpilot train-scorer " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    metadata = {"model": model_dir.name, "model_fingerprint": fingerprint, "stage": "supervised",
                "command": command, "held_out_overlap": str(curve[-1]["held_out_overlap"])}
    weights = fold(mlp, mean, std, head_dim, metadata)
    weights.save(out)
    recipe = {"scorer": "foresight", "stage": "supervised (golden labels, pairwise rank hinge)", "command": command,
              "settings": settings, "training_seeds": f">= {TRAIN_SEED_BASE + args.seed}",
              "evaluation_seeds": f"0..{args.eval_episodes - 1} per task",
              "compressions": {"train": len(data["train"]), "held_out": len(data["held_out"])},
              "optimiser": {"adam_lr": args.lr, "warmup": 10, "schedule": "cosine", "steps": args.steps,
                            "batch": args.batch, "grad_clip": 1.0, "margin": MARGIN, "hidden": args.hidden},
              "held_out_overlap": {"foresight": curve[-1]["held_out_overlap"], "h2o": round(h2o, 4)},
              "model_fingerprint": fingerprint, "collect_seconds": round(collected_s, 1),
              "total_seconds": round(time.time() - started, 1), "curve": curve}
    out.with_suffix(".json").write_text(json.dumps(recipe, indent=1) + "\n")
    (args.work_dir / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    plot_curve(curve, h2o, args.work_dir / "curve.png")
    print(f"wrote {out} and {out.with_suffix('.json')}; curve in {args.work_dir}")
    return 0


def plot_curve(curve: list[dict], h2o: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [c["step"] for c in curve]
    a.plot(steps, [c["loss"] for c in curve])
    a.set(xlabel="step", ylabel="rank hinge loss", title="training loss")
    b.plot(steps, [c["held_out_overlap"] for c in curve], label="foresight")
    b.axhline(h2o, color="grey", linestyle="--", label="H2O's choice")
    b.set(xlabel="step", ylabel="overlap with golden", title="held-out top-d overlap")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
