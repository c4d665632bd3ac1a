"""ForesightKV: the decoder's features against slow references, the projection trick (kv_features + the rest of
fc1 = the full MLP on raw features), the ranking loss and overlap on hand-made cases, a short training run that
learns, weights round trip, remote = in-process plans, and the clear errors (another model's file, bad files);
stage 2 (GRPO): fold/unfold, the reward and advantages by hand, the clipped policy step, one real step end to end."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import random_foresight
from decoder_service.calibration import weights_fingerprint
from decoder_service.remote_policy import RemotePolicy
from decoder_service.requests import CompressionConfig, GenerationRequest, InvalidRequest, SamplingParams
from decoder_service.statistics import FORESIGHT_SUMS, attention_features
from kvpilot.training.train_scorer import (Compression, ScorerMLP, features, fold, mean_overlap, overlap, rank_hinge_loss,
                                          standardisation, train)
from kvpilot_protocol.features import decode_feature_weights, encode_feature_weights
from kvpilot_protocol.policy import PolicyRejected
from policy_service.local import InProcessPolicy
from policy_service.scorers.foresight import Foresight, ForesightWeights, attention_inputs, sample_evictions
from policy_service.server import BackgroundPolicyServer

PROMPT = list(range(3, 123))


def request(params, budget=40, n=40, seed=3):
    return GenerationRequest("r", list(PROMPT), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, seed=seed),
                             compression=CompressionConfig(policy="foresight", budget=budget, interval=8, window=8,
                                                           sinks=4, params=dict(params)))


def frames_of(engine, params, **kw):
    """Run one foresight request and return the frames its policy saw (and the final event)."""
    frames = []
    decide = engine.compressor.policy.decide
    engine.compressor.policy.decide = lambda frame, name, p=None: (frames.append(frame), decide(frame, name, p))[1]
    [result] = engine.generate([request(params, **kw)])
    return frames, result


# ---- features ------------------------------------------------------------------------------------------------
def test_attention_features_match_a_slow_reference():
    probs = torch.rand(2, 3, 40, 7)  # [L, Hq, w, n]
    got = attention_features(probs)
    assert got.shape == (2, 3, 7, 6)
    for layer in range(2):
        for head in range(3):
            for slot in range(7):
                column = [float(probs[layer, head, q, slot]) for q in range(40)]
                expected = [max(column), min(column), sum(column)] + [sum(column[-k:]) for k in FORESIGHT_SUMS]
                assert got[layer, head, slot].tolist() == pytest.approx(expected, rel=1e-5)


def test_projection_trick_gives_the_full_mlp_on_raw_features(make_engine, tiny_model, tmp_path, make_checkpoint):
    """Two runs reach the same first compression: one whose scorer ships an identity projection (the frame then
    holds [k, v] raw), one with a real 16-wide scorer. The decoder's kv_features equal [k, v] @ [W_key; W_value],
    and the scorer's eviction scores equal fc2(GELU(fc1([k, v, a]))) computed on raw features."""
    config = tiny_model.config
    fingerprint = weights_fingerprint(make_checkpoint("llama"))
    real = random_foresight(config, seed=7, fingerprint=fingerprint)
    D = config.head_dim
    eye = torch.eye(2 * D)
    identity = ForesightWeights(w_key=eye[:D].expand(config.num_layers, config.num_kv_heads, D, 2 * D).clone(),
                                w_value=eye[D:].expand(config.num_layers, config.num_kv_heads, D, 2 * D).clone(),
                                w_attention=torch.zeros(*real.w_attention.shape[:3], 2 * D),
                                b1=torch.zeros(config.num_layers, config.num_kv_heads, 2 * D),
                                w2=torch.zeros(config.num_layers, config.num_kv_heads, 2 * D),
                                b2=torch.zeros(config.num_layers, config.num_kv_heads),
                                metadata={"model_fingerprint": fingerprint})
    real.save(tmp_path / "real.safetensors")
    identity.save(tmp_path / "identity.safetensors")
    raw, _ = frames_of(make_engine(), {"weights": str(tmp_path / "identity.safetensors")})
    projected, _ = frames_of(make_engine(), {"weights": str(tmp_path / "real.safetensors")})
    a, b = raw[0], projected[0]
    assert a.n == b.n and a.stats["kv_features"].shape[-1] == 2 * D and b.stats["kv_features"].shape[-1] == 16
    kv = a.stats["kv_features"]  # [L, H, n, 2D] = [k, v]
    expected = torch.einsum("lhnd,lhdr->lhnr", kv, torch.cat([real.w_key, real.w_value], dim=2))
    torch.testing.assert_close(b.stats["kv_features"], expected, rtol=1e-4, atol=1e-4)
    full_w1 = torch.cat([real.w_key, real.w_value, real.w_attention], dim=2)  # fc1 on [k, v, a]
    x = torch.cat([kv, attention_inputs(a)], dim=-1)
    hidden = torch.einsum("lhnf,lhfr->lhnr", x, full_w1) + real.b1[:, :, None]
    direct = torch.einsum("lhnr,lhr->lhn", F.gelu(hidden), real.w2) + real.b2[:, :, None]
    from policy_service.scorers.foresight import Foresight

    scorer = Foresight.from_params({"weights": str(tmp_path / "real.safetensors")})
    torch.testing.assert_close(scorer.eviction_scores(b), direct, rtol=1e-4, atol=1e-4)


def test_wire_carries_projections_not_raw_kv(make_engine):
    """The 16-wide kv_features instead of 2D raw numbers per slot (the tiny model: D = 16, so 16 vs 32)."""
    frames, result = frames_of(make_engine(), {})
    assert result.usage.compression_events > 0 and result.usage.fallbacks == 0
    frame = frames[0]
    assert frame.stats["kv_features"].shape == (2, 2, frame.n, 16)
    assert frame.stats["attention_features"].shape == (2, 4, frame.n, 6)
    assert not {"keys", "values"} & set(frame.stats)


# ---- selection -----------------------------------------------------------------------------------------------
def test_sampling_draws_only_among_the_top_two_d_and_is_seeded():
    scores = torch.arange(20, dtype=torch.float32).repeat(3, 1)  # slot i has eviction score i
    scores[:, 18:] = float("-inf")  # protected
    picks = [sample_evictions(scores, 4, torch.Generator().manual_seed(s)) for s in range(20)]
    for p in picks:
        assert p.shape == (3, 4) and all(len(set(row.tolist())) == 4 for row in p)
        assert set(p.flatten().tolist()) <= set(range(10, 18))  # the 8 best unprotected
    assert len({tuple(p.flatten().tolist()) for p in picks}) > 1  # sampled, not top-k
    assert torch.equal(sample_evictions(scores, 4, torch.Generator().manual_seed(1)),
                       sample_evictions(scores, 4, torch.Generator().manual_seed(1)))
    assert sorted(sample_evictions(scores, 4, None, sample=False)[0].tolist()) == [14, 15, 16, 17]


def test_plan_keeps_the_protected_slots_and_the_budget(make_engine):
    frames, _ = frames_of(make_engine(), {"sample": "false"})
    scorer = InProcessPolicy().scorer("foresight", {"sample": "false"})
    for frame in frames:
        plan = scorer.plan(frame)
        assert plan.indices.shape == (2, 2, frame.keep)
        protected = frame.protected_mask().nonzero().squeeze(1)
        for row in plan.indices.reshape(-1, frame.keep):
            assert set(protected.tolist()) <= set(row.tolist()) and row.tolist() == sorted(set(row.tolist()))


# ---- training --------------------------------------------------------------------------------------------------
def hand_event(golden, drop=2):
    n = golden.shape[-1]
    return Compression(kv=torch.zeros(1, 1, n, 4).half(), attention=torch.zeros(1, 1, n, 8), golden=golden,
                       candidates=torch.ones(n, dtype=torch.bool), drop=drop)


def test_rank_hinge_loss_on_a_hand_made_case():
    golden = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    ideal = -golden * 10  # evict the lowest golden first, with gaps far above the margin
    assert float(rank_hinge_loss(ideal, golden, torch.ones(4, dtype=torch.bool), 64, torch.Generator().manual_seed(0))) == 0.0
    reversed_ = golden.clone()
    loss = rank_hinge_loss(reversed_, golden, torch.ones(4, dtype=torch.bool), 64, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same pairs, by hand
    i, j = torch.randint(4, (64,), generator=g), torch.randint(4, (64,), generator=g)
    terms = [0.01 + abs(float(golden[0, 0, a] - golden[0, 0, b])) for a, b in zip(i.tolist(), j.tolist()) if a != b]
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_overlap_with_golden_on_a_hand_made_case():
    event = hand_event(torch.tensor([[[0.5, 0.1, 0.4, 0.2, 0.3]]]), drop=2)  # golden evicts slots 1 and 3
    assert overlap(torch.tensor([[[0.0, 9.0, 0.0, 8.0, 0.0]]]), event) == 1.0
    assert overlap(torch.tensor([[[0.0, 9.0, 8.0, 0.0, 0.0]]]), event) == 0.5
    assert overlap(torch.tensor([[[9.0, 0.0, 8.0, 0.0, 0.0]]]), event) == 0.0


def synthetic_events(count, seed):
    """Compressions whose golden score is a linear function of two inputs: learnable, and not trivially."""
    g = torch.Generator().manual_seed(seed)
    events = []
    for _ in range(count):
        kv = torch.randn(2, 2, 30, 8, generator=g)
        attention = torch.rand(2, 2, 30, 8, generator=g)
        golden = attention[..., 0] - 0.5 * kv[..., 1]
        events.append(Compression(kv=kv.half(), attention=attention, golden=golden,
                                  candidates=torch.ones(30, dtype=torch.bool), drop=10))
    return events


def test_a_short_training_run_lowers_the_loss_and_raises_the_overlap():
    train_events, held_out = synthetic_events(24, 0), synthetic_events(8, 1)
    untrained, *_ = train(train_events, held_out, 4, steps=1, lr=1e-9, batch=4, hidden=16, seed=0, log=lambda *_: None)
    mlp, mean, std, curve = train(train_events, held_out, 4, steps=80, lr=1e-2, batch=4, hidden=16, seed=0,
                                  log=lambda *_: None, eval_every=20)
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"] or curve[-1]["loss"] < 0.005, curve
    assert curve[-1]["held_out_overlap"] > 0.8 > curve[0]["held_out_overlap"] - 0.3, curve
    # Folding the standardisation into fc1 gives the same scores on raw features.
    folded = fold(mlp, mean, std, 4, {})
    e = held_out[0]
    raw = torch.cat([e.kv.float(), e.attention], dim=-1)
    kv_part = torch.einsum("lhnd,lhdr->lhnr", raw[..., :4], folded.w_key) + torch.einsum(
        "lhnd,lhdr->lhnr", raw[..., 4:8], folded.w_value)
    with torch.no_grad():
        expected = mlp((raw - mean[:, :, None]) / std[:, :, None])
    torch.testing.assert_close(folded.eviction_scores(kv_part, raw[..., 8:]), expected, rtol=1e-4, atol=1e-4)
    assert mean_overlap(held_out, lambda ev: folded.eviction_scores(
        torch.einsum("lhnd,lhdr->lhnr", ev.kv.float()[..., :4], folded.w_key)
        + torch.einsum("lhnd,lhdr->lhnr", ev.kv.float()[..., 4:], folded.w_value), ev.attention)) > 0.8


def test_standardisation_is_per_layer_head_and_input():
    events = synthetic_events(3, 2)
    mean, std = standardisation(events)
    assert mean.shape == std.shape == (2, 2, 16) and (std > 0).all()
    assert math.isclose(float(mean[0, 0, 8]), float(torch.cat([e.attention[0, 0, :, 0] for e in events]).mean()),
                        rel_tol=1e-4)


# ---- files, wire, errors ---------------------------------------------------------------------------------------
def test_weights_round_trip(tmp_path, tiny_model):
    weights = random_foresight(tiny_model.config, seed=3, fingerprint="ab" * 32)
    path = weights.save(tmp_path / "w.safetensors", command="kvpilot train-scorer foresight")
    back = ForesightWeights.read(path)
    for name in ForesightWeights.TENSORS:
        assert torch.equal(getattr(back, name), getattr(weights, name))
    assert back.metadata["model_fingerprint"] == "ab" * 32 and back.metadata["command"].startswith("kvpilot")
    assert back.shape == {"layers": 2, "kv_heads": 2, "head_dim": 16, "hidden": 16, "group": 2}


def test_feature_weights_blob_round_trip_and_rejects_garbage():
    key, value = torch.randn(2, 2, 16, 5), torch.randn(2, 2, 16, 5)
    k, v = decode_feature_weights(encode_feature_weights(key, value))
    assert torch.equal(k, key) and torch.equal(v, value)
    with pytest.raises(ValueError, match="safetensors"):
        decode_feature_weights(b"not a blob")
    with pytest.raises(ValueError, match="NaN"):
        decode_feature_weights(encode_feature_weights(key * float("nan"), value))


def test_remote_and_in_process_give_identical_plans(make_engine):
    frames, _ = frames_of(make_engine(), {})
    assert len(frames) >= 3
    with BackgroundPolicyServer() as server:
        remote = RemotePolicy(server.address)
        try:
            assert remote.wait_until_available(10)
            for frame in frames:
                local = InProcessPolicy().decide(frame, "foresight", {})
                key = remote.submit(frame, "foresight", {}, {})
                deadline = time.monotonic() + 10
                while (result := remote.poll(key)) is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert result is not None and not isinstance(result, Exception) and not result.note
                assert torch.equal(result.plan.indices, local.plan.indices)
            described = remote.describe("foresight", {})
            assert described.spec == InProcessPolicy().describe("foresight", {}).spec  # the weights travel intact
        finally:
            remote.close()


def test_a_scorer_trained_for_another_model_is_refused(make_engine, tiny_model, tmp_path):
    other = random_foresight(tiny_model.config, fingerprint="0" * 64).save(tmp_path / "other.safetensors")
    with pytest.raises(InvalidRequest, match="trained for the model with weights sha256 000000000000"):
        make_engine().add_request(request({"weights": str(other)}), lambda ev: None)
    config = tiny_model.config
    wrong = random_foresight(type(config)(**{**config.__dict__, "num_layers": 3})).save(tmp_path / "wrong.safetensors")
    with pytest.raises(InvalidRequest, match=r"\[layers, KV heads, head dim\] = \[3, 2, 16\]"):
        make_engine().add_request(request({"weights": str(wrong)}), lambda ev: None)


def test_bad_weights_parameters_are_clear_errors(tmp_path):
    policy = InProcessPolicy()
    with pytest.raises(PolicyRejected, match="no weights file"):
        policy.describe("foresight", {"weights": str(tmp_path / "missing.safetensors")})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(PolicyRejected, match="cannot read .* as safetensors"):
        policy.describe("foresight", {"weights": str(tmp_path / "junk.safetensors")})
    encode = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(encode), metadata={"format": "something-else"})
    with pytest.raises(PolicyRejected, match="not a foresight weights file"):
        policy.describe("foresight", {"weights": str(encode)})
    with pytest.raises(PolicyRejected, match="sample"):
        policy.describe("foresight", {"sample": "maybe"})
    with pytest.raises(PolicyRejected, match="at most 4096"):
        policy.describe("foresight", {"weights": "x" * 5000})


def test_a_bundled_model_name_selects_the_weights_beside_it():
    from kvpilot.models import BUNDLED_MODELS

    for name in ("reasoner", "reasoner-v2"):  # the bundled models that ship foresight weights
        directory = BUNDLED_MODELS[name]
        assert Foresight.from_params({"weights": name}).path.resolve() == (directory / "foresight.safetensors").resolve()
    assert Foresight.from_params({"weights": "reasoner"}).model.metadata["model_fingerprint"] == \
        weights_fingerprint(BUNDLED_MODELS["reasoner"])


# ---- stage 2: GRPO ---------------------------------------------------------------------------------------------
def test_unfold_inverts_fold():
    from kvpilot.training.foresight_grpo import unfold

    events = synthetic_events(2, 5)
    mean, std = standardisation(events)
    mlp = ScorerMLP(2, 2, 16, 16, seed=1)
    back = unfold(fold(mlp, mean, std, 4, {}), mean, std)
    x = (features(events[0]) - mean[:, :, None]) / std[:, :, None]
    with torch.no_grad():
        torch.testing.assert_close(back(x), mlp(x), rtol=1e-4, atol=1e-4)


def test_reward_counts_only_large_deteriorations_on_low_entropy_tokens():
    from kvpilot.bench.fidelity import ReplayCase
    from kvpilot.training.foresight_grpo import Trace, reward

    case = ReplayCase(0, list(range(8)), 3, [True] * 5)
    full = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1])
    low = torch.tensor([False, True, True, True, False])  # token 4 is high-entropy: ignored
    trace = Trace(case, budget=4, full_loss=full, low_entropy=low)
    compressed_nll = [0.1, 2.1, 0.5, 3.1, 9.0]  # deltas on the low tokens: -2.0, -0.4 (small), -3.0
    assert reward(trace, [-v for v in compressed_nll]) == pytest.approx(-(4.0 + 0.0 + 9.0) / 3, rel=1e-5)
    assert reward(Trace(case, 4, full, torch.zeros(5, dtype=torch.bool)), [-v for v in compressed_nll]) == 0.0


def test_group_advantages_are_z_scores_within_each_group():
    from kvpilot.training.foresight_grpo import group_advantages

    a = group_advantages(torch.tensor([[1.0, 3.0], [-2.0, -2.0], [0.0, 6.0]]))
    torch.testing.assert_close(a, torch.tensor([[-1.0, 1.0], [0.0, 0.0], [-1.0, 1.0]]))


def test_grpo_step_moves_probability_towards_advantaged_evictions_and_clips():
    from kvpilot.training.foresight_grpo import Step, candidate_log_probs, grpo_loss

    events = synthetic_events(1, 6)
    mean, std = standardisation(events)
    x = (features(events[0]) - mean[:, :, None]) / std[:, :, None]
    candidates = torch.ones(30, dtype=torch.bool)
    candidates[:2] = False
    evicted = torch.arange(2, 7).expand(2, 2, 5).contiguous()

    def logp_after(advantage: float) -> Tensor:
        mlp = ScorerMLP(2, 2, 16, 16, seed=2)
        with torch.no_grad():
            old = candidate_log_probs(mlp(x), candidates).gather(-1, evicted)
        loss = grpo_loss(mlp, mlp, Step(x.half(), candidates, evicted, old), advantage, clip=0.2, beta=0.0)
        loss.backward()
        with torch.no_grad():
            for p in mlp.parameters():
                p -= 0.05 * p.grad
            return candidate_log_probs(mlp(x), candidates).gather(-1, evicted).sum() - old.sum()

    assert logp_after(1.0) > 0 > logp_after(-1.0)
    # A ratio already past 1 + clip with a positive advantage gives no gradient.
    mlp = ScorerMLP(2, 2, 16, 16, seed=2)
    with torch.no_grad():
        old = candidate_log_probs(mlp(x), candidates).gather(-1, evicted) - 1.0
    grpo_loss(mlp, mlp, Step(x.half(), candidates, evicted, old), 1.0, clip=0.2, beta=0.0).backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in mlp.parameters())


def test_rl_stage_runs_end_to_end_on_the_bundled_model(tmp_path):
    """One GRPO step on real rollouts through the engine: weights for the same model, the recipe beside them."""
    from kvpilot.cli import main
    from kvpilot.models import BUNDLED_MODEL

    out = tmp_path / "rl.safetensors"
    assert main(["train-scorer", "foresight", "--stage", "rl", "--tasks", "multihop", "--rl-steps", "1",
                 "--traces", "1", "--group", "2", "--rl-episodes", "1", "--eval-episodes", "1",
                 "--out", str(out), "--work-dir", str(tmp_path), "--threads", "1"]) == 0
    weights = ForesightWeights.read(out)
    assert weights.metadata["stage"] == "supervised+grpo"
    assert weights.metadata["model_fingerprint"] == weights_fingerprint(BUNDLED_MODEL)
    recipe = json.loads(out.with_suffix(".json").read_text())
    assert [p["step"] for p in recipe["curve"]] == [0, 1] and "held_out_penalty" in recipe["curve"][-1]
    assert (tmp_path / "rl_curve.png").stat().st_size > 0


def test_rl_stage_refuses_bad_settings(tmp_path):
    from kvpilot.cli import main

    with pytest.raises(SystemExit, match="--group must be in"):
        main(["train-scorer", "foresight", "--stage", "rl", "--group", "1", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--difficulty takes easy, default, hard, long"):
        main(["train-scorer", "foresight", "--difficulty", "default,extreme", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--tasks takes a comma-separated list"):
        main(["train-scorer", "foresight", "--tasks", "sudoku", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no supervised weights"):
        main(["train-scorer", "foresight", "--stage", "rl", "--init", str(tmp_path / "none.safetensors"),
              "--work-dir", str(tmp_path)])
