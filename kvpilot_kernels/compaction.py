"""In-place KV compaction: move the kept slots of every (layer, KV head) row to the front of the row.

Layout (fixed by decoder_service/kv_pool.py), per sequence:

    k, v       [L, H, cap, D]   contiguous
    positions  [L, H, cap]      int64, logical position of each slot

`keep` is either global `[n_keep]` (the same slots in every row) or per head `[L, H, n_keep]`. Indices are
strictly ascending within a row, unique and `< n_valid`. After `compact_` row (l, h) holds in slots
`[0, n_keep)` the old slots `keep[l, h, :]`, with k, v and positions moved together; the caller lowers its
valid count to the returned `n_keep`, so the freed tail takes new tokens (memory is reclaimed, not masked).

Paged pool: compaction through a slot map
-----------------------------------------
With `slot_map` (int64 [>= n_valid], distinct entries) k, v and positions are the WHOLE paged pool,
[L, H, S, D] and [L, H, S] with S = num_blocks * block_size physical slots, and row (l, h)'s logical slot j
lives at physical slot `slot_map[j]` (the engine builds it from the sequence's block table:
`block_table[j // block_size] * block_size + j % block_size`, the same map for every (layer, head) row).
The contract is unchanged, in logical slots: afterwards logical slot j (physical `slot_map[j]`) holds old
logical slot `keep[l, h, j]` (physical `slot_map[keep[l, h, j]]`). Only the physical slots
`slot_map[:n_keep]` are written and only `slot_map[:n_valid]` are read; every other physical slot of the
pool (other sequences, this sequence's freed tail) is left untouched. Entries of `slot_map` beyond n_valid
(e.g. padding of a block table) are never read, nor validated. The launchers map the keep set to physical
sources once on the device (`slot_map[keep]`) and the kernel maps each destination j through `slot_map`.

Hazard-freedom of the in-place move
-----------------------------------
Strictly ascending, non-negative indices give keep[j] >= j for every j (by induction: keep[0] >= 0 and
keep[j] > keep[j-1] >= j-1). Destination slot j is therefore never *after* the source it receives. One
program walks its row in ascending chunks of BLOCK_N destinations [c*B, (c+1)*B):

* within a chunk, all loads come before all stores (the whole chunk lives in registers, and a CTA barrier
  separates the loads from the stores, because the threads of one program are not in lock step on a GPU:
  without it one warp could store slot j before another warp has loaded keep[j'] == j);
* a later chunk c' > c only reads slots keep[j] >= j >= c'*B >= (c+1)*B, never a slot chunk c wrote;
* chunk c's own reads that reach into later chunks' destinations happened before chunk c's barrier, which
  every thread passes before it reaches any later chunk's stores.

So no source is overwritten before it is read. The argument lives entirely in logical slots, and a slot map
preserves it: the map is injective (distinct entries), so the physical destination `slot_map[j]` equals the
physical source `slot_map[keep[j']]` exactly when j == keep[j'], i.e. the physical accesses collide exactly
where the logical ones do, and the ordering above still separates every read from the write over it. Rows
(l, h) stay disjoint because each row has its own [S, D] plane of the pool. Programs never share memory: a program owns one (layer,
head) row and one slice of the head dimension (a second grid axis, so a few rows still fill the GPU), and
the positions of a row are moved only by the program of the first slice.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

__all__ = ["compact_", "compact_reference", "compact_triton", "check_keep", "check_slot_map", "launchable", "use_triton"]


# --------------------------------------------------------------------------------------------------------------
# Shared launcher helpers
# --------------------------------------------------------------------------------------------------------------

_INTERPRETED: dict = {}


def use_triton(*tensors: Tensor) -> bool:
    """Dispatch rule of the public entry points: Triton for CUDA tensors, or everywhere when
    KVPILOT_FORCE_TRITON=1 (the kernel tests, under the interpreter); the torch reference otherwise (the
    engine on CPU). Read at call time, so a test can flip it without re-importing anything."""
    if os.environ.get("KVPILOT_FORCE_TRITON", "") == "1":
        return True
    return any(t.is_cuda for t in tensors)


def launchable(kernel, device: torch.device):
    """The form of a @triton.jit kernel that can run on `device`.

    Triton picks compiled vs interpreted when `@triton.jit` runs, i.e. at import. Our kernels are rebuilt
    as interpreter functions for CPU tensors (or when the interpreter knob is on now), so import order of
    *this* package does not matter. Triton's own library helpers (tl.zeros, tl.max, tl.sum, ...) are jitted
    when triton itself is imported, though: the interpreter can run them only if TRITON_INTERPRET=1 was set
    before the first `import triton` in the process (kvpilot_kernels/__init__.py sets it on machines without CUDA).
    """
    interpreted = isinstance(kernel, InterpretedFunction)
    if not (interpreted or device.type == "cpu" or triton.knobs.runtime.interpret):
        return kernel  # compiled, on the GPU
    if isinstance(tl.zeros, JITFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors run under the Triton interpreter, but triton was imported before "
            "TRITON_INTERPRET=1 was set, so its library helpers cannot be interpreted. Set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton (or import `kvpilot_kernels` first; "
            "without CUDA it sets the default).")
    if interpreted:
        return kernel
    wrapped = _INTERPRETED.get(kernel)
    if wrapped is None:
        wrapped = _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return wrapped


def _check_kv(k: Tensor, v: Tensor, positions: Tensor, n_valid: int) -> tuple[int, int, int, int]:
    if k.dim() != 4:
        raise ValueError(f"k must be [L, H, cap, D], got shape {tuple(k.shape)}")
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v {tuple(v.shape)} {v.dtype} must match k {tuple(k.shape)} {k.dtype} on {k.device}")
    L, H, cap, D = k.shape
    if positions.shape != (L, H, cap) or positions.dtype != torch.int64 or positions.device != k.device:
        raise ValueError(f"positions must be int64 [L, H, cap] = {(L, H, cap)} on {k.device}, "
                         f"got {positions.dtype} {tuple(positions.shape)} on {positions.device}")
    # An in-place kernel on a hidden copy would silently do nothing to the caller's cache.
    if not (k.is_contiguous() and v.is_contiguous() and positions.is_contiguous()):
        raise ValueError("k, v and positions must be contiguous")
    if not 0 <= n_valid <= cap:
        raise ValueError(f"n_valid={n_valid} outside [0, cap={cap}]")
    return L, H, cap, D


def check_keep(keep, L: int, H: int, n_valid: int, device: torch.device, validate: bool = True) -> tuple[Tensor, bool]:
    """Normalise a keep set to an int64 tensor on `device`; returns (keep, per_head).

    Raises ValueError for a wrong shape, an index outside [0, n_valid), or a row that is not strictly
    ascending (which would also break the in-place hazard argument). `validate=False` skips the value checks
    (they cost a device sync on a GPU) for callers that validated the plan already, e.g. on the CPU copy that
    arrived from the wire.
    """
    keep = torch.as_tensor(keep)
    if keep.numel() == 0:
        keep = keep.to(torch.int64)  # torch.as_tensor([]) is float32
    if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
        raise ValueError(f"keep must hold integer slot indices, got {keep.dtype}")
    if keep.dim() == 1:
        per_head = False
    elif keep.dim() == 3 and tuple(keep.shape[:2]) == (L, H):
        per_head = True
    else:
        raise ValueError(f"keep must be [n_keep] or [L, H, n_keep] = [{L}, {H}, n], got {tuple(keep.shape)}")
    if validate and keep.numel() > 0:
        # Check on the device the indices came on: plans from the wire are on the CPU, so no GPU sync.
        if int(keep.min()) < 0 or int(keep.max()) >= n_valid:
            raise ValueError(f"keep indices must lie in [0, n_valid={n_valid}), got [{int(keep.min())}, {int(keep.max())}]")
        if keep.shape[-1] > 1 and not bool((keep[..., 1:] > keep[..., :-1]).all()):
            raise ValueError("keep indices must be strictly ascending (sorted, unique) in every row")
    return keep.to(device=device, dtype=torch.int64).contiguous(), per_head


def check_slot_map(slot_map, S: int, n_valid: int, device: torch.device, validate: bool = True) -> Tensor:
    """Normalise a logical -> physical slot map to a contiguous int64 tensor on `device`.

    Always checked (no device sync): an integer 1-D tensor with at least n_valid entries. With `validate`
    also the values of the first n_valid entries (the only ones the kernels read): in [0, S) and distinct,
    since two logical slots on one physical slot would break the in-place hazard argument and corrupt the
    pool silently. Raises ValueError.
    """
    slot_map = torch.as_tensor(slot_map)
    if slot_map.numel() == 0:
        slot_map = slot_map.to(torch.int64)  # torch.as_tensor([]) is float32
    if slot_map.dtype.is_floating_point or slot_map.dtype.is_complex or slot_map.dtype == torch.bool:
        raise ValueError(f"slot_map must hold integer physical slot indices (int64), got {slot_map.dtype}")
    if slot_map.dim() != 1:
        raise ValueError(f"slot_map must be 1-D [>= n_valid], got shape {tuple(slot_map.shape)}")
    if slot_map.numel() < n_valid:
        raise ValueError(f"slot_map has {slot_map.numel()} entries, fewer than n_valid={n_valid}")
    if validate and n_valid > 0:
        used = slot_map[:n_valid]
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= S:
            raise ValueError(f"slot_map[:n_valid] must lie in [0, S={S}) physical slots, got [{lo}, {hi}]")
        if torch.unique(used).numel() != n_valid:
            raise ValueError("slot_map[:n_valid] must be distinct: two logical slots map to one physical slot")
    return slot_map.to(device=device, dtype=torch.int64).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _compact_kernel(
    k_ptr, v_ptr, pos_ptr, keep_ptr, slot_map_ptr,
    n_keep, cap, D,
    keep_row_stride,  # 0 for a global keep set, n_keep for a per-head one
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,  # keep holds physical sources already; destinations go through slot_map
):
    row = tl.program_id(0)  # flattened (layer, head)
    dblk = tl.program_id(1)  # slice of the head dim
    # int64 row offsets: L*H*cap*D overflows int32 for long contexts.
    kv_base = row.to(tl.int64) * cap * D
    pos_base = row.to(tl.int64) * cap
    keep_base = row.to(tl.int64) * keep_row_stride

    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # Only the first slice moves the positions of the row (an empty range for the others).
    n_pos = tl.where(dblk == 0, n_keep, 0)

    # Ascending chunks of destinations: see the module docstring for why this order is hazard-free.
    for start in range(0, n_keep, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keep
        src = tl.load(keep_ptr + keep_base + offs_n, mask=n_mask, other=0)
        mask = n_mask[:, None] & d_mask[None, :]
        src_off = kv_base + src[:, None] * D + offs_d[None, :]
        k_tile = tl.load(k_ptr + src_off, mask=mask)
        v_tile = tl.load(v_ptr + src_off, mask=mask)
        p_tile = tl.load(pos_ptr + pos_base + src, mask=offs_n < n_pos)
        if HAS_SLOT_MAP:
            dst = tl.load(slot_map_ptr + offs_n, mask=n_mask, other=0)
        else:
            dst = offs_n
        # Every thread has its chunk in registers before any thread stores over a source slot.
        tl.debug_barrier()
        dst_off = kv_base + dst[:, None] * D + offs_d[None, :]
        tl.store(k_ptr + dst_off, k_tile, mask=mask)
        tl.store(v_ptr + dst_off, v_tile, mask=mask)
        tl.store(pos_ptr + pos_base + dst, p_tile, mask=offs_n < n_pos)


def _blocks(D: int, block_n: int | None, block_d: int | None) -> tuple[int, int]:
    # A slice of at most 64 columns (128 B in bf16) keeps accesses coalesced and gives D=128 two programs
    # per row, so small L*H still spreads over the GPU. 128 slots per chunk puts 32 KB of k+v (bf16) in
    # flight per program between barriers. (Untuned: no GPU was at hand when this was written.)
    BLOCK_D = block_d or min(64, triton.next_power_of_2(D))
    BLOCK_N = block_n or 128
    return BLOCK_N, BLOCK_D


def compact_triton(k: Tensor, v: Tensor, positions: Tensor, keep, n_valid: int, *, validate: bool = True,
                   slot_map: Tensor | None = None,
                   block_n: int | None = None, block_d: int | None = None) -> int:
    """Triton launcher: one launch covers every layer and head. Returns the new valid count.

    With `slot_map`, k/v/positions are the whole paged pool and slots are logical (module docstring)."""
    L, H, cap, D = _check_kv(k, v, positions, n_valid)
    keep, per_head = check_keep(keep, L, H, n_valid, k.device, validate)
    if slot_map is not None:
        slot_map = check_slot_map(slot_map, cap, n_valid, k.device, validate)
    n_keep = keep.shape[-1]
    if n_keep == 0 or L * H == 0:
        return n_keep
    if slot_map is not None:
        keep = slot_map[keep]  # physical sources, one gather on the device
    BLOCK_N, BLOCK_D = _blocks(D, block_n, block_d)
    grid = (L * H, triton.cdiv(D, BLOCK_D))
    launchable(_compact_kernel, k.device)[grid](
        k, v, positions, keep, keep if slot_map is None else slot_map,  # unused pointer without a map
        n_keep, cap, D,
        n_keep if per_head else 0,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_SLOT_MAP=slot_map is not None,
    )
    return n_keep


# --------------------------------------------------------------------------------------------------------------
# Torch reference (also the CPU serving path)
# --------------------------------------------------------------------------------------------------------------

_GATHER_BYTES = 2 << 20  # rows gathered per step of the torch path: the temporary stays cache-sized


def compact_reference(k: Tensor, v: Tensor, positions: Tensor, keep, n_valid: int, *, validate: bool = True,
                      slot_map: Tensor | None = None) -> int:
    """Same contract as `compact_triton`, in torch: out-of-place gather, then copy back into the front slots.

    This is also the engine's CPU path, so it gathers a few (layer, head) rows at a time (row-major
    index_select into a cache-sized temporary, then a copy back): several times faster on CPU than one
    torch.gather over [L, H, n, D], whose temporary goes through DRAM twice. Rows are disjoint, so each step
    is independent. Sources are gathered from `slot_map[keep]` and written back to the physical slots
    `slot_map[:n_keep]` (an index_copy_ of the gathered copy, so still out of place); without a slot map the
    map is the identity.
    """
    L, H, cap, D = _check_kv(k, v, positions, n_valid)
    keep, per_head = check_keep(keep, L, H, n_valid, k.device, validate)
    if slot_map is not None:
        slot_map = check_slot_map(slot_map, cap, n_valid, k.device, validate)
    n_keep = keep.shape[-1]
    if n_keep == 0 or L * H == 0:
        return n_keep
    # Logical slot j is physical slot j of the sequence's own rows, or slot_map[j] in a paged pool.
    if slot_map is None:
        src, dst = keep, torch.arange(n_keep, device=k.device)
    else:
        src, dst = slot_map[keep], slot_map[:n_keep]
    rows = L * H
    row_src = src.reshape(rows, n_keep) if per_head else src.expand(rows, n_keep)
    step = max(1, _GATHER_BYTES // (n_keep * D * k.element_size()))
    row_base = torch.arange(min(step, rows), device=k.device).unsqueeze(1) * cap
    k_rows, v_rows = k.view(rows, cap, D), v.view(rows, cap, D)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        flat = (row_base[: r1 - r0] + row_src[r0:r1]).reshape(-1)  # slot index within rows r0..r1
        for t in (k_rows, v_rows):
            t[r0:r1].index_copy_(1, dst, t[r0:r1].reshape(-1, D).index_select(0, flat).view(r1 - r0, n_keep, D))
    moved = torch.gather(positions, 2, src if per_head else src.expand(L, H, n_keep))
    positions.index_copy_(2, dst, moved)
    return n_keep


def compact_(k: Tensor, v: Tensor, positions: Tensor, keep, n_valid: int, *, validate: bool = True,
             slot_map: Tensor | None = None) -> int:
    """Compact every (layer, KV head) row in place to the slots `keep`; returns the new valid count.

    With `slot_map` (int64 [>= n_valid], distinct), k/v/positions are the whole paged pool [L, H, S, D] /
    [L, H, S] and slots are the sequence's logical slots: logical j lives at physical `slot_map[j]`.
    Triton on CUDA tensors (or with KVPILOT_FORCE_TRITON=1), the torch reference otherwise.
    """
    impl = compact_triton if use_triton(k) else compact_reference
    return impl(k, v, positions, keep, n_valid, validate=validate, slot_map=slot_map)
