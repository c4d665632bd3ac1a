"""The training script: deterministic batches, exact resume, and an export both loaders read (tiny settings)."""
from __future__ import annotations

import json

import torch

from decoder_service.checkpoint import load_checkpoint
from kvpilot.tasks.vocab import PAD, token_ids
from kvpilot import cli
from kvpilot.training import train_model

TINY = ["--hidden", "32", "--heads", "2", "--kv-heads", "2", "--intermediate", "64", "--layers", "2",
        "--batch-tokens", "512", "--warmup", "2", "--drill-warmup", "1", "--lookback-hold", "2", "--procs", "1",
        "--threads", "1", "--eval-every", "1000", "--eval-episodes", "1", "--final-episodes", "1", "--no-progress"]


def parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    train_model.add_arguments(parser)
    return parser.parse_args([*TINY, *argv])


def test_batches_are_a_pure_function_of_seed_and_step():
    vocab = token_ids()
    args = parse("--steps", "100")
    first = train_model.make_batch(args, 57, vocab)
    again = train_model.make_batch(args, 57, vocab)
    other = train_model.make_batch(parse("--steps", "100", "--seed", "1"), 57, vocab)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert first[0].shape != other[0].shape or not torch.equal(first[0], other[0])
    inputs, targets, mask = first
    assert inputs.numel() <= 512 and mask.any()
    assert not (targets[mask] == vocab[PAD]).any()  # padding is never a training target
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # next-token targets


def test_resume_continues_the_same_run_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # The straight run goes through `kvpilot train-model` itself (its arguments carry the CLI's handler).
    # It also runs a held-out check at step 2 (evaluation must not disturb the run).
    assert cli.main(["train-model", *TINY, "--steps", "4", "--eval-every", "2", "--out", str(straight)]) == 0
    # Same run cut after 2 steps (the time limit stops it at once) and resumed: identical weights.
    assert train_model.run(parse("--steps", "4", "--out", str(split), "--time-limit-minutes", "0")) == 0
    assert torch.load(split / "state.pt", weights_only=False)["step"] == 1
    assert train_model.run(parse("--steps", "4", "--out", str(split), "--resume")) == 0
    a = torch.load(straight / "state.pt", weights_only=False)
    b = torch.load(split / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)

    recorded = json.loads((straight / "args.json").read_text())
    assert recorded["steps"] == 4 and "func" not in recorded
    exported = load_checkpoint(straight / "model")
    assert exported.config.hidden_size == 32 and exported.tokenizer.vocab_size == exported.config.vocab_size
    summary = json.loads((straight / "model" / "training.json").read_text())
    assert summary["steps"] == 4 and set(summary["eval"]["default_full_cache"]) == {"multihop", "variables", "graph"}
    assert [h["step"] for h in summary["accuracy_history"]] == [2, 4]
    assert set(summary["accuracy_history"][0]["accuracy_default"]) == {"multihop", "variables", "graph"}
