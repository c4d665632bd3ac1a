"""The training script: deterministic batches, exact resume, and an export both loaders read (tiny settings);
the v1 recipe unchanged; grouped-query models and the v2 preset."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from decoder_service.checkpoint import load_checkpoint
from decoder_service.model import Transformer, apply_rope
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
    return train_model.resolve_preset(parser.parse_args([*TINY, *argv]))


def test_batches_are_a_pure_function_of_seed_and_step():
    vocab = token_ids()
    args = parse("--steps", "100")
    first = train_model.make_batch(args, 57, vocab)
    again = train_model.make_batch(args, 57, vocab)
    other = train_model.make_batch(parse("--steps", "100", "--seed", "1"), 57, vocab)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert first[0].shape != other[0].shape or not torch.equal(first[0], other[0])
    inputs, targets, mask, _ = first
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


def test_init_from_an_export_continues_at_its_step(tmp_path):
    """A run whose state.pt is gone continues from its exported weights: same weights in, step resumed."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert train_model.run(parse("--steps", "2", "--out", str(first))) == 0
    assert train_model.run(parse("--steps", "3", "--out", str(second), "--init-from", str(first / "model"),
                                 "--start-step", "2", "--time-limit-minutes", "0")) == 0
    state = torch.load(second / "state.pt", weights_only=False)
    assert state["step"] == 3, "one step from the exported step 2"
    exported = load_checkpoint(first / "model").model.state_dict()
    # Started at its last step, the continued run trains nothing and exports exactly the weights it was given.
    same = tmp_path / "same"
    assert train_model.run(parse("--steps", "2", "--out", str(same), "--init-from", str(first / "model"),
                                 "--start-step", "2")) == 0
    for name, tensor in load_checkpoint(same / "model").model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name
    assert any(not torch.equal(t, exported[name]) for name, t in state["model"].items()), "step 3 trained them"
    with pytest.raises(SystemExit, match="--init-from"):
        train_model.run(parse("--steps", "3", "--out", str(second), "--start-step", "2"))
    with pytest.raises(SystemExit, match="different model"):
        train_model.run(parse("--steps", "3", "--out", str(tmp_path / "x"), "--hidden", "64",
                              "--init-from", str(first / "model"), "--start-step", "2"))


# ------------------------------------------------------------------------------- v1 stays reproducible

REPO = Path(__file__).resolve().parents[1]


def test_v1_recipe_is_still_the_default():
    """`kvpilot train-model` with the committed model's command line resolves to its recorded recipe."""
    from kvpilot.cli import build_parser

    committed = json.loads((REPO / "kvpilot/assets/reasoner/training.json").read_text())
    args = train_model.resolve_preset(build_parser().parse_args([
        "train-model", "--out", "runs/reasoner", "--seed", "0", "--steps", "5000", "--eval-every", "500",
        "--eval-episodes", "30", "--final-episodes", "200", "--checkpoint-minutes", "3"]))
    for key, value in committed["recipe"].items():
        assert getattr(args, key) == value, key
    assert args.preset == "v1" and args.curriculum == "v1"
    assert [{"until": p.until, "weights": p.weights} for p in train_model.CURRICULA["v1"]] == committed["curriculum"]
    model = Transformer(train_model.model_config(args))
    assert model.num_parameters() == committed["parameters"]


def test_v1_batches_never_change():
    """Batches of the default recipe, pinned: presets, GQA and the long tasks must not disturb them."""
    import argparse

    parser = argparse.ArgumentParser()
    train_model.add_arguments(parser)
    args = train_model.resolve_preset(parser.parse_args([]))
    digest = hashlib.sha256()
    for step in (0, 450, 1700, 4000):
        inputs, targets, mask, _ = train_model.make_batch(args, step, token_ids())
        digest.update(inputs.numpy().tobytes())
        digest.update(mask.numpy().tobytes())
        digest.update(str(tuple(inputs.shape)).encode())
    assert digest.hexdigest() == "8f5f7a4aa4e3e0cc9e9745a7d467860a6d6c4f91bb303f0fa49c52737cac2b94"


# -------------------------------------------------------------------------------- grouped-query attention

GQA_TINY = ["--hidden", "64", "--heads", "8", "--kv-heads", "2", "--intermediate", "64", "--layers", "2",
            *TINY[TINY.index("--batch-tokens"):]]


def test_trains_a_gqa_model_through_the_cli(tmp_path):
    out = tmp_path / "gqa"
    assert cli.main(["train-model", *GQA_TINY, "--steps", "4", "--out", str(out)]) == 0
    loaded = load_checkpoint(out / "model")
    assert (loaded.config.num_heads, loaded.config.num_kv_heads) == (8, 2)
    assert json.loads((out / "model" / "config.json").read_text())["num_key_value_heads"] == 2
    assert loaded.model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 64)
    from kvpilot.tasks import make_episode

    ids = loaded.tokenizer.encode(make_episode("multihop", 0).training_text, add_bos=True)
    logits = loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None])
    assert logits.shape == (1, len(ids), loaded.config.vocab_size) and torch.isfinite(logits).all()
    summary = json.loads((out / "model" / "training.json").read_text())
    assert summary["recipe"]["kv_heads"] == 2 and summary["steps"] == 4


@pytest.mark.parametrize("heads,kv_heads", [(6, 4), (8, 3), (2, 0)])
def test_rejects_kv_heads_that_do_not_divide_heads(tmp_path, heads, kv_heads):
    with pytest.raises(SystemExit, match="--kv-heads"):
        cli.main(["train-model", *TINY, "--heads", str(heads), "--kv-heads", str(kv_heads), "--out", str(tmp_path)])
    assert not (tmp_path / "args.json").exists()  # rejected before any work


@pytest.mark.parametrize("option, value, message", [
    ("--sidequest-share", "1.5", "share in"), ("--sidequest-drops", "-0.1", "share in"),
    ("--breadcrumbs", "1", "beacon intervals"), ("--breadcrumbs", "4,x", "beacon intervals"),
    ("--breadcrumbs", "300", "beacon intervals"),
])
def test_rejects_bad_sidequest_and_breadcrumbs_options(tmp_path, option, value, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["train-model", *TINY, option, value, "--out", str(tmp_path)])
    assert not (tmp_path / "args.json").exists()  # rejected before any work


def test_rejects_odd_head_dimensions(tmp_path):
    with pytest.raises(SystemExit, match="head dimension"):
        train_model.run(parse("--hidden", "36", "--heads", "4", "--kv-heads", "2", "--out", str(tmp_path)))


def layer0_attention(model) -> torch.Tensor:
    """Layer-0 attention probabilities [heads, T, T] on random tokens, computed from the weights."""
    config = model.config
    t = 40
    ids = torch.randint(4, config.vocab_size, (1, t), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(ids))
    attention = layer.self_attn
    q = attention.q_proj(x).view(1, t, config.num_heads, config.head_dim)
    k = attention.k_proj(x).view(1, t, config.num_kv_heads, config.head_dim)
    cos, sin = model.model.rotary_emb(torch.arange(t)[None])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin).repeat_interleave(config.group_size, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k)[0] / math.sqrt(config.head_dim)
    return scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


@pytest.mark.parametrize("shape", [("6", "6"), ("8", "2"), ("6", "3"), ("6", "1")])
@torch.no_grad()
def test_lookback_heads_work_with_grouped_kv_heads(shape):
    """Heads 0 and 1 of layer 0 attend one and two tokens back whatever the grouping; a K/V head they share
    with ordinary heads keeps its slow RoPE rows (content) trainable while the look-back rows are held."""
    heads, kv_heads = shape
    args = parse("--hidden", "256", "--heads", heads, "--kv-heads", kv_heads)
    model = Transformer(train_model.model_config(args)).init_random(0)
    train_model.init_lookback_heads(model)
    probs = layer0_attention(model)
    for head, offset in ((0, 1), (1, 2)):
        mass = torch.stack([probs[head, p, p - offset] for p in range(3, 40)])
        assert mass.mean() > 0.85, (shape, head, mass.mean())
    config = model.config
    q_rows, k_rows = train_model.lookback_rows(config)
    d = config.head_dim
    assert q_rows == list(range(2 * d))
    if config.group_size == 1:
        assert k_rows == list(range(2 * d))  # v1: each look-back head owns its K/V head
    elif config.group_size == 2:
        assert k_rows == list(range(d))  # both query heads of K/V head 0 look back: all of it
    else:
        assert len(k_rows) == 16 and max(k_rows) < d  # shared: the 8 fastest RoPE pairs only
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    train_model.hold_lookback_heads(model)
    k_grad = model.model.layers[0].self_attn.k_proj.weight.grad
    held = torch.zeros(k_grad.shape[0], dtype=torch.bool)
    held[k_rows] = True
    assert (k_grad[held] == 0).all() and (k_grad[~held] == 1).all()


# ----------------------------------------------------------------------------------------------- v2

def test_v2_preset():
    args = train_model.resolve_preset(parse_plain("--preset", "v2"))
    assert (args.heads, args.kv_heads) == (8, 2) and args.max_positions >= 4096
    model = Transformer(train_model.model_config(args))
    assert 3e6 <= model.num_parameters() <= 8e6
    assert model.config.max_position_embeddings >= 4096 and model.config.group_size == 4
    assert any("long" in phase.weights for phase in train_model.CURRICULA[args.curriculum])
    # Explicit options win over the preset, whatever their order.
    assert train_model.resolve_preset(parse_plain("--layers", "3", "--preset", "v2")).layers == 3
    # Late in a v2 run, long episodes (1,000-2,000 tokens) fill some steps, within the token budget.
    widths = [train_model.make_batch(args, step, token_ids())[0].shape for step in range(4000, 4040)]
    assert max(w[1] for w in widths) > 1000
    assert all(w[0] * w[1] <= args.batch_tokens for w in widths)


def parse_plain(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    train_model.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_breadcrumbs_batches_carry_beacons_and_their_block_mask():
    from kvpilot.training.breadcrumbs import BEACON

    vocab = token_ids()
    args = parse("--steps", "100", "--tasks", "variables,graph", "--breadcrumbs", "4,8", "--drill-warmup", "0",
                 "--drill-share", "0")
    inputs, targets, mask, positions, attend = train_model.make_batch(args, 3, vocab)
    beacon = vocab[BEACON]
    assert (inputs == beacon).any() and not (targets[mask] == beacon).any()  # fed, never a target
    assert attend.shape == (*inputs.shape, inputs.shape[1]) and attend.diagonal(dim1=1, dim2=2).all()
    row = int((inputs == beacon).any(1).nonzero()[0])
    where = (inputs[row] == beacon).nonzero().flatten().tolist()
    first, second = where[0], where[1] if len(where) > 1 else None
    after = first + 1  # the first token after the first beacon sees that beacon, not the window it folded
    assert attend[row, after, first] and not attend[row, after, first - 1]
    if second is not None:
        assert attend[row, second, first] and attend[row, second, second - 1]
