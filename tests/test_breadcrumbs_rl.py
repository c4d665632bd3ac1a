"""Breadcrumbs' RL + distillation stage (kvpilot/training/breadcrumbs_rl.py): the objective's pieces by hand, the
log-probabilities it trains on equal the engine's (so RL optimises the served model), bad arguments, and a short
end-to-end run on the bundled student that exports a checkpoint the engine accepts."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest
import torch

from decoder_service.engine import Engine, EngineConfig
from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams
from kvpilot.models import BUNDLED_MODELS
from kvpilot.training import breadcrumbs_rl
from kvpilot.training.breadcrumbs_rl import group_advantages, policy_gradient_loss, rollout_batch, token_logprobs
from policy_service.local import InProcessPolicy

BEACON, PAD = 7, 2
PROMPT = list(range(20, 44))
STUDENT = BUNDLED_MODELS["reasoner-v2-breadcrumbs"]


def test_group_advantages_subtract_each_groups_mean():
    assert group_advantages([1, 0, 0, 0, 1, 1, 1, 1], group=4) == [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]


@pytest.mark.parametrize("c", [3, 4])
def test_rollout_logprobs_equal_the_engines_under_beacons(tiny_model, c):
    """Two sampled rollouts of different lengths, batched with padding: each token's log-probability from the
    training-mask pass equals what the engine gives the same tokens replayed under policy breadcrumbs."""
    loaded = dataclasses.replace(tiny_model, beacon_token_id=BEACON)
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=2 << 20), policy=InProcessPolicy())
    compression = CompressionConfig(policy="breadcrumbs", params={"c": str(c)})
    rollouts = engine.generate([
        GenerationRequest(f"s{n}", PROMPT, SamplingParams(temperature=1.0, seed=n, max_new_tokens=n, ignore_eos=True),
                          compression=compression) for n in (9, 14)])
    bos = tiny_model.config.bos_token_id
    sequences = [([bos] + PROMPT + r.token_ids, 1 + len(PROMPT)) for r in rollouts]
    batch = rollout_batch(sequences, c, BEACON, PAD)
    with torch.no_grad():
        logp = token_logprobs(tiny_model.model, batch)
    for row, r in enumerate(rollouts):
        [replayed] = engine.generate([GenerationRequest(
            f"f{row}", PROMPT, SamplingParams(temperature=0, max_new_tokens=len(r.token_ids), ignore_eos=True),
            compression=compression, forced_tokens=r.token_ids)])
        mask = batch[2][row]
        assert int(mask.sum()) == len(r.token_ids)  # every generated token is a target, no beacon is
        assert batch[1][row][mask].tolist() == r.token_ids
        assert torch.allclose(logp[row][mask], torch.tensor([s.logprob for s in replayed.replay]), atol=1e-4)


def test_policy_gradient_raises_the_better_rollout_and_lowers_the_worse(tiny_model):
    model = tiny_model.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    bos = tiny_model.config.bos_token_id
    sequences = [([bos] + PROMPT + [50, 51, 52, 53, 54], 1 + len(PROMPT)), ([bos] + PROMPT + [60, 61, 62], 1 + len(PROMPT))]
    batch = rollout_batch(sequences, 2, BEACON, PAD)

    def mean_logp():
        lp = token_logprobs(model, batch)
        return (lp * batch[2]).sum(1) / batch[2].sum(1)

    try:
        before = mean_logp().detach()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        policy_gradient_loss(token_logprobs(model, batch), batch[2], [0.5, -0.5]).backward()
        optimizer.step()
        after = mean_logp().detach()
        assert after[0] > before[0] and after[1] < before[1]
    finally:
        model.load_state_dict(weights)  # the session-wide fixture stays as it was


def parse(*extra):
    parser = argparse.ArgumentParser()
    breadcrumbs_rl.add_arguments(parser)
    return parser.parse_args(["--student", str(STUDENT), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--cs", "1"], "--cs takes beacon intervals"),
    (["--cs", "4,x"], "--cs takes beacon intervals"),
    (["--tasks", "variables,chess"], "unknown task"),
    (["--tasks", "variables,multihop"], "single-pass tasks"),
    (["--difficulty", "brutal"], "--difficulty must be"),
    (["--group", "1"], "--group must be >= 2"),
    (["--prompts", "0"], "--prompts must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--temperature", "0"], "--temperature must be in (0, 2]"),
    (["--lr", "0.5"], "--lr must be in"),
    (["--distill-weight", "-1"], "--distill-weight must be >= 0"),
    (["--distill-tokens", "10"], "--distill-tokens must be >= 64"),
])
def test_bad_arguments_are_refused_with_what_to_fix(extra, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        breadcrumbs_rl.check_args(parse(*extra))


def test_a_student_without_a_beacon_is_refused():
    args = parse()
    args.student = BUNDLED_MODELS["reasoner-v2"]
    with pytest.raises(SystemExit, match="not a beacon-trained checkpoint"):
        breadcrumbs_rl.check_args(args)


def test_a_short_run_exports_a_student_the_engine_serves_and_resumes(tmp_path):
    from decoder_service.checkpoint import load_checkpoint

    out = tmp_path / "rl"
    argv = ["--student", str(STUDENT), "--out", str(out), "--steps", "1", "--prompts", "1", "--group", "2",
            "--cs", "8", "--tasks", "variables", "--eval-every", "1", "--eval-episodes", "1", "--distill-tokens", "512",
            "--no-progress"]
    assert breadcrumbs_rl.main(argv) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1] and "validation" in history[1] and history[1]["c"] == 8
    assert history[1]["distill_loss"] > 0
    model_dir = out / "model"
    summary = json.loads((model_dir / "training-rl.json").read_text())
    assert summary["steps"] == 1 and summary["command"].startswith("kvpilot train-breadcrumbs-rl")
    student = load_checkpoint(model_dir)
    assert student.beacon_token_id is not None  # breadcrumbs.json came along: policy breadcrumbs accepts it
    changed = any(not torch.equal(a, b) for a, b in zip(student.model.state_dict().values(),
                                                        load_checkpoint(STUDENT).model.state_dict().values()))
    assert changed
    # Resuming a finished run does no further step and exports again.
    assert breadcrumbs_rl.main(argv + ["--resume"]) == 0
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
