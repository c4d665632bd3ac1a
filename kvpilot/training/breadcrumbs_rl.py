"""`kvpilot train-breadcrumbs-rl`: Breadcrumbs' joint stage, RL on exact match together with distillation.

The student (a beacon-trained checkpoint from `kvpilot train-model --breadcrumbs`) is trained further on its own
samples under the runtime it is served with. One step:
1. Rollouts: `--prompts` training episodes (seeds apart from evaluation's), each sampled `--group` times at
   `--temperature` through the real engine under policy `breadcrumbs:c=C` (beacon fed, window folded, exactly as
   served). One c per step, drawn from `--cs`.
2. Reward: exact match of the episode's answer (1 or 0). Advantage: reward minus its group's mean (GRPO's group
   baseline); a group whose members all agree teaches nothing and adds no gradient.
3. Policy-gradient loss: -mean over rollouts of A_i * (mean log-probability of rollout i's generated tokens), the
   log-probabilities from one teacher-forced pass with the training block mask, which gives the engine's own logits
   (tests/test_breadcrumbs.py). Samples are drawn by the weights being trained, so the importance ratio is 1 and
   PPO's clip never acts: one gradient step per batch of rollouts.
4. Distillation loss: the supervised stage's loss on a batch of the teacher's traces (`--distill-tokens` tokens,
   the same c), weighted by `--distill-weight`; the paper trains both jointly so the student keeps the teacher's
   reasoning while RL teaches it what to keep in its beacons.
Held-out: every `--eval-every` steps, greedy accuracy per c on validation seeds (500..), which neither the Pareto
tables (seeds 0..N-1) nor training (seeds >= 1,000,000) use.

[CHOICE] advantage without the std division (reward - group mean): with 0/1 rewards and small groups the std is
         often tiny and would blow single lucky samples up.
[CHOICE] per-rollout mean over its tokens (GRPO's 1/|o|), then the mean over all rollouts of the step.
[CHOICE] one c per step, so a step's rollouts run together in one engine batch.
[CHOICE] Adam, constant `--lr` after a short warmup, grad-clip 1.0; temperature 1.0 (the model's distribution).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from decoder_service.checkpoint import BREADCRUMBS_FILE, load_checkpoint, save_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.model import Transformer
from decoder_service.requests import CompressionConfig
from kvpilot.agent import EpisodeResult, EpisodeRunner
from kvpilot.models import resolve_model
from kvpilot.tasks import TASKS, make_episode
from kvpilot.training import train_model
from kvpilot.training.breadcrumbs import block_mask, insert_beacons, masked_attention
from policy_service.local import InProcessPolicy
from policy_service.scorers.breadcrumbs import MAX_BEACON_INTERVAL

RL_SEED_OFFSET = 700_000  # rollout episodes: TRAIN_SEED_BASE + this + a draw (the supervised stage draws below 1e9)
VALIDATION_SEED = 500  # periodic evaluation seeds 500.. (the Pareto tables use 0..N-1)
STATE_FILE = "rl_state.pt"
SINGLE_PASS_TASKS = ("variables", "graph")  # no tool turns: the answer follows the prompt in one generation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, type=Path, help="a beacon-trained checkpoint (breadcrumbs.json beside it)")
    p.add_argument("--out", type=Path, default=Path("runs/breadcrumbs-rl"), help="run directory (state, history, model)")
    p.add_argument("--export", type=Path, default=None, help="also write the final model here")
    p.add_argument("--cs", default=None, help="beacon intervals to train at (default: the student's trained c)")
    p.add_argument("--tasks", default="variables,graph")
    p.add_argument("--difficulty", default="default")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=4, help="episodes per step")
    p.add_argument("--group", type=int, default=8, help="samples per episode (the group baseline's size)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation loss (0 = RL alone)")
    p.add_argument("--distill-tokens", type=int, default=2048, help="teacher-trace tokens per step for distillation")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-episodes", type=int, default=10, help="validation episodes per task and c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--time-limit-minutes", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def check_args(args) -> list[int]:
    """Every bad value refused with what to fix; returns the beacon intervals."""
    meta = args.student / BREADCRUMBS_FILE
    if not meta.is_file():
        raise SystemExit(f"error: --student {args.student} is not a beacon-trained checkpoint (no {BREADCRUMBS_FILE}); "
                         "train one with `kvpilot train-model --breadcrumbs ...`")
    trained = json.loads(meta.read_text()).get("trained_c", [])
    text = args.cs if args.cs is not None else ",".join(str(c) for c in trained)
    try:
        cs = [int(c) for c in text.split(",")]
    except ValueError:
        cs = []
    if not cs or any(not 2 <= c <= MAX_BEACON_INTERVAL for c in cs):
        raise SystemExit(f"error: --cs takes beacon intervals in [2, {MAX_BEACON_INTERVAL}], comma-separated (got {text!r})")
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: --tasks: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if any(t not in SINGLE_PASS_TASKS for t in args.tasks.split(",")):
        # A rollout's generated tokens are one run after the prompt; tool outputs in between would become targets.
        raise SystemExit(f"error: --tasks: the RL stage trains on single-pass tasks {list(SINGLE_PASS_TASKS)} "
                         f"(beacons fold generated tokens only; got {args.tasks!r})")
    if args.difficulty not in ("easy", "default", "hard", "long"):
        raise SystemExit(f"error: --difficulty must be easy, default, hard or long (got {args.difficulty!r})")
    for name, low in (("steps", 1), ("prompts", 1), ("group", 2), ("eval_every", 1), ("eval_episodes", 1),
                      ("distill_tokens", 64)):
        if getattr(args, name) < low:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= {low} (got {getattr(args, name)})")
    if not 0.0 < args.temperature <= 2.0:
        raise SystemExit(f"error: --temperature must be in (0, 2] (got {args.temperature}); RL needs sampling")
    if not 0.0 < args.lr <= 1e-2:
        raise SystemExit(f"error: --lr must be in (0, 0.01] (got {args.lr})")
    if args.distill_weight < 0:
        raise SystemExit(f"error: --distill-weight must be >= 0 (got {args.distill_weight})")
    return cs


# ---- the objective ---------------------------------------------------------------------------------------------
def rollout_batch(sequences: list[tuple[list[int], int]], c: int, beacon: int, pad: int):
    """Teacher-forcing batch for rollouts given as (ids with <bos>, prompt length with <bos>): beacons inserted
    every c generated tokens as the runtime feeds them, the block mask, and a target mask over the generated
    tokens (beacons are input only: never targets). Returns (inputs, targets, target mask, positions, attend)."""
    rows = [insert_beacons(ids, prompt, c, beacon) + (prompt,) for ids, prompt in sequences]
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.bool)
    attend = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself only
    for r, (seq, flags, prompt) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        targets[r, prompt: len(seq)] = ~torch.tensor(flags[prompt:], dtype=torch.bool)
        attend[r, : len(seq), : len(seq)] = block_mask(flags, prompt)
    positions = torch.arange(width).repeat(len(rows), 1)
    return ids[:, :-1], ids[:, 1:], targets[:, 1:], positions[:, :-1], attend[:, :-1, :-1]


def token_logprobs(model: Transformer, batch) -> torch.Tensor:
    """log p(target) at every position of `batch` (rollout_batch's or make_batch's), [B, T-1]; masked ones too."""
    inputs, targets, _, positions, attend = batch
    logits = model(inputs, positions, masked_attention(attend))
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]


def group_advantages(rewards: list[float], group: int) -> list[float]:
    """Reward minus the mean of its group (consecutive runs of `group`)."""
    out = []
    for g in range(0, len(rewards), group):
        members = rewards[g: g + group]
        mean = sum(members) / len(members)
        out += [r - mean for r in members]
    return out


def policy_gradient_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: list[float]) -> torch.Tensor:
    """-mean_i A_i * mean_t log p(o_i,t): GRPO's surrogate at ratio 1."""
    per_rollout = (logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)
    return -(torch.tensor(advantages, dtype=per_rollout.dtype) * per_rollout).mean()


def rollout_sequence(result: EpisodeResult, prompt_ids: list[int], eos: int) -> tuple[list[int], int]:
    """(<bos> + prompt + generated [+ <eos> when the model ended it], prompt length with <bos>), from the session's
    history (which never holds beacons)."""
    ids = list(result.token_ids)
    prompt = len(prompt_ids) + 1
    if ids[1:prompt] != prompt_ids:
        raise RuntimeError("a rollout's history does not start with its prompt")
    if ids and ids[-1] == eos:
        ids.pop()
    return ids + ([eos] if result.finish == "stop" else []), prompt


# ---- the loop --------------------------------------------------------------------------------------------------
def evaluate(engine: Engine, tasks: list[str], cs: list[int], difficulty: str, episodes: int) -> dict[str, float]:
    """Greedy accuracy per task and c on validation seeds."""
    scores = {}
    for c in cs:
        runner = EpisodeRunner(engine, compression=CompressionConfig(policy="breadcrumbs", params={"c": str(c)}))
        for task in tasks:
            results = runner.run([make_episode(task, VALIDATION_SEED + i, difficulty) for i in range(episodes)])
            scores[f"{task}/c{c}"] = round(sum(r.correct for r in results) / episodes, 4)
    return scores


def run(args) -> int:
    cs = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    loaded = load_checkpoint(resolve_model(str(args.student)))
    engine = Engine(loaded, EngineConfig(max_running=args.prompts * args.group, max_batch_tokens=4096,
                                         prefill_chunk=1024, kv_pool_bytes=256 << 20), policy=InProcessPolicy())
    model = Transformer(loaded.config)
    model.load_state_dict(loaded.model.state_dict())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    tokenizer, beacon = loaded.tokenizer, loaded.beacon_token_id
    eos, pad = loaded.config.eos_token_ids[0], tokenizer.token_to_id(train_model.PAD)
    vocab = train_model.token_ids()
    args.out.mkdir(parents=True, exist_ok=True)
    state_path, history_path = args.out / STATE_FILE, args.out / "history.jsonl"
    step, elapsed = 0, 0.0
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {state_path} at step {step}", file=sys.stderr)
    else:
        history_path.unlink(missing_ok=True)
        with torch.no_grad():
            record = {"step": 0, "validation": evaluate(engine, tasks, cs, args.difficulty, args.eval_episodes)}
        print(f"step 0 validation {record['validation']}", file=sys.stderr)
        with history_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    from tqdm import tqdm

    # The distillation batches come from the supervised stage's own batch maker, at the same c as the step's.
    distill_args = {c: train_model.parse_args(["--preset", "v2", "--tasks", args.tasks, "--breadcrumbs", str(c),
                                               "--batch-tokens", str(args.distill_tokens), "--steps", "1",
                                               "--curriculum-scale", "0.01", "--drill-share", "0", "--drill-warmup",
                                               "0", "--seed", str(args.seed + 1000)]) for c in cs}
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True, mininterval=5)
    started, last_save = time.monotonic() - elapsed, time.monotonic()
    while step < args.steps:
        rng = random.Random(f"breadcrumbs-rl/{args.seed}/{step}")
        c = rng.choice(cs)
        with torch.no_grad():
            engine.model.load_state_dict(model.state_dict())  # sample from the weights being trained
        prompts = [make_episode(rng.choice(tasks), train_model.TRAIN_SEED_BASE + RL_SEED_OFFSET + rng.randrange(10**8),
                                args.difficulty) for _ in range(args.prompts)]
        episodes = [e for e in prompts for _ in range(args.group)]
        runner = EpisodeRunner(engine, compression=CompressionConfig(policy="breadcrumbs", params={"c": str(c)}),
                               temperature=args.temperature, seed=rng.randrange(2**31))
        t0 = time.monotonic()
        results = runner.run(episodes)
        rollout_seconds = time.monotonic() - t0
        rewards = [float(r.correct) for r in results]
        advantages = group_advantages(rewards, args.group)

        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        pg = torch.zeros(())
        if any(a != 0 for a in advantages):
            batch = rollout_batch([rollout_sequence(r, tokenizer.encode(r.episode.prompt), eos) for r in results], c,
                                  beacon, pad)
            pg = policy_gradient_loss(token_logprobs(model, batch), batch[2], advantages)
        distill = torch.zeros(())
        if args.distill_weight > 0:
            teacher_batch = train_model.make_batch(distill_args[c], step + 1, vocab)  # step + 1: past the ramp
            distill = -token_logprobs(model, teacher_batch)[teacher_batch[2]].mean()
        loss = pg + args.distill_weight * distill
        pg_value, distill_value = float(pg.detach()), float(distill.detach())
        if loss.requires_grad:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{sum(rewards) / len(rewards):.2f}", distill=f"{distill_value:.3f}", refresh=False)
        record = {"step": step, "minutes": round((time.monotonic() - started) / 60, 2), "c": c,
                  "reward": round(sum(rewards) / len(rewards), 4),
                  "groups_with_signal": sum(any(a != 0 for a in advantages[g: g + args.group])
                                            for g in range(0, len(advantages), args.group)),
                  "pg_loss": round(pg_value, 5), "distill_loss": round(distill_value, 4),
                  "generated_tokens": sum(r.generated_tokens for r in results), "rollout_seconds": round(rollout_seconds, 1)}
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                engine.model.load_state_dict(model.state_dict())
            record["validation"] = evaluate(engine, tasks, cs, args.difficulty, args.eval_episodes)
            bar.write(f"step {step} validation {record['validation']}")
        with history_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        elapsed = time.monotonic() - started
        out_of_time = args.time_limit_minutes is not None and elapsed > 60 * args.time_limit_minutes
        if out_of_time or step == args.steps or time.monotonic() - last_save > 60 * args.checkpoint_minutes:
            train_model.save_state(state_path, model, optimizer, step, elapsed, 0.0, args)
            last_save = time.monotonic()
        if out_of_time:
            bar.write(f"time limit reached at step {step}; continue with --resume")
            return 0
    bar.close()
    export(model, loaded, args, cs, step, elapsed, history_path)
    return 0


def export(model: Transformer, loaded, args, cs: list[int], step: int, elapsed: float, history_path: Path) -> None:
    """The RL'd student beside its recipe and curve: model/ under --out, and --export if given."""
    tokenizer_json = loaded.path / "tokenizer.json"
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}
    summary = {"stage": "breadcrumbs RL + distillation", "recipe": recipe, "cs": cs, "steps": step,
               "wall_minutes": round(elapsed / 60, 1),
               "command": "kvpilot train-breadcrumbs-rl " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
               "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    for directory in [args.out / "model"] + ([args.export] if args.export is not None else []):
        save_checkpoint(model, tokenizer_json, directory)
        for name in (BREADCRUMBS_FILE, "chat_template.jinja"):
            if (loaded.path / name).is_file():
                (directory / name).write_text((loaded.path / name).read_text())
        (directory / "training-rl.json").write_text(json.dumps(summary, indent=2) + "\n")
        (directory / "training-rl-history.jsonl").write_text(history_path.read_text())
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvpilot train-breadcrumbs-rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
