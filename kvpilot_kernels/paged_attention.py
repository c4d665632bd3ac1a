"""Paged decode attention with fused attention statistics.

Layout (fixed by the paged KV pool), for one layer:

    q             [B, Hq, D]          one decode query per sequence, any float dtype; Hq = G * H
    k_cache       [H, S, D]           pool.k[layer]: S = num_blocks * block_size physical slots
    v_cache       [H, S, D]           pool.v[layer]
    block_tables  int32 [B, max_blocks]  physical block of each logical block; entries past a sequence's
                                      blocks may hold anything (they are never dereferenced)
    seq_lens      int32 [B]           valid logical slots per sequence (0 for a padding row)

Logical slot j of sequence b lives at physical slot `block_tables[b, j // block_size] * block_size +
j % block_size`. Query head i uses KV head i // G (grouped-query attention). The new token's K/V is already
in the pool, so the query attends to all seq_len slots: no causal mask.

    out             [B, Hq, D]        q's dtype, float32 accumulation; zeros for seq_len == 0
    slot_attention  float32 [B, H, max_len], max_len = max_blocks * block_size (only with_stats):
                    slot_attention[b, h, j] = sum over the G query heads of group h of softmax_j, for
                    j < seq_len; 0 beyond. Summed over the group because the engine adds it, per KV head,
                    to its cumulative and decayed attention scores (the statistics compaction policies use).

Triton kernel
-------------
One program per (sequence, KV head) handles the G query heads of the group together: every K/V tile is
loaded once for all G queries (the whole point of grouping: decode attention is bound by reading the
cache, and a program per query head would read each KV head G times). G is padded to a power of two >= 16
(tl.dot's minimum; padded rows have zero queries and are masked off on every store), and so is the head
dim D (padded columns load as zeros: any D works, not only powers of two). The program walks the
sequence in tiles of BLOCK_N logical slots (a tile spans BLOCK_N / block_size blocks, or part of one block,
whichever block_size is: each slot's physical row is gathered through the block table), with an online
softmax: running max m and running sum l in float32, exp2 with the scale folded into log2(e).

Statistics need each slot's final probability, p_j = exp(s_j - m) / l, which is known only once the whole
sequence has been seen. Rather than writing every raw score and renormalising in a second kernel, the
program runs a second loop after the first (log-sum-exp second pass): it recomputes the scores of every
tile (K tiles only, no V) with the final m and l and writes p summed over the G heads. The pass is compiled
out (constexpr STATS) without with_stats, so plain decoding pays nothing for it.

Split-K (flash-decoding) for few programs: B * H programs can be far fewer than the GPU's SMs (one
sequence of a 2-KV-head model is 2 programs), leaving most of the GPU idle during a long context. The
launcher then splits each sequence into `num_splits` partitions of whole tiles: a first kernel writes each
partition's unnormalised (m, l, acc) to a float32 scratch, a second one, per (sequence, KV head, split),
reduces the partials of all splits to the final (m, l); split 0 writes the output and, with statistics,
every split runs the second pass over its own partition with the global (m, l). With one split (the
default whenever B * H fills the GPU, and on CPU) it is exactly the single-program kernel above.

Dtypes: scores and the P @ V product use tl.dot on the cache dtype (bf16/fp16 tensor cores, float32
accumulation); float32 inputs, mixed q/cache dtypes and the interpreter use an IEEE float32 dot instead
(TF32 would cost ~1e-3 relative error, and the interpreter multiplies 16-bit floats wrongly).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compaction import launchable, use_triton

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
           "slot_map_from_block_table"]

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: -inf - -inf would be NaN


# --------------------------------------------------------------------------------------------------------------
# Checks and helpers
# --------------------------------------------------------------------------------------------------------------

def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           block_size: int) -> tuple[int, int, int, int, int, int]:
    """Shape/dtype/device checks (no device sync). Returns B, Hq, D, H, G, max_len."""
    if q.dim() != 3 or not q.dtype.is_floating_point:
        raise ValueError(f"q must be a float [B, Hq, D] tensor, got {q.dtype} {tuple(q.shape)}")
    if k_cache.dim() != 3 or not k_cache.dtype.is_floating_point:
        raise ValueError(f"k_cache must be a float [H, S, D] tensor (one layer of the pool), got {k_cache.dtype} {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {v_cache.dtype} {tuple(v_cache.shape)} must match k_cache {k_cache.dtype} {tuple(k_cache.shape)}")
    B, Hq, D = q.shape
    H, S, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) and of the cache ({Dk}) differ")
    if H == 0 or Hq % H != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H}) for grouped-query attention")
    if not isinstance(block_size, int) or not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size!r}")
    if S % block_size != 0:
        raise ValueError(f"the pool's slot count S={S} must be a multiple of block_size={block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be int32 [B={B}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (B,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int32 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, caches, block_tables and seq_lens must be on one device, got {sorted(map(str, devices))}")
    return B, Hq, D, H, Hq // H, block_tables.shape[1] * block_size


def slot_map_from_block_table(block_table: Tensor, n: int, block_size: int) -> Tensor:
    """Physical slot of each of a sequence's first n logical slots: int64 [n],
    `block_table[j // block_size] * block_size + j % block_size` (the slot map compact_/merge_ take)."""
    j = torch.arange(n, device=block_table.device)
    return block_table.to(torch.int64)[j // block_size] * block_size + j % block_size


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _physical_rows(bt_row_ptr, offs_n, n_mask, BLOCK_SIZE: tl.constexpr):
    # Logical slot -> physical slot, int64 (H * S * D overflows int32 in a large pool). block_size is a
    # constexpr power of two: the division and modulo are shifts and masks.
    blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    return blk * BLOCK_SIZE + (offs_n % BLOCK_SIZE)


@triton.jit
def _score_tile(q, k, qk_scale, DOT_FP32: tl.constexpr):
    # [BLOCK_G, BLOCK_N] scores in the log2 domain (scale * log2(e) folded in).
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q.to(k.dtype), tl.trans(k))
    return s * qk_scale


@triton.jit
def _pv_tile(p, v, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


@triton.jit
def _stats_pass(
    q, k_ptr, k_head_base, stride_ks, bt_row_ptr, stats_row_ptr,
    m, l, g_mask, offs_d, d_mask,
    lo, hi, seq_len, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Write slot_attention for logical slots [lo, hi): sum over the group of exp2(s - m) / l where the slot
    is < seq_len, 0 beyond. m, l are the final (global) max and sum of each query row."""
    # Padded query rows (g >= G) add nothing; an empty sequence has l == 0 and no scores to write anyway.
    inv_l = tl.where(g_mask & (l > 0), 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    valid_end = tl.maximum(tl.minimum(hi, seq_len), lo)
    offs = tl.arange(0, BLOCK_N)
    for start in range(lo, valid_end, BLOCK_N):
        offs_n = start + offs
        n_mask = offs_n < valid_end
        phys = _physical_rows(bt_row_ptr, offs_n, n_mask, BLOCK_SIZE)
        k = tl.load(k_ptr + k_head_base + phys[:, None] * stride_ks + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = _score_tile(q, k, qk_scale, DOT_FP32)
        p = tl.where(g_mask[:, None] & n_mask[None, :], tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
        # Slots of the last tile past seq_len get 0 here (still < hi); the rest of [lo, hi) below.
        tl.store(stats_row_ptr + offs_n, tl.sum(p, axis=0), mask=offs_n < hi)
    zero_from = lo + tl.cdiv(valid_end - lo, BLOCK_N) * BLOCK_N
    for start in range(zero_from, hi, BLOCK_N):
        offs_n = start + offs
        tl.store(stats_row_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=offs_n < hi)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, stats_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,  # split-K scratch (unused with one split)
    qk_scale, G, max_len, part_len, num_splits,
    stride_qb, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
    stride_btb, stride_ob, stride_oh, stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, STATS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    H = tl.num_programs(1)
    # A length past the block table would dereference table entries that are not there: clamp.
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), max_len)
    lo = split * part_len
    hi = tl.minimum(lo + part_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    qo_mask = g_mask[:, None] & d_mask[None, :]
    q_rows = (h * G + offs_g).to(tl.int64)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0)

    k_head_base = h.to(tl.int64) * stride_kh
    v_head_base = h.to(tl.int64) * stride_vh
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_btb

    m = tl.full([BLOCK_G], NEG_BIG, dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs
        n_mask = offs_n < hi
        phys = _physical_rows(bt_row_ptr, offs_n, n_mask, BLOCK_SIZE)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + k_head_base + phys[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.where(n_mask[None, :], _score_tile(q, k, qk_scale, DOT_FP32), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_head_base + phys[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _pv_tile(p, v, DOT_FP32)
        m = m_new

    if SPLIT:
        # Unnormalised partials, padded rows and columns included (the scratch has padded shapes).
        part = ((b * H + h) * num_splits + split).to(tl.int64)
        tl.store(part_m_ptr + part * BLOCK_G + offs_g, m)
        tl.store(part_l_ptr + part * BLOCK_G + offs_g, l)
        tl.store(part_acc_ptr + (part * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :], acc)
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty sequence: acc == 0, out == 0
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + q_rows[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qo_mask)
        if STATS:
            _stats_pass(q, k_ptr, k_head_base, stride_ks, bt_row_ptr,
                        stats_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh,
                        m, l, g_mask, offs_d, d_mask, 0, max_len, seq_len, qk_scale,
                        BLOCK_N, BLOCK_SIZE, DOT_FP32)


@triton.jit
def _paged_decode_combine_kernel(
    q_ptr, k_ptr, bt_ptr, lens_ptr, out_ptr, stats_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    qk_scale, G, max_len, part_len, num_splits,
    stride_qb, stride_qh, stride_kh, stride_ks,
    stride_btb, stride_ob, stride_oh, stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLITS_POW2: tl.constexpr, STATS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)  # 0 only, without statistics
    H = tl.num_programs(1)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    # Global max and sum from every split's partials: M = max_s m_s, L = sum_s l_s * 2^(m_s - M).
    first = ((b * H + h) * num_splits).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_POW2)
    s_mask = offs_s < num_splits
    idx = (first + offs_s)[:, None] * BLOCK_G + offs_g[None, :]
    m_s = tl.load(part_m_ptr + idx, mask=s_mask[:, None], other=NEG_BIG)
    l_s = tl.load(part_l_ptr + idx, mask=s_mask[:, None], other=0.0)
    m = tl.max(m_s, axis=0)
    l = tl.sum(l_s * tl.exp2(m_s - m[None, :]), axis=0)

    q_rows = (h * G + offs_g).to(tl.int64)
    qo_mask = g_mask[:, None] & d_mask[None, :]
    if split == 0:
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for s in range(0, num_splits):
            row = (first + s) * BLOCK_G + offs_g
            w = tl.exp2(tl.load(part_m_ptr + row) - m)
            acc += w[:, None] * tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :])
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + q_rows[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qo_mask)
    if STATS:
        seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int32), 0), max_len)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0)
        lo = split * part_len
        _stats_pass(q, k_ptr, h.to(tl.int64) * stride_kh, stride_ks, bt_ptr + b.to(tl.int64) * stride_btb,
                    stats_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh,
                    m, l, g_mask, offs_d, d_mask, lo, tl.minimum(lo + part_len, max_len), seq_len, qk_scale,
                    BLOCK_N, BLOCK_SIZE, DOT_FP32)


def _num_splits(B: int, H: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Splits per sequence so that B * H * splits programs fill the GPU (about two waves of SMs), each split
    keeping at least 4 tiles so the extra reduction stays small. 1 on CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, B * H))
    return max(1, min(want, triton.cdiv(max_len, 4 * block_n)))


def paged_decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                                  block_size: int, scale: float | None = None, *, with_stats: bool = False,
                                  num_splits: int | None = None, block_n: int | None = None,
                                  num_warps: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Triton launcher (module docstring). `num_splits` (default: enough to fill the GPU, 1 on CPU),
    `block_n` (slots per tile, a power of two >= 16) and `num_warps` are tuning knobs; the result does not
    depend on them beyond float rounding.

    Defaults (untuned: no GPU was at hand when this was written; chosen from ptxas resource usage for sm_90,
    bf16, D=128, G padded to 16): 64-slot tiles with 8 warps use ~195 registers and no spills, while 64 with
    4 warps spills and 32 with 4 warps moves half the bytes per iteration. benchmarks/attention_bench.py
    measures them against SDPA."""
    B, Hq, D, H, G, max_len = _check(q, k_cache, v_cache, block_tables, seq_lens, block_size)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    stats = torch.empty(B, H, max_len, dtype=torch.float32, device=q.device) if with_stats else None
    if B == 0 or Hq == 0 or D == 0:
        return out.zero_(), stats
    if max_len == 0:
        return out.zero_(), stats
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need unit stride along the head dim (pool.k[layer] has it)")
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()

    BLOCK_N = block_n or 64
    num_warps = num_warps or (8 if BLOCK_N >= 64 else 4)
    if BLOCK_N < 16 or not _is_pow2(BLOCK_N):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot's minimum), got {BLOCK_N}")
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16; padded rows are masked
    BLOCK_D = max(16, triton.next_power_of_2(D))
    dot_fp32 = (q.dtype == torch.float32 or k_cache.dtype == torch.float32 or q.dtype != k_cache.dtype
                or q.device.type == "cpu" or triton.knobs.runtime.interpret)
    splits = num_splits or _num_splits(B, H, max_len, BLOCK_N, q.device)
    splits = max(1, min(int(splits), triton.cdiv(max_len, BLOCK_N)))
    part_len = triton.cdiv(triton.cdiv(max_len, splits), BLOCK_N) * BLOCK_N  # whole tiles per split
    splits = triton.cdiv(max_len, part_len)
    qk_scale = scale * LOG2E
    stats_arg = stats if stats is not None else out  # an unused pointer without statistics
    s_strides = (stats.stride(0), stats.stride(1)) if stats is not None else (0, 0)
    common = dict(HEAD_DIM=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
                  STATS=with_stats, DOT_FP32=dot_fp32, num_warps=num_warps)

    if splits == 1:
        launchable(_paged_decode_kernel, q.device)[(B, H, 1)](
            q, k_cache, v_cache, block_tables, seq_lens, out, stats_arg,
            out, out, out,
            qk_scale, G, max_len, part_len, 1,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            block_tables.stride(0), out.stride(0), out.stride(1), *s_strides,
            SPLIT=False, **common)
        return out, stats

    part_m = torch.empty(B, H, splits, BLOCK_G, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B, H, splits, BLOCK_G, BLOCK_D, dtype=torch.float32, device=q.device)
    launchable(_paged_decode_kernel, q.device)[(B, H, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, stats_arg,
        part_m, part_l, part_acc,
        qk_scale, G, max_len, part_len, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1), *s_strides,
        SPLIT=True, **common)
    launchable(_paged_decode_combine_kernel, q.device)[(B, H, splits if with_stats else 1)](
        q, k_cache, block_tables, seq_lens, out, stats_arg,
        part_m, part_l, part_acc,
        qk_scale, G, max_len, part_len, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1), *s_strides,
        SPLITS_POW2=triton.next_power_of_2(splits), **common)
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# Torch reference (what runs without Triton)
# --------------------------------------------------------------------------------------------------------------

def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                                     block_size: int, scale: float | None = None, *,
                                     with_stats: bool = False) -> tuple[Tensor, Tensor | None]:
    """Same contract as `paged_decode_attention_triton`, in torch: gather every sequence's slots through its
    block table (padded to max_len; padding table entries are replaced, never dereferenced) and run plain
    masked softmax attention in float32, all sequences at once (what `paged_decode_attention` runs without
    Triton; the engine's CPU path is its own batched attention in decoder_service/attention.py). Checks
    seq_lens and the used block ids (one sync) and raises ValueError where the kernel would read outside the
    pool."""
    B, Hq, D, H, G, max_len = _check(q, k_cache, v_cache, block_tables, seq_lens, block_size)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if B == 0 or max_len == 0:
        stats = torch.zeros(B, H, max_len, dtype=torch.float32, device=q.device) if with_stats else None
        return torch.zeros_like(q), stats
    lens = seq_lens.to(torch.int64)
    if int(lens.min()) < 0 or int(lens.max()) > max_len:
        raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {max_len}], got "
                         f"[{int(lens.min())}, {int(lens.max())}]")
    n_blocks = k_cache.shape[1] // block_size
    tables = block_tables.to(torch.int64)
    used = torch.arange(tables.shape[1], device=q.device) < ((lens + block_size - 1) // block_size)[:, None]
    if used.any():
        ids = tables[used]
        if int(ids.min()) < 0 or int(ids.max()) >= n_blocks:
            raise ValueError(f"block_tables hold a block outside [0, {n_blocks}) among the blocks of the sequences")
    tables = torch.where(used, tables, 0)  # padding entries may hold anything: never gather through them
    j = torch.arange(max_len, device=q.device)
    slots = tables[:, j // block_size] * block_size + j % block_size  # [B, max_len]
    valid = j[None, :] < lens[:, None]  # [B, max_len]
    k = k_cache[:, slots].float().transpose(0, 1)  # [B, H, max_len, D]
    # Invalid slots (a last block's tail, padding) may hold another sequence's data, even NaN: zero their
    # values, since a probability of 0 times NaN would still be NaN.
    v = v_cache[:, slots].float().transpose(0, 1).masked_fill(~valid[:, None, :, None], 0.0)
    scores = (q.float().view(B, H, G, D) @ k.transpose(-1, -2)) * scale  # [B, H, G, max_len]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # An empty sequence's row is all -inf (softmax NaN): its probabilities are 0, so its output is 0.
    p = torch.softmax(scores, dim=-1).masked_fill(~valid[:, None, None, :], 0.0)
    out = (p @ v).reshape(B, Hq, D)
    return out.to(q.dtype), (p.sum(dim=2) if with_stats else None)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           block_size: int, scale: float | None = None, *,
                           with_stats: bool = False) -> tuple[Tensor, Tensor | None]:
    """Decode attention of one query per sequence over its paged KV: (out [B, Hq, D], slot_attention
    float32 [B, H, max_blocks * block_size] or None). See the module docstring for the layout.

    Triton on CUDA tensors (or with KVPILOT_FORCE_TRITON=1), the torch reference otherwise.
    """
    impl = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_reference
    return impl(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, with_stats=with_stats)
