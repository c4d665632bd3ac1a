"""KV pool accounting and allocation (vLLM-style deterministic bookkeeping tests)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder_service.kv_pool import KVPool, PoolExhausted


def make_pool(slots=64, dtype=torch.float32):
    return KVPool(num_layers=3, num_kv_heads=2, head_dim=8, capacity_slots=slots, dtype=dtype)


def test_bytes_match_tensor_sizes():
    pool = make_pool(dtype=torch.bfloat16)
    a = pool.allocate("a", 10)
    b = pool.allocate("b", 7)
    tensor_bytes = sum(r.k.numel() * r.k.element_size() + r.v.numel() * r.v.element_size() for r in (a, b))
    assert pool.reserved_bytes == tensor_bytes == 17 * pool.slot_bytes
    assert pool.slot_bytes == 2 * 3 * 2 * 8 * 2  # K and V, layers, KV heads, head dim, bf16
    assert pool.arena.numel() * pool.arena.element_size() == pool.capacity_bytes
    a.n, b.n = 4, 7
    assert pool.used_bytes == 11 * pool.slot_bytes
    assert pool.free_slots == 64 - 17


def test_regions_do_not_alias():
    pool = make_pool()
    a = pool.allocate("a", 5)
    b = pool.allocate("b", 5)
    a.k.fill_(1.0)
    a.v.fill_(2.0)
    assert b.k.abs().sum() == 0 and b.v.abs().sum() == 0
    assert a.k.data_ptr() != a.v.data_ptr()


def test_free_coalesces_and_exhaustion_is_reported():
    pool = make_pool(slots=30)
    for name in "abc":
        pool.allocate(name, 10)
    with pytest.raises(PoolExhausted, match="no free region of 1 slots"):
        pool.allocate("d", 1)
    pool.free("a")
    pool.free("c")
    assert pool.largest_free_region == 10  # two pieces of 10, not adjacent
    pool.free("b")
    assert pool._free == [(0, 30)]
    pool.check_consistency()


def test_resize_keeps_valid_slots_and_positions():
    pool = make_pool()
    a = pool.allocate("a", 6)
    a.k[:, :, :4] = torch.arange(4.0)[None, None, :, None]
    a.positions[:, :, :4] = torch.tensor([0, 5, 9, 11])
    a.n = 4
    pool.allocate("blocker", 2)  # forces the grow to move the region
    grown = pool.resize("a", 20)
    assert grown.capacity == 20 and grown.n == 4 and grown.offset != a.offset
    assert torch.equal(grown.k[:, :, :4, 0], torch.arange(4.0).expand(3, 2, 4))
    assert grown.positions[0, 0, :4].tolist() == [0, 5, 9, 11]
    shrunk = pool.resize("a", 4)
    assert shrunk.positions[2, 1, :4].tolist() == [0, 5, 9, 11]
    assert pool.reserved_slots == 6
    with pytest.raises(ValueError, match="holds 4"):
        pool.resize("a", 3)
    pool.check_consistency()


def test_write_past_the_reservation_is_refused():
    pool = make_pool()
    a = pool.allocate("a", 2)
    a.n = 2
    with pytest.raises(RuntimeError, match="exceed its reserved"):
        a.write(0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "resize"]), st.integers(0, 5), st.integers(1, 20)),
                max_size=40))
def test_random_operations_keep_the_arena_tiled(ops):
    pool = make_pool(slots=50)
    live = {}
    for op, who, size in ops:
        name = f"s{who}"
        try:
            if op == "alloc" and name not in live:
                live[name] = pool.allocate(name, size)
            elif op == "free" and name in live:
                pool.free(name)
                del live[name]
            elif op == "resize" and name in live:
                live[name] = pool.resize(name, size)
        except PoolExhausted:
            pass
        pool.check_consistency()
        assert pool.reserved_slots + pool.free_slots == 50
        assert pool.reserved_slots == sum(r.capacity for r in live.values())
