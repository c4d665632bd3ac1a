"""Kernels against their torch references (and against slot-by-slot oracles written from the contract).

Without CUDA the Triton kernels run under the Triton interpreter. Environment, and why it is safe for the
other test files in the same pytest process:

* TRITON_INTERPRET=1 is set at the top of this module, before anything below imports triton: triton jits its
  own library helpers (tl.zeros, tl.max, ...) when it is first imported, so the interpreter must be chosen
  by then. It is only set when CUDA is absent, where compiled Triton cannot run at all, so it changes
  nothing for any other test; kernels/__init__.py applies the same default for processes that import the
  package first. An explicit setting always wins. With CUDA the kernels are compiled and run on the GPU.
* KVPILOT_FORCE_TRITON=1 (public entry points take the Triton path for CPU tensors) is set per test by an
  autouse fixture and removed afterwards, never at import: at import it would leak into every other test
  module collected in the same process (the engine would run its compactions through the interpreter).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvpilot_kernels as kernels  # noqa: E402
from kvpilot_kernels import compaction, merge, redundancy  # noqa: E402
from kvpilot_kernels.merge import MergePlan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HYP = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------

def make_kv(L, H, cap, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, H, cap, D, generator=g).to(dtype)
    v = torch.randn(L, H, cap, D, generator=g).to(dtype)
    # Distinct positions per (layer, head, slot), so a slot moved to the wrong row or place shows.
    positions = torch.arange(L * H * cap, dtype=torch.int64).reshape(L, H, cap) * 3 + 1000
    return k.to(DEVICE), v.to(DEVICE), positions.to(DEVICE)


def sorted_sample(rng, n_valid, n_keep):
    return sorted(rng.sample(range(n_valid), n_keep))


def make_keep(rng, L, H, n_valid, n_keep, per_head):
    if per_head:
        return torch.tensor([[sorted_sample(rng, n_valid, n_keep) for _ in range(H)] for _ in range(L)],
                            dtype=torch.int64).reshape(L, H, n_keep)
    return torch.tensor(sorted_sample(rng, n_valid, n_keep), dtype=torch.int64)


def assert_slots_equal(got, want, what):
    """Compare [L, H, n(, D)] slot by slot and name the first wrong (layer, head, slot)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (got != want)
    if bad.dim() == 4:
        bad = bad.any(dim=-1)
    if bad.any():
        l, h, j = (int(x) for x in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} wrong slots, first at layer {l} head {h} slot {j}: "
                             f"got {got[l, h, j].tolist()} want {want[l, h, j].tolist()}")


def check_compaction(k0, v0, p0, keep, k, v, p):
    """Oracle straight from the contract: row (l, h) slot j holds old slot keep[l, h, j]; the tail is untouched."""
    L, H, cap, D = k0.shape
    n_keep = keep.shape[-1]
    idx = keep.to(k0.device).expand(L, H, n_keep) if keep.dim() == 1 else keep.to(k0.device)
    for name, old, new in (("k", k0, k), ("v", v0, v)):
        want = torch.stack([torch.stack([old[l, h, idx[l, h]] for h in range(H)]) for l in range(L)])
        assert_slots_equal(new[:, :, :n_keep], want, name)
        assert_slots_equal(new[:, :, n_keep:], old[:, :, n_keep:], f"{name} tail")
    want_p = torch.stack([torch.stack([p0[l, h, idx[l, h]] for h in range(H)]) for l in range(L)])
    assert_slots_equal(p[:, :, :n_keep], want_p, "positions")
    assert_slots_equal(p[:, :, n_keep:], p0[:, :, n_keep:], "positions tail")


def run_compaction(fn, L, H, cap, D, dtype, n_valid, keep, seed=0, **kw):
    k, v, p = make_kv(L, H, cap, D, dtype, seed)
    k0, v0, p0 = k.clone(), v.clone(), p.clone()
    n = fn(k, v, p, keep, n_valid, **kw)
    assert n == keep.shape[-1]
    check_compaction(k0, v0, p0, keep, k, v, p)
    return k, v, p


# --------------------------------------------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [8, 16, 24, 64])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("n_keep", ["zero", "one", "all", "some"])
def test_compact_matches_reference(dtype, D, per_head, n_keep):
    L, H, cap, n_valid = 2, 3, 37, 33  # cap not a multiple of any block
    rng = random.Random(hash((D, per_head, n_keep)) & 0xFFFF)
    n = {"zero": 0, "one": 1, "all": n_valid, "some": 19}[n_keep]
    keep = make_keep(rng, L, H, n_valid, n, per_head)
    # block_n=8: several chunks per row, so the cross-chunk half of the hazard argument is exercised.
    k, v, p = run_compaction(compaction.compact_triton, L, H, cap, D, dtype, n_valid, keep, block_n=8)
    kr, vr, pr = make_kv(L, H, cap, D, dtype)
    assert compaction.compact_reference(kr, vr, pr, keep, n_valid) == n
    assert torch.equal(k, kr) and torch.equal(v, vr) and torch.equal(p, pr)


@pytest.mark.parametrize("block_n", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("pattern", ["shift1", "cross_chunk", "every_other", "tail_half", "first_and_last"])
def test_compact_in_place_hazards(block_n, pattern):
    """Keep sets where sources sit inside the chunk being written or in the next chunk: an implementation
    that stored before loading (or walked rows in the wrong order) would read overwritten slots."""
    L, H, cap, D, n_valid = 1, 2, 50, 16, 48
    keep = {
        "shift1": list(range(1, n_valid)),  # every destination j reads slot j+1: the next one written
        "cross_chunk": [j + block_n for j in range(n_valid - block_n)],  # sources are next chunk's dests
        "every_other": list(range(1, n_valid, 2)),
        "tail_half": list(range(n_valid // 2, n_valid)),
        "first_and_last": [0, n_valid - 1],
    }[pattern]
    keep = torch.tensor(keep, dtype=torch.int64)
    run_compaction(compaction.compact_triton, L, H, cap, D, torch.float32, n_valid, keep, block_n=block_n)
    per_head = keep.expand(L, H, keep.numel()).clone()
    per_head[0, 1] = torch.arange(keep.numel())  # an identity row next to a moving one
    run_compaction(compaction.compact_triton, L, H, cap, D, torch.float32, n_valid, per_head, block_n=block_n)


def test_compact_repeated_events_keep_positions():
    """Several compactions in a row, as the engine does them: positions travel with their slots."""
    L, H, cap, D = 2, 2, 40, 16
    k, v, p = make_kv(L, H, cap, D, torch.float32)
    token_of = p.clone()  # slot -> original identity
    rng = random.Random(3)
    n = cap
    for _ in range(4):
        keep = make_keep(rng, L, H, n, n * 2 // 3, per_head=True)
        want = torch.gather(token_of, 2, keep.to(DEVICE))
        n = kernels.compact_(k, v, p, keep, n)
        token_of[:, :, :n] = want
        assert torch.equal(p[:, :, :n], token_of[:, :, :n])


def test_compact_strided_row_offsets_use_int64():
    """The kernel addresses rows as row * cap * D in int64; check a row far into a larger cache."""
    L, H, cap, D = 3, 4, 300, 64
    keep = torch.arange(5, 300, 7)
    run_compaction(compaction.compact_triton, L, H, cap, D, torch.bfloat16, cap, keep)


@pytest.mark.parametrize("impl", [compaction.compact_triton, compaction.compact_reference])
def test_compact_rejects_bad_keep_sets(impl):
    L, H, cap, D, n_valid = 2, 2, 16, 8, 12
    k, v, p = make_kv(L, H, cap, D, torch.float32)
    k0 = k.clone()
    bad = {
        "unsorted": torch.tensor([0, 5, 3]),
        "duplicate": torch.tensor([1, 4, 4, 7]),
        "beyond n_valid": torch.tensor([0, 12]),
        "negative": torch.tensor([-1, 3]),
        "float": torch.tensor([0.0, 1.0]),
        "wrong per-head shape": torch.zeros(2, 3, 1, dtype=torch.int64),
        "unsorted in one head": torch.tensor([[[0, 1], [2, 3]], [[4, 5], [7, 6]]]),
    }
    for name, keep in bad.items():
        with pytest.raises(ValueError):
            impl(k, v, p, keep, n_valid)
        assert torch.equal(k, k0), f"{name}: a rejected keep set must leave the cache untouched"
    with pytest.raises(ValueError, match="n_valid"):
        impl(k, v, p, torch.tensor([0]), cap + 1)
    strided = torch.zeros(L, H, cap, 2 * D, device=DEVICE)[..., ::2]  # right shape, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        impl(strided, strided, p, torch.tensor([0]), 4)
    with pytest.raises(ValueError):
        impl(k, v.half(), p, torch.tensor([0]), n_valid)
    with pytest.raises(ValueError):
        impl(k, v, p.int(), torch.tensor([0]), n_valid)


def test_compact_accepts_python_lists():
    """Plans decoded from the wire may come as lists; an empty list is an empty keep set, not a float tensor."""
    k, v, p = make_kv(1, 2, 8, 8, torch.float32)
    k0, v0, p0 = k.clone(), v.clone(), p.clone()
    assert kernels.compact_(k, v, p, [], 8) == 0
    assert kernels.compact_(k, v, p, [1, 5, 6], 8) == 3
    check_compaction(k0, v0, p0, torch.tensor([1, 5, 6]), k, v, p)
    assert kernels.merge_(k, v, p, MergePlan.from_groups([]), 3) == 0


def test_unsorted_keep_raises_through_public_entry():
    k, v, p = make_kv(1, 1, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="ascending"):
        kernels.compact_(k, v, p, torch.tensor([2, 1]), 8)


@HYP
@given(L=st.integers(1, 3), H=st.integers(1, 3), cap=st.integers(1, 70), D=st.sampled_from([8, 16, 24, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), per_head=st.booleans(),
       block_n=st.sampled_from([None, 1, 4, 16]), data=st.data())
def test_compact_property(L, H, cap, D, dtype, per_head, block_n, data):
    n_valid = data.draw(st.integers(0, cap), label="n_valid")
    n_keep = data.draw(st.integers(0, n_valid), label="n_keep")
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    keep = make_keep(rng, L, H, n_valid, n_keep, per_head)
    run_compaction(compaction.compact_triton, L, H, cap, D, dtype, n_valid, keep, block_n=block_n)


# --------------------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------------------

def random_plan(rng, n_valid, max_group=5, p_drop=0.3):
    """Groups of nearby slots (as adjacent consolidation makes), some slots dropped, members shuffled,
    random weights, anchor anywhere in the group."""
    slots = [s for s in range(n_valid) if rng.random() > p_drop]
    groups, i = [], 0
    while i < len(slots):
        size = rng.randint(1, max_group)
        groups.append(slots[i:i + size])
        i += size
    groups = [rng.sample(g, len(g)) for g in groups]
    weights = [[rng.uniform(-1.0, 2.0) for _ in g] for g in groups]
    anchors = [rng.choice(g) for g in groups]
    return MergePlan.from_groups(groups, weights, anchors), groups, weights, anchors


def merge_oracle(k0, v0, p0, groups, weights, anchors):
    n_out = len(groups)
    L, H, cap, D = k0.shape
    k_want, p_want = k0[:, :, anchors], p0[:, :, anchors]
    v_want = torch.zeros(L, H, n_out, D, dtype=torch.float64, device=v0.device)
    for j, (g, w) in enumerate(zip(groups, weights)):
        for s, ws in zip(g, w):
            v_want[:, :, j] += ws * v0[:, :, s].double()
    return k_want, v_want, p_want


def run_merge(fn, L, H, cap, D, dtype, n_valid, plan, groups, weights, anchors, **kw):
    k, v, p = make_kv(L, H, cap, D, dtype, seed=1)
    k0, v0, p0 = k.clone(), v.clone(), p.clone()
    n_out = fn(k, v, p, plan, n_valid, **kw)
    assert n_out == len(groups)
    if n_out:
        k_want, v_want, p_want = merge_oracle(k0, v0, p0, groups, weights, anchors)
        assert_slots_equal(k[:, :, :n_out], k_want, "k")
        assert_slots_equal(p[:, :, :n_out], p_want, "positions")
        # Accumulated in float32, rounded once to the cache dtype.
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        err = (v[:, :, :n_out].double() - v_want).abs() / (1 + v_want.abs())
        assert err.max() <= tol, f"v: max relative error {err.max():.3g} at {torch.nonzero(err == err.max())[0].tolist()}"
    assert torch.equal(k[:, :, n_out:], k0[:, :, n_out:]) and torch.equal(v[:, :, n_out:], v0[:, :, n_out:])
    return k, v, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 16, 24, 64])
@pytest.mark.parametrize("block_n", [None, 4])
def test_merge_matches_reference(dtype, D, block_n):
    L, H, cap, n_valid = 2, 2, 45, 41
    rng = random.Random(D)
    plan, groups, weights, anchors = random_plan(rng, n_valid)
    k, v, p = run_merge(merge.merge_triton, L, H, cap, D, dtype, n_valid, plan, groups, weights, anchors, block_n=block_n)
    kr, vr, pr = make_kv(L, H, cap, D, dtype, seed=1)
    assert merge.merge_reference(kr, vr, pr, plan, n_valid) == len(groups)
    assert torch.equal(k, kr) and torch.equal(p, pr)
    torch.testing.assert_close(v, vr, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", ["empty", "singletons", "one_big_group", "big_and_small", "identity"])
def test_merge_edge_plans(case):
    L, H, cap, D, n_valid = 1, 2, 40, 24, 37
    if case == "empty":
        groups = []
    elif case == "singletons":
        groups = [[s] for s in range(3, n_valid, 3)]
    elif case == "one_big_group":
        groups = [list(range(n_valid))[::-1]]
    elif case == "big_and_small":  # a long group next to short ones: the inner loop masks unequal lengths
        groups = [[0], list(range(1, 30)), [30, 31], [35]]
    else:
        groups = [[s] for s in range(n_valid)]
    weights = [[1.0 / len(g)] * len(g) for g in groups]
    anchors = [g[len(g) // 2] for g in groups]
    plan = MergePlan.from_groups(groups, weights, anchors)
    for fn in (merge.merge_triton, merge.merge_reference):
        run_merge(fn, L, H, cap, D, torch.float32, n_valid, plan, groups, weights, anchors)


def test_merge_keep_plan_equals_compaction():
    L, H, cap, D, n_valid = 2, 2, 40, 16, 39
    keep = torch.tensor(sorted_sample(random.Random(5), n_valid, 21))
    k1, v1, p1 = make_kv(L, H, cap, D, torch.bfloat16)
    k2, v2, p2 = make_kv(L, H, cap, D, torch.bfloat16)
    assert kernels.merge_(k1, v1, p1, MergePlan.keep(keep), n_valid) == 21
    assert kernels.compact_(k2, v2, p2, keep, n_valid) == 21
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(p1, p2)


@pytest.mark.parametrize("impl", [merge.merge_triton, merge.merge_reference])
def test_merge_rejects_bad_plans(impl):
    L, H, cap, D, n_valid = 1, 1, 12, 8, 10
    k, v, p = make_kv(L, H, cap, D, torch.float32)
    v0 = v.clone()
    bad = {
        "unordered groups": MergePlan.from_groups([[4, 5], [1, 2]], anchors=[4, 1]),
        "overlapping groups": MergePlan.from_groups([[1, 2], [2, 3]], anchors=[1, 3]),
        "anchor outside group": MergePlan.from_groups([[1, 2], [3, 4]], anchors=[1, 5]),
        "empty group": MergePlan.from_groups([[1], [], [3]], anchors=[1, 3, 3]),
        "source beyond n_valid": MergePlan.from_groups([[1], [10]], anchors=[1, 10]),
        "negative source": MergePlan.from_groups([[-1, 2]], anchors=[2]),
        "non-finite weight": MergePlan.from_groups([[1, 2]], weights=[[0.5, float("nan")]], anchors=[2]),
        "offsets do not cover sources": MergePlan(torch.tensor([0, 1]), torch.tensor([1, 2]),
                                                  torch.tensor([1.0, 1.0]), torch.tensor([1])),
        "weights length": MergePlan(torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor([1])),
        "anchors length": MergePlan(torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([1.0, 1.0]), torch.tensor([1, 2])),
        "not a plan": object(),
    }
    for name, plan in bad.items():
        with pytest.raises(ValueError):
            impl(k, v, p, plan, n_valid)
        assert torch.equal(v, v0), f"{name}: a rejected plan must leave the cache untouched"


@HYP
@given(L=st.integers(1, 2), H=st.integers(1, 3), cap=st.integers(1, 60), D=st.sampled_from([8, 16, 24, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), block_n=st.sampled_from([None, 1, 8]),
       max_group=st.integers(1, 8), data=st.data())
def test_merge_property(L, H, cap, D, dtype, block_n, max_group, data):
    n_valid = data.draw(st.integers(0, cap), label="n_valid")
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    plan, groups, weights, anchors = random_plan(rng, n_valid, max_group=max_group, p_drop=rng.random() * 0.6)
    run_merge(merge.merge_triton, L, H, cap, D, dtype, n_valid, plan, groups, weights, anchors, block_n=block_n)


# --------------------------------------------------------------------------------------------------------------
# paged pool: compaction and merge through a slot map
# --------------------------------------------------------------------------------------------------------------

def shuffled_slot_map(rng, num_blocks, block_size, n_slots):
    """A sequence's slot map over a pool of num_blocks blocks: its blocks are a random subset of the pool's,
    in random order (as a pool hands them out after churn); covers whole blocks, so it may be longer than
    n_slots (the last block partly used)."""
    n_blocks = -(-n_slots // block_size)
    table = torch.tensor(rng.sample(range(num_blocks), n_blocks), dtype=torch.int32)
    return kernels.slot_map_from_block_table(table, n_blocks * block_size, block_size).to(DEVICE)


def check_paged(fn_single, fn_paged, k0, v0, p0, slot_map, n_valid, arg, n_mapped=None, **kw):
    """Run fn_paged on a copy of the pool through slot_map; the oracle is fn_single (the tested non-paged
    reference) on the sequence's logical cache, gathered through slot_map[:n_mapped] (default: all of it).
    Also: every physical slot not in that part of the map is untouched. Returns the paged result (k, v, p, n).

    k and positions must match exactly; v too, except after a merge in 16-bit (float32 sums, rounded once:
    Triton and torch may round the last bit differently, as in test_merge_matches_reference)."""
    k, v, p = k0.clone(), v0.clone(), p0.clone()
    n = fn_paged(k, v, p, arg, n_valid, slot_map=slot_map, **kw)
    mapped = slot_map[:n_mapped]
    kl, vl, pl = (t[:, :, mapped].contiguous() for t in (k0, v0, p0))
    assert fn_single(kl, vl, pl, arg, n_valid) == n
    assert_slots_equal(k[:, :, mapped], kl, "k (logical slots)")
    assert_slots_equal(p[:, :, mapped], pl, "positions (logical slots)")
    if fn_single is merge.merge_reference and v0.dtype != torch.float32:
        torch.testing.assert_close(v[:, :, mapped], vl, rtol=1.6e-2, atol=1e-2)
    else:
        assert_slots_equal(v[:, :, mapped], vl, "v (logical slots)")
    outside = torch.ones(k0.shape[2], dtype=torch.bool, device=k0.device)
    outside[mapped] = False
    for name, got, old in (("k", k, k0), ("v", v, v0), ("positions", p, p0)):
        assert_slots_equal(got[:, :, outside], old[:, :, outside], f"{name} outside the slot map")
    return k, v, p, n


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("n_keep", ["zero", "one", "all", "some"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_through_slot_map(block_size, per_head, n_keep, dtype):
    L, H, D, num_blocks, n_valid = 2, 3, 16, 24, 37  # n_valid ends mid-block for both block sizes
    rng = random.Random(block_size * 100 + per_head * 10 + len(n_keep))
    slot_map = shuffled_slot_map(rng, num_blocks, block_size, n_valid)
    n = {"zero": 0, "one": 1, "all": n_valid, "some": 19}[n_keep]
    keep = make_keep(rng, L, H, n_valid, n, per_head)
    k0, v0, p0 = make_kv(L, H, num_blocks * block_size, D, dtype, seed=2)
    # block_n=8: several chunks per row (the cross-chunk half of the hazard argument, through the map).
    kt, vt, pt, nt = check_paged(compaction.compact_reference, compaction.compact_triton, k0, v0, p0, slot_map,
                                 n_valid, keep, block_n=8)
    kr, vr, pr, nr = check_paged(compaction.compact_reference, compaction.compact_reference, k0, v0, p0, slot_map,
                                 n_valid, keep)
    assert nt == nr == n
    assert torch.equal(kt, kr) and torch.equal(vt, vr) and torch.equal(pt, pr)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("pattern", ["shift1", "cross_chunk", "every_other", "tail_half"])
def test_compact_slot_map_hazards(block_size, pattern):
    """The in-place hazard patterns of test_compact_in_place_hazards, in logical slots spread over shuffled
    blocks: sources sit in the chunk being written or in the next one."""
    L, H, D, num_blocks, n_valid, block_n = 1, 2, 16, 20, 48, 4
    keep = {
        "shift1": list(range(1, n_valid)),
        "cross_chunk": [j + block_n for j in range(n_valid - block_n)],
        "every_other": list(range(1, n_valid, 2)),
        "tail_half": list(range(n_valid // 2, n_valid)),
    }[pattern]
    keep = torch.tensor(keep, dtype=torch.int64)
    slot_map = shuffled_slot_map(random.Random(block_size), num_blocks, block_size, n_valid)
    k0, v0, p0 = make_kv(L, H, num_blocks * block_size, D, torch.float32)
    for n_blk in (block_n, 1, 64):
        check_paged(compaction.compact_reference, compaction.compact_triton, k0, v0, p0, slot_map, n_valid, keep,
                    block_n=n_blk)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_group", [1, 5])
def test_merge_through_slot_map(block_size, dtype, max_group):
    L, H, D, num_blocks, n_valid = 2, 2, 24, 16, 41
    rng = random.Random(block_size * 10 + max_group)
    slot_map = shuffled_slot_map(rng, num_blocks, block_size, n_valid)
    plan, groups, weights, anchors = random_plan(rng, n_valid, max_group=max_group)
    k0, v0, p0 = make_kv(L, H, num_blocks * block_size, D, dtype, seed=3)
    kt, vt, pt, nt = check_paged(merge.merge_reference, merge.merge_triton, k0, v0, p0, slot_map, n_valid, plan,
                                 block_n=4)
    kr, vr, pr, nr = check_paged(merge.merge_reference, merge.merge_reference, k0, v0, p0, slot_map, n_valid, plan)
    assert nt == nr == len(groups)
    assert torch.equal(kt, kr) and torch.equal(pt, pr)
    torch.testing.assert_close(vt, vr, rtol=1e-5 if dtype == torch.float32 else 1.6e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)
    # And against the slot-by-slot oracle on the logical cache.
    if nt:
        k_want, v_want, p_want = merge_oracle(*(t[:, :, slot_map] for t in (k0, v0, p0)), groups, weights, anchors)
        assert_slots_equal(kt[:, :, slot_map[:nt]], k_want, "k")
        assert_slots_equal(pt[:, :, slot_map[:nt]], p_want, "positions")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert ((vt[:, :, slot_map[:nt]].double() - v_want).abs() / (1 + v_want.abs())).max() <= tol


def test_slot_map_two_sequences_share_a_pool():
    """Two sequences in one pool, compacted and merged one after the other through their own slot maps, each
    equal to the same operation on a private cache; the other sequence's slots are never touched."""
    L, H, D, block_size, num_blocks = 2, 2, 16, 4, 12
    rng = random.Random(9)
    blocks = rng.sample(range(num_blocks), 10)
    tables = [torch.tensor(blocks[:5]), torch.tensor(blocks[5:])]
    maps = [kernels.slot_map_from_block_table(t, 20, block_size).to(DEVICE) for t in tables]
    k, v, p = make_kv(L, H, num_blocks * block_size, D, torch.float32)
    private = [tuple(t[:, :, m].contiguous() for t in (k, v, p)) for m in maps]
    keep = make_keep(rng, L, H, 18, 7, per_head=True)
    plan = MergePlan.from_groups([[0, 1], [3], [4, 6, 5]])
    assert kernels.compact_(k, v, p, keep, 18, slot_map=maps[0]) == 7
    assert kernels.merge_(k, v, p, plan, 19, slot_map=maps[1]) == 3
    kernels.compact_(*private[0], keep, 18)
    kernels.merge_(*private[1], plan, 19)
    for m, (kp, vp, pp) in zip(maps, private):
        assert torch.equal(k[:, :, m], kp) and torch.equal(v[:, :, m], vp) and torch.equal(p[:, :, m], pp)


@pytest.mark.parametrize("impl", [compaction.compact_triton, compaction.compact_reference])
def test_slot_map_entries_past_n_valid_are_not_read(impl):
    """A slot map may be longer than n_valid (whole blocks, a padded table): entries past n_valid are neither
    validated nor read, so padding may hold anything."""
    L, H, D, S, n_valid = 1, 2, 8, 32, 6
    slot_map = torch.tensor([9, 3, 30, 12, 0, 17, -1, 999, 3], device=DEVICE)
    k0, v0, p0 = make_kv(L, H, S, D, torch.float32)
    keep = torch.tensor([1, 2, 5])
    check_paged(compaction.compact_reference, impl, k0, v0, p0, slot_map, n_valid, keep, n_mapped=n_valid)


@pytest.mark.parametrize("impl", [compaction.compact_triton, compaction.compact_reference,
                                  merge.merge_triton, merge.merge_reference])
def test_bad_slot_maps_raise(impl):
    L, H, D, S, n_valid = 1, 2, 8, 16, 6
    k, v, p = make_kv(L, H, S, D, torch.float32)
    k0, p0 = k.clone(), p.clone()
    arg = MergePlan.keep([0, 2, 5]) if impl in (merge.merge_triton, merge.merge_reference) else torch.tensor([0, 2, 5])
    bad = {
        "float": (torch.tensor([0.0, 1, 2, 3, 4, 5]), "integer"),
        "bool": (torch.ones(6, dtype=torch.bool), "integer"),
        "2-D": (torch.arange(6).reshape(2, 3), "1-D"),
        "too short": (torch.arange(5), "fewer than n_valid"),
        "beyond S": (torch.tensor([0, 1, 2, 3, 4, S]), "lie in"),
        "negative": (torch.tensor([0, 1, -2, 3, 4, 5]), "lie in"),
        "duplicate": (torch.tensor([0, 1, 2, 3, 4, 1]), "distinct"),
    }
    for name, (slot_map, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            impl(k, v, p, arg, n_valid, slot_map=slot_map.to(DEVICE))
        assert torch.equal(k, k0) and torch.equal(p, p0), f"{name}: a rejected slot map must leave the pool untouched"
    # Python lists are accepted, as keep sets are.
    assert impl(k, v, p, arg, n_valid, slot_map=[7, 6, 5, 4, 3, 2]) == 3


@HYP
@given(L=st.integers(1, 2), H=st.integers(1, 3), D=st.sampled_from([8, 16, 24]),
       block_size=st.sampled_from([1, 4, 16]), extra_blocks=st.integers(0, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), op=st.sampled_from(["compact", "compact_per_head", "merge"]),
       block_n=st.sampled_from([None, 1, 8]), data=st.data())
def test_slot_map_property(L, H, D, block_size, extra_blocks, dtype, op, block_n, data):
    n_valid = data.draw(st.integers(0, 50), label="n_valid")
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    num_blocks = -(-n_valid // block_size) + extra_blocks
    if num_blocks == 0:
        return
    slot_map = shuffled_slot_map(rng, num_blocks, block_size, n_valid)
    k0, v0, p0 = make_kv(L, H, num_blocks * block_size, D, dtype, seed=rng.randrange(100))
    if op == "merge":
        plan = random_plan(rng, n_valid, max_group=rng.randint(1, 6), p_drop=rng.random() * 0.6)[0]
        kt, vt, pt, _ = check_paged(merge.merge_reference, merge.merge_triton, k0, v0, p0, slot_map, n_valid, plan,
                                    block_n=block_n)
    else:
        keep = make_keep(rng, L, H, n_valid, rng.randint(0, n_valid), per_head=op == "compact_per_head")
        check_paged(compaction.compact_reference, compaction.compact_triton, k0, v0, p0, slot_map, n_valid, keep,
                    block_n=block_n)


# --------------------------------------------------------------------------------------------------------------
# redundancy
# --------------------------------------------------------------------------------------------------------------

def clustered_keys(H, n, D, dtype, seed, n_clusters=4, noise=0.4, threshold=0.5):
    """Keys that mix near-duplicates (noisy copies of a few directions) with unrelated ones, with every pairwise
    similarity at least 1e-3 away from the threshold, so float rounding cannot flip a comparison between the
    kernel and the reference."""
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        base = torch.randn(H, n_clusters, D, generator=g)
        pick = torch.randint(0, n_clusters, (H, n), generator=g)
        keys = torch.gather(base, 1, pick[..., None].expand(H, n, D)) + noise * torch.randn(H, n, D, generator=g)
        lone = torch.rand(H, n, generator=g) < 0.3
        keys = torch.where(lone[..., None], torch.randn(H, n, D, generator=g), keys).to(dtype)
        s = redundancy._similarity_reference(keys)
        off_diag = ~torch.eye(n, dtype=torch.bool)
        if ((s - threshold).abs() > 1e-3)[:, off_diag].all():
            return keys.to(DEVICE)
    raise RuntimeError("could not draw keys away from the threshold")


def check_redundancy(keys, threshold=0.5, **kw):
    last_k = redundancy.last_similar_triton(keys, threshold, **kw)
    last_r = redundancy.last_similar_reference(keys, threshold)
    assert torch.equal(last_k.cpu(), last_r.cpu()), "pass 1 (last near-duplicate per row) differs"
    red_k = redundancy.key_redundancy_triton(keys, threshold, **kw)
    red_r = redundancy.key_redundancy_reference(keys, threshold)
    assert red_k.shape == keys.shape[:2] and red_k.dtype == torch.float32
    torch.testing.assert_close(red_k, red_r, rtol=1e-4, atol=1e-7)
    if keys.shape[1]:
        torch.testing.assert_close(red_k.sum(-1), torch.ones(keys.shape[0], device=keys.device))
    return last_r, red_r


def test_redundancy_reference_follows_the_spec():
    """Hand-made keys where the answer is known: rows name their last near-duplicate, which stops counting."""
    e = torch.eye(4)
    keys = torch.stack([e[0], e[0], e[1], e[0], e[1], e[2]])[None]  # [1, 6, 4]
    last, red = check_redundancy(keys.to(DEVICE))
    assert last.tolist() == [[3, 3, 4, 1, 2, -1]]
    # Column sums of S after zeroing: col 0 <- rows 1, 3 (row 1's last is 3, row 3's last is 1): 1 + 1;
    # col 1 <- rows 0 (last 3, keeps col 1) and 3 (zeroed): 1; col 3 <- rows 0, 1 zeroed: 0; ...
    means = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 0.0]) / 6
    torch.testing.assert_close(red.cpu(), torch.softmax(means, -1)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 16, 24, 64])
@pytest.mark.parametrize("n", [1, 2, 17, 70])
def test_redundancy_matches_reference(dtype, D, n):
    keys = clustered_keys(2, n, D, dtype, seed=n * 100 + D)
    check_redundancy(keys, block_m=16, block_n=32)


@pytest.mark.parametrize("threshold", [-2.0, 0.0, 0.9, 1.5])
def test_redundancy_thresholds(threshold):
    keys = clustered_keys(1, 23, 16, torch.float32, seed=7, threshold=threshold)
    last, _ = check_redundancy(keys, threshold, block_m=16, block_n=16)
    if threshold < -1:  # every other column passes: the last one is n-1 (n-2 for the last row)
        assert last[0, :-1].tolist() == [22] * 22 and int(last[0, -1]) == 21
    if threshold > 1:
        assert (last == -1).all()


def test_redundancy_on_a_pool_slice():
    """keys straight from the KV layout: k[l, :, :n, :] of [L, H, cap, D] is strided, not contiguous."""
    L, H, cap, D, n = 2, 2, 64, 24, 41
    k = torch.zeros(L, H, cap, D, device=DEVICE)
    k[1, :, :n] = clustered_keys(H, n, D, torch.float32, seed=11)
    check_redundancy(k[1, :, :n, :], block_m=16, block_n=16)
    check_redundancy(k[1, :, :n, :])  # default blocks: one tile covers every row


@HYP
@given(H=st.integers(1, 3), n=st.integers(0, 80), D=st.sampled_from([8, 16, 24, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), blocks=st.sampled_from([(16, 16), (16, 32), (None, None)]),
       seed=st.integers(0, 2**16))
def test_redundancy_property(H, n, D, dtype, blocks, seed):
    keys = clustered_keys(H, n, D, dtype, seed)
    check_redundancy(keys, block_m=blocks[0], block_n=blocks[1])


# --------------------------------------------------------------------------------------------------------------
# dispatch and environment
# --------------------------------------------------------------------------------------------------------------

def test_dispatch_follows_device_and_env(monkeypatch):
    cpu = torch.zeros(1)
    assert kernels.use_triton(cpu)
    monkeypatch.delenv("KVPILOT_FORCE_TRITON")
    assert not kernels.use_triton(cpu)
    # Without the override, CPU tensors take the torch path: make the Triton launchers fail loudly to prove it.
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("Triton path taken on CPU"))  # noqa: E731
    monkeypatch.setattr(compaction, "compact_triton", boom)
    monkeypatch.setattr(merge, "merge_triton", boom)
    monkeypatch.setattr(redundancy, "key_redundancy_triton", boom)
    k, v, p = make_kv(1, 1, 8, 8, torch.float32)
    if DEVICE.type == "cpu":
        assert kernels.compact_(k, v, p, torch.tensor([1, 3]), 8) == 2
        assert kernels.merge_(k, v, p, MergePlan.keep([0, 1]), 2) == 2
        assert kernels.key_redundancy(torch.randn(1, 5, 8)).shape == (1, 5)


def test_kernels_import_first_sets_interpreter_when_no_cuda():
    """A fresh process that imports kvpilot's kernels before triton can force the Triton path on CPU."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernels compile; the interpreter default only applies without it")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["KVPILOT_FORCE_TRITON"] = "1"
    code = ("import torch, kvpilot_kernels as kernels\n"
            "from kvpilot_kernels.merge import MergePlan\n"
            "k = torch.randn(1, 2, 9, 16); v = k.clone(); p = torch.arange(18).reshape(1, 2, 9)\n"
            "assert kernels.merge_(k, v, p, MergePlan.from_groups([[1, 2], [4]]), 9) == 2\n"
            "assert kernels.key_redundancy(torch.randn(2, 7, 16)).shape == (2, 7)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
