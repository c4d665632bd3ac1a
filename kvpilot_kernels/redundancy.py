"""R-KV key redundancy of one layer without materialising the n x n similarity matrix.

For keys [H, n, D] (one layer, per KV head), with S = cosine similarity of the keys of a head:

1. S_ii = 0.
2. For each row i, the LAST column j != i (largest index) with S_ij > threshold is set to 0: the most
   recent near-duplicate of a key does not count against it. A row with no such column is left as is.
3. redundancy_j = softmax_j( mean_i S_ij )  (mean over all n rows).

The Triton path runs two tiled passes, O(n) extra memory:

* pass 1 (`_last_similar_kernel`), one program per (row block, head), tiles over columns and keeps the
  running largest column above the threshold: last[h, i] (-1 when none);
* pass 2 (`_column_mean_kernel`), one program per (column block, head), tiles over rows and sums S_ij with
  the diagonal and (i, last[i]) zeroed, then divides by n.

The softmax over n values per head is done in torch. Keys are normalised on the fly: S_ij = (a_i . b_j) *
inv_i * inv_j with inv = 1 / (||x|| + eps), the same formula as the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compaction import launchable, use_triton

__all__ = ["key_redundancy", "key_redundancy_reference", "key_redundancy_triton", "last_similar_reference"]

EPS = 1e-8


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _cosine_tile(a, a32, b, b32, inv_a, inv_b, DOT_FP32: tl.constexpr):
    # DOT_FP32: fp32 keys need a full-precision dot (TF32 would move similarities across the threshold),
    # and the interpreter multiplies 16-bit floats wrongly. Otherwise fp16/bf16 tiles go to the tensor
    # cores as they are: their products are exact in fp32 and accumulate in fp32, the same sums.
    if DOT_FP32:
        dots = tl.dot(a32, tl.trans(b32), input_precision="ieee")
    else:
        dots = tl.dot(a, tl.trans(b))
    return dots * inv_a[:, None] * inv_b[None, :]


@triton.jit
def _last_similar_kernel(
    keys_ptr, last_ptr,
    n, D, stride_h, stride_n,
    threshold, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    head_base = head.to(tl.int64) * stride_h

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Out-of-range rows and padded head-dim columns load as zeros, which add nothing to any dot product.
    a = tl.load(keys_ptr + head_base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                mask=(rows[:, None] < n) & d_mask[None, :], other=0.0)
    a32 = a.to(tl.float32)
    inv_a = 1.0 / (tl.sqrt(tl.sum(a32 * a32, axis=1)) + eps)

    last = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = tl.load(keys_ptr + head_base + cols[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                    mask=(cols[:, None] < n) & d_mask[None, :], other=0.0)
        b32 = b.to(tl.float32)
        inv_b = 1.0 / (tl.sqrt(tl.sum(b32 * b32, axis=1)) + eps)
        s = _cosine_tile(a, a32, b, b32, inv_a, inv_b, DOT_FP32)
        hit = (s > threshold) & (cols[None, :] < n) & (cols[None, :] != rows[:, None])
        last = tl.maximum(last, tl.max(tl.where(hit, cols[None, :], -1), axis=1))
    tl.store(last_ptr + head.to(tl.int64) * n + rows, last, mask=rows < n)


@triton.jit
def _column_mean_kernel(
    keys_ptr, last_ptr, out_ptr,
    n, D, stride_h, stride_n,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    head_base = head.to(tl.int64) * stride_h

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(keys_ptr + head_base + cols[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                mask=(cols[:, None] < n) & d_mask[None, :], other=0.0)
    b32 = b.to(tl.float32)
    inv_b = 1.0 / (tl.sqrt(tl.sum(b32 * b32, axis=1)) + eps)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a = tl.load(keys_ptr + head_base + rows[:, None].to(tl.int64) * stride_n + offs_d[None, :],
                    mask=(rows[:, None] < n) & d_mask[None, :], other=0.0)
        a32 = a.to(tl.float32)
        inv_a = 1.0 / (tl.sqrt(tl.sum(a32 * a32, axis=1)) + eps)
        last = tl.load(last_ptr + head.to(tl.int64) * n + rows, mask=rows < n, other=-1)
        s = _cosine_tile(a, a32, b, b32, inv_a, inv_b, DOT_FP32)
        # Zero the diagonal and each row's most recent near-duplicate; padded rows load as zeros already.
        drop = (rows[:, None] == cols[None, :]) | (last[:, None] == cols[None, :])
        acc += tl.sum(tl.where(drop, 0.0, s), axis=0)
    tl.store(out_ptr + head.to(tl.int64) * n + cols, acc / n, mask=cols < n)


def _prepare_keys(keys: Tensor) -> Tensor:
    if keys.dim() != 3:
        raise ValueError(f"keys must be [H, n, D], got shape {tuple(keys.shape)}")
    if not keys.dtype.is_floating_point:
        raise ValueError(f"keys must be floating point, got {keys.dtype}")
    return keys


def _dot_fp32(keys: Tensor) -> bool:
    return keys.dtype == torch.float32 or keys.device.type == "cpu" or triton.knobs.runtime.interpret


def _blocks(D: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int]:
    # tl.dot needs every block dim >= 16; padded head-dim columns load as zeros and change nothing.
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # Keep the [BLOCK, BLOCK_D] tiles plus the [BLOCK_M, BLOCK_N] scores within registers for D up to 256.
    big = 64 if BLOCK_D <= 128 else 32
    return block_m or big, block_n or big, BLOCK_D


def last_similar_triton(keys: Tensor, threshold: float = 0.5, *, block_m: int | None = None,
                        block_n: int | None = None) -> Tensor:
    """Pass 1 alone: last[h, i] = largest j != i with S_ij > threshold, or -1. int32 [H, n]."""
    keys = _prepare_keys(keys)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    H, n, D = keys.shape
    last = torch.empty(H, n, dtype=torch.int32, device=keys.device)
    if H * n == 0:
        return last
    BLOCK_M, BLOCK_N, BLOCK_D = _blocks(D, block_m, block_n)
    launchable(_last_similar_kernel, keys.device)[(triton.cdiv(n, BLOCK_M), H)](
        keys, last, n, D, keys.stride(0), keys.stride(1), float(threshold), EPS,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_FP32=_dot_fp32(keys),
    )
    return last


def key_redundancy_triton(keys: Tensor, threshold: float = 0.5, *, block_m: int | None = None,
                          block_n: int | None = None) -> Tensor:
    """Triton launcher: two passes over tiles of S, then a torch softmax. float32 [H, n]."""
    keys = _prepare_keys(keys)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()  # the kernels read rows with unit stride; a pool slice [H, :n, D] already is
    H, n, D = keys.shape
    if H * n == 0:
        return torch.empty(H, n, dtype=torch.float32, device=keys.device)
    BLOCK_M, BLOCK_N, BLOCK_D = _blocks(D, block_m, block_n)
    last = last_similar_triton(keys, threshold, block_m=BLOCK_M, block_n=BLOCK_N)
    mean = torch.empty(H, n, dtype=torch.float32, device=keys.device)
    launchable(_column_mean_kernel, keys.device)[(triton.cdiv(n, BLOCK_N), H)](
        keys, last, mean, n, D, keys.stride(0), keys.stride(1), EPS,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_FP32=_dot_fp32(keys),
    )
    return torch.softmax(mean, dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Torch reference (materialises S; also the CPU serving path, where n is small)
# --------------------------------------------------------------------------------------------------------------

def _similarity_reference(keys: Tensor) -> Tensor:
    k = keys.float()
    unit = k / (k.norm(dim=-1, keepdim=True) + EPS)
    s = unit @ unit.transpose(-1, -2)
    s.diagonal(dim1=-2, dim2=-1).zero_()
    return s


def last_similar_reference(keys: Tensor, threshold: float = 0.5) -> Tensor:
    """Pass 1 in torch: int32 [H, n], -1 where a row has no column above the threshold."""
    keys = _prepare_keys(keys)
    H, n, _ = keys.shape
    s = _similarity_reference(keys)
    cols = torch.arange(n, device=keys.device)
    # The diagonal is 0 in s; it is excluded explicitly too, in case threshold < 0.
    hit = (s > threshold) & (cols[None, :] != cols[:, None])
    if n == 0:
        return torch.empty(H, 0, dtype=torch.int32, device=keys.device)
    return torch.where(hit, cols, -1).amax(dim=-1).to(torch.int32)


def key_redundancy_reference(keys: Tensor, threshold: float = 0.5) -> Tensor:
    """R-KV redundancy in torch, materialising S [H, n, n]. float32 [H, n]."""
    keys = _prepare_keys(keys)
    H, n, _ = keys.shape
    if n == 0:
        return torch.empty(H, 0, dtype=torch.float32, device=keys.device)
    s = _similarity_reference(keys)
    last = last_similar_reference(keys, threshold).long()
    h_idx, r_idx = torch.nonzero(last >= 0, as_tuple=True)
    s[h_idx, r_idx, last[h_idx, r_idx]] = 0.0
    return torch.softmax(s.mean(dim=1), dim=-1)


def key_redundancy(keys: Tensor, threshold: float = 0.5) -> Tensor:
    """R-KV key redundancy of one layer: keys [H, n, D] -> float32 [H, n] (a softmax over n per head).

    Triton on CUDA tensors (or with KVPILOT_FORCE_TRITON=1), the torch reference otherwise.
    """
    impl = key_redundancy_triton if use_triton(keys) else key_redundancy_reference
    return impl(keys, threshold)
