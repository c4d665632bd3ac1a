"""Golden Eviction (ForesightKV's oracle): the scorer on known patterns, the oracle's block attention against a
direct computation, the frame statistic at compression points, and the decoder refusing it without an oracle
(in-process) or at all (gRPC). The free-generation path (kvpilot eval) runs on the bundled model."""
from __future__ import annotations

import math

import pytest
import torch

from decoder_service.model import causal_attention
from decoder_service.oracle import FutureAttention, block_index, future_attention, reference_oracle
from decoder_service.requests import CompressionConfig, GenerationRequest, InvalidRequest, SamplingParams
from kvpilot_protocol.frame import KeepSet, StatsFrame
from policy_service.registry import POLICIES, make_scorer, serving_policies

L, H, N = 2, 2, 30


def frame(future: torch.Tensor, keep=12, sinks=2, window=3) -> StatsFrame:
    return StatsFrame(frame_id=1, session_id="s", n=future.shape[-1], keep=keep, sinks=sinks, window=window,
                      num_layers=future.shape[0], num_kv_heads=future.shape[1], num_heads=2 * future.shape[1],
                      step=0, seed=0, stats={"future_attention": future})


def test_golden_keeps_what_the_future_attends_to_per_head():
    """A pattern whose optimum is known: per (layer, KV head) a different set of 7 slots carries future
    attention; golden keeps exactly those plus the protected sinks and window."""
    future = torch.full((L, H, N), 1e-4)
    wanted = {}
    for l in range(L):
        for h in range(H):
            chosen = torch.randperm(N - 5, generator=torch.Generator().manual_seed(10 * l + h))[:7] + 2
            future[l, h, chosen] = torch.linspace(0.2, 0.8, 7)
            wanted[l, h] = set(chosen.tolist())
    plan = make_scorer("golden").plan(frame(future))
    assert isinstance(plan, KeepSet) and plan.indices.shape == (L, H, 12)
    for (l, h), chosen in wanted.items():
        assert set(plan.indices[l, h].tolist()) == {0, 1, N - 3, N - 2, N - 1} | chosen
    assert len({tuple(r.tolist()) for r in plan.indices.reshape(-1, 12)}) > 1  # per head, not global


def test_slots_without_evidence_rank_below_all_others_by_recency():
    """Past the reference's end (or at positions it never had) the oracle says 0: such slots go first, the
    oldest of them first."""
    future = torch.zeros(1, 1, N)
    future[0, 0, 5] = 1e-6  # any evidence beats none
    plan = make_scorer("golden").plan(frame(future, keep=8))
    assert plan.indices[0, 0].tolist() == [0, 1, 5, N - 5, N - 4, N - 3, N - 2, N - 1]


def test_golden_is_registered_as_evaluation_only(capsys):
    from kvpilot.cli import main

    assert POLICIES["golden"].eval_only and "golden" not in serving_policies()
    assert not POLICIES["h2o"].eval_only and "h2o" in serving_policies()
    assert main(["policies"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("golden"))
    assert "[eval only]" in line


def test_block_index_follows_the_compression_grid():
    # Blocks of 8 starting at 3 (mod 8): [0, 3) is block 0, [3, 11) block 1, ...
    assert [block_index(p, 8, 3) for p in (0, 2, 3, 10, 11, 19)] == [0, 0, 1, 1, 2, 3]
    assert [block_index(p, 4, 0) for p in (0, 3, 4, 8)] == [0, 0, 1, 2]


def direct_future_attention(model, tokens: list[int], block: int, origin: int) -> torch.Tensor:
    """The definition, written out: softmax attention of every query to every key from a plain forward, mean
    over each KV group, mean over each block's queries, then the max over the blocks from j on."""
    captured = {}

    def capture(layer, q, k, v):
        captured[layer] = (q[0].float(), k[0].float())
        return causal_attention(layer, q, k, v)

    with torch.no_grad():
        model(torch.tensor([tokens]), torch.arange(len(tokens))[None], capture)
    T = len(tokens)
    blocks = [block_index(t, block, origin) for t in range(T)]
    nb = blocks[-1] + 1
    layers = []
    for layer in range(len(captured)):
        q, k = captured[layer]  # [T, Hq, D], [T, H, D]
        hq, h, d = q.shape[1], k.shape[1], q.shape[2]
        out = torch.zeros(h, nb, T)
        for kv in range(h):
            probs = []
            for head in range(kv * (hq // h), (kv + 1) * (hq // h)):
                scores = q[:, head] @ k[:, kv].T / math.sqrt(d)  # [T, T]
                scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                probs.append(torch.softmax(scores, dim=-1))
            group = torch.stack(probs).mean(0)  # [T queries, T keys]
            for j in range(nb):
                rows = [t for t in range(T) if blocks[t] == j]
                out[kv, j] = group[rows].mean(0)
        for j in range(nb - 2, -1, -1):
            out[:, j] = torch.maximum(out[:, j], out[:, j + 1])
        layers.append(out)
    return torch.stack(layers)


@pytest.mark.parametrize("block, origin, chunk", [(8, 0, 256), (8, 3, 16), (5, 4, 7)])
def test_oracle_equals_a_direct_computation(tiny_model, block, origin, chunk):
    """The chunked explicit-softmax forward (GQA: 4 query heads over 2 KV heads) gives the definition's numbers,
    whatever the query chunk, for grids aligned at 0 or not."""
    tokens = torch.randint(2, 300, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    oracle = future_attention(tiny_model.model, tokens, block=block, origin=origin, chunk=chunk)
    expected = direct_future_attention(tiny_model.model, tokens, block, origin)
    assert oracle.suffix.shape == expected.shape == (2, 2, block_index(69, block, origin) + 1, 70)
    torch.testing.assert_close(oracle.suffix, expected, atol=1e-5, rtol=1e-4)
    # Each block's mean attention sums to 1 over the keys: the suffix max of a distribution is >= 1/T.
    assert bool((oracle.suffix[:, :, -1].sum(-1) - 1).abs().max() < 1e-4)


def test_lookup_reads_the_future_blocks_at_the_compression_point():
    T, block, origin = 20, 4, 2
    suffix = torch.rand(1, 2, block_index(T - 1, block, origin) + 1, T, generator=torch.Generator().manual_seed(0))
    oracle = FutureAttention(suffix=suffix, block=block, origin=origin)
    positions = torch.tensor([[[0, 3, 5, 9], [1, 4, 9, 25]]])  # per-head keep sets; 25 is past the trace
    got = oracle.lookup(positions, now=10)  # 10 = 2 + 2 * 4: block 3 starts there
    assert oracle.block_of(10) == 3
    assert torch.equal(got[0, 0], suffix[0, 0, 3, [0, 3, 5, 9]])
    assert torch.equal(got[0, 1, :3], suffix[0, 1, 3, [1, 4, 9]]) and got[0, 1, 3] == 0
    assert torch.equal(oracle.lookup(positions, now=40), torch.zeros(1, 2, 4))  # past the end: no evidence
    assert oracle.matches(interval=4, budget=10) and not oracle.matches(interval=4, budget=11)


def golden_request(prompt, budget=40, n=30, oracle=None, interval=8):
    return GenerationRequest("g", list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
                             compression=CompressionConfig(policy="golden", budget=budget, interval=interval,
                                                           window=8, sinks=4),
                             oracle=oracle)


def test_engine_refuses_future_attention_without_an_oracle(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match="declares future_attention.*GenerationRequest.oracle"):
        engine.add_request(golden_request(range(3, 80)), lambda ev: None)
    oracle = FutureAttention(suffix=torch.zeros(2, 2, 20, 160), block=8, origin=1)  # grid of budget 41
    with pytest.raises(InvalidRequest, match="not this request's compression points"):
        engine.add_request(golden_request(range(3, 80), budget=40, oracle=oracle), lambda ev: None)
    assert not engine.waiting and not engine.running


def test_golden_through_the_engine_reads_its_oracle_at_every_compression(make_engine, tiny_model, monkeypatch):
    """Free generation with the oracle of its full-cache reference: every compression point (prefill included)
    lies on the oracle's grid, the frame's statistic comes from it, and nothing falls back."""
    engine = make_engine()
    prompt = list(range(3, 90))
    [reference] = engine.generate([GenerationRequest("ref", prompt, SamplingParams(temperature=0, max_new_tokens=30,
                                                                                   ignore_eos=True))])
    trace = [0] + prompt + reference.token_ids
    points = []
    lookup = FutureAttention.lookup
    monkeypatch.setattr(FutureAttention, "lookup", lambda self, pos, now: (points.append((now, int(pos.max()))),
                                                                           lookup(self, pos, now))[1])
    [golden] = engine.generate([golden_request(prompt, oracle=reference_oracle(tiny_model.model, trace, 8, 40))])
    assert golden.usage.compression_events == len(points) > 0 and golden.usage.fallbacks == 0
    assert all((now - 40) % 8 == 0 and now == newest + 1 for now, newest in points)
    assert golden.usage.peak_kv_slots <= 40 + 8 + 4


def test_kvpilot_eval_runs_golden_against_its_references():
    """`kvpilot eval --policy golden`: each episode's full-cache reference gives the oracle, then golden
    generates with it. At a budget where StreamingLLM loses answers, golden is at least as accurate."""
    from decoder_service.checkpoint import load_checkpoint
    from decoder_service.engine import Engine, EngineConfig
    from kvpilot.evaluate import compression_for, episodes_for, evaluate
    from kvpilot.models import BUNDLED_MODEL
    from policy_service.local import InProcessPolicy

    engine = Engine(load_checkpoint(BUNDLED_MODEL), EngineConfig(kv_pool_bytes=16 << 20), policy=InProcessPolicy())
    episodes = episodes_for("multihop", 3)
    golden, _ = evaluate(engine, "multihop", episodes, compression_for("golden", 48))
    streaming, _ = evaluate(engine, "multihop", episodes, compression_for("streaming_llm", 48))
    assert golden.compression_events > 0 and golden.fallbacks == 0
    assert golden.mean_peak_kv_slots <= 48 + 8 + 4
    assert golden.accuracy >= streaming.accuracy
