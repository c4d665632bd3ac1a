"""Paged KV pool: fixed-size blocks with reference counts, a block table per sequence, explicit accounting.

Physical layout (one allocation each, made once):

    k, v       [L, H, S, D]   S = (num_blocks + 1) * block_size physical slots; keys stored after RoPE
    positions  [L, H, S]      int64, the logical position of each slot (eviction never shifts positions)

(the last block is never handed out: it stays zero and is what batched attention reads for padding).

Physical block b holds the physical slots [b * block_size, (b + 1) * block_size) of every (layer, KV head)
row, so one block of one head is a contiguous [block_size, D] tile (what the paged decode kernel loads). A
sequence sees *logical* slots 0..n-1: logical slot j lives at physical slot

    slot_map[j] = block_table[j // block_size] * block_size + j % block_size

for every (layer, KV head) row: one map shared by all rows (invariant 4: every row holds the same number of
valid slots; per-head keep sets differ in *which* tokens a row holds, never in how many).

Accounting (the vLLM / nano-vLLM block manager idea, written for this pool):
  * a block is free or has a reference count >= 1 (the sequences whose tables hold it);
  * a sequence *reserves* `capacity` slots at admission (its maximum footprint); blocks are taken when its
    tokens are written. The pool promises every sequence its headroom (reserved blocks not yet in its table)
    and every shared block its private copies (one per extra holder), and admits new reservations only from
    what is free beyond those promises, so a running sequence can never run out of blocks;
  * compaction rewrites slots within the sequence's blocks and returns the emptied tail blocks at once
    (invariant 1: the freed bytes are counted free);
  * `fork` gives a child that shares all its parent's blocks (reference counts + 1): copy-on-write. Whoever
    writes a shared block (an append into the parent's partly filled last block, a compaction) first gets a
    private copy, so neither ever changes the other's cache; freeing frees only the blocks no one else holds;
  * a parked session shrinks its reservation to what it holds (no copy) and grows it again when it continues
    (no copy either): the contiguous pool this replaced copied a session's whole KV twice per turn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

import kvpilot_kernels as kernels

DEFAULT_BLOCK_SIZE = 16


class PoolExhausted(Exception):
    """Not enough unpromised free blocks right now."""


class DenseKV(NamedTuple):
    """A sequence's valid slots gathered out of the pool (a copy): k, v [L, H, n, D], positions [L, H, n]."""

    k: Tensor
    v: Tensor
    positions: Tensor


@dataclass(eq=False)
class SequenceKV:
    """One sequence's view of the pool: its block table, its valid count and its reservation."""

    owner: str
    pool: "KVPool"
    capacity: int  # slots reserved: the sequence never holds more (admission control counted them)
    blocks: list[int] = field(default_factory=list)  # block table: physical block of logical block i
    n: int = 0  # valid slots in every (layer, KV head) row
    # Blocks held by lease (a side-thread fork): no private copy was promised for them; if their other holder
    # rewrites one, this sequence is broken (KVPool.take_broken) and must end before it reads again.
    leased: set[int] = field(default_factory=set)
    _slot_map: Tensor | None = None

    @property
    def free_slots(self) -> int:
        return self.capacity - self.n

    @property
    def reserved_blocks(self) -> int:
        return -(-self.capacity // self.pool.block_size)

    @property
    def slot_map(self) -> Tensor:
        """Physical slot of every logical slot the table covers: [len(blocks) * block_size] int64."""
        if self._slot_map is None:
            bs = self.pool.block_size
            table = torch.tensor(self.blocks, dtype=torch.long, device=self.pool.device)
            self._slot_map = (table[:, None] * bs + torch.arange(bs, device=self.pool.device)).reshape(-1)
        return self._slot_map

    # ---- appending ----------------------------------------------------------------------------------
    def prepare_append(self, t: int) -> None:
        """Make room for t new tokens at logical slots [n, n + t): take blocks, and copy a shared partly filled
        last block first (copy-on-write: the slots past `n` in it belong to whoever shares it)."""
        if self.n + t > self.capacity:
            raise RuntimeError(f"sequence {self.owner}: {self.n} + {t} slots exceed its reserved {self.capacity}")
        bs = self.pool.block_size
        # Copy-on-write: every shared block the new tokens land in (the partly filled last one, in practice).
        for index in range(self.n // bs, min(len(self.blocks), self.pool.blocks_for(self.n + t))):
            if self.pool.needs_copy(self, index):
                self.pool.copy_on_write(self, index)
        while len(self.blocks) * bs < self.n + t:
            self.pool.take_block(self)

    def write_slots(self, t: int) -> Tensor:
        """Physical slots of the next t tokens (after `prepare_append(t)`)."""
        return self.slot_map[self.n:self.n + t]

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Store T new tokens of one layer (k_new, v_new: [T, H, D]); `n` moves in `commit`."""
        t = k_new.shape[0]
        self.prepare_append(t)
        slots = self.write_slots(t)
        self.pool.k[layer][:, slots] = k_new.transpose(0, 1).to(self.pool.dtype)
        self.pool.v[layer][:, slots] = v_new.transpose(0, 1).to(self.pool.dtype)

    def commit(self, positions: Tensor) -> None:
        """After all layers wrote T tokens (`write`): record their logical positions [T] and make them valid."""
        slots = self.write_slots(positions.shape[0])
        self.advance(positions.shape[0])
        self.pool.positions[:, :, slots] = positions.to(self.pool.positions.device)

    def advance(self, t: int) -> None:
        """Make t written tokens valid (the engine's batched path writes their positions with the K/V)."""
        if self.n + t > len(self.blocks) * self.pool.block_size:
            raise RuntimeError(f"sequence {self.owner}: committing {t} slots that were never prepared")
        self.n += t

    # ---- reading ------------------------------------------------------------------------------------
    def dense(self) -> DenseKV:
        slots = self.slot_map[:self.n]
        p = self.pool
        return DenseKV(p.k[:, :, slots], p.v[:, :, slots], p.positions[:, :, slots])

    def load(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Replace the valid slots with dense k, v [L, H, n, D] and positions [L, H, n] (a KV snapshot)."""
        n = k.shape[2]
        self.pool.truncate(self, 0)
        self.prepare_append(n)
        slots = self.write_slots(n)
        p = self.pool
        p.k[:, :, slots] = k.to(p.device, p.dtype)
        p.v[:, :, slots] = v.to(p.device, p.dtype)
        p.positions[:, :, slots] = positions.to(p.device)
        self.n = n

    # ---- rewriting ----------------------------------------------------------------------------------
    def compact(self, keep: Tensor) -> int:
        """Keep the slots `keep` ([k] global or [L, H, k] per head, ascending) in logical slots [0, k); the
        emptied blocks go back to the pool at once. Returns the new valid count."""
        n_keep = keep.shape[-1]
        self.pool.make_private(self, n_keep)
        n = kernels.compact_(self.pool.k, self.pool.v, self.pool.positions, keep, self.n, slot_map=self.slot_map)
        self.pool.truncate(self, n)
        return n

    def merge(self, plan) -> int:
        """Apply a kernels.MergePlan (groups -> representatives in logical slots [0, groups))."""
        self.pool.make_private(self, plan.n_out)
        n = kernels.merge_(self.pool.k, self.pool.v, self.pool.positions, plan, self.n, slot_map=self.slot_map)
        self.pool.truncate(self, n)
        return n


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_slots: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1 (got {block_size})")
        if capacity_slots < block_size:
            raise ValueError(f"a pool of {capacity_slots} slots holds no block of {block_size}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size = block_size
        self.num_blocks = capacity_slots // block_size
        self.capacity_slots = self.num_blocks * block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.row_elems = num_layers * num_kv_heads * head_dim  # elements of K (or V) for one token
        self.slot_bytes = 2 * self.row_elems * torch.empty((), dtype=dtype).element_size()
        # One more block than can be handed out: its slots stay zero, and batched attention pads every sequence
        # to the longest with them, so a padded read can never meet another sequence's data (a NaN there would
        # poison the masked product: 0 * NaN = NaN).
        self.pad_slot = self.capacity_slots
        shape = (num_layers, num_kv_heads, self.capacity_slots + block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.positions = torch.zeros(shape[:3], dtype=torch.int64, device=self.device)
        self.refcount = [0] * self.num_blocks
        self._free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack: lowest ids first
        self._sequences: dict[str, SequenceKV] = {}
        # Sum over shared blocks of (refcount - leases - 1): the copies copy-on-write may still make. A lease (a
        # side-thread fork's hold on a full block it only reads) is not promised a copy.
        self._shared_extra = 0
        self.leases = [0] * self.num_blocks
        self._lease_holds = 0  # sum of `leases`
        self._broken: set[str] = set()  # lease holders whose leased blocks were rewritten under them

    @classmethod
    def for_model(cls, config, capacity_bytes: int, dtype: torch.dtype, device,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> "KVPool":
        slot_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
        slots = max(block_size, capacity_bytes // slot_bytes)
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, slots, dtype, device, block_size)

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.capacity_slots * self.slot_bytes

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def headroom(self, seq: SequenceKV) -> int:
        """Blocks `seq` may still add to its table (its reservation beyond what it holds)."""
        return max(0, seq.reserved_blocks - len(seq.blocks))

    @property
    def promised_blocks(self) -> int:
        """Blocks that may still be taken: every sequence's headroom, plus one private copy per extra holder of
        a shared block (r holders of a block need at most r - 1 copies: the last one keeps the original)."""
        return sum(self.headroom(s) for s in self._sequences.values()) + self._shared_extra

    @property
    def available_blocks(self) -> int:
        """Free blocks that no reservation has promised: what admission can hand out."""
        return self.free_blocks - self.promised_blocks

    @property
    def available_slots(self) -> int:
        return self.available_blocks * self.block_size

    @property
    def reserved_slots(self) -> int:
        """Slots reserved by live sequences (running, parked or forked)."""
        return sum(s.capacity for s in self._sequences.values())

    @property
    def used_slots(self) -> int:
        """Valid slots over all sequences (a slot shared by a fork counts once per holder)."""
        return sum(s.n for s in self._sequences.values())

    @property
    def free_slots(self) -> int:
        return self.free_blocks * self.block_size

    @property
    def largest_free_region(self) -> int:
        """Paged: any free block serves any sequence, so this is what admission can still promise."""
        return self.available_slots

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of valid K/V slots: what the sequences really hold after compaction."""
        return self.used_slots * self.slot_bytes

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.slot_bytes

    def blocks_for(self, slots: int) -> int:
        return -(-slots // self.block_size)

    def region(self, owner: str) -> SequenceKV | None:
        return self._sequences.get(owner)

    def regions(self) -> list[SequenceKV]:
        return list(self._sequences.values())

    def can_allocate(self, slots: int) -> bool:
        return self.available_blocks >= self.blocks_for(slots)

    # ---- reservations -------------------------------------------------------------------------------
    def allocate(self, owner: str, slots: int) -> SequenceKV:
        """Reserve `slots` for a new sequence (blocks are taken as its tokens are written)."""
        if owner in self._sequences:
            raise ValueError(f"{owner} already holds a reservation")
        if slots <= 0:
            raise ValueError("a sequence needs at least one slot")
        self._check_available(self.blocks_for(slots), slots)
        seq = SequenceKV(owner=owner, pool=self, capacity=slots)
        self._sequences[owner] = seq
        return seq

    def resize(self, owner: str, slots: int) -> SequenceKV:
        """Change a sequence's reservation, keeping its blocks (a parked session shrinks to what it holds, and
        grows for its next turn): nothing is copied. On PoolExhausted nothing has changed."""
        seq = self._sequences[owner]
        if slots < seq.n:
            raise ValueError(f"cannot shrink {owner} to {slots} slots: it holds {seq.n}")
        before, old_capacity = self.headroom(seq), seq.capacity
        seq.capacity = max(slots, 1)
        extra = self.headroom(seq) - before
        if extra > 0 and self.free_blocks < self.promised_blocks:
            seq.capacity = old_capacity
            self._check_available(extra, slots)
        self.truncate(seq, seq.n)  # a shrunk reservation gives back blocks past its valid slots
        return seq

    def free(self, owner: str) -> None:
        seq = self._sequences.pop(owner, None)
        self._broken.discard(owner)
        if seq is not None:
            for block in seq.blocks:
                self._release(seq, block)
            seq.blocks = []
            seq._slot_map = None
            seq.n = 0

    def fork(self, parent: str, child: str, slots: int | None = None, lease: bool = False) -> SequenceKV:
        """A child sequence that shares all of the parent's blocks copy-on-write (SideQuest's side thread, n > 1
        samples). `slots`: the child's reservation (default: the parent's). Neither ever writes a block the
        other holds; freeing the child frees only blocks no one else holds.

        `lease`: for a child that only appends (a side thread): its full shared blocks are leased, with no
        private copy promised, so the fork costs its growth and one block (the partly filled last one) instead
        of a copy of the whole context. If the parent rewrites a leased block (a compaction), it writes in
        place and the child is broken: the engine ends it (take_broken) at the start of its next step, before it
        reads again and before anything is admitted; until then the blocks the parent gave back stay the child's,
        so the promises are whole again only once it ends."""
        src = self._sequences[parent]
        if child in self._sequences:
            raise ValueError(f"{child} already holds a reservation")
        slots = src.capacity if slots is None else slots
        if slots < src.n:
            raise ValueError(f"a fork of {parent} needs at least its {src.n} slots (asked {slots})")
        # Only the blocks that hold valid slots are shared: a block taken ahead of an append is the parent's.
        seq = SequenceKV(owner=child, pool=self, capacity=slots, blocks=list(src.blocks[:self.blocks_for(src.n)]),
                         n=src.n)
        before = self.promised_blocks
        full = src.n // self.block_size
        for index, block in enumerate(seq.blocks):
            if lease and index < full:
                self._adjust(block, refs=1, leases=1)
                seq.leased.add(block)
            else:
                self._share(block)
        self._sequences[child] = seq
        # The promise now covers the child's growth and one private copy of every block it shares but does not lease.
        if self.free_blocks < self.promised_blocks:
            self.free(child)
            raise PoolExhausted(f"fork of {parent} needs {self.promised_blocks - before} more promised blocks; "
                                f"{self.free_blocks - before} free beyond existing promises")
        return seq

    def _check_available(self, blocks: int, slots: int) -> None:
        if self.available_blocks < blocks:
            raise PoolExhausted(
                f"no room for {slots} slots ({blocks} blocks of {self.block_size}): {self.free_blocks} blocks free, "
                f"{self.promised_blocks} of them promised to running sequences")

    # ---- blocks -------------------------------------------------------------------------------------
    def take_block(self, seq: SequenceKV) -> int:
        if len(seq.blocks) >= seq.reserved_blocks:
            raise RuntimeError(f"sequence {seq.owner} would hold more than its {seq.reserved_blocks} reserved blocks")
        if not self._free_blocks:
            raise RuntimeError("KV pool out of blocks despite reservations (accounting bug)")
        block = self._free_blocks.pop()
        self.refcount[block] = 1
        seq.blocks.append(block)
        seq._slot_map = None
        return block

    def needs_copy(self, seq: SequenceKV, index: int) -> bool:
        """Before `seq` writes its logical block `index`: True when another holder keeps a promised share (copy
        first). Held besides `seq` only by leases, the block is written in place and the lease holders are
        broken (their answer is void; the engine ends them)."""
        block = seq.blocks[index]
        if self.refcount[block] == 1:
            return False
        if block in seq.leased:
            raise RuntimeError(f"{seq.owner} would write block {block} it only leases (a lease fork only appends)")
        if self.refcount[block] - self.leases[block] > 1:
            return True
        self._broken.update(s.owner for s in self._sequences.values() if block in s.leased)
        return False

    def take_broken(self) -> set[str]:
        """Lease holders broken since the last call (the engine ends them before they read again)."""
        broken, self._broken = self._broken, set()
        return broken

    def copy_on_write(self, seq: SequenceKV, index: int) -> None:
        """Give `seq` a private copy of its logical block `index` (shared with another sequence)."""
        old = seq.blocks[index]
        if not self._free_blocks:
            raise RuntimeError("KV pool out of blocks for a copy-on-write (accounting bug)")
        new = self._free_blocks.pop()
        self.refcount[new] = 1
        src = slice(old * self.block_size, (old + 1) * self.block_size)
        dst = slice(new * self.block_size, (new + 1) * self.block_size)
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]
        self.positions[:, :, dst] = self.positions[:, :, src]
        seq.blocks[index] = new
        seq._slot_map = None
        self._release(seq, old)

    def make_private(self, seq: SequenceKV, slots: int) -> None:
        """Copy every shared block among the first `slots` logical slots of `seq` (before a rewrite)."""
        if not self._shared_extra and not self._lease_holds:  # nothing is shared anywhere (no fork alive)
            return
        for index in range(min(len(seq.blocks), self.blocks_for(slots))):
            if self.needs_copy(seq, index):
                self.copy_on_write(seq, index)

    def truncate(self, seq: SequenceKV, n: int) -> None:
        """Set the valid count to n and give back the blocks past it."""
        keep = self.blocks_for(n)
        for block in seq.blocks[keep:]:
            self._release(seq, block)
        if len(seq.blocks) > keep:
            del seq.blocks[keep:]
            seq._slot_map = None
        seq.n = n

    def _copies(self, block: int) -> int:
        """Private copies of `block` still promised: one per holder beyond the first, leases excepted."""
        return max(0, self.refcount[block] - self.leases[block] - 1)

    def _adjust(self, block: int, refs: int, leases: int = 0) -> None:
        before = self._copies(block)
        self.refcount[block] += refs
        self.leases[block] += leases
        self._lease_holds += leases
        self._shared_extra += self._copies(block) - before
        if self.refcount[block] == 0:
            self._free_blocks.append(block)

    def _share(self, block: int) -> None:
        self._adjust(block, refs=1)

    def _release(self, holder: SequenceKV, block: int) -> None:
        """`holder` lets go of `block` (its lease, if it leased it)."""
        leased = block in holder.leased
        holder.leased.discard(block)
        self._adjust(block, refs=-1, leases=-1 if leased else 0)

    def check_consistency(self) -> None:
        """Reference counts equal table occurrences, free blocks are exactly the unreferenced ones, no sequence
        holds more than it reserved, and the promises fit in the free blocks (tests and debug builds)."""
        counts = [0] * self.num_blocks
        for seq in self._sequences.values():
            assert len(seq.blocks) <= seq.reserved_blocks, f"{seq.owner} holds more blocks than it reserved"
            assert seq.n <= min(seq.capacity, len(seq.blocks) * self.block_size), f"{seq.owner}: n past its blocks"
            for block in seq.blocks:
                counts[block] += 1
        assert counts == self.refcount, "reference counts differ from the block tables"
        free = sorted(self._free_blocks)
        assert free == [b for b in range(self.num_blocks) if counts[b] == 0], "free list differs from unreferenced blocks"
        leases = [0] * self.num_blocks
        for seq in self._sequences.values():
            assert seq.leased <= set(seq.blocks), f"{seq.owner} leases blocks it does not hold"
            for block in seq.leased:
                leases[block] += 1
        assert leases == self.leases, "lease counts differ from the sequences' leased blocks"
        assert self._shared_extra == sum(max(0, c - l - 1) for c, l in zip(counts, leases)), "shared-copy count is off"
        assert self.promised_blocks <= self.free_blocks, "promised more blocks than are free"
