"""`kvpilot calibrate --model DIR [--tokens N] [--seed S]`: measure TriAttention's query centres of a model.

Writes `triattention_calibration.safetensors` beside the checkpoint (format: decoder_service/calibration.py):
per (layer, query head, RoPE frequency pair) the mean pre-RoPE query and its mean modulus, with the tokens used,
the seed, the command line and the sha256 of the weights it was measured on. The decoder loads it with the
checkpoint (and refuses it for other weights); policies that need `trig_scores` (triattention, cask) need it.

Corpus: [CHOICE] teacher-forced reference traces of the bundled tasks (each episode's full sequence: prompt,
model turns and tool outputs, <bos> first), one forward pass per episode, tasks taken in turn, difficulties in
turn (default: those the bundled v1 reasoner was trained on; add `long` for a v2 model), until --tokens tokens
(the last sequence cut to fit). Teacher forcing rather than greedy generation: no sampling, a fraction of the
time, and the text the model was trained to produce whatever its accuracy.
Seeds: episode seeds are drawn by --seed from [2,000,000, 2,000,000 + 10^9), disjoint from the evaluation seeds
0..N-1 (kvpilot eval, below 1,000,000). Training draws from >= 1,000,000, so an episode may coincide with a
training one; that is harmless here (the calibration measures the model on its own distribution).
"""
from __future__ import annotations

import datetime
import random
import time
from pathlib import Path

CALIBRATION_SEED_BASE = 2_000_000  # evaluation uses seeds < 1,000,000 (kvpilot.evaluate)
DEFAULT_TOKENS = 32_768


def corpus(tokenizer, max_len: int, tokens: int, seed: int, difficulties: list[str]):
    """Token sequences of reference traces, `tokens` in all; yields lists of token ids."""
    from kvpilot.tasks import TASKS, make_episode

    rng = random.Random(f"calibrate/{seed}")
    tasks = sorted(TASKS)
    left, i = tokens, 0
    while left > 0:
        task, difficulty = tasks[i % len(tasks)], difficulties[(i // len(tasks)) % len(difficulties)]
        episode = make_episode(task, CALIBRATION_SEED_BASE + rng.randrange(10**9), difficulty)
        ids = tokenizer.encode(episode.training_text, add_bos=True)[: min(max_len, left)]
        left -= len(ids)
        i += 1
        yield ids


def run(args) -> int:
    import torch

    from decoder_service.calibration import CALIBRATION_FILE, calibrate, describe_calibration, weights_fingerprint
    from decoder_service.checkpoint import load_checkpoint
    from kvpilot.models import resolve_model
    from kvpilot.tasks import DIFFICULTIES

    if args.tokens < 1:
        raise SystemExit(f"--tokens must be >= 1 (got {args.tokens})")
    difficulties = [d for d in args.difficulties.split(",") if d]
    unknown = sorted(set(difficulties) - set(DIFFICULTIES))
    if unknown or not difficulties:
        raise SystemExit(f"--difficulties takes a comma-separated list of {', '.join(DIFFICULTIES)} (got {args.difficulties!r})")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    start = time.monotonic()
    loaded = load_checkpoint(path, device=args.device, calibration=False)  # a stale calibration is replaced
    command = (f"kvpilot calibrate --model {path} --tokens {args.tokens} --seed {args.seed} "
               f"--difficulties {','.join(difficulties)}")
    sequences = corpus(loaded.tokenizer, loaded.config.max_position_embeddings, args.tokens, args.seed, difficulties)
    result = calibrate(loaded.model, sequences, seed=args.seed, seed_base=CALIBRATION_SEED_BASE,
                       difficulties=",".join(difficulties), command=command,
                       created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       weights_sha256=weights_fingerprint(path))
    out = result.save(path / CALIBRATION_FILE)
    print(f"wrote {out} in {time.monotonic() - start:.1f} s: {describe_calibration(result)}")
    return 0


def add_arguments(p) -> None:
    import torch

    from kvpilot.tasks import V1_DIFFICULTIES

    p.add_argument("--model", help="Hugging Face-format checkpoint directory, or a bundled model by name: reasoner-v2 (the default), reasoner (v1)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens of reference traces to run")
    p.add_argument("--seed", type=int, default=0, help="which episodes (seeds >= 2,000,000, never evaluation's)")
    p.add_argument("--difficulties", default=",".join(V1_DIFFICULTIES), help="comma-separated task difficulties")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)
