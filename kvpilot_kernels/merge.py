"""In-place KV merge (CASK-style consolidation) with one global plan for every (layer, KV head).

Output slot j (j = 0 .. n_out-1) is a group of source slots, given in CSR form:

    group_offsets [n_out + 1]   group j is sources[group_offsets[j] : group_offsets[j+1]]
    sources       [total]       slot indices (< n_valid)
    weights       [total]       float, the value weights of those sources
    anchors       [n_out]       the member of group j whose key (and position) represents the group

    new v[j]         = sum_i weights[i] * v[sources[i]]     (accumulated in float32)
    new k[j]         = k[anchors[j]]
    new positions[j] = positions[anchors[j]]

A plainly kept slot s is a group of one source s with weight 1 and itself as anchor, so a keep set is the
special case of a plan. The caller lowers its valid count to the returned n_out.

Paged pool: merge through a slot map
------------------------------------
With `slot_map` (int64 [>= n_valid], distinct entries; see kvpilot_kernels/compaction.py) k, v and positions are the
whole paged pool [L, H, S, D] / [L, H, S] and every slot of the plan (sources, anchors, outputs) is a
logical slot of the sequence, stored at physical slot `slot_map[slot]`. The launchers map sources and
anchors to physical slots once on the device, and the kernel writes output j to physical `slot_map[j]`.
Only `slot_map[:n_out]` are written, only `slot_map[:n_valid]` read; the rest of the pool is untouched.

Hazard-freedom of the in-place merge
------------------------------------
Groups are non-empty, pairwise disjoint and ordered by their smallest source, so their minima are distinct
non-negative integers in increasing order: min_0 < min_1 < ... hence min_j >= j, and every source and the
anchor of group j are >= j. Read the other way: slot s is read only by groups g <= s. One program walks its
row over ascending chunks of outputs [c*B, (c+1)*B):

* a chunk loads all sources and anchors of its groups (the whole weighted sum sits in registers), then a CTA
  barrier, then stores; so the chunk's own stores never precede its own loads, in any thread;
* the slots chunk c stores (< (c+1)*B) are read only by groups g < (c+1)*B, i.e. by chunks <= c, which
  loaded before this chunk's barrier;
* slots read by chunk c that lie in a later chunk's destinations are loaded before that later chunk's
  barrier and stores.

The argument is about logical slots; an injective slot map (distinct entries) makes a physical write of
output j collide with a physical read of source s exactly when j == s, so it carries over unchanged.

`check_plan` enforces every premise (non-empty, in range, disjoint, ordered by minimum, anchor in group) and
raises ValueError otherwise, because a plan that breaks them would corrupt the cache silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .compaction import _check_kv, check_slot_map, launchable, use_triton

__all__ = ["MergePlan", "merge_", "merge_reference", "merge_triton", "check_plan"]


@dataclass(frozen=True)
class MergePlan:
    """A global merge plan in CSR form (see the module docstring)."""

    group_offsets: Tensor  # [n_out + 1] int64
    sources: Tensor  # [total] int64
    weights: Tensor  # [total] float32
    anchors: Tensor  # [n_out] int64

    @property
    def n_out(self) -> int:
        return int(self.group_offsets.numel()) - 1

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], weights: Sequence[Sequence[float]] | None = None,
                    anchors: Sequence[int] | None = None) -> "MergePlan":
        """Build from Python lists. Default weights: uniform mean of the group; default anchor: the group's
        last (most recent) member."""
        offsets = [0]
        for g in groups:
            offsets.append(offsets[-1] + len(g))
        flat = [int(s) for g in groups for s in g]
        if weights is None:
            w = [1.0 / len(g) for g in groups for _ in g]
        else:
            w = [float(x) for ws in weights for x in ws]
        if anchors is None:
            anchors = [max(g) if len(g) else -1 for g in groups]
        return cls(
            group_offsets=torch.tensor(offsets, dtype=torch.int64),
            sources=torch.tensor(flat, dtype=torch.int64),
            weights=torch.tensor(w, dtype=torch.float32),
            anchors=torch.tensor(list(anchors), dtype=torch.int64),
        )

    @classmethod
    def keep(cls, keep: Sequence[int] | Tensor) -> "MergePlan":
        """The plan that only keeps slots: each a group of one, weight 1, anchored at itself."""
        keep = torch.as_tensor(keep, dtype=torch.int64).reshape(-1)
        n = keep.numel()
        return cls(torch.arange(n + 1, dtype=torch.int64), keep.clone(), torch.ones(n, dtype=torch.float32), keep.clone())


def check_plan(plan, n_valid: int, device: torch.device, validate: bool = True) -> MergePlan:
    """Normalise a plan (any object with group_offsets, sources, weights, anchors) onto `device`.

    Raises ValueError when the plan breaks a premise of the in-place merge (module docstring). `validate=False`
    skips the value checks (a device sync on a GPU) for plans validated already.
    """
    try:
        offsets, sources, weights, anchors = (torch.as_tensor(getattr(plan, name)) for name in
                                              ("group_offsets", "sources", "weights", "anchors"))
    except AttributeError as e:
        raise ValueError(f"merge plan needs group_offsets, sources, weights and anchors: {e}") from None
    # torch.as_tensor([]) is float32: empty index lists are still index lists.
    sources, anchors = (t.to(torch.int64) if t.numel() == 0 else t for t in (sources, anchors))
    for name, t in (("group_offsets", offsets), ("sources", sources), ("anchors", anchors)):
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if weights.dim() != 1 or not (weights.dtype.is_floating_point or weights.numel() == 0):
        raise ValueError(f"weights must be a 1-D float tensor, got {weights.dtype} {tuple(weights.shape)}")
    if offsets.numel() < 1:
        raise ValueError("group_offsets must have n_out + 1 >= 1 entries")
    n_out, total = offsets.numel() - 1, sources.numel()
    if anchors.numel() != n_out:
        raise ValueError(f"anchors has {anchors.numel()} entries, expected n_out={n_out}")
    if weights.numel() != total:
        raise ValueError(f"weights has {weights.numel()} entries, sources {total}")
    if validate:
        if int(offsets[0]) != 0 or int(offsets[-1]) != total:
            raise ValueError(f"group_offsets must run from 0 to len(sources)={total}, got {int(offsets[0])}..{int(offsets[-1])}")
        lengths = offsets[1:] - offsets[:-1]
        if n_out and int(lengths.min()) < 1:
            raise ValueError("every group needs at least one source (group_offsets must be strictly increasing)")
        if total:
            if int(sources.min()) < 0 or int(sources.max()) >= n_valid:
                raise ValueError(f"sources must lie in [0, n_valid={n_valid}), got [{int(sources.min())}, {int(sources.max())}]")
            if torch.unique(sources).numel() != total:
                raise ValueError("groups must be disjoint: a source slot appears twice")
            if not bool(torch.isfinite(weights).all()):
                raise ValueError("weights must be finite")
        if n_out:
            group = torch.repeat_interleave(torch.arange(n_out, device=offsets.device), lengths)
            mins = torch.full((n_out,), n_valid, dtype=torch.int64, device=sources.device)
            mins = mins.scatter_reduce(0, group, sources.to(torch.int64), reduce="amin")
            if n_out > 1 and not bool((mins[1:] > mins[:-1]).all()):
                raise ValueError("groups must be ordered by their smallest source (this is what makes the merge hazard-free in place)")
            hits = torch.zeros(n_out, dtype=torch.int64, device=sources.device)
            hits.index_add_(0, group, (sources.to(torch.int64) == anchors.to(torch.int64)[group]).to(torch.int64))
            if not bool((hits == 1).all()):
                bad = int(torch.nonzero(hits != 1)[0])
                raise ValueError(f"anchor of group {bad} ({int(anchors[bad])}) is not one of its sources")
    return MergePlan(
        group_offsets=offsets.to(device=device, dtype=torch.int64).contiguous(),
        sources=sources.to(device=device, dtype=torch.int64).contiguous(),
        weights=weights.to(device=device, dtype=torch.float32).contiguous(),
        anchors=anchors.to(device=device, dtype=torch.int64).contiguous(),
    )


# --------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _merge_kernel(
    k_ptr, v_ptr, pos_ptr,
    offsets_ptr, sources_ptr, weights_ptr, anchors_ptr, slot_map_ptr,
    n_out, cap, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,  # sources/anchors are physical already; outputs go through slot_map
):
    row = tl.program_id(0)  # flattened (layer, head); the plan is the same for every row
    dblk = tl.program_id(1)  # slice of the head dim
    kv_base = row.to(tl.int64) * cap * D
    pos_base = row.to(tl.int64) * cap

    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # Only the first slice moves the positions of the row (an empty range for the others).
    n_pos = tl.where(dblk == 0, n_out, 0)

    # Ascending chunks of outputs: see the module docstring for why this order is hazard-free.
    for start in range(0, n_out, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_out
        g_lo = tl.load(offsets_ptr + offs_n, mask=n_mask, other=0)
        g_len = (tl.load(offsets_ptr + offs_n + 1, mask=n_mask, other=0) - g_lo).to(tl.int32)
        anchor = tl.load(anchors_ptr + offs_n, mask=n_mask, other=0)

        mask = n_mask[:, None] & d_mask[None, :]
        k_tile = tl.load(k_ptr + kv_base + anchor[:, None] * D + offs_d[None, :], mask=mask)
        p_tile = tl.load(pos_ptr + pos_base + anchor, mask=offs_n < n_pos)

        # Weighted value sum: walk the t-th member of every group of the chunk at once; groups shorter
        # than the longest one in the chunk are masked off.
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for t in range(0, tl.max(g_len, axis=0)):
            m = n_mask & (t < g_len)
            src = tl.load(sources_ptr + g_lo + t, mask=m, other=0)
            w = tl.load(weights_ptr + g_lo + t, mask=m, other=0.0)
            v_t = tl.load(v_ptr + kv_base + src[:, None] * D + offs_d[None, :], mask=m[:, None] & d_mask[None, :], other=0.0)
            acc += w[:, None] * v_t.to(tl.float32)

        if HAS_SLOT_MAP:
            dst = tl.load(slot_map_ptr + offs_n, mask=n_mask, other=0)
        else:
            dst = offs_n
        # Every thread holds its chunk's sources before any thread stores over one of them.
        tl.debug_barrier()
        dst_off = kv_base + dst[:, None] * D + offs_d[None, :]
        tl.store(k_ptr + dst_off, k_tile, mask=mask)
        tl.store(v_ptr + dst_off, acc.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(pos_ptr + pos_base + dst, p_tile, mask=offs_n < n_pos)


def _physical_plan(plan: MergePlan, slot_map: Tensor) -> MergePlan:
    """The plan with sources and anchors mapped to physical slots (one gather each, on the device)."""
    return MergePlan(plan.group_offsets, slot_map[plan.sources], plan.weights, slot_map[plan.anchors])


def merge_triton(k: Tensor, v: Tensor, positions: Tensor, plan, n_valid: int, *, validate: bool = True,
                 slot_map: Tensor | None = None,
                 block_n: int | None = None, block_d: int | None = None) -> int:
    """Triton launcher: one launch applies the plan to every layer and head. Returns n_out.

    With `slot_map`, k/v/positions are the whole paged pool and slots are logical (module docstring)."""
    L, H, cap, D = _check_kv(k, v, positions, n_valid)
    plan = check_plan(plan, n_valid, k.device, validate)
    if slot_map is not None:
        slot_map = check_slot_map(slot_map, cap, n_valid, k.device, validate)
    n_out = plan.n_out
    if n_out == 0 or L * H == 0:
        return n_out
    if slot_map is not None:
        plan = _physical_plan(plan, slot_map)
    BLOCK_D = block_d or min(64, triton.next_power_of_2(D))
    BLOCK_N = block_n or 32  # smaller than compaction's: the accumulator is float32
    grid = (L * H, triton.cdiv(D, BLOCK_D))
    launchable(_merge_kernel, k.device)[grid](
        k, v, positions,
        plan.group_offsets, plan.sources, plan.weights, plan.anchors,
        plan.anchors if slot_map is None else slot_map,  # unused pointer without a map
        n_out, cap, D,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_SLOT_MAP=slot_map is not None,
    )
    return n_out


# --------------------------------------------------------------------------------------------------------------
# Torch reference (also the CPU serving path)
# --------------------------------------------------------------------------------------------------------------

_GATHER_BYTES = 2 << 20  # rows merged per step of the torch path: the float32 temporaries stay cache-sized


def merge_reference(k: Tensor, v: Tensor, positions: Tensor, plan, n_valid: int, *, validate: bool = True,
                    slot_map: Tensor | None = None) -> int:
    """Same contract as `merge_triton`, in torch: out-of-place gather and segment sum, then copy back.

    Also the engine's CPU path: a few (layer, head) rows at a time, as row-major 2-D index_select /
    index_add_ over flattened slots, which stay cache-sized and are several times faster than the same ops
    along dim 2 of [L, H, cap, D]. Sources and anchors are read at their physical slots and the outputs
    written back to `slot_map[:n_out]` with index_copy_ (still out of place; without a slot map the map is
    the identity).
    """
    L, H, cap, D = _check_kv(k, v, positions, n_valid)
    plan = check_plan(plan, n_valid, k.device, validate)
    if slot_map is not None:
        slot_map = check_slot_map(slot_map, cap, n_valid, k.device, validate)
    n_out, total = plan.n_out, plan.sources.numel()
    if n_out == 0 or L * H == 0:
        return n_out
    phys_dst = torch.arange(n_out, device=k.device)  # physical output slots (identity without a slot map)
    if slot_map is not None:
        plan, phys_dst = _physical_plan(plan, slot_map), slot_map[:n_out]
    rows = L * H
    lengths = plan.group_offsets[1:] - plan.group_offsets[:-1]
    group = torch.repeat_interleave(torch.arange(n_out, device=k.device), lengths)
    step = max(1, _GATHER_BYTES // (total * D * 4))
    local = torch.arange(min(step, rows), device=k.device).unsqueeze(1)
    k_rows, v_rows = k.view(rows, cap, D), v.view(rows, cap, D)
    weights = plan.weights.unsqueeze(1)
    for r0 in range(0, rows, step):
        g = min(step, rows - r0)
        src = (local[:g] * cap + plan.sources).reshape(-1)  # slot index within rows r0..r0+g
        dst = (local[:g] * n_out + group).reshape(-1)  # output index within the same rows
        weighted = v_rows[r0:r0 + g].reshape(-1, D).index_select(0, src).float().view(g, total, D) * weights
        v_new = torch.zeros(g * n_out, D, dtype=torch.float32, device=k.device).index_add_(0, dst, weighted.view(-1, D))
        k_new = k_rows[r0:r0 + g].index_select(1, plan.anchors)
        v_rows[r0:r0 + g].index_copy_(1, phys_dst, v_new.view(g, n_out, D).to(v.dtype))
        k_rows[r0:r0 + g].index_copy_(1, phys_dst, k_new)
    positions.index_copy_(2, phys_dst, positions.index_select(2, plan.anchors))
    return n_out


def merge_(k: Tensor, v: Tensor, positions: Tensor, plan, n_valid: int, *, validate: bool = True,
           slot_map: Tensor | None = None) -> int:
    """Apply a global merge plan in place to every (layer, KV head) row; returns the new valid count (n_out).

    With `slot_map` (int64 [>= n_valid], distinct), k/v/positions are the whole paged pool [L, H, S, D] /
    [L, H, S] and the plan's slots are the sequence's logical slots: logical j lives at physical `slot_map[j]`.
    Triton on CUDA tensors (or with KVPILOT_FORCE_TRITON=1), the torch reference otherwise.
    """
    impl = merge_triton if use_triton(k) else merge_reference
    return impl(k, v, positions, plan, n_valid, validate=validate, slot_map=slot_map)
