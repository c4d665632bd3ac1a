"""Paged KV pool: block accounting, reservations, fork with copy-on-write (vLLM-style bookkeeping tests)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder_service.kv_pool import KVPool, PoolExhausted

L, H, D = 3, 2, 8


def make_pool(slots=64, dtype=torch.float32, block_size=4):
    return KVPool(num_layers=L, num_kv_heads=H, head_dim=D, capacity_slots=slots, dtype=dtype, block_size=block_size)


def append(seq, t, start=0.0):
    """Write t tokens whose K equal start, start + 1, ... (V = -K) at the next positions, and commit them."""
    seq.prepare_append(t)
    values = start + torch.arange(t, dtype=torch.float32)
    for layer in range(L):
        k = values[:, None, None].expand(t, H, D)
        seq.write(layer, k, -k)
    seq.commit(torch.arange(seq.n, seq.n + t))


def keys_of(seq) -> list[float]:
    return seq.dense().k[0, 0, :, 0].tolist()


def test_bytes_match_tensor_sizes_and_blocks_are_taken_as_written():
    pool = make_pool(dtype=torch.bfloat16)
    assert pool.slot_bytes == 2 * L * H * D * 2  # K and V, layers, KV heads, head dim, bf16
    padding_block = pool.block_bytes  # one zero block, never handed out, read by batched attention's padding
    assert (pool.k.numel() + pool.v.numel()) * pool.k.element_size() == pool.capacity_bytes + padding_block
    a = pool.allocate("a", 10)  # 3 blocks reserved, none taken yet
    assert pool.free_blocks == 16 and pool.promised_blocks == 3 and pool.available_blocks == 13
    append(a, 5)
    assert a.blocks and len(a.blocks) == 2 and pool.free_blocks == 14 and pool.promised_blocks == 1
    assert pool.used_bytes == 5 * pool.slot_bytes and pool.reserved_bytes == 10 * pool.slot_bytes
    pool.check_consistency()


def test_sequences_never_alias_and_the_slot_map_follows_the_table():
    pool = make_pool()
    a, b = pool.allocate("a", 8), pool.allocate("b", 8)
    append(a, 6, start=100.0)
    append(b, 6, start=200.0)
    assert keys_of(a) == [100.0 + i for i in range(6)] and keys_of(b) == [200.0 + i for i in range(6)]
    assert not set(a.blocks) & set(b.blocks)
    assert a.slot_map.tolist()[:4] == list(range(a.blocks[0] * 4, a.blocks[0] * 4 + 4))


def test_write_past_the_reservation_is_refused():
    pool = make_pool()
    a = pool.allocate("a", 2)
    append(a, 2)
    with pytest.raises(RuntimeError, match="exceed its reserved"):
        a.prepare_append(1)


def test_compaction_returns_emptied_blocks_at_once():
    """Invariant 1 with pages: the blocks past the kept slots are free and counted free at once."""
    pool = make_pool()
    a = pool.allocate("a", 16)
    append(a, 14, start=0.0)
    assert len(a.blocks) == 4 and pool.free_blocks == 12
    n = a.compact(torch.tensor([0, 1, 12, 13]))
    assert n == 4 and a.n == 4 and len(a.blocks) == 1 and pool.free_blocks == 15
    assert keys_of(a) == [0.0, 1.0, 12.0, 13.0] and a.dense().positions[0, 0].tolist() == [0, 1, 12, 13]
    assert pool.promised_blocks == 3  # the reservation stands: the sequence may grow back to 16 slots
    append(a, 12, start=50.0)  # the freed blocks take new tokens
    pool.check_consistency()


def test_admission_counts_promises_not_only_free_blocks():
    pool = make_pool(slots=32)  # 8 blocks
    a = pool.allocate("a", 20)  # 5 blocks promised, none taken
    with pytest.raises(PoolExhausted, match="promised"):
        pool.allocate("b", 16)  # 4 blocks: 8 free but only 3 unpromised
    b = pool.allocate("b", 12)
    append(a, 20)
    append(b, 12)
    assert pool.free_blocks == 0 and pool.available_blocks == 0
    pool.free("a")
    assert pool.free_blocks == 5 and pool.available_blocks == 5
    pool.check_consistency()


def test_resize_keeps_blocks_and_refuses_what_it_cannot_promise():
    pool = make_pool(slots=32)
    a = pool.allocate("a", 10)
    append(a, 6, start=7.0)
    blocks = list(a.blocks)
    parked = pool.resize("a", 6)  # park: the reservation shrinks to what it holds, nothing moves
    assert parked is a and a.blocks == blocks and a.capacity == 6 and pool.promised_blocks == 0
    other = pool.allocate("other", 24)  # takes every unpromised block (6 of 8)
    with pytest.raises(PoolExhausted):
        pool.resize("a", 12)  # needs one more block than it holds: none left to promise
    assert a.capacity == 6 and pool.promised_blocks == 6  # nothing changed
    pool.free(other.owner)
    pool.resize("a", 12)
    append(a, 6, start=13.0)
    assert a.blocks[:2] == blocks and keys_of(a) == [7.0 + i for i in range(12)]  # grown in place
    with pytest.raises(ValueError, match="holds 12"):
        pool.resize("a", 11)
    pool.check_consistency()


def test_fork_shares_blocks_and_the_child_never_writes_the_parent():
    pool = make_pool()
    parent = pool.allocate("parent", 16)
    append(parent, 6, start=0.0)  # blocks: [0..3] full, [4, 5] half
    used_before = pool.used_blocks
    child = pool.fork("parent", "child")
    assert child.blocks == parent.blocks and pool.used_blocks == used_before  # shared, nothing copied
    assert all(pool.refcount[b] == 2 for b in parent.blocks)
    append(child, 3, start=100.0)  # copy-on-write of the half-filled last block, then a block of its own
    assert keys_of(parent) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert keys_of(child) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0, 102.0]
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    append(parent, 2, start=50.0)  # the parent's own append lands in its block, unseen by the child
    assert keys_of(child)[6:] == [100.0, 101.0, 102.0] and keys_of(parent)[6:] == [50.0, 51.0]
    pool.check_consistency()


def test_compacting_a_fork_copies_only_what_it_rewrites():
    pool = make_pool()
    parent = pool.allocate("parent", 16)
    append(parent, 12, start=0.0)
    child = pool.fork("parent", "child")
    child.compact(torch.tensor([0, 5, 6, 11]))
    assert keys_of(child) == [0.0, 5.0, 6.0, 11.0]
    assert keys_of(parent) == [float(i) for i in range(12)]  # untouched by the child's rewrite
    per_head = torch.tensor([[0, 2, 9], [1, 3, 10]]).expand(L, H, 3)
    parent.compact(per_head)  # the parent rewrites too, now that a block of it is shared no more
    assert keys_of(child) == [0.0, 5.0, 6.0, 11.0]
    assert parent.dense().k[0, 1, :, 0].tolist() == [1.0, 3.0, 10.0]
    pool.check_consistency()


def test_freeing_a_fork_frees_only_its_own_blocks_and_memory_returns_to_baseline():
    pool = make_pool()
    baseline = (pool.free_blocks, pool.available_blocks)
    parent = pool.allocate("parent", 16)
    append(parent, 10)
    held = pool.used_blocks
    child = pool.fork("parent", "child", slots=16)
    append(child, 4, start=100.0)
    own = [b for b in child.blocks if pool.refcount[b] == 1]
    assert own and pool.used_blocks == held + len(own)
    pool.free("child")
    assert pool.used_blocks == held and keys_of(parent) == [float(i) for i in range(10)]
    pool.check_consistency()
    child = pool.fork("parent", "child2")
    pool.free("parent")  # the child now holds the shared blocks alone
    assert pool.used_blocks == held and keys_of(child) == [float(i) for i in range(10)]
    pool.free("child2")
    assert (pool.free_blocks, pool.available_blocks) == baseline
    pool.check_consistency()


def test_a_fork_that_cannot_be_promised_is_refused():
    pool = make_pool(slots=16)  # 4 blocks
    parent = pool.allocate("parent", 12)
    append(parent, 12)  # 3 blocks, one free
    with pytest.raises(PoolExhausted, match="fork"):
        pool.fork("parent", "child")  # the child may have to copy all 3 blocks
    assert pool.region("child") is None
    pool.check_consistency()


def test_a_shared_block_is_promised_one_copy_per_extra_holder():
    """r holders of a block need at most r - 1 private copies: a parent holding almost half the pool forks."""
    pool = make_pool(slots=64)  # 16 blocks
    parent = pool.allocate("parent", 28)
    append(parent, 28)  # 7 blocks, all full
    child = pool.fork("parent", "child", slots=28)
    assert pool.promised_blocks == 7 and pool.free_blocks == 9  # one copy per shared block, not two
    append(parent, 0)
    child.compact(torch.arange(0, 28, 2))  # copies the 4 blocks it rewrites (the first 14 slots)
    assert pool.promised_blocks == 3 and pool.free_blocks == 5 and keys_of(parent) == [float(i) for i in range(28)]
    pool.check_consistency()


def test_a_lease_fork_is_promised_only_its_growth_and_a_rewrite_breaks_it():
    """A side thread's fork leases the parent's full blocks: it starts where a copy-promising fork is refused,
    and a compaction of the parent writes in place and breaks it instead of copying."""
    pool = make_pool(slots=16)  # 4 blocks
    parent = pool.allocate("parent", 12)
    append(parent, 12)  # 3 full blocks, one free
    with pytest.raises(PoolExhausted, match="fork"):
        pool.fork("parent", "copying", slots=16)  # would be promised 3 copies + its growth
    child = pool.fork("parent", "child", slots=16, lease=True)
    assert child.leased == set(parent.blocks) and pool.promised_blocks == 1  # its growth only
    append(child, 3, start=100.0)  # a block of its own; the leased ones are never written
    assert keys_of(child) == [float(i) for i in range(12)] + [100.0, 101.0, 102.0]
    pool.check_consistency()
    assert pool.take_broken() == set()
    parent.compact(torch.tensor([1, 2, 3, 5, 8]))  # no free block for a copy: written in place
    assert keys_of(parent) == [1.0, 2.0, 3.0, 5.0, 8.0]
    assert pool.take_broken() == {"child"} and pool.take_broken() == set()
    with pytest.raises(RuntimeError, match="only leases"):
        child.compact(torch.tensor([0, 1]))  # a lease holder never rewrites what it leases
    # Until the broken child ends, the block the parent gave back is still the child's: the parent's promise
    # (its reservation of 3 blocks) is met again once the engine ends the child, before anything is admitted.
    assert pool.free_blocks == 0
    pool.free("child")
    pool.check_consistency()
    pool.free("parent")
    assert pool.free_blocks == pool.num_blocks and pool.promised_blocks == 0
    pool.check_consistency()


def test_a_lease_fork_shares_the_partly_filled_block_with_a_promise():
    pool = make_pool(slots=32)
    parent = pool.allocate("parent", 16)
    append(parent, 6)  # one full block, one half-filled
    child = pool.fork("parent", "child", slots=10, lease=True)
    assert child.leased == {parent.blocks[0]} and pool.refcount[parent.blocks[1]] == 2
    append(parent, 2, start=50.0)  # copies the half-filled block (promised): the child still sees its view
    append(child, 2, start=100.0)
    assert keys_of(child) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 101.0]
    assert keys_of(parent)[6:] == [50.0, 51.0] and pool.take_broken() == set()
    pool.check_consistency()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "append", "compact", "fork", "lease", "free", "resize"]),
                          st.integers(0, 4), st.integers(1, 12)), max_size=40))
def test_random_operations_keep_the_accounting_exact(ops):
    pool = make_pool(slots=48, block_size=4)
    live: dict[str, object] = {}
    for op, who, size in ops:
        name = f"s{who}"
        seq = live.get(name)
        if seq is not None and seq.leased and op in ("compact", "resize"):
            continue  # a lease fork only appends (the engine gives leases to side threads only)
        try:
            if op == "lease" and seq is not None:
                child = f"s{(who + 1) % 5}"
                if child not in live:
                    live[child] = pool.fork(name, child, slots=seq.n + size, lease=True)
            if op == "alloc" and seq is None:
                live[name] = pool.allocate(name, size)
            elif op == "append" and seq is not None:
                append(seq, min(size, seq.free_slots))
            elif op == "compact" and seq is not None and seq.n:
                keep = torch.arange(0, seq.n, 2)
                seq.compact(keep)
            elif op == "fork" and seq is not None:
                child = f"s{(who + 1) % 5}"
                if child not in live:
                    live[child] = pool.fork(name, child)
            elif op == "free" and seq is not None:
                pool.free(name)
                del live[name]
            elif op == "resize" and seq is not None:
                pool.resize(name, max(size, seq.n))
        except PoolExhausted:
            pass
        for broken in pool.take_broken():  # the engine ends a broken lease fork before it reads again
            pool.free(broken)
            del live[broken]
        pool.check_consistency()
        assert pool.reserved_slots == sum(s.capacity for s in live.values())
        assert pool.free_blocks + len({b for s in live.values() for b in s.blocks}) == pool.num_blocks


@pytest.mark.parametrize("block_size", [0, 3, 12, -4])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        make_pool(block_size=block_size)


def test_a_pool_smaller_than_one_block_is_refused():
    with pytest.raises(ValueError, match="holds no block of 16"):
        make_pool(slots=10, block_size=16)


def test_engine_block_size_is_checked(make_engine):  # EngineConfig.block_size reaches the pool
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        make_engine(block_size=24)
