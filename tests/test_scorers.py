"""Scorers on hand-made frames: what each keeps, protection of sinks and window, equal counts, registry."""
from __future__ import annotations

import pytest
import torch

from kvpilot_protocol.frame import KeepSet, StatsFrame
from policy_service.registry import POLICIES, make_scorer
from policy_service.scorers.base import ParameterError, pool_slots

L, H, HQ, N = 2, 2, 4, 40


def frame(keep=16, sinks=2, window=4, seed=0, **stats):
    return StatsFrame(frame_id=1, session_id="s", n=N, keep=keep, sinks=sinks, window=window, num_layers=L,
                      num_kv_heads=H, num_heads=HQ, step=0, seed=seed, stats=stats)


def kept(plan: KeepSet) -> torch.Tensor:
    assert isinstance(plan, KeepSet)
    idx = plan.indices
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "keep sets must be sorted and unique"
    return idx


def protected(idx: torch.Tensor, sinks=2, window=4) -> bool:
    must = set(range(sinks)) | set(range(N - window, N))
    rows = idx.reshape(-1, idx.shape[-1]) if idx.dim() > 1 else idx[None]
    return all(must <= set(r.tolist()) for r in rows)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_streaming_llm_keeps_sinks_and_most_recent():
    idx = kept(make_scorer("streaming_llm").plan(frame()))
    assert idx.tolist() == [0, 1] + list(range(N - 14, N))


def test_h2o_keeps_heavy_hitters_per_head():
    cumulative = rand(L, H, N)
    idx = kept(make_scorer("h2o").plan(frame(cumulative_attention=cumulative)))
    assert idx.shape == (L, H, 16) and protected(idx)
    for l in range(L):
        for h in range(H):
            free = [i for i in range(2, N - 4)]
            best = sorted(free, key=lambda i: -cumulative[l, h, i])[:10]
            assert set(idx[l, h].tolist()) == set(range(2)) | set(range(N - 4, N)) | set(best)


def test_knorm_keeps_low_norm_keys():
    norms = rand(L, H, N)
    idx = kept(make_scorer("knorm").plan(frame(key_norm=norms)))
    free = [i for i in range(2, N - 4)]
    assert set(idx[0, 1].tolist()) - set(range(2)) - set(range(N - 4, N)) == set(sorted(free, key=lambda i: norms[0, 1, i])[:10])


def test_tova_and_snapkv_reduce_query_heads_per_group():
    attention = rand(L, HQ, N)
    tova = kept(make_scorer("tova").plan(frame(last_attention=attention)))
    grouped = attention.view(L, H, 2, N).mean(2)
    free = [i for i in range(2, N - 4)]
    assert set(tova[1, 0].tolist()) >= set(sorted(free, key=lambda i: -grouped[1, 0, i])[:10])
    snap = kept(make_scorer("snapkv", {"kernel": "1"}).plan(frame(window_attention=attention)))
    assert torch.equal(snap, tova)  # kernel 1 = no pooling: same scores


def test_rkv_trades_importance_against_redundancy():
    attention = torch.ones(L, HQ, N)
    redundancy = rand(L, H, N, seed=3)
    idx = kept(make_scorer("rkv").plan(frame(window_attention=attention, key_redundancy=redundancy)))
    free = [i for i in range(2, N - 4)]
    assert set(idx[0, 0].tolist()) >= set(sorted(free, key=lambda i: redundancy[0, 0, i])[:10])


def test_vase_attnv_reserves_large_values_and_samples_the_rest():
    value_range = rand(L, H, N, seed=1)
    attention = rand(L, HQ, N, seed=2)
    scorer = make_scorer("vase")
    f = frame(keep=20, value_range=value_range, window_attention=attention, seed=9)
    idx = kept(scorer.plan(f))
    assert idx.shape == (L, H, 20) and protected(idx)
    n_large = 5  # budget / 4
    for l in range(L):
        for h in range(H):
            free = [i for i in range(2, N - 4)]
            largest = sorted(free, key=lambda i: -value_range[l, h, i])[:n_large]
            assert set(largest) <= set(idx[l, h].tolist())
    assert torch.equal(idx, kept(scorer.plan(frame(keep=20, value_range=value_range, window_attention=attention, seed=9))))
    assert not torch.equal(idx, kept(scorer.plan(frame(keep=20, value_range=value_range, window_attention=attention, seed=10))))


def test_vase_dkv_scores_projection_norms():
    proj = rand(L, H, N, 2, seed=4)
    idx = kept(make_scorer("vase", {"variant": "dkv"}).plan(frame(kv_projection=proj)))
    score = proj[..., 0] * proj[..., 1]
    free = [i for i in range(2, N - 4)]
    assert set(idx[1, 1].tolist()) >= set(sorted(free, key=lambda i: -score[1, 1, i])[:10])


def test_golden_keeps_the_highest_future_attention_per_head():
    future = rand(L, H, N, seed=5) + 1e-3  # every slot has evidence (a softmax never gives 0)
    idx = kept(make_scorer("golden").plan(frame(future_attention=future)))
    assert idx.shape == (L, H, 16) and protected(idx)
    free = [i for i in range(2, N - 4)]
    for l in range(L):
        for h in range(H):
            best = sorted(free, key=lambda i: -future[l, h, i])[:10]
            assert set(idx[l, h].tolist()) == set(range(2)) | set(range(N - 4, N)) | set(best)


def test_random_is_seeded_and_global():
    a = kept(make_scorer("random").plan(frame(seed=1)))
    b = kept(make_scorer("random").plan(frame(seed=1)))
    c = kept(make_scorer("random").plan(frame(seed=2)))
    assert a.dim() == 1 and torch.equal(a, b) and not torch.equal(a, c) and protected(a)


def test_random_per_head_draws_a_keep_set_per_row():
    idx = kept(make_scorer("random", {"per_head": "true"}).plan(frame(seed=1)))
    assert idx.shape == (L, H, 16) and protected(idx)
    rows = {tuple(r.tolist()) for r in idx.reshape(-1, 16)}
    assert len(rows) > 1, "per-head random must differ between rows"
    with pytest.raises(ParameterError, match="per_head"):
        make_scorer("random", {"per_head": "maybe"})


def test_nothing_to_evict_means_no_plan():
    assert make_scorer("h2o").plan(frame(keep=N, cumulative_attention=torch.zeros(L, H, N))) is None
    assert make_scorer("full").plan(frame()) is None


def test_pooling_spreads_importance_to_neighbours():
    x = torch.zeros(1, 9)
    x[0, 4] = 1.0
    assert pool_slots(x, 3, "max")[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_registry_and_parameter_errors():
    assert {"full", "random", "streaming_llm", "h2o", "tova", "snapkv", "knorm", "rkv", "vase"} <= set(POLICIES)
    for name, cls in POLICIES.items():
        assert cls.name == name and (cls.__doc__ or "").strip(), f"{name} needs a one-line description"
    with pytest.raises(ParameterError, match="variant is attnv or dkv"):
        make_scorer("vase", {"variant": "x"})
    with pytest.raises(ParameterError, match="not a valid bool"):
        make_scorer("h2o", {"normalize": "maybe"})
