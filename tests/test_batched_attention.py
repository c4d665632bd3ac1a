"""The engine's batched attention over the paged pool (one call per layer for the whole step) against the
dense per-sequence reference, for decode tokens and prefill chunks in one step, grouped-query heads,
shuffled block tables, and the carried statistics it feeds."""
from __future__ import annotations

import pytest
import torch

from decoder_service.attention import PoolAttention, Segment, attend
from decoder_service.kv_pool import KVPool
from decoder_service.statistics import SequenceStatistics
from kvpilot_protocol.policy import StatsSpec

L, H, HQ, D = 2, 2, 6, 8  # a group of 3 query heads per KV head (not a power of two)


def make_sequences(pool: KVPool, prior: list[int], gen: torch.Generator):
    """Sequences holding `prior[i]` random slots; a blocker between them scatters their blocks in the pool."""
    seqs = []
    for i, n in enumerate(prior):
        seq = pool.allocate(f"s{i}", n + 16)
        if n:
            seq.load(torch.randn(L, H, n, D, generator=gen), torch.randn(L, H, n, D, generator=gen),
                     torch.arange(n).expand(L, H, n))
        pool.allocate(f"gap{i}", 8).prepare_append(8)  # the next sequence's blocks are not adjacent
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("with_stats", [False, True])
def test_one_call_per_layer_equals_the_dense_reference(with_stats):
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(L, H, D, capacity_slots=512, block_size=4)
    prior, new = [0, 5, 9, 13], [7, 1, 1, 4]  # a fresh prefill, two decode tokens, a chunk after a prefix
    seqs = make_sequences(pool, prior, gen)
    spec = StatsSpec(frozenset({"cumulative_attention", "decayed_attention"}), decay=0.8)
    stats = [SequenceStatistics(spec, L, H, HQ, D, 64, pool.device) if with_stats and i % 2 else None
             for i in range(len(seqs))]
    segments, start = [], 0
    for seq, s, t in zip(seqs, stats, new):
        segments.append(Segment(kv=seq, stats=s, start=start, length=t,
                                positions=torch.arange(seq.n, seq.n + t)))
        start += t
    dense_before = [seq.dense() for seq in seqs]
    attention = PoolAttention(segments, pool)
    for layer in range(L):
        q = torch.randn(1, start, HQ, D, generator=gen)
        k = torch.randn(1, start, H, D, generator=gen)
        v = torch.randn(1, start, H, D, generator=gen)
        out = attention(layer, q, k, v)
        assert all(s is None or not s.accumulators["cumulative_attention"][layer].any() for s in stats)
        attention.apply_statistics()  # statistics land only once the forward succeeded
        for seg, before in zip(segments, dense_before):
            rows = slice(seg.start, seg.start + seg.length)
            keys = torch.cat([before.k[layer], k[0, rows].transpose(0, 1)], dim=1)
            values = torch.cat([before.v[layer], v[0, rows].transpose(0, 1)], dim=1)
            expected, probs = attend(q[0, rows], keys, values, seg.kv.n)
            assert torch.allclose(out[0, rows], expected, atol=1e-5), f"sequence {seg.kv.owner}, layer {layer}"
            if seg.stats is not None:
                summed = probs.view(H, HQ // H, seg.length, -1).sum(dim=1)  # [H, T, S]
                total = seg.kv.n + seg.length
                cumulative = seg.stats.accumulators["cumulative_attention"][layer, :, :total]
                assert torch.allclose(cumulative, summed.sum(dim=1), atol=1e-5)
                weights = 0.8 ** torch.arange(seg.length - 1, -1, -1, dtype=torch.float32)
                decayed = seg.stats.accumulators["decayed_attention"][layer, :, :total]
                assert torch.allclose(decayed, torch.einsum("hts,t->hs", summed, weights), atol=1e-5)
    for seg in segments:  # positions were written with the K/V; advancing makes the new slots valid
        seg.kv.advance(seg.length)
        assert seg.kv.dense().positions[0, 0].tolist() == list(range(seg.kv.n))
    pool.check_consistency()


def test_the_new_tokens_land_in_the_pool_through_the_block_tables():
    gen = torch.Generator().manual_seed(1)
    pool = KVPool(L, H, D, capacity_slots=256, block_size=4)
    [seq] = make_sequences(pool, [6], gen)
    attention = PoolAttention([Segment(kv=seq, stats=None, start=0, length=3, positions=torch.arange(6, 9))], pool)
    k = torch.randn(1, 3, H, D, generator=gen)
    for layer in range(L):
        attention(layer, torch.randn(1, 3, HQ, D, generator=gen), k * (layer + 1), k)
    seq.advance(3)
    dense = seq.dense()
    for layer in range(L):
        assert torch.equal(dense.k[layer, :, 6:], (k[0] * (layer + 1)).transpose(0, 1))
    assert len(seq.blocks) == 3  # 9 slots in blocks of 4


def test_decode_steps_through_the_triton_kernel_equal_the_torch_path(make_engine, monkeypatch):
    """With KVPILOT_FORCE_TRITON=1 (the interpreter on CPU) the engine's decode-only steps run the paged decode
    kernel with fused statistics: same tokens, same evictions and the same carried attention as the torch path."""
    from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams

    def run() -> tuple[list, dict]:
        engine = make_engine(prefill_chunk=64)
        finals = {}
        retire = engine._retire

        def capture(seq):
            finals[seq.id] = seq.stats.accumulators["cumulative_attention"][:, :, :seq.kv.n].clone()
            retire(seq)

        engine._retire = capture
        requests = [GenerationRequest(f"r{i}", list(range(3, 3 + length)),
                                      SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True),
                                      compression=CompressionConfig(policy="h2o", budget=36, interval=4, window=4))
                    for i, length in enumerate((30, 37, 21))]
        results = engine.generate(requests)
        return [(r.token_ids, r.usage.evicted_tokens) for r in results], finals

    reference, reference_stats = run()
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    kernel_runs = []
    original = PoolAttention._kernel_call

    def counted(self, layer, q):
        kernel_runs.append(len(self.segments))
        return original(self, layer, q)

    monkeypatch.setattr(PoolAttention, "_kernel_call", counted)
    fused, fused_stats = run()
    assert kernel_runs and max(kernel_runs) == 3  # decode steps of all three sequences went through the kernel
    assert fused == reference and any(evicted for _, evicted in fused)
    for rid, acc in reference_stats.items():
        assert torch.allclose(fused_stats[rid], acc, atol=1e-4), rid


@pytest.mark.parametrize("with_stats", [False, True])
def test_a_poisoned_sequence_cannot_reach_its_neighbours_through_padding(with_stats):
    """Shorter sequences are padded to the longest; the padding reads the pool's zero block, never another
    sequence's slots, so NaN in one sequence's cache (a numeric fault) stays in that sequence."""
    gen = torch.Generator().manual_seed(2)
    pool = KVPool(L, H, D, capacity_slots=256, block_size=4)
    long, short = make_sequences(pool, [11, 3], gen)  # the poisoned one holds physical block 0
    pool.v[:, :, long.slot_map[:long.n]] = float("nan")
    spec = StatsSpec(frozenset({"cumulative_attention"}))
    stats = SequenceStatistics(spec, L, H, HQ, D, 32, pool.device) if with_stats else None
    segments = [Segment(kv=short, stats=stats, start=0, length=1, positions=torch.tensor([3])),
                Segment(kv=long, stats=None, start=1, length=1, positions=torch.tensor([11]))]
    out = PoolAttention(segments, pool)(0, torch.randn(1, 2, HQ, D, generator=gen),
                                        torch.randn(1, 2, H, D, generator=gen), torch.randn(1, 2, H, D, generator=gen))
    assert torch.isfinite(out[0, 0]).all() and not torch.isfinite(out[0, 1]).all()


def test_a_retried_batch_counts_no_sequence_twice(make_engine, monkeypatch):
    """A batched forward that fails is retried sequence by sequence: the innocent sequences' carried statistics
    equal a clean run's (nothing is observed until a forward succeeds)."""
    from decoder_service.requests import CompressionConfig, GenerationRequest, SamplingParams

    original = PoolAttention._attend

    def attend_or_fail(self, layer, q, group, explicit):  # the victim's batch fails in its second layer
        if layer == 1 and any(seg.kv is POISONED.get("kv") for seg in group.segments):
            raise RuntimeError("injected fault in layer 1")
        return original(self, layer, q, group, explicit)

    POISONED = {}
    monkeypatch.setattr(PoolAttention, "_attend", attend_or_fail)

    def run(poison: bool) -> dict:
        engine = make_engine()
        finals = {}
        retire = engine._retire

        def capture(seq):
            if seq.stats is not None:
                finals[seq.id] = seq.stats.accumulators["cumulative_attention"][:, :, :seq.kv.n].clone()
            retire(seq)

        engine._retire = capture
        names = ["a", "b", "victim"] if poison else ["a", "b"]
        for rid in names:
            engine.add_request(GenerationRequest(rid, list(range(3, 30)), SamplingParams(temperature=0, max_new_tokens=8,
                                                                                        ignore_eos=True),
                                                 compression=CompressionConfig(policy="h2o", budget=400)), lambda ev: None)
        for _ in range(3):
            engine.step()
        if poison:
            POISONED["kv"] = next(s for s in engine.running if s.id == "victim").kv
        engine.run_until_done()
        POISONED.clear()
        return finals

    clean, retried = run(False), run(True)
    for rid in ("a", "b"):
        assert torch.allclose(retried[rid], clean[rid], atol=1e-6), rid
