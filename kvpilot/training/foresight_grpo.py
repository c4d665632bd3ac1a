"""`kvpilot train-scorer foresight --stage rl`: ForesightKV's stage 2, GRPO on top of the supervised scorer.

MDP (the paper's): state = the cache at a compression, action = the evicted set, drawn exactly as the served
scorer draws it (top-2d candidates, d of them sampled from their softmax: scorers/foresight.py), policy = the
per-(layer, KV head) MLPs. log pi(action) = sum over the evicted slots of log_softmax(scores) over every
unprotected slot (the paper's code), with per-slot ratios.

One step:
1. Rollouts: `--traces` reference traces (the model's own full-cache greedy runs of training episodes, seeds
   apart from the supervised stage's and from evaluation's) are each replayed `--group` times teacher-forced
   through the real engine under the current scorer with sampled evictions (a recorder policy keeps each
   compression's raw features, candidates, evicted slots and their log-probabilities). The group members
   differ only by their sampling seed.
2. Reward per rollout: Delta = loss_full - loss_compressed per model-written token after the first
   compression; the top 20 % by full-cache entropy are dropped; R = -mean(Delta^2 * [Delta < -eta]),
   eta = 1.5 nats: only large deteriorations on low-entropy tokens count.
3. Advantage: z-score of R within the trace's group (all members of a group share it at every compression,
   layer and head; a group with equal rewards teaches nothing).
4. Loss: PPO clip (epsilon 0.2) on the per-slot ratios + beta * KL_k3(pi || pi_SL) with beta 0.05 for the
   first `--kl-steps` steps, then 0. Adam, lr 3e-4, linear warmup 10, constant, grad-clip 1.0, one epoch.
Held-out: every `--eval-every` steps, the mean penalty of the current scorer over held-out traces (evaluation
seeds), beside the supervised scorer's at step 0.

[CHOICE] group size G: the paper's G is its number of GPUs (one rollout per rank); here `--group` (4).
[CHOICE] rollouts per step: the paper uses 32 prompts; here `--traces` (4) per step on a CPU.
[CHOICE] the paper's budget/interval rule (B 1024 / L 256, or 2048 / 512 past 12K tokens) scaled to our traces:
         budgets are `--fracs` of the mean trace (0.25, 0.5), one drawn per trace, interval 16.
[CHOICE] features are standardised with statistics of golden-trajectory compressions of a few training traces
         (the supervised stage's recipe); the supervised weights are unfolded into that space, trained, folded.
"""
from __future__ import annotations

import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from decoder_service.calibration import weights_fingerprint
from kvpilot.bench.fidelity import ReplayCase, references, replay
from kvpilot.evaluate import compression_for, episodes_for, mean_reference_tokens
from kvpilot.runtime import RuntimeOptions, build_engine
from kvpilot.tasks import make_episode
from kvpilot.training.train_model import TRAIN_SEED_BASE
from kvpilot_protocol.features import encode_feature_weights
from kvpilot_protocol.frame import KeepSet, StatsFrame
from kvpilot_protocol.policy import StatsSpec
from policy_service.local import InProcessPolicy
from policy_service.registry import POLICIES
from policy_service.scorers.base import Scorer
from policy_service.scorers.foresight import (DECAY, WINDOW_QUERIES, Foresight, ForesightWeights, attention_inputs,
                                              sample_evictions)

RL_WEIGHTS_FILE = "foresight_rl.safetensors"
RL_SEED_OFFSET = 500_000  # rollout traces: TRAIN_SEED_BASE + seed + this + i (the supervised stage uses + i)
ETA = 1.5
HIGH_ENTROPY_SHARE = 0.2


# ---- the scorer in standardised space --------------------------------------------------------------------
def unfold(weights: ForesightWeights, mean: Tensor, std: Tensor):
    """The inverse of train_scorer.fold: fc1 on raw x = (W * std) on (x - mean) / std, bias b1 + mean . W."""
    from kvpilot.training.train_scorer import ScorerMLP

    w = torch.cat([weights.w_key, weights.w_value, weights.w_attention], dim=2)  # [L, H, F, R]
    L, H, f, r = w.shape
    mlp = ScorerMLP(L, H, f, r, seed=0)
    with torch.no_grad():
        mlp.w1.copy_(w * std[..., None])
        mlp.b1.copy_(weights.b1 + torch.einsum("lhf,lhfr->lhr", mean, w))
        mlp.w2.copy_(weights.w2)
        mlp.b2.copy_(weights.b2)
    return mlp


def candidate_log_probs(scores: Tensor, candidates: Tensor) -> Tensor:
    """log_softmax of the eviction scores [L, H, n] over the unprotected slots (protected: -inf)."""
    return torch.log_softmax(scores.masked_fill(~candidates, float("-inf")), dim=-1)


# ---- rollouts ----------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One compression of one rollout: standardised features, candidates, evicted slots, their old log-probs."""

    x: Tensor  # [L, H, n, F] standardised
    candidates: Tensor  # [n] bool
    evicted: Tensor  # [L, H, d]
    old_logp: Tensor  # [L, H, d]


@dataclass
class Rollouts:
    steps: dict[str, list[Step]] = field(default_factory=dict)  # request id -> its compressions


def rollout_policy(sink: Rollouts, mlp, mean: Tensor, std: Tensor, layers: int, kv_heads: int,
                   head_dim: int) -> type[Scorer]:
    """A policy that samples evictions from the current `mlp` exactly as `foresight` does and records them."""
    from kvpilot.training.train_scorer import identity_projection

    blob = encode_feature_weights(*identity_projection(layers, kv_heads, head_dim))

    @dataclass
    class ForesightRollout(Scorer):
        name: ClassVar[str] = "foresight_rollout"
        stats: ClassVar[frozenset[str]] = Foresight.stats

        def spec(self) -> StatsSpec:
            return StatsSpec(self.stats, window_queries=WINDOW_QUERIES, decay=DECAY, feature_weights=blob)

        def plan(self, frame: StatsFrame):
            if frame.n <= frame.keep:
                return None
            raw = torch.cat([frame.stats["kv_features"].float(), attention_inputs(frame)], dim=-1).cpu()
            x = (raw - mean[:, :, None]) / std[:, :, None]
            candidates = ~frame.protected_mask("cpu")
            with torch.no_grad():
                scores = mlp(x)
            L, H, n = scores.shape
            drop = n - frame.keep
            masked = scores.masked_fill(~candidates, float("-inf"))
            evicted = sample_evictions(masked.reshape(L * H, n), drop, frame.generator()).view(L, H, drop)
            logp = candidate_log_probs(scores, candidates).gather(-1, evicted)
            sink.steps.setdefault(frame.session_id, []).append(Step(x.half(), candidates, evicted, logp))
            keep_mask = torch.ones(L, H, n, dtype=torch.bool)
            keep_mask.scatter_(-1, evicted, False)
            return KeepSet(keep_mask.nonzero()[:, 2].view(L, H, frame.keep))

    return ForesightRollout


@dataclass
class Trace:
    """A reference trace with its full-cache per-token loss and entropy at the scored (model-written) steps."""

    case: ReplayCase
    budget: int
    full_loss: Tensor  # [forced] NLL of each forced token under the full cache
    low_entropy: Tensor  # [forced] bool: scored, after the first compression, not in the top 20 % entropy


@torch.no_grad()
def full_cache_trace(model, case: ReplayCase, budget: int, interval: int) -> Trace:
    ids = torch.tensor(case.trace)
    logits = model(ids[None], torch.arange(len(ids))[None])[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    start = case.prompt_len
    predict = logp[start - 1:len(ids) - 1]  # row j predicts forced token j
    forced = ids[start:]
    loss = -predict.gather(1, forced[:, None]).squeeze(1)
    entropy = -(predict.exp() * predict).sum(-1)
    scored = torch.tensor(case.scored)
    after = torch.arange(len(forced)) + start >= budget + interval  # the first compression has happened
    eligible = scored & after
    low = eligible.clone()
    if eligible.any():
        threshold = torch.quantile(entropy[eligible], 1 - HIGH_ENTROPY_SHARE)
        low &= entropy <= threshold
    return Trace(case, budget, loss, low)


def reward(trace: Trace, replayed_logprobs: list[float], eta: float = ETA) -> float:
    """-mean(Delta^2 * [Delta < -eta]) over the low-entropy tokens, Delta = loss_full - loss_compressed."""
    if not trace.low_entropy.any():
        return 0.0
    compressed = -torch.tensor(replayed_logprobs)
    delta = (trace.full_loss - compressed)[trace.low_entropy]
    return -float((delta.pow(2) * (delta < -eta)).mean())


def group_advantages(rewards: Tensor) -> Tensor:
    """[T, G] rewards -> z-scores within each trace's group (0 where the group's rewards are all equal)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > 1e-8, (rewards - mean) / std.clamp_min(1e-8), torch.zeros_like(rewards))


def grpo_loss(mlp, reference, step: Step, advantage: float, clip: float, beta: float) -> Tensor:
    """PPO-clip on the per-slot ratios of one compression + beta * KL_k3 to the reference (supervised) scorer."""
    # Recorded inside the engine's inference mode: clones are ordinary tensors autograd may save.
    x, candidates, evicted = step.x.float().clone(), step.candidates.clone(), step.evicted.clone()
    logp = candidate_log_probs(mlp(x), candidates).gather(-1, evicted)
    ratio = (logp - step.old_logp.clone()).exp()
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    loss = -surrogate.mean()
    if beta > 0:
        with torch.no_grad():
            ref = candidate_log_probs(reference(x), candidates).gather(-1, evicted)
        log_r = ref - logp
        loss = loss + beta * (log_r.exp() - log_r - 1).mean()
    return loss


# ---- the run ---------------------------------------------------------------------------------------------
def trace_pool(engine, task_episodes, fracs, interval, window, sinks, rng) -> list[Trace]:
    pool = []
    for episodes in task_episodes:
        mean_len = mean_reference_tokens(episodes, engine.tokenizer)
        for case in references(engine, episodes):
            budget = max(window + sinks + 1, round(rng.choice(fracs) * mean_len))
            pool.append(full_cache_trace(engine.model, case, budget, interval))
    return pool


def run_rollouts(engine, sink: Rollouts, traces: list[Trace], group: int, interval: int, window: int, sinks: int,
                 tag: str, name: str, seed: int) -> tuple[Tensor, list[list[list[Step]]]]:
    """Replay each trace `group` times under the rollout policy; [T, G] rewards and the recorded steps. The
    members' request seeds (`seed + 1000 t + g`) seed their frames' sampling."""
    rewards = torch.zeros(len(traces), group)
    steps: list[list[list[Step]]] = []
    for t, trace in enumerate(traces):
        sink.steps.clear()
        cases = [trace.case] * group
        events = replay(engine, cases, compression_for(name, trace.budget, interval, window, sinks), tag=f"{tag}-{t}",
                        seed=seed + 1000 * t)
        row = []
        for g, event in enumerate(events):
            rewards[t, g] = reward(trace, [s.logprob for s in event.replay])
            row.append(sink.steps.get(f"{tag}-{t}-{g}", []))
        steps.append(row)
    return rewards, steps


def train_rl(args, model_dir: Path, sl_path: Path, log=print) -> dict:
    from kvpilot.training.train_scorer import collect, fold, standardisation

    started = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    engine = build_engine(RuntimeOptions(model=str(model_dir), threads=args.threads))
    c = engine.model_config
    tasks = [t for t in args.tasks.split(",") if t]
    fracs = [float(f) for f in args.fracs.split(",") if f]
    sl = ForesightWeights.read(sl_path)
    fingerprint = weights_fingerprint(model_dir)
    if sl.metadata.get("model_fingerprint") != fingerprint:
        raise SystemExit(f"train-scorer: {sl_path} was trained for other weights than {model_dir}")

    base = TRAIN_SEED_BASE + args.seed + RL_SEED_OFFSET
    log("standardisation from golden-trajectory compressions of 2 training traces per task")
    probe = []
    difficulties = args.difficulty.split(",")  # a mix: one trace pool per (task, difficulty), budgets of its own mean
    for task in tasks:
        for difficulty in difficulties:
            probe += collect(engine, [make_episode(task, base - 1 - i, difficulty) for i in range(2)], fracs,
                             args.interval, args.window, args.sinks, log=lambda *_: None)
    mean, std = standardisation(probe)
    mlp = unfold(sl, mean, std)
    reference = unfold(sl, mean, std).requires_grad_(False)

    sink = Rollouts()
    policy = rollout_policy(sink, mlp, mean, std, c.num_layers, c.num_kv_heads, c.head_dim)
    engine.compressor.policy = InProcessPolicy({**POLICIES, policy.name: policy})

    log(f"reference traces: {args.rl_episodes} training and {args.eval_episodes} held-out per task")
    train_pool = trace_pool(engine, [[make_episode(t, base + i, d) for i in range(args.rl_episodes)]
                                     for t in tasks for d in difficulties], fracs, args.interval, args.window,
                            args.sinks, rng)
    held_pool = trace_pool(engine, [episodes_for(t, args.eval_episodes, d) for t in tasks for d in difficulties],
                           fracs, args.interval, args.window, args.sinks, rng)

    def held_out_penalty(tag: str) -> float:
        rewards, _ = run_rollouts(engine, sink, held_pool, 1, args.interval, args.window, args.sinks, tag, policy.name,
                                  seed=7)  # the same draws at every evaluation
        return -float(rewards.mean())

    opt = torch.optim.Adam(mlp.parameters(), lr=args.rl_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    curve = [{"step": 0, "held_out_penalty": round(held_out_penalty("rl-eval-0"), 4)}]
    log(f"  step     0  held-out penalty {curve[0]['held_out_penalty']:.4f} (the supervised scorer)")
    for step in range(1, args.rl_steps + 1):
        traces = rng.sample(train_pool, min(args.traces, len(train_pool)))
        rewards, steps = run_rollouts(engine, sink, traces, args.group, args.interval, args.window, args.sinks,
                                      f"rl-{step}", policy.name, seed=10**6 * step)
        advantages = group_advantages(rewards)
        beta = args.kl if step <= args.kl_steps else 0.0
        losses = [grpo_loss(mlp, reference, s, float(advantages[t, g]), args.clip, beta)
                  for t, row in enumerate(steps) for g, trajectory in enumerate(row) for s in trajectory
                  if advantages[t, g] != 0 or beta > 0]
        point = {"step": step, "mean_reward": round(float(rewards.mean()), 4),
                 "informative_groups": int((rewards.std(dim=1) > 1e-8).sum())}
        if losses:
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1.0)
            opt.step()
            point["loss"] = round(loss.item(), 5)
        schedule.step()
        if step % args.eval_every == 0 or step == args.rl_steps:
            point["held_out_penalty"] = round(held_out_penalty(f"rl-eval-{step}"), 4)
        curve.append(point)
        log("  " + "  ".join(f"{k} {v}" for k, v in point.items()))

    command = "kvpilot train-scorer " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    metadata = {"model": model_dir.name, "model_fingerprint": fingerprint, "stage": "supervised+grpo",
                "command": command, "supervised_weights": sl_path.name}
    out = args.out or model_dir / RL_WEIGHTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fold(mlp, mean, std, c.head_dim, metadata).save(out)
    recipe = {"scorer": "foresight", "stage": "GRPO on the supervised scorer", "command": command,
              "supervised_weights": sl_path.name,
              "settings": {"tasks": tasks, "difficulty": args.difficulty, "fracs": fracs, "interval": args.interval,
                           "window": args.window, "sinks": args.sinks, "seed": args.seed},
              "training_seeds": f"{base}..{base + args.rl_episodes - 1} per task",
              "evaluation_seeds": f"0..{args.eval_episodes - 1} per task",
              "grpo": {"steps": args.rl_steps, "traces_per_step": args.traces, "group": args.group,
                       "adam_lr": args.rl_lr, "warmup": 10, "schedule": "constant", "clip": args.clip,
                       "kl_beta": args.kl, "kl_steps": args.kl_steps, "eta": ETA,
                       "high_entropy_dropped": HIGH_ENTROPY_SHARE, "grad_clip": 1.0},
              "held_out_penalty": {"supervised": curve[0]["held_out_penalty"],
                                   "grpo": curve[-1].get("held_out_penalty")},
              "model_fingerprint": fingerprint, "total_seconds": round(time.time() - started, 1), "curve": curve}
    out.with_suffix(".json").write_text(json.dumps(recipe, indent=1) + "\n")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "rl_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    plot_rl_curve(curve, args.work_dir / "rl_curve.png")
    log(f"wrote {out} and {out.with_suffix('.json')}; curve in {args.work_dir}")
    return recipe


def plot_rl_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    train = [p for p in curve if "mean_reward" in p]
    a.plot([p["step"] for p in train], [p["mean_reward"] for p in train])
    a.set(xlabel="step", ylabel="mean reward (-penalty)", title="rollout reward")
    held = [p for p in curve if p.get("held_out_penalty") is not None]
    b.plot([p["step"] for p in held], [p["held_out_penalty"] for p in held], marker="o")
    b.set(xlabel="step", ylabel="mean penalty (lower is better)", title="held-out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
