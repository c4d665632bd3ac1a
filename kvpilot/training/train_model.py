"""Train the bundled reasoning model on the synthetic tasks (CPU friendly; resumable).

    kvpilot train-model --out runs/reasoner --seed 0 [--resume] [--export kvpilot/assets/reasoner]
    python -m kvpilot.training.train_model ...   (same)

Recipe (the defaults): a 4-layer, width-192 Llama (`decoder_service.model.Transformer`, 1.9 M parameters)
trained with AdamW (warmup + cosine) for 5,000 steps of 4,096 tokens (37 minutes on 2 CPU cores here; see
benchmarks/results/train_model.md for the committed model's exact history). The loss covers model-written
tokens only (prompt and tool outputs are masked). Three things make it learn on a 2-core CPU in under an hour:
  * two layer-0 heads start as look-back heads (previous token, two back) and are held for the first steps
    (`init_lookback_heads`): the seed of the induction heads every lookup needs;
  * the first steps train on copying drills only, and lookup drills stay in the mix for a while
    (`drill_words`): induction heads form there within a few hundred steps;
  * a curriculum: each step draws one difficulty (mostly easy first, then mostly default with a share of
    hard) and fills the token budget with episodes of that difficulty, so a batch holds similar lengths.
Work is split over `--procs` data-parallel processes (gloo all-reduce of the gradients).

Reproducibility: the batch of step s is a pure function of (--seed, s) and the model starts from
`init_random(--seed)`, so the same arguments retrace the same run up to float summation order (wall-clock
time differs by machine); `--resume` continues from the last checkpoint in --out without changing the data.

Presets: `--preset v1` (the default) is the recipe above, the committed model's. `--preset v2` is the next
bundled reasoner: 8 query heads over 2 K/V heads (grouped-query attention), width 256, 6 layers, MLP 768
(4.7 M parameters), 4,096 positions, 8,192 tokens per step and the v2 curriculum, which adds the `long` task
variants (1,000-2,000-token episodes). A preset only fills the options not given: `--preset v2 --layers 4`
is v2 with 4 layers. Any --heads / --kv-heads where --kv-heads divides --heads works (GQA).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from decoder_service.checkpoint import BREADCRUMBS_FILE, load_checkpoint, save_checkpoint
from decoder_service.model import ModelConfig, Transformer, causal_attention
from decoder_service.tokenizer import TextTokenizer
from kvpilot.tasks import TASKS, make_episode
from kvpilot.tasks.vocab import (BOS, COLORS, ENTITIES, EOS, LABELS, NODES, NUMBERS, PAD, VARIABLES, VOCAB,
                                 build_tokenizer, token_ids)
from kvpilot.training import quick_eval

TRAIN_SEED_BASE = 1_000_000  # training episodes use seeds >= this; evaluation uses seeds below it
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Phase:
    """Until `until` (fraction of all steps) draw difficulties with these weights."""

    until: float
    weights: dict[str, float]


# Short episodes first: the lookups are found faster with few distractors; then mostly the default
# difficulty (the accuracy target) with a growing share of long hard episodes.
CURRICULUM = [
    Phase(0.2, {"easy": 0.8, "default": 0.2}),
    Phase(0.5, {"easy": 0.3, "default": 0.6, "hard": 0.1}),
    Phase(1.0, {"easy": 0.1, "default": 0.65, "hard": 0.25}),
]
# v2: the same start, then the long variants (1,000-2,000 tokens) take a growing share. The token budget per
# step is fixed, so a long step holds fewer, longer episodes (a step draws one difficulty).
CURRICULUM_V2 = [
    Phase(0.15, {"easy": 0.7, "default": 0.3}),
    Phase(0.35, {"easy": 0.2, "default": 0.5, "hard": 0.2, "long": 0.1}),
    Phase(0.6, {"easy": 0.1, "default": 0.35, "hard": 0.25, "long": 0.3}),
    Phase(1.0, {"easy": 0.05, "default": 0.25, "hard": 0.25, "long": 0.45}),
]
CURRICULA = {"v1": CURRICULUM, "v2": CURRICULUM_V2}

# Options a preset sets (each defaults to None on the command line: an explicit value always wins).
PRESETS = {
    "v1": {"batch_tokens": 4096, "hidden": 192, "layers": 4, "heads": 6, "kv_heads": 6, "intermediate": 512,
           "max_positions": 2048, "curriculum": "v1"},
    "v2": {"batch_tokens": 8192, "hidden": 256, "layers": 6, "heads": 8, "kv_heads": 2, "intermediate": 768,
           "max_positions": 4096, "curriculum": "v2"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="v1",
                        help="model size and curriculum: v1 (the committed reasoner) or v2 (GQA, long episodes); "
                             "explicit options override it")
    parser.add_argument("--out", type=Path, default=Path("runs/reasoner"), help="run directory (checkpoints, logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="token budget per step, padding included (v1 4096, v2 8192)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=None, help="width (v1 192, v2 256)")
    parser.add_argument("--layers", type=int, default=None, help="v1 4, v2 6")
    parser.add_argument("--heads", type=int, default=None, help="query heads (v1 6, v2 8)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="K/V heads, a divisor of --heads; fewer than --heads is grouped-query attention "
                             "(v1 6, v2 2)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (v1 512, v2 768)")
    parser.add_argument("--max-positions", type=int, default=None, help="v1 2048, v2 4096")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks to train on")
    parser.add_argument("--task-weights", default=None,
                        help="comma-separated sampling weights, same order as --tasks (default: multihop 1.5, others 1)")
    parser.add_argument("--lookback-init", action=argparse.BooleanOptionalAction, default=True,
                        help="start two layer-0 heads as previous-token / two-back heads (see init_lookback_heads)")
    parser.add_argument("--lookback-hold", type=int, default=2000, help="steps during which those heads stay fixed")
    parser.add_argument("--drill-warmup", type=int, default=400, help="first steps train on lookup drills only")
    parser.add_argument("--drill-share", type=float, default=0.3,
                        help="share of lookup-drill sequences early in training (a fifth of it later)")
    parser.add_argument("--drill-until", type=float, default=0.3, help="progress at which the drill share drops")
    parser.add_argument("--sidequest-share", type=float, default=0.0,
                        help="share of sequences that are SideQuest side threads (multihop traces forked at a tool "
                             "output, answered with the outputs whose last use is past; kvpilot.training."
                             "sidequest_data); the rest is the usual mix, which keeps the main task as it was")
    parser.add_argument("--sidequest-drops", type=float, default=0.0,
                        help="share of multihop main traces trained with the deletions sidequest would make (hidden "
                             "from every later token by the attention mask), so the main thread keeps working with holes")
    parser.add_argument("--breadcrumbs", default=None, metavar="C[,C...]",
                        help="train a Breadcrumbs student: a beacon after every C model-written tokens with the block "
                             "attention mask (kvpilot/training/breadcrumbs.py); several values: one C drawn per "
                             "sequence (the variable-c student); single-pass tasks (--tasks variables,graph)")
    parser.add_argument("--curriculum", choices=sorted(CURRICULA), default=None,
                        help="difficulty schedule: v1 (easy/default/hard) or v2 (adds the long variants)")
    parser.add_argument("--curriculum-scale", type=float, default=1.0,
                        help="stretch (>1) or shrink the curriculum phases relative to --steps")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bfloat16 autocast for matmuls: only on CPUs with AVX512-BF16/AMX (measured 10x slower "
                             "than float32 on an AVX2-only CPU)")
    parser.add_argument("--procs", type=int, default=2,
                        help="data-parallel worker processes (gloo); on small CPUs two 1-thread processes beat one 2-thread")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between greedy accuracy checks")
    parser.add_argument("--eval-episodes", type=int, default=20, help="held-out episodes per task per check")
    parser.add_argument("--final-episodes", type=int, default=200, help="held-out episodes per task at the end")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--time-limit-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="start from an exported checkpoint's weights (same shape) at --start-step, with fresh "
                             "AdamW moments: continues a run whose state.pt is gone (runs/ is not committed)")
    parser.add_argument("--start-step", type=int, default=0,
                        help="with --init-from: the step the weights were exported at (schedule and curriculum resume there)")
    parser.add_argument("--export", type=Path, default=None, help="also save the final HF-format model here")
    parser.add_argument("--no-progress", action="store_true")


def resolve_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset (None) from --preset (v1 when absent); explicit values are kept. Idempotent."""
    for name, value in PRESETS[getattr(args, "preset", None) or "v1"].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject model shapes the trainer cannot build, with the reason (SystemExit, like the other commands)."""
    heads, kv_heads, hidden = args.heads, args.kv_heads, args.hidden
    if getattr(args, "start_step", 0) and getattr(args, "init_from", None) is None:
        raise SystemExit("error: --start-step needs --init-from DIR (the weights exported at that step)")
    if not 0 <= getattr(args, "start_step", 0) <= args.steps:
        raise SystemExit(f"error: --start-step must be in [0, --steps {args.steps}] (got {args.start_step})")
    if heads < 1 or kv_heads < 1:
        raise SystemExit(f"error: --heads and --kv-heads must be >= 1 (got {heads} and {kv_heads})")
    for name in ("sidequest_share", "sidequest_drops"):
        if not 0.0 <= getattr(args, name, 0.0) <= 1.0:
            raise SystemExit(f"error: --{name.replace('_', '-')} is a share in [0, 1] (got {getattr(args, name)})")
    if getattr(args, "breadcrumbs", None):
        from policy_service.scorers.breadcrumbs import MAX_BEACON_INTERVAL

        cs = args.breadcrumbs.split(",")
        if not all(c.strip().isdigit() and 2 <= int(c) <= MAX_BEACON_INTERVAL for c in cs):
            raise SystemExit(f"error: --breadcrumbs takes beacon intervals in [2, {MAX_BEACON_INTERVAL}], comma-separated "
                             f"(got {args.breadcrumbs!r}); the policy accepts the same range")
    if heads % kv_heads:
        raise SystemExit(f"error: --kv-heads {kv_heads} does not divide --heads {heads}: grouped-query attention "
                         f"shares each K/V head by the same number of query heads (valid --kv-heads for {heads} "
                         f"heads: {', '.join(str(k) for k in range(1, heads + 1) if heads % k == 0)})")
    if hidden % heads or (hidden // heads) % 2:
        raise SystemExit(f"error: --hidden {hidden} / --heads {heads} must be an even integer head dimension "
                         f"(RoPE rotates pairs of dimensions)")


# ---------------------------------------------------------------------------------------------- data

def difficulty_weights(progress: float, curriculum: list[Phase] = CURRICULUM) -> dict[str, float]:
    for phase in curriculum:
        if progress < phase.until:
            return phase.weights
    return curriculum[-1].weights


DRILL_POOL = ENTITIES + COLORS + NUMBERS + VARIABLES + NODES + LABELS
# About as long as the tasks; long copy drills stop at 3 x 90 distinct words (the pool has 272).
DRILL_FACTS = {"easy": (6, 14), "default": (12, 30), "hard": (24, 60), "long": (40, 90)}


def drill_words(rng: random.Random, facts: int, copy: bool = False) -> tuple[list[str], list[bool]]:
    """A lookup drill over random words, half of the time a copy drill, else an associative-recall drill.

    copy:    w1 w2 ... wn ; w1 w2 ... wn       every repeated word is scored
    recall:  k v . k' v' . ... ; k' v' . k v .  facts repeated in a new order; the values are scored
    Neither can be solved without looking back for the current word, the circuit (induction heads) behind
    every lookup of the tasks. On the tasks alone the model learns the formats, then sits on a plateau for
    thousands of steps guessing the looked-up words; dense copying forms the heads within a few hundred
    steps, and recall (keys of one or two words, like `k42` -> color, `n3 a` -> node) adapts them to lookups.
    """
    pool = DRILL_POOL[:]
    rng.shuffle(pool)
    if copy or rng.random() < 0.5:
        sequence = pool[: 3 * facts]  # distinct words: each has one successor to find
        return sequence + [";"] + sequence, [False] * (len(sequence) + 2) + [True] * (len(sequence) - 1)
    key_words = rng.choice([1, 2])
    key_pool, value_pool = pool[: len(pool) // 2], pool[len(pool) // 2:]
    keys: list[tuple[str, ...]] = []
    while len(keys) < facts:
        key = tuple(rng.choice(key_pool) for _ in range(key_words))
        if key not in keys:
            keys.append(key)
    values = [rng.choice(value_pool) for _ in keys]
    words: list[str] = []
    for key, value in zip(keys, values):
        words += [*key, value, "."]
    words.append(";")
    mask = [False] * len(words)
    order = list(range(facts))
    rng.shuffle(order)
    for i in order:
        words += [*keys[i], values[i], "."]
        mask += [False] * key_words + [True, False]
    return words, mask


def make_batch(args, step: int, vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, loss mask, positions) for one step; a pure function of (seed, step). Positions are
    0, 1, ... except in SideQuest side threads, whose deleted tool outputs leave gaps (as in the runtime's cache)."""
    rng = random.Random(f"train/{args.seed}/{step}")
    progress = min(1.0, step / (args.steps * args.curriculum_scale))
    weights = difficulty_weights(progress, CURRICULA[args.curriculum])
    difficulty = rng.choices(list(weights), list(weights.values()))[0]
    warmup = step < args.drill_warmup
    if warmup:
        drill_share = 1.0  # induction heads first: they form quickly on copying alone, hardly at all amid the tasks
    else:
        drill_share = args.drill_share if progress < args.drill_until else args.drill_share / 5
    tasks = args.tasks.split(",")
    if args.task_weights:
        task_weights = [float(w) for w in args.task_weights.split(",")]
    else:  # multihop puts the fewest model-written tokens in a sequence: show it more often
        task_weights = [1.5 if task == "multihop" else 1.0 for task in tasks]

    sidequest_share = getattr(args, "sidequest_share", 0.0)
    beacon_cs = [int(c) for c in args.breadcrumbs.split(",")] if getattr(args, "breadcrumbs", None) else []
    sequences = []
    longest = 0
    while True:
        positions, hidden = None, None
        if sidequest_share and difficulty != "easy" and rng.random() < sidequest_share:
            from kvpilot.training.sidequest_data import random_side_example

            episode = make_episode("multihop", TRAIN_SEED_BASE + rng.randrange(10**9), difficulty)
            example = random_side_example(episode, rng)
            if example is None:
                continue
            words, mask, positions = example
        elif rng.random() < drill_share:
            words, mask = drill_words(rng, rng.randint(*DRILL_FACTS[difficulty]), copy=warmup)
        else:
            task = rng.choices(tasks, task_weights)[0]
            episode = make_episode(task, TRAIN_SEED_BASE + rng.randrange(10**9), difficulty)
            words, mask = episode.training_words()
            if (task == "multihop" and difficulty != "easy" and getattr(args, "sidequest_drops", 0.0)
                    and rng.random() < args.sidequest_drops):
                from kvpilot.training.sidequest_data import EVERY_CHOICES, main_trace_with_drops

                words, mask, hidden = main_trace_with_drops(episode, rng.choice(EVERY_CHOICES))
        longest_if_added = max(longest, len(words) + 1)
        if sequences and longest_if_added * (len(sequences) + 1) > args.batch_tokens:
            break
        beacons = None
        if beacon_cs:
            from kvpilot.training.breadcrumbs import BEACON, insert_beacons

            prompt = next((i for i, m in enumerate(mask) if m), len(mask))  # the leading unscored words
            ids, beacons = insert_beacons(words, prompt, rng.choice(beacon_cs), BEACON)
            scored = iter(mask[prompt:])
            mask = mask[:prompt] + [False if b else next(scored) for b in beacons[prompt:]]  # a beacon is no target
            words, beacons = ids, [False] + beacons
            longest_if_added = max(longest, len(words) + 1)
            if sequences and longest_if_added * (len(sequences) + 1) > args.batch_tokens:
                break
        positions = [0] + (list(positions) if positions is not None else list(range(1, len(words) + 1)))
        sequences.append(([vocab[BOS]] + [vocab[w] for w in words], [False] + mask, positions, beacons, hidden))
        longest = longest_if_added

    pad = vocab[PAD]
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    pos = torch.arange(longest).repeat(len(sequences), 1)  # padding continues the count (it is masked anyway)
    masked = beacon_cs or any(s[4] for s in sequences)
    attend = torch.eye(longest, dtype=torch.bool).repeat(len(sequences), 1, 1) if masked else None
    for row, (seq, mask, where, beacons, hidden) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        loss_mask[row, : len(mask)] = torch.tensor(mask)
        pos[row, : len(where)] = torch.tensor(where)
        if attend is not None and beacons is not None:
            from kvpilot.training.breadcrumbs import block_mask

            prompt = next((i for i, m in enumerate(mask) if m), len(mask))
            attend[row, : len(seq), : len(seq)] = block_mask(beacons, prompt)  # padding attends to itself only
        elif attend is not None:  # causal, minus what sidequest's deletions hide (nothing for other rows)
            from kvpilot.training.sidequest_data import hidden_mask

            attend[row, : len(seq), : len(seq)] = hidden_mask(len(seq), hidden or [])
    # Predict token t from tokens < t: the mask belongs to the target position.
    batch = ids[:, :-1], ids[:, 1:], loss_mask[:, 1:], pos[:, :-1]
    return batch if attend is None else (*batch, attend[:, :-1, :-1])


# --------------------------------------------------------------------------------------------- model

def model_config(args) -> ModelConfig:
    vocab = token_ids()
    return ModelConfig(
        vocab_size=len(VOCAB),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_positions,
        bos_token_id=vocab[BOS],
        eos_token_ids=[vocab[EOS]],
    )


def lookback_rows(config: ModelConfig, heads: int = 2, frequencies: int = 8) -> tuple[list[int], list[int]]:
    """Rows of layer 0's q_proj and k_proj that the look-back heads own (`init_lookback_heads` sets them,
    `hold_lookback_heads` keeps them fixed).

    The look-back query heads are heads 0..heads-1, all of each. Their keys come from K/V head h // group (GQA:
    `group` query heads read one K/V head). A K/V head read only by look-back heads is theirs whole (always the
    case without GQA, the v1 layout); one shared with ordinary query heads gives up only the rows of the
    `frequencies` fastest RoPE pairs, the only rows a look-back query reads, and keeps the rest for content.
    """
    d, group = config.head_dim, config.group_size
    heads = min(heads, config.num_heads)
    frequencies = min(frequencies, d // 2)
    q_rows = list(range(heads * d))
    k_rows: list[int] = []
    for kv in sorted({h // group for h in range(heads)}):
        if (kv + 1) * group <= heads:  # every query head of the group is a look-back head
            k_rows += range(kv * d, (kv + 1) * d)
        else:
            k_rows += [kv * d + i for i in range(frequencies)] + [kv * d + d // 2 + i for i in range(frequencies)]
    return q_rows, k_rows


@torch.no_grad()
def init_lookback_heads(model: Transformer, offsets: tuple[int, ...] = (1, 2), strength: float = 1.0,
                        frequencies: int = 8, constant: float = 0.2) -> None:
    """Start heads 0, 1, ... of layer 0 as fixed look-back heads (structured initialisation; all weights train).

    Lookups need induction heads, and those need heads that move a token's predecessors into its position.
    From random weights such a head takes thousands of CPU steps to appear (measured: no lookup learned after
    2,700 steps; on a pure copying drill, no induction after 700 steps, versus ~450 steps with this init), so
    we build them: every embedding gets a shared component `constant` on dimension 0, which RMSNorm turns into
    a near-constant input; head h's query and key read it into the `frequencies` fastest RoPE pairs with a
    phase offset of offsets[h] positions, so the score sum_i cos((p - s - offset) * theta_i) peaks at
    s = p - offset (margin ~0.69 per pair over any other key). Offsets 1 and 2 serve one- and two-word keys.

    Grouped-query attention: the key carries no offset (only the query is rotated), so the look-back heads of
    one K/V group share one look-back key, and heads 0 and 1 sit in the same group whenever a group has two
    or more query heads. The group's other query heads keep that K/V head's slow RoPE pairs for content
    (see `lookback_rows`); without GQA each look-back head owns its K/V head, exactly as in v1.
    """
    config = model.config
    d, group = config.head_dim, config.group_size
    offsets = offsets[: config.num_heads]
    frequencies = min(frequencies, d // 2)
    theta = config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    model.model.embed_tokens.weight[:, 0] = constant
    attention = model.model.layers[0].self_attn
    q_rows, k_rows = lookback_rows(config, len(offsets), frequencies)
    attention.q_proj.weight[q_rows] = 0
    attention.k_proj.weight[k_rows] = 0
    for head, offset in enumerate(offsets):
        kv = head // group
        for i in range(frequencies):
            # The query is rotated back by offset * theta_i: the dot product peaks `offset` positions back.
            attention.q_proj.weight[head * d + i, 0] = strength * math.cos(-offset * theta[i])
            attention.q_proj.weight[head * d + i + d // 2, 0] = strength * math.sin(-offset * theta[i])
            attention.k_proj.weight[kv * d + i, 0] = strength


def make_optimizer(model: Transformer, args) -> torch.optim.Optimizer:
    # No weight decay on norms and embeddings: decaying them only fights the RMSNorm scale.
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def learning_rate(args, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, optimizer, batch, args, world: int, freeze_lookback: bool = False) -> float:
    """One optimizer step on this rank's rows of the batch; returns the batch's mean token loss.

    Every rank builds the same full batch and takes every world-th row, so the token count of the whole batch
    is known locally: dividing the summed loss by it and summing gradients across ranks gives exactly the
    full-batch gradient, whatever the split.
    """
    inputs, targets, mask, positions = batch[:4]
    attend = batch[4] if len(batch) > 4 else None  # Breadcrumbs' block mask [B, T, T]
    total = mask.sum()
    rank = dist.get_rank() if world > 1 else 0
    inputs, targets, mask, positions = inputs[rank::world], targets[rank::world], mask[rank::world], positions[rank::world]
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1  # drop this shard's trailing padding
    inputs, targets, mask, positions = inputs[:, :width], targets[:, :width], mask[:, :width], positions[:, :width]
    attention = causal_attention
    if attend is not None:
        from kvpilot.training.breadcrumbs import masked_attention

        attention = masked_attention(attend[rank::world, :width, :width])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        logits = model(inputs, positions, attention)
    loss_sum = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / total).backward()
    loss_sum = loss_sum.detach()
    if world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(model.parameters(), grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g)
            offset += g.numel()
        loss_sum = flat[-1]
    if freeze_lookback:
        hold_lookback_heads(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss_sum / total)


def hold_lookback_heads(model: Transformer, heads: int = 2) -> None:
    """Zero the gradients that would move the built look-back heads (see init_lookback_heads).

    Left free from the first step, the heads decay (93% -> 39% of attention on the previous token within
    750 steps) before the induction heads that need them have formed; held for a while, they get used.
    """
    attention = model.model.layers[0].self_attn
    for proj, rows in zip((attention.q_proj, attention.k_proj), lookback_rows(model.config, heads)):
        if proj.weight.grad is not None:
            proj.weight.grad[rows] = 0
    embed = model.model.embed_tokens.weight
    if embed.grad is not None:
        embed.grad[:, 0] = 0


# ----------------------------------------------------------------------------------------- bookkeeping

def init_from_checkpoint(model: Transformer, path: Path, start_step: int) -> int:
    """Load an exported model's weights into `model` (the shapes must agree); returns the step to continue at."""
    loaded = load_checkpoint(path, calibration=False).model
    if loaded.config != model.config:
        raise SystemExit(f"error: --init-from {path} holds a different model ({loaded.config}) than this run "
                         f"builds ({model.config}); pass the same --preset and shape options")
    model.load_state_dict(loaded.state_dict())
    return start_step


def save_state(path: Path, model, optimizer, step: int, elapsed: float, eval_seconds: float, args) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed, "eval_seconds": eval_seconds, "args": jsonable(vars(args))}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken checkpoint


def evaluate(model, tokenizer, tasks: list[str], episodes: int, world: int, difficulty: str = "default",
             window_fraction: float | None = None) -> dict[str, float]:
    """Greedy accuracy on held-out seeds 0..episodes-1, the seeds split across ranks."""
    rank = dist.get_rank() if world > 1 else 0
    model.eval()
    counts = torch.tensor([
        quick_eval.count_correct(model, tokenizer, task, range(rank, episodes, world), difficulty, window_fraction)
        for task in tasks
    ], dtype=torch.float64)
    model.train()
    if world > 1:
        dist.all_reduce(counts)
    return {task: round(float(c) / episodes, 4) for task, c in zip(tasks, counts)}


def accuracy_history(out: Path) -> list[dict]:
    """The periodic held-out checks from history.jsonl (step, minutes, loss, accuracy per task)."""
    path = out / "history.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: r[k] for k in ("step", "minutes", "loss", "accuracy_default")} for r in records
            if "accuracy_default" in r]


def log(out: Path, record: dict) -> None:
    with open(out / "history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run(args) -> int:
    """Train (spawning --procs data-parallel worker processes) and finish with evaluation and export."""
    resolve_preset(args)
    check_args(args)
    if args.procs == 1:
        return worker(0, args, None)
    with socket.socket() as sock:  # a free local port for the workers' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args, port), nprocs=args.procs, join=True)
    return 0


def worker(rank: int, args, port: int | None) -> int:
    world = args.procs
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lead = rank == 0
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out / "tokenizer.json"
    if lead:
        build_tokenizer(tokenizer_path)
    barrier(world)
    vocab = token_ids()
    config = model_config(args)
    tokenizer = TextTokenizer.from_file(tokenizer_path, config.eos_token_ids, config.bos_token_id)
    tasks = args.tasks.split(",")

    torch.manual_seed(args.seed)
    model = Transformer(config).init_random(args.seed)
    if args.lookback_init:
        init_lookback_heads(model)
    model.train()
    optimizer = make_optimizer(model, args)
    step, elapsed, eval_seconds = 0, 0.0, 0.0
    state_path = out / STATE_FILE
    if args.init_from is not None and not (args.resume and state_path.is_file()):
        step = init_from_checkpoint(model, args.init_from, args.start_step)
        # The beacon starts as the mean embedding (a neutral point, no particular word), unless the checkpoint is a
        # breadcrumbs student already: then its trained beacon is kept and training continues from it.
        if args.breadcrumbs and not (Path(args.init_from) / BREADCRUMBS_FILE).is_file():
            from kvpilot.training.breadcrumbs import BEACON

            with torch.no_grad():
                table = model.model.embed_tokens.weight
                table[vocab[BEACON]] = table.mean(0)
        if lead:
            print(f"initialised from {args.init_from} at step {step} (fresh optimizer moments)", file=sys.stderr)
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        eval_seconds = state["eval_seconds"]
        if lead:
            print(f"resumed from {state_path} at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    elif lead:
        (out / "history.jsonl").unlink(missing_ok=True)
    if lead:
        (out / "args.json").write_text(json.dumps(jsonable(vars(args)), indent=2))
        print(f"model: {model.num_parameters() / 1e6:.2f} M parameters; {config}", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress or not lead, dynamic_ncols=True, mininterval=5)
    started = time.monotonic() - elapsed
    last_save = time.monotonic()
    smoothed, window_tokens, window_start = None, 0, time.monotonic()
    while step < args.steps:
        batch = make_batch(args, step, vocab)
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = learning_rate(args, step)
        hold = args.lookback_init and step < args.lookback_hold
        loss = train_step(model, optimizer, batch, args, world, freeze_lookback=hold)
        step += 1
        window_tokens += batch[0].numel()
        smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed:.3f}", T=batch[0].shape[1], refresh=False)
        record = None
        if step % 50 == 0:
            now = time.monotonic()
            record = {"step": step, "minutes": round((now - started) / 60, 2), "loss": round(smoothed, 4),
                      "lr": learning_rate(args, step), "tokens_per_s": round(window_tokens / (now - window_start))}
            window_tokens, window_start = 0, now
        if step % args.eval_every == 0 or step == args.steps:
            t0 = time.monotonic()
            scores = evaluate(model, tokenizer, tasks, args.eval_episodes, world)
            eval_seconds += time.monotonic() - t0
            window_start += time.monotonic() - t0  # keep evaluation out of the throughput figure
            record = {**(record or {"step": step, "minutes": round((time.monotonic() - started) / 60, 2),
                                    "loss": round(smoothed, 4)}), "accuracy_default": scores}
            if lead:
                bar.write(f"step {step} ({(time.monotonic() - started) / 60:.1f} min) loss {smoothed:.3f} "
                          f"default accuracy {scores}")
        if record and lead:
            log(out, record)
        elapsed = time.monotonic() - started
        # The lead decides on wall-clock events and tells the others, so all ranks stay in step.
        flags = torch.tensor([
            time.monotonic() - last_save > 60 * args.checkpoint_minutes or step == args.steps,
            args.time_limit_minutes is not None and elapsed > 60 * args.time_limit_minutes,
        ], dtype=torch.int32)
        if world > 1:
            dist.broadcast(flags, 0)
        save, out_of_time = bool(flags[0]) or bool(flags[1]), bool(flags[1])
        if save and lead:
            save_state(state_path, model, optimizer, step, elapsed, eval_seconds, args)
        if save:
            last_save = time.monotonic()
        if out_of_time:
            if lead:
                bar.write(f"time limit reached at step {step}; continue with --resume")
            return 0
    bar.close()

    final = finish(model, tokenizer, tokenizer_path, tasks, args, step, elapsed, eval_seconds, world)
    if lead:
        print(json.dumps(final, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return 0


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def jsonable(d: dict) -> dict:
    """The run's arguments as JSON (paths as strings; the CLI's handler function left out)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items() if not callable(v)}


def finish(model, tokenizer, tokenizer_path: Path, tasks: list[str], args, step: int, elapsed: float,
           eval_seconds: float, world: int) -> dict:
    """Final held-out evaluation, HF export and training.json (the recipe and the measured results)."""
    n = args.final_episodes
    n_hard = max(1, n // 4)
    started = time.monotonic()
    full = evaluate(model, tokenizer, tasks, n, world)
    hard = evaluate(model, tokenizer, tasks, n_hard, world, difficulty="hard")
    window = evaluate(model, tokenizer, ["multihop"], n, world, window_fraction=0.25) if "multihop" in tasks else {}
    curriculum = CURRICULA[args.curriculum]
    trains_long = any("long" in phase.weights for phase in curriculum)
    n_long = max(1, n // 10)  # 1,000-2,000-token episodes: a tenth as many
    long = evaluate(model, tokenizer, tasks, n_long, world, difficulty="long") if trains_long else None
    summary = {
        "recipe": {k: v for k, v in jsonable(vars(args)).items() if k not in ("resume", "no_progress", "export", "out")},
        "curriculum": [{"until": p.until, "weights": p.weights} for p in curriculum],
        "parameters": model.num_parameters(),
        "steps": step,
        "train_wall_minutes": round((elapsed - eval_seconds) / 60, 1),
        "periodic_eval_minutes": round(eval_seconds / 60, 1),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.procs} processes x {args.threads} threads",
        "eval": {
            "seeds": f"0..N-1 per task (training seeds are >= {TRAIN_SEED_BASE})",
            "episodes_per_task": n,
            "default_full_cache": full,
            "hard_episodes_per_task": n_hard,
            "hard_full_cache": hard,
            "multihop_default_sink4_window25": window.get("multihop"),
            **({"long_episodes_per_task": n_long, "long_full_cache": long} if long is not None else {}),
            "final_eval_minutes": round((time.monotonic() - started) / 60, 1),
        },
        "accuracy_history": accuracy_history(args.out),
    }
    if dist.is_initialized() and dist.get_rank() != 0:
        return summary
    model_dir = args.out / "model"
    for directory in [model_dir] + ([args.export] if args.export is not None else []):
        save_checkpoint(model, tokenizer_path, directory)
        (directory / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.breadcrumbs:  # what makes the decoder accept policy breadcrumbs for this checkpoint
            from kvpilot.training.breadcrumbs import BEACON

            (directory / BREADCRUMBS_FILE).write_text(json.dumps(
                {"beacon": BEACON, "trained_c": [int(c) for c in args.breadcrumbs.split(",")]}, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as `run` takes it, preset resolved."""
    parser = argparse.ArgumentParser(prog="kvpilot train-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return resolve_preset(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
