"""Paged decode attention: the Triton kernel against the torch reference, the reference against dense SDPA.

Environment as in tests/test_kernels.py (see its docstring for why this is safe for other test files):
TRITON_INTERPRET=1 before anything imports triton when CUDA is absent, and KVPILOT_FORCE_TRITON=1 per test
through an autouse fixture. Shapes stay small: the interpreter runs every program in Python.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kvpilot_kernels as kernels  # noqa: E402
from kvpilot_kernels import paged_attention as pa  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------

def make_case(lens, H, G, D, block_size, dtype=torch.float32, seed=0, spare_blocks=3, pad_value=0, extra_cols=1):
    """A pool [H, S, D] holding len(lens) sequences in shuffled, disjoint blocks (plus spare blocks nobody
    uses), block tables padded with `pad_value` past each sequence's blocks (and `extra_cols` more columns
    than the longest sequence needs), and one query per sequence. Returns q, k, v, block_tables, seq_lens."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    order = list(range(num_blocks))
    rng.shuffle(order)
    max_blocks = max(need, default=0) + extra_cols
    tables = torch.full((len(lens), max_blocks), pad_value, dtype=torch.int32)
    at = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = torch.tensor(order[at:at + nb], dtype=torch.int32)
        at += nb
    S = num_blocks * block_size
    k = torch.randn(H, S, D, generator=g).to(dtype)
    v = torch.randn(H, S, D, generator=g).to(dtype)
    q = (torch.randn(len(lens), H * G, D, generator=g) * 2).to(dtype)  # peaky enough to make softmax non-uniform
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k, v, tables, seq_lens))


def gathered(k, v, tables, b, n, block_size):
    slots = kernels.slot_map_from_block_table(tables[b], n, block_size)
    return k[:, slots], v[:, slots]


def check_against_reference(case, block_size, with_stats, rtol=1e-5, atol=1e-5, **kw):
    q, k, v, tables, lens = case
    out_t, st_t = pa.paged_decode_attention_triton(q, k, v, tables, lens, block_size, with_stats=with_stats, **kw)
    out_r, st_r = pa.paged_decode_attention_reference(q, k, v, tables, lens, block_size, with_stats=with_stats)
    assert out_t.dtype == q.dtype and out_t.shape == q.shape
    torch.testing.assert_close(out_t, out_r, rtol=rtol, atol=atol)
    if with_stats:
        H = k.shape[0]
        assert st_t.dtype == torch.float32 and st_t.shape == (q.shape[0], H, tables.shape[1] * block_size)
        torch.testing.assert_close(st_t, st_r, rtol=1e-5, atol=1e-6)
    else:
        assert st_t is None and st_r is None
    return out_t, st_t


# Ragged: empty, one slot, ends mid-block (for 4 and 16), a whole number of blocks, the longest.
LENS = [13, 0, 1, 32, 45]


# --------------------------------------------------------------------------------------------------------------
# Triton against the reference
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,G", [(2, 1), (2, 4), (2, 3)])  # Hq = 2, 8, 6: G = 3 is not a power of two
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("with_stats", [False, True])
def test_triton_matches_reference(H, G, block_size, with_stats):
    case = make_case(LENS, H, G, 32, block_size, seed=G * 10 + block_size)
    out, stats = check_against_reference(case, block_size, with_stats, block_n=16)
    assert not out[1].any(), "a sequence of length 0 must give zeros"
    if with_stats:
        assert not stats[1].any()


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("with_stats", [False, True])
def test_split_k_matches_reference(num_splits, with_stats):
    """The flash-decoding path (partials per split, then a combine kernel): splits past a short sequence's
    end are empty and must not disturb the result; 7 splits of 16 slots over max_len 48 -> 3 used."""
    case = make_case(LENS, 2, 3, 32, 4, seed=num_splits)
    check_against_reference(case, 4, with_stats, block_n=16, num_splits=num_splits)


@pytest.mark.parametrize("block_n", [16, 32, 64])
@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_tile_and_block_sizes(block_n, block_size):
    """Tiles that span several blocks, exactly one, or part of one (block_size > block_n)."""
    case = make_case([70, 5, 64], 1, 2, 16, block_size, seed=block_n + block_size)
    check_against_reference(case, block_size, True, block_n=block_n)


@pytest.mark.parametrize("D", [8, 24, 64])
def test_head_dims(D):
    """Head dims below tl.dot's 16 and not a power of two: padded columns are masked."""
    case = make_case([9, 30], 2, 2, D, 4, seed=D)
    check_against_reference(case, 4, True, block_n=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit(dtype):
    case = make_case(LENS, 2, 3, 32, 16, dtype=dtype, seed=5)
    out, stats = check_against_reference(case, 16, True, rtol=1.6e-2, atol=1e-2, block_n=16)
    assert stats is not None


def test_float32_query_on_a_bfloat16_pool():
    q, k, v, tables, lens = make_case(LENS, 2, 2, 16, 4, dtype=torch.bfloat16, seed=8)
    out, _ = check_against_reference((q.float(), k, v, tables, lens), 4, True, block_n=16)
    assert out.dtype == torch.float32


def test_scale_and_strided_query():
    """An explicit scale; q as a strided view (every other head of a larger tensor, as a fused QKV
    projection would hand it over)."""
    q, k, v, tables, lens = make_case(LENS, 2, 2, 16, 4, seed=4)
    wide = torch.zeros(q.shape[0], 2 * q.shape[1], q.shape[2], device=DEVICE)
    wide[:, ::2] = q
    q_view = wide[:, ::2]
    assert not q_view.is_contiguous()
    out_t, st_t = pa.paged_decode_attention_triton(q_view, k, v, tables, lens, 4, 0.3, with_stats=True, block_n=16)
    out_r, st_r = pa.paged_decode_attention_reference(q, k, v, tables, lens, 4, 0.3, with_stats=True)
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_t, st_r, rtol=1e-5, atol=1e-6)


def test_block_table_padding_is_never_read():
    """Entries past a sequence's blocks may hold anything: here indices far outside the pool, which a
    dereference would show (a crash or garbage)."""
    case = make_case(LENS, 2, 2, 16, 4, seed=6, pad_value=10**6, extra_cols=3)
    check_against_reference(case, 4, True, block_n=16)
    check_against_reference(case, 4, True, block_n=16, num_splits=3)


def test_all_sequences_empty():
    case = make_case([0, 0], 2, 2, 16, 4, seed=1)
    out, stats = check_against_reference(case, 4, True, block_n=16)
    assert not out.any() and not stats.any()


def test_seq_len_past_the_block_table():
    """The kernel clamps a length past max_blocks * block_size (it never reads past the table); the
    reference, which checks values anyway, raises."""
    q, k, v, tables, lens = make_case([8, 12], 1, 2, 16, 4, seed=2, extra_cols=0)
    too_long = torch.tensor([8, 99], dtype=torch.int32, device=DEVICE)
    out_t, st_t = pa.paged_decode_attention_triton(q, k, v, tables, too_long, 4, with_stats=True, block_n=16)
    out_r, st_r = pa.paged_decode_attention_reference(q, k, v, tables, lens, 4, with_stats=True)
    torch.testing.assert_close(out_t, out_r)
    torch.testing.assert_close(st_t, st_r)
    with pytest.raises(ValueError, match="seq_lens"):
        pa.paged_decode_attention_reference(q, k, v, tables, too_long, 4)


# --------------------------------------------------------------------------------------------------------------
# The reference against independent computations
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,G", [(2, 1), (2, 4), (2, 3)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_dense_sdpa(H, G, block_size):
    """out: SDPA over each sequence's KV gathered through its block table (KV heads repeated for the
    group). slot_attention: SDPA with the identity as values returns the probabilities themselves."""
    q, k, v, tables, lens = make_case(LENS, H, G, 32, block_size, seed=G + block_size)
    out, stats = pa.paged_decode_attention_reference(q, k, v, tables, lens, block_size, with_stats=True)
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            assert not out[b].any() and not stats[b].any()
            continue
        kb, vb = gathered(k, v, tables, b, n, block_size)
        kq = kb.double().repeat_interleave(G, dim=0)  # [Hq, n, D]: query head i reads KV head i // G
        vq = vb.double().repeat_interleave(G, dim=0)
        qb = q[b].double()[:, None, :]  # [Hq, 1, D]
        want = F.scaled_dot_product_attention(qb, kq, vq)[:, 0]
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-6)
        eye = torch.eye(n, dtype=torch.float64, device=DEVICE).expand(H * G, n, n)
        probs = F.scaled_dot_product_attention(qb, kq, eye)[:, 0]  # [Hq, n]
        want_stats = probs.view(H, G, n).sum(dim=1)
        torch.testing.assert_close(stats[b, :, :n].double(), want_stats, rtol=1e-5, atol=1e-7)
        assert not stats[b, :, n:].any()


@pytest.mark.parametrize("impl", [pa.paged_decode_attention_triton, pa.paged_decode_attention_reference])
@pytest.mark.parametrize("G", [1, 3, 4])
def test_slot_attention_sums_to_group_size(impl, G):
    q, k, v, tables, lens = make_case(LENS, 2, G, 16, 4, seed=G)
    kw = {"block_n": 16} if impl is pa.paged_decode_attention_triton else {}
    _, stats = impl(q, k, v, tables, lens, 4, with_stats=True, **kw)
    totals = stats.sum(dim=-1)  # [B, H]
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(totals[b], torch.full_like(totals[b], float(G) if n else 0.0), rtol=1e-5, atol=1e-5)
    assert (stats >= 0).all()


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, tables, lens = make_case([7], 1, 1, 16, 4, seed=3)
    a, _ = pa.paged_decode_attention_reference(q, k, v, tables, lens, 4)
    b, _ = pa.paged_decode_attention_reference(q, k, v, tables, lens, 4, 1 / math.sqrt(16))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# checks and dispatch
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [pa.paged_decode_attention_triton, pa.paged_decode_attention_reference])
def test_bad_arguments_raise(impl):
    q, k, v, tables, lens = make_case([5, 9], 2, 2, 16, 4, seed=0)
    bad = {
        "block size not a power of two": dict(block_size=3),
        "block size zero": dict(block_size=0),
        "pool not a whole number of blocks": dict(k=k[:, :-1], v=v[:, :-1]),
        "Hq not a multiple of H": dict(q=q[:, :3]),
        "head dims differ": dict(q=q[..., :8]),
        "v differs from k": dict(v=v.half()),
        "integer q": dict(q=q.long()),
        "float block table": dict(tables=tables.float()),
        "block table rows": dict(tables=tables[:1]),
        "seq_lens shape": dict(lens=lens[:1]),
        "float seq_lens": dict(lens=lens.float()),
    }
    for name, change in bad.items():
        a = dict(q=q, k=k, v=v, tables=tables, lens=lens, block_size=4) | change
        with pytest.raises(ValueError):
            impl(a["q"], a["k"], a["v"], a["tables"], a["lens"], a["block_size"])
    if impl is pa.paged_decode_attention_reference:
        with pytest.raises(ValueError, match="block"):
            impl(q, k, v, torch.full_like(tables, 10**6), lens, 4)


def test_public_entry_dispatches(monkeypatch):
    case = make_case(LENS, 2, 2, 16, 4, seed=0)
    want = pa.paged_decode_attention_reference(*case, 4, with_stats=True)
    got = kernels.paged_decode_attention(*case, 4, with_stats=True)  # forced: Triton under the interpreter
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    if DEVICE.type == "cpu":
        monkeypatch.delenv("KVPILOT_FORCE_TRITON")
        boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("Triton path taken on CPU"))  # noqa: E731
        monkeypatch.setattr(pa, "paged_decode_attention_triton", boom)
        out, stats = kernels.paged_decode_attention(*case, 4)
        assert stats is None and torch.equal(out, want[0])


def test_reference_ignores_nan_outside_the_valid_slots():
    """Another sequence's NaN in the tail of a shared-size block, or behind padding, never reaches an output."""
    torch.manual_seed(0)
    H, G, D, bs = 2, 2, 8, 4
    k_cache, v_cache = torch.randn(H, 8 * bs, D), torch.randn(H, 8 * bs, D)
    v_cache[:, 2 * bs + 3] = float("nan")  # the tail slot of block 2, past the sequence's 3 valid slots
    v_cache[:, :bs] = float("nan")  # block 0: what padded table entries pointed at
    q = torch.randn(2, H * G, D)
    tables = torch.tensor([[2, 0], [5, 6]], dtype=torch.int32)
    out, stats = kernels.paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor([3, 6]), bs,
                                                          with_stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
