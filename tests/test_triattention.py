"""TriAttention: RoPE inversion, the calibration file, the decoder's trig_scores and pre-RoPE key statistics, the
scorer's selections, the refusal without calibration, the wire, and generation through the engine."""
from __future__ import annotations

import shutil

import pytest
import torch

from decoder_service import calibration as cal
from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.model import ModelConfig, RotaryEmbedding, apply_rope, invert_rope, rope_angles
from decoder_service.requests import (CompressionConfig, EvictionEvent, FinishEvent, GenerationRequest, InvalidRequest,
                                      SamplingParams)
from decoder_service.statistics import build_frame
from kvpilot_protocol import wire
from kvpilot_protocol.frame import KeepSet, StatsFrame
from kvpilot_protocol.policy import ParameterError, StatsSpec
from policy_service.local import InProcessPolicy
from policy_service.registry import make_scorer
from policy_service.scorers.triattention import head_scores, union_select

L, H, HQ, N = 2, 2, 4, 40


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def frame(keep=16, sinks=2, window=4, prompt_len=0, seed=0, positions=None, scores=None, n=N):
    positions = torch.arange(n).expand(L, H, n).clone() if positions is None else positions
    scores = rand(L, HQ, n, seed=seed) if scores is None else scores
    return StatsFrame(frame_id=1, session_id="s", n=n, keep=keep, sinks=sinks, window=window, num_layers=L,
                      num_kv_heads=H, num_heads=HQ, step=0, seed=seed, prompt_len=prompt_len,
                      stats={"trig_scores": scores, "positions": positions})


def random_calibration(layers, heads, half, seed=0) -> cal.TrigCalibration:
    q = torch.complex(rand(layers, heads, half, seed=seed), rand(layers, heads, half, seed=seed + 1))
    return cal.TrigCalibration(q, q.abs() + rand(layers, heads, half, seed=seed + 2).abs())


# ---- RoPE inversion ------------------------------------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope", [dict(rope_scaling=LLAMA3), dict(rope_theta=1_000_000.0)])
def test_invert_rope_round_trips(rope):
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=512, **rope)
    rotary = RotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 7, 31, 200, 511]])
    x = rand(1, 6, 3, config.head_dim)
    cos, sin = rotary(positions)
    rotated = apply_rope(x, cos, sin)
    assert not torch.allclose(rotated[:, 1:], x[:, 1:])
    assert torch.allclose(invert_rope(rotated, cos, sin), x, atol=1e-5)
    # rope_angles gives exactly the model's angles, for any layout of positions.
    c2, s2 = rope_angles(positions, rotary.inv_freq)
    assert torch.equal(c2[:, :, None, :], cos) and torch.equal(s2[:, :, None, :], sin)


# ---- the decoder's statistics --------------------------------------------------------------------------
def direct_trig_scores(calibration, pre_keys, positions, inv_freq, t):
    """The description, literally: pre-RoPE key pairs, amplitude and phase, a sum over the 17 offsets."""
    Lk, Hk, n, D = pre_keys.shape
    hq = calibration.shape[1]
    group = hq // Hk
    k = pre_keys.double().repeat_interleave(group, dim=1)
    k = torch.complex(k[..., :D // 2], k[..., D // 2:])  # [L, Hq, n, F]
    q = calibration.q_mean.to(torch.complex128)[:, :, None, :]
    amp, phi = q.abs() * k.abs(), torch.angle(q * k.conj())
    extra = (calibration.q_abs_mean.double()[:, :, None, :] - q.abs()) * k.abs()
    distance = (t - positions).double().repeat_interleave(group, dim=1)[..., None]
    total = torch.zeros(Lk, hq, n, dtype=torch.float64)
    for o in cal.OFFSETS:
        total += (amp * torch.cos(inv_freq.double() * (distance + o) + phi)).sum(-1) + extra.sum(-1)
    return total / len(cal.OFFSETS)


def test_trig_scores_and_pre_rope_keys_match_a_direct_computation(make_engine):
    """Frames built from a pool region holding post-RoPE keys; rows hold different positions (per-head
    compaction), each scored at its own."""
    engine = make_engine()
    pool, n = engine.pool, 24
    shape = (pool.num_layers, pool.num_kv_heads, n, pool.head_dim)
    positions = torch.stack([torch.stack([torch.arange(n) * (1 + l + h) + 3 * h for h in range(shape[1])])
                             for l in range(shape[0])])  # [L, H, n], different per row
    inv_freq = engine.model.model.rotary_emb.inv_freq
    pre = rand(*shape, seed=4)
    cos, sin = rope_angles(positions, inv_freq)
    kv = pool.allocate("t", n)
    kv.load(apply_rope(pre, cos, sin), rand(*shape, seed=5), positions)
    calibration = random_calibration(shape[0], engine.model_config.num_heads, pool.head_dim // 2)
    spec = StatsSpec(frozenset({"trig_scores", "keys_pre_rope_mean"}))
    f = build_frame(1, "s", kv, None, spec, list(range(int(positions.max()) + 1)), [], keep=8, sinks=1, window=1,
                    num_heads=engine.model_config.num_heads, step=0, seed=0, prompt_len=5, rope_inv_freq=inv_freq,
                    calibration=calibration)
    t = int(positions.max()) + 1
    expected = direct_trig_scores(calibration, pre, positions, inv_freq, t)
    got = f.stats["trig_scores"]
    assert got.shape == (shape[0], engine.model_config.num_heads, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max())
    mean = torch.nn.functional.normalize(pre, dim=-1).mean(dim=(0, 1))
    assert torch.allclose(f.stats["keys_pre_rope_mean"], mean, atol=1e-5)
    assert f.prompt_len == 5
    pool.free("t")


def test_trig_scores_need_the_rotary_frequencies_and_a_calibration(make_engine):
    engine = make_engine()
    kv = engine.pool.allocate("t", 4)
    shape = (engine.pool.num_layers, engine.pool.num_kv_heads, 4, engine.pool.head_dim)
    kv.load(rand(*shape), rand(*shape), torch.arange(4).expand(*shape[:2], 4))
    build = lambda **kw: build_frame(1, "s", kv, None, StatsSpec(frozenset({"trig_scores"})), [0] * 4, [],  # noqa: E731
                                     keep=2, sinks=0, window=0, num_heads=4, step=0, seed=0, **kw)
    with pytest.raises(ValueError, match="rotary frequencies"):
        build(calibration=engine.loaded.calibration)
    with pytest.raises(ValueError, match="kvpilot calibrate"):
        build(rope_inv_freq=engine.model.model.rotary_emb.inv_freq)
    engine.pool.free("t")


# ---- the calibration ------------------------------------------------------------------------------------
def test_calibration_records_the_mean_pre_rope_query(make_checkpoint):
    loaded = load_checkpoint(make_checkpoint("llama", seed=3, calibrate=False))
    tokens = [list(range(5, 45)), list(range(100, 160))]
    captured = []
    hook = loaded.model.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: captured.append(out[0]))  # llama has no q_norm: q_proj is the pre-RoPE query
    result = cal.calibrate(loaded.model, tokens)
    hook.remove()
    d = loaded.config.head_dim
    q = torch.cat(captured).view(-1, loaded.config.num_heads, d).double()
    pairs = torch.complex(q[..., :d // 2], q[..., d // 2:])
    assert torch.allclose(result.q_mean[1].to(torch.complex128), pairs.mean(0), atol=1e-5)
    assert torch.allclose(result.q_abs_mean[1].double(), pairs.abs().mean(0), atol=1e-5)
    assert result.metadata["tokens"] == "100" and result.metadata["sequences"] == "2"


def test_calibration_file_round_trip_and_fingerprint(make_checkpoint, tmp_path):
    src = make_checkpoint("llama", seed=3, calibrate=False)
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    assert load_checkpoint(model_dir).calibration is None
    loaded = load_checkpoint(model_dir)
    made = cal.calibrate(loaded.model, [list(range(3, 60))], weights_sha256=cal.weights_fingerprint(model_dir))
    made.save(model_dir / cal.CALIBRATION_FILE)
    back = load_checkpoint(model_dir).calibration
    assert torch.equal(back.q_mean, made.q_mean) and torch.equal(back.q_abs_mean, made.q_abs_mean)
    assert back.metadata["weights_sha256"] == cal.weights_fingerprint(model_dir)
    # Other weights beside the same file: a clear error naming the fix, never a silent fallback.
    from safetensors.torch import load_file, save_file
    state = load_file(model_dir / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] * 1.5
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cal.CalibrationError, match=f"other weights.*kvpilot calibrate --model {model_dir}"):
        load_checkpoint(model_dir)
    assert load_checkpoint(model_dir, calibration=False).calibration is None  # what `kvpilot calibrate` loads


def test_calibration_of_a_sharded_checkpoint_and_a_wrong_shape(make_checkpoint, tmp_path):
    sharded = make_checkpoint("llama", seed=1, shard_bytes=60_000)
    assert load_checkpoint(sharded).calibration is not None  # the fingerprint covers every shard
    model_dir = tmp_path / "m"
    shutil.copytree(make_checkpoint("llama", seed=3, calibrate=False), model_dir)
    random_calibration(3, 4, 8).save(model_dir / cal.CALIBRATION_FILE)
    with pytest.raises(cal.CalibrationError, match=r"\[3, 4, 8\] but the model has \[2, 4, 8\]"):
        load_checkpoint(model_dir)


def test_calibrate_command_writes_the_file(make_checkpoint, tmp_path):
    from kvpilot.cli import main

    model_dir = tmp_path / "m"
    shutil.copytree(make_checkpoint("llama", seed=3, calibrate=False), model_dir)
    assert main(["calibrate", "--model", str(model_dir), "--tokens", "700", "--seed", "2"]) == 0
    loaded = load_checkpoint(model_dir)
    meta = loaded.calibration.metadata
    assert meta["tokens"] == "700" and meta["seed"] == "2" and meta["seed_base"] == "2000000"
    assert meta["command"] == f"kvpilot calibrate --model {model_dir} --tokens 700 --seed 2 --difficulties easy,default,hard"
    assert meta["weights_sha256"] == cal.weights_fingerprint(model_dir)


@pytest.mark.parametrize("name", ["reasoner-v2", "reasoner"])
def test_the_bundled_models_ship_a_matching_calibration(name):
    from kvpilot.models import BUNDLED_MODELS

    loaded = load_checkpoint(BUNDLED_MODELS[name])
    c = loaded.config  # one pre-RoPE query centre per (layer, query head, frequency)
    assert loaded.calibration is not None and loaded.calibration.shape == (c.num_layers, c.num_heads, c.head_dim // 2)
    assert int(loaded.calibration.metadata["tokens"]) >= 10_000


# ---- the scorer ------------------------------------------------------------------------------------------
def test_union_select_on_a_hand_made_case():
    scores = torch.tensor([[9.0, 5.0, 1.0, 0.0, 0.0, 4.0],
                           [0.0, 0.0, 3.0, 8.0, 1.0, 0.0]])
    candidates = torch.tensor([False, True, True, True, True, True])
    # head 0's top-2 candidates: 1, 5; head 1's: 3, 2. Union {1, 2, 3, 5} by max over heads: 3 (8), 1 (5).
    assert union_select(scores, 2, candidates).tolist() == [1, 3]
    assert union_select(scores, 3, candidates).tolist() == [1, 3, 5]
    assert union_select(scores, 9, candidates).tolist() == [1, 2, 3, 4, 5]  # more than the candidates: all
    assert union_select(scores, 0, candidates).tolist() == []


def test_union_select_keeps_the_top_k_of_the_max_over_heads():
    scores = rand(24, 50, seed=7)
    candidates = torch.rand(50, generator=torch.Generator().manual_seed(1)) > 0.3
    k = 12
    best = scores.amax(0).masked_fill(~candidates, float("-inf")).topk(k).indices.sort().values
    assert torch.equal(union_select(scores, k, candidates), best)


def test_head_scores_are_z_normalised_with_seeded_noise():
    f = frame(seed=3, scores=rand(L, HQ, N, seed=9) * 50 + 7)
    z = head_scores(f)
    assert torch.allclose(z.mean(-1), torch.zeros(L, HQ), atol=1e-5)
    assert torch.allclose(z.std(-1), torch.ones(L, HQ), atol=1e-5)
    assert torch.equal(z, head_scores(f)) and not torch.equal(z, head_scores(frame(seed=4, scores=f.stats["trig_scores"])))
    raw = head_scores(f, normalize=False)
    assert torch.allclose(raw, f.stats["trig_scores"], atol=1e-5)


def test_global_mode_keeps_protected_slots_and_the_union_top_k():
    f = frame()
    plan = make_scorer("triattention").plan(f)
    assert isinstance(plan, KeepSet) and plan.indices.shape == (16,)
    idx = plan.indices.tolist()
    assert idx == sorted(set(idx)) and {0, 1, 36, 37, 38, 39} <= set(idx)
    free = torch.ones(N, dtype=torch.bool)
    free[:2] = free[-4:] = False
    expected = union_select(head_scores(f).reshape(-1, N), 10, free)
    assert set(idx) == {0, 1, 36, 37, 38, 39} | set(expected.tolist())
    assert make_scorer("triattention").plan(frame(keep=N)) is None


def test_per_kv_head_mode_gives_equal_rows_across_layers():
    f = frame(seed=5)
    plan = make_scorer("triattention", {"mode": "per_kv_head"}).plan(f)
    assert plan.per_head and plan.indices.shape == (L, H, 16)
    assert torch.equal(plan.indices[0], plan.indices[1])  # every layer uses the KV head's set
    assert not torch.equal(plan.indices[0, 0], plan.indices[0, 1])  # the KV heads choose apart
    votes = head_scores(f).view(L, H, HQ // H, N).amax(2).mean(0)  # [H, N]
    for h in range(H):
        free = votes[h, 2:N - 4]
        best = set((free.topk(10).indices + 2).tolist())
        assert set(plan.indices[0, h].tolist()) == {0, 1, 36, 37, 38, 39} | best


def test_rows_holding_different_positions_select_row_by_row():
    positions = torch.arange(N).expand(L, H, N).clone()
    positions[1, 1] += 100  # an earlier per-head compaction left this row with other tokens
    for mode in ("global", "per_kv_head"):
        plan = make_scorer("triattention", {"mode": mode}).plan(frame(positions=positions))
        assert plan.per_head and plan.indices.shape == (L, H, 16)
        assert all({0, 1, 36, 37, 38, 39} <= set(r.tolist()) for r in plan.indices.reshape(-1, 16))


def test_pin_prompt_keeps_the_prompt_when_it_fits():
    late = torch.arange(N, dtype=torch.float32).expand(L, HQ, N).clone()  # later slots score higher
    pinned = make_scorer("triattention").plan(frame(prompt_len=10, scores=late)).indices.tolist()
    assert set(range(10)) <= set(pinned)  # 10 prompt + 4 window <= 16
    assert set(pinned) == set(range(10)) | {34, 35, 36, 37, 38, 39}
    unpinned = make_scorer("triattention", {"pin_prompt": "false"}).plan(frame(prompt_len=10, scores=late)).indices
    assert unpinned.tolist() == [0, 1] + list(range(26, 40))
    # A prompt that does not fit in the budget is scored like the rest.
    too_long = make_scorer("triattention").plan(frame(prompt_len=30, scores=late)).indices
    assert too_long.tolist() == [0, 1] + list(range(26, 40))


@pytest.mark.parametrize("params, message", [
    ({"mode": "per_head"}, "mode is one of global, per_kv_head"),
    ({"normalize": "maybe"}, "not a valid bool"),
    ({"pin_prompt": "2"}, "not a valid bool"),
    ({"window_queries": "8"}, "has no parameter"),
])
def test_parameter_validation(params, message):
    with pytest.raises(ParameterError, match=message):
        make_scorer("triattention", params)


# ---- the wire --------------------------------------------------------------------------------------------
def test_prompt_len_and_trig_scores_cross_the_wire():
    f = frame(prompt_len=17)
    back = wire.frame_from_pb(wire.pb.StatsFrame.FromString(
        wire.frame_to_pb(f, "triattention", {"mode": "global"}).SerializeToString()))
    assert back.prompt_len == 17
    assert torch.equal(back.stats["trig_scores"], f.stats["trig_scores"])
    assert torch.equal(make_scorer("triattention").plan(back).indices, make_scorer("triattention").plan(f).indices)


# ---- through the engine ------------------------------------------------------------------------------------
def request(policy="triattention", prompt=tuple(range(3, 83)), budget=40, n=40, session=None, create=False, **params):
    return GenerationRequest(
        f"r{len(prompt)}{session}", list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, seed=1),
        compression=CompressionConfig(policy=policy, budget=budget, interval=8, window=4, sinks=2,
                                      params={k: str(v) for k, v in params.items()}),
        session_id=session, create_session=create)


def test_a_model_without_calibration_is_refused_with_the_fix(make_checkpoint):
    path = make_checkpoint("llama", seed=3, calibrate=False)
    engine = Engine(load_checkpoint(path), EngineConfig(kv_pool_bytes=2 << 20), policy=InProcessPolicy())
    with pytest.raises(InvalidRequest, match=f"needs the model's TriAttention calibration.*kvpilot calibrate --model {path}"):
        engine.add_request(request(), lambda event: None)
    assert not engine.has_work()
    engine.generate([request("snapkv")])  # other policies are served as before


def frames_seen(engine):
    frames = []
    decide = engine.compressor.policy.decide
    engine.compressor.policy.decide = lambda frame, name, params=None: (frames.append(frame), decide(frame, name, params))[1]
    return frames


@pytest.mark.parametrize("mode", ["global", "per_kv_head"])
def test_generation_with_triattention_on_the_tiny_model(make_engine, mode):
    engine = make_engine(prefill_chunk=32)
    frames = frames_seen(engine)
    events = []
    engine.add_request(request(mode=mode), events.append)
    engine.run_until_done()
    done = events[-1]
    assert isinstance(done, FinishEvent) and done.usage.generated_tokens == 40
    evictions = [e for e in events if isinstance(e, EvictionEvent)]
    assert evictions and not any(e.fallback for e in evictions) and done.usage.fallbacks == 0
    assert all(f.prompt_len == 81 for f in frames)  # <bos> + 80 prompt tokens, even while prefilling


def test_prompt_len_of_a_session_is_its_first_turn(make_engine):
    engine = make_engine()
    frames = frames_seen(engine)
    [first] = engine.generate([request(prompt=range(3, 33), budget=400, n=8, session="s1", create=True)])
    [second] = engine.generate([request(prompt=range(40, 100), n=30, session="s1")])
    assert second.usage.compression_events > 0 and second.usage.fallbacks == 0
    assert frames and all(f.prompt_len == 31 for f in frames)


def test_generation_on_the_bundled_model():
    from kvpilot.models import BUNDLED_MODEL
    from kvpilot.tasks import make_episode

    engine = Engine(load_checkpoint(BUNDLED_MODEL), EngineConfig(kv_pool_bytes=8 << 20), policy=InProcessPolicy())
    prompt = engine.tokenizer.encode(make_episode("multihop", 3).prompt)
    results = engine.generate([request(prompt=prompt, budget=32, n=48, mode=mode) for mode in ("global",)]
                              + [request(prompt=prompt[:-1], budget=32, n=48, mode="per_kv_head")])
    for result in results:
        assert result.usage.compression_events > 0 and result.usage.fallbacks == 0, result.usage
        assert result.usage.peak_kv_slots <= 32 + 8 + 4

