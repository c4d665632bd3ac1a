"""KV pool: one preallocated arena, carved into per-sequence regions, with explicit byte accounting.

Every sequence owns one contiguous region of `capacity` slots. A slot holds one token's key and value for
every (layer, KV head), so the region views as

    k, v       [L, H, capacity, D]   keys stored after RoPE
    positions  [L, H, capacity]      logical position of each slot (eviction never shifts positions)

and the first `n` slots of every (layer, head) row are valid: the same count everywhere (per-head keep sets
differ in *which* slots, never in how many), so attention over a sequence is a dense op.

Memory is realised, not simulated: compaction moves kept slots to the front and lowers `n`, so the freed
slots take new tokens, and a sequence never needs more than the region admission control reserved. The
arena is allocated once; regions come from a first-fit free list that coalesces on free (the explicit
accounting vLLM's block pool does for pages, done here for variable-size contiguous regions).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor


class PoolExhausted(Exception):
    """No free region is large enough right now."""


@dataclass
class SequenceKV:
    """One sequence's region of the pool."""

    owner: str
    offset: int  # first slot of the region in the arena
    capacity: int  # slots reserved
    k: Tensor  # [L, H, capacity, D]
    v: Tensor  # [L, H, capacity, D]
    positions: Tensor  # [L, H, capacity] int64
    n: int = 0  # valid slots in every (layer, KV head) row

    @property
    def free_slots(self) -> int:
        return self.capacity - self.n

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Store T new tokens of one layer in slots [n, n + T). k_new, v_new: [T, H, D]. `n` moves in `commit`."""
        t = k_new.shape[0]
        if self.n + t > self.capacity:
            raise RuntimeError(f"sequence {self.owner}: {self.n} + {t} slots exceed its reserved {self.capacity}")
        self.k[layer, :, self.n:self.n + t] = k_new.transpose(0, 1)
        self.v[layer, :, self.n:self.n + t] = v_new.transpose(0, 1)

    def commit(self, positions: Tensor) -> None:
        """After all layers wrote T tokens: record their logical positions [T] and make them valid."""
        t = positions.shape[0]
        self.positions[:, :, self.n:self.n + t] = positions.to(self.positions.device)
        self.n += t


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_slots: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.capacity_slots = capacity_slots
        self.dtype, self.device = dtype, torch.device(device)
        self.row_elems = num_layers * num_kv_heads * head_dim  # elements of K (or V) for one token
        self.slot_bytes = 2 * self.row_elems * torch.empty((), dtype=dtype).element_size()
        # K and V of all regions live in one allocation; positions in a second, smaller one.
        self.arena = torch.zeros(capacity_slots * 2 * self.row_elems, dtype=dtype, device=self.device)
        self.position_arena = torch.zeros(capacity_slots * num_layers * num_kv_heads, dtype=torch.int64, device=self.device)
        self._free: list[tuple[int, int]] = [(0, capacity_slots)]  # (offset, length), sorted by offset
        self._regions: dict[str, SequenceKV] = {}

    @classmethod
    def for_model(cls, config, capacity_bytes: int, dtype: torch.dtype, device) -> "KVPool":
        slot_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, max(1, capacity_bytes // slot_bytes), dtype, device)

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.capacity_slots * self.slot_bytes

    @property
    def reserved_slots(self) -> int:
        return sum(r.capacity for r in self._regions.values())

    @property
    def used_slots(self) -> int:
        return sum(r.n for r in self._regions.values())

    @property
    def free_slots(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free_region(self) -> int:
        return max((length for _, length in self._free), default=0)

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of valid K/V slots: what the sequences really hold after compaction."""
        return self.used_slots * self.slot_bytes

    def region(self, owner: str) -> SequenceKV | None:
        return self._regions.get(owner)

    def regions(self) -> list[SequenceKV]:
        return list(self._regions.values())

    def can_allocate(self, slots: int) -> bool:
        return self.largest_free_region >= slots

    # ---- allocation ---------------------------------------------------------------------------------
    def allocate(self, owner: str, slots: int) -> SequenceKV:
        if owner in self._regions:
            raise ValueError(f"{owner} already holds a region")
        if slots <= 0:
            raise ValueError("a region needs at least one slot")
        offset = self._take(slots)
        region = self._view(owner, offset, slots)
        self._regions[owner] = region
        return region

    def free(self, owner: str) -> None:
        region = self._regions.pop(owner, None)
        if region is not None:
            self._give_back(region.offset, region.capacity)

    def resize(self, owner: str, slots: int) -> SequenceKV:
        """Grow or shrink a region, keeping its `n` valid slots (a multi-turn session gets room for the next turn).

        Growth never needs the old and the new region at once when it can be avoided: it extends in place
        when the free piece right after the region is long enough, else it gives the region back first and
        takes the new one from the coalesced free space (so a continuation that fits the pool is never blocked
        by its own parked region). On PoolExhausted nothing has changed."""
        old = self._regions[owner]
        if slots < old.n:
            raise ValueError(f"cannot shrink {owner} to {slots} slots: it holds {old.n}")
        if slots == old.capacity:
            return old
        # Row strides depend on capacity, so the valid slots move row by row (from a clone: rows may overlap).
        n = old.n
        k, v, p = old.k[:, :, :n].clone(), old.v[:, :, :n].clone(), old.positions[:, :, :n].clone()
        if slots < old.capacity:
            self._give_back(old.offset + slots, old.capacity - slots)
            new = self._view(owner, old.offset, slots)
        elif self._take_at(old.offset + old.capacity, slots - old.capacity):
            new = self._view(owner, old.offset, slots)
        else:
            self._give_back(old.offset, old.capacity)
            try:
                offset = self._take(slots)
            except PoolExhausted:
                taken = self._take_at(old.offset, old.capacity)  # just given back, so it is free
                assert taken, "the region given back must still be free"
                raise
            new = self._view(owner, offset, slots)
        new.k[:, :, :n], new.v[:, :, :n], new.positions[:, :, :n] = k, v, p
        new.n = n
        self._regions[owner] = new
        return new

    def _view(self, owner: str, offset: int, slots: int) -> SequenceKV:
        L, H, D = self.num_layers, self.num_kv_heads, self.head_dim
        start = offset * 2 * self.row_elems
        half = slots * self.row_elems
        k = self.arena[start:start + half].view(L, H, slots, D)
        v = self.arena[start + half:start + 2 * half].view(L, H, slots, D)
        pstart = offset * L * H
        positions = self.position_arena[pstart:pstart + slots * L * H].view(L, H, slots)
        return SequenceKV(owner=owner, offset=offset, capacity=slots, k=k, v=v, positions=positions)

    def _take(self, slots: int) -> int:
        for i, (offset, length) in enumerate(self._free):
            if length >= slots:
                if length == slots:
                    del self._free[i]
                else:
                    self._free[i] = (offset + slots, length - slots)
                return offset
        raise PoolExhausted(
            f"no free region of {slots} slots (free {self.free_slots} slots in {len(self._free)} pieces, "
            f"largest {self.largest_free_region})"
        )

    def _take_at(self, offset: int, slots: int) -> bool:
        """Take exactly [offset, offset + slots) if it lies inside one free piece."""
        i = bisect.bisect_right(self._free, (offset, self.capacity_slots + 1)) - 1
        if i < 0:
            return False
        start, length = self._free[i]
        if offset + slots > start + length:
            return False
        del self._free[i]
        if offset + slots < start + length:
            self._free.insert(i, (offset + slots, start + length - offset - slots))
        if start < offset:
            self._free.insert(i, (start, offset - start))
        return True

    def _give_back(self, offset: int, length: int) -> None:
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, length))
        # Coalesce with the right neighbour, then the left one.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            self._free[i] = (offset, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def check_consistency(self) -> None:
        """Free pieces and regions tile the arena exactly (used by tests and debug builds)."""
        pieces = sorted([(o, l) for o, l in self._free] + [(r.offset, r.capacity) for r in self._regions.values()])
        cursor = 0
        for offset, length in pieces:
            assert offset == cursor, f"gap or overlap at slot {cursor}: next piece starts at {offset}"
            cursor += length
        assert cursor == self.capacity_slots, f"pieces cover {cursor} of {self.capacity_slots} slots"
