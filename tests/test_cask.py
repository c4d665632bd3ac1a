"""CASK on hand-made frames: the core vote, run splitting, merge tiers, the two stages, both guards, keepkv."""
from __future__ import annotations

import pytest
import torch

from kvpilot_protocol.frame import KeepSet, MergePlanSpec, StatsFrame
from policy_service.registry import make_scorer
from policy_service.scorers.base import ParameterError
from policy_service.scorers.cask import CASK, union_top_k

L, H, HQ, D = 2, 2, 4, 8


def cask_frame(n, keep, prompt_len, *, window=2, sinks=0, seed=0, markers=(), vectors=None, attention=None):
    """A frame with an rkv base (window attention + redundancy) and CASK's own statistics."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(n).expand(L, H, n).clone()
    tokens = torch.full((L, H, n), 50)
    for i in markers:
        tokens[:, :, i] = 21  # ";" in the bundled vocabulary
    stats = {
        "window_attention": attention if attention is not None else torch.rand(L, HQ, n, generator=g),
        "key_redundancy": torch.zeros(L, H, n),
        "keys_pre_rope_mean": vectors if vectors is not None else torch.randn(n, D, generator=g),
        "positions": positions,
        "token_ids": tokens,
    }
    f = StatsFrame(frame_id=1, session_id="s", n=n, keep=keep, sinks=sinks, window=window, num_layers=L,
                   num_kv_heads=H, num_heads=HQ, step=0, seed=seed, stats=stats)
    f.prompt_len = prompt_len
    return f


def rkv_cask(**params):
    return make_scorer("cask", {"base": "rkv", **{k: str(v) for k, v in params.items()}})


def check_plan(plan: MergePlanSpec, n: int, keep: int):
    assert plan.count <= keep
    flat = [s for g in plan.groups for s in g]
    assert len(flat) == len(set(flat)), "groups must be disjoint"
    assert [g[0] for g in plan.groups] == sorted(g[0] for g in plan.groups)
    for g, w, a in zip(plan.groups, plan.weights, plan.anchors):
        assert g == list(range(g[0], g[0] + len(g))), "a group is a contiguous run of slots"
        assert a in g and len(w) == len(g)
    return set(flat)


def test_vote_core_ranks_by_votes_then_score_then_index():
    heads = torch.tensor([[5.0, 4.0, 0.0, 0.0],
                          [0.0, 4.0, 5.0, 0.0],
                          [0.0, 4.0, 0.0, 5.0]])
    aggregate = heads.max(0).values
    core = CASK.vote_core(heads, aggregate, 1)
    # slot 1 is in no head's top-1; slots 0, 2, 3 get one vote each and tie on score: the earliest wins.
    assert core.tolist() == [True, False, False, False]
    core2 = CASK.vote_core(heads, aggregate, 2)
    assert core2.tolist() == [False, True, False, False] or int(core2.sum()) == 2
    assert bool(core2[1]), "slot 1 is in every head's top-2: most votes"


def test_stage_two_merges_scratch_and_drops_nothing():
    n, keep, prompt = 60, 40, 10
    f = cask_frame(n, keep, prompt)
    plan = rkv_cask(recent_window=8).plan(f)
    assert isinstance(plan, MergePlanSpec)
    covered = check_plan(plan, n, keep)
    assert covered == set(range(n)), "stage 2 merges scratch into representatives: every slot is covered"
    assert plan.count == keep
    assert any(len(g) > 1 for g in plan.groups)
    for slot in range(prompt):  # the prompt fits: pinned
        assert [slot] in plan.groups
    for slot in range(n - 8, n):  # recent window (min(8, max(window, keep // 4)) = 8)
        assert [slot] in plan.groups
    assert plan.guards == ()


def test_runs_are_cut_at_phase_markers_unless_nothing_else_fits():
    n, keep, prompt = 40, 30, 4
    # Every 4th slot is a marker: merges stay inside a phase as long as possible.
    markers = list(range(prompt + 3, n, 4))
    f = cask_frame(n, keep, prompt, markers=markers)
    plan = rkv_cask(recent_window=4).plan(f)
    tokens = f.stats["token_ids"][0, 0]
    for g in plan.groups:
        # a marker closes its phase: within a group, only the last member may be a marker
        assert not any(int(tokens[s]) == 21 for s in g[:-1]), g
    f2 = cask_frame(n, keep, prompt, markers=list(range(prompt, n)))  # every token is a marker: must relax
    plan2 = rkv_cask(recent_window=4).plan(f2)
    assert check_plan(plan2, n, keep) == set(range(n))


def test_merge_tiers_prefer_near_duplicates_within_the_local_window():
    n, keep, prompt = 24, 23, 2
    vectors = torch.eye(D).repeat(3, 1)[:n] + 0.0  # orthogonal neighbours: cosine 0
    vectors[10] = vectors[11]  # one near-duplicate adjacent pair (cosine 1)
    f = cask_frame(n, keep, prompt, vectors=vectors)
    plan = rkv_cask(recent_window=2, protected_core_ratio=0.0).plan(f)
    merged = [g for g in plan.groups if len(g) > 1]
    assert merged == [[10, 11]], "one merge needed: the tier-2 pair (cosine >= 0.985) goes first"


class FixedScores(CASK):
    """CASK with head scores given by the test (the base scorer is exercised elsewhere)."""

    def __init__(self, scores, **params):
        super().__init__(**params)
        self.scores = scores

    def head_scores(self, frame):
        return self.scores


def test_keepkv_weights_and_anchor():
    n, keep, prompt = 12, 11, 1
    scores = torch.zeros(1, n)
    scores[0, 2] = 3.0  # the core (at least one core token even at ratio 0)
    scores[0, 4] = 1.0  # the best-scoring scratch token
    f = cask_frame(n, keep, prompt, vectors=torch.ones(n, D))  # all alike: the first allowed pair merges
    plan = FixedScores(scores, protected_core_ratio=0.0, recent_window=2).plan(f)
    assert [2] in plan.groups
    merged = [(g, w, a) for g, w, a in zip(plan.groups, plan.weights, plan.anchors) if len(g) > 1]
    assert len(merged) == 1
    group, weights, anchor = merged[0]
    assert group == [3, 4], "slot 1 is cut off by the core token 2: (3, 4) is the first adjacent pair"
    assert anchor == 4, "the highest-scoring source keys the representative"
    support = torch.nn.functional.softplus(torch.tensor([0.0, 1.0])) + 1e-4
    expected = support / support.sum().clamp_min(1.0)
    assert weights == pytest.approx(expected.tolist())


def test_stage_one_evicts_the_prompt_with_spread_anchors():
    n, keep, prompt = 120, 60, 55  # prefix budget 60 - (8 + 2) = 50 < 55 <= 60
    f = cask_frame(n, keep, prompt)
    plan = rkv_cask(recent_window=8, prefix_coverage_ratio=0.25).plan(f)
    assert "prefix_evicted" in plan.guards
    kept = check_plan(plan, n, keep) if isinstance(plan, MergePlanSpec) else set(plan.indices.tolist())
    prefix_kept = sorted(s for s in kept if s < prompt)
    prefix_budget = keep - (8 + 2)
    assert len(prefix_kept) == prefix_budget
    anchors = torch.linspace(0, prompt - 1, round(prefix_budget * 0.25)).round().long().tolist()
    assert set(anchors) <= set(prefix_kept), "evenly spaced anchors cover the prompt"


def test_prefix_budget_exhausted_keeps_the_last_slots():
    n, keep = 80, 30
    plan = rkv_cask().plan(cask_frame(n, keep, prompt_len=70))
    assert isinstance(plan, KeepSet) and plan.guards == ("prefix_budget_exhausted",)
    assert plan.indices.tolist() == list(range(n - keep, n))


def test_merge_inactive_truncates():
    # Stage 1 leaves 2 scratch slots by construction; the request's 12 sinks plus 6 spread anchors overflow the
    # prefix budget of 13, so 1 slot is left between prefix and recent window: nothing to merge into.
    n, keep, prompt = 40, 20, 17
    plan = rkv_cask(prefix_coverage_ratio=0.5).plan(cask_frame(n, keep, prompt, sinks=12))
    assert "merge_inactive" in plan.guards
    assert isinstance(plan, KeepSet) and plan.count <= keep
    assert plan.indices.tolist()[:12] == list(range(12)) and plan.indices.tolist()[-3:] == [37, 38, 39]


def test_union_top_k_prefers_the_union_then_fills():
    heads = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.1, 0.0]])
    aggregate = heads.max(0).values
    allowed = torch.ones(5, dtype=torch.bool)
    assert sorted(union_top_k(heads, aggregate, 1, allowed).tolist()) in ([0], [2])
    assert sorted(union_top_k(heads, aggregate, 2, allowed).tolist()) == [0, 2]
    allowed[0] = False
    assert 0 not in union_top_k(heads, aggregate, 3, allowed).tolist()


def test_heads_holding_different_positions_are_refused():
    f = cask_frame(40, 20, 4)
    f.stats["positions"][1, 1] = f.stats["positions"][1, 1].flip(0)
    with pytest.raises(ValueError, match="different positions"):
        rkv_cask().plan(f)


@pytest.mark.parametrize("params, message", [
    ({"base": "h2o"}, "base is one of"),
    ({"protected_core_ratio": "1.5"}, "protected_core_ratio"),
    ({"recent_window": "-1"}, "recent_window"),
    ({"merge_local_window": "0"}, "merge_local_window"),
    ({"merge_similarity_threshold": "2"}, "merge_similarity_threshold"),
    ({"prefix_coverage_ratio": "0.9"}, "prefix_coverage_ratio"),
    ({"phase_markers": "a,b"}, "phase_markers"),
    ({"phase_markers": "-3"}, "phase_markers"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ParameterError, match=message):
        make_scorer("cask", params)
