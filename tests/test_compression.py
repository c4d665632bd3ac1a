"""Decode-time compression through the real engine: DESIGN invariants 1-5, 7 and 8, one test (or more) each."""
from __future__ import annotations

import pytest
import torch

from decoder_service.requests import (
    CompressionConfig,
    EvictionEvent,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
)
from policy_service.registry import serving_policies

PROMPT = list(range(3, 163))  # 160 tokens + <bos>
# golden (eval only) needs an oracle: tests/test_golden.py; breadcrumbs needs a beacon-trained checkpoint:
# tests/test_breadcrumbs.py runs it on one (budget and all).
COMPRESSING = [p for p in serving_policies() if p not in ("full", "breadcrumbs")]


def request(policy="h2o", budget=48, n=60, seed=5, interval=8, window=8, sinks=4, prompt=PROMPT, **params):
    return GenerationRequest(
        "r", list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, seed=seed),
        compression=CompressionConfig(policy=policy, budget=budget, interval=interval, window=window, sinks=sinks,
                                      params={k: str(v) for k, v in params.items()}))


def run_with_trace(engine, req):
    """Run one request; record the live slot count after every step (before and after compression)."""
    events, counts, seqs = [], [], []

    def observe(engine_, seq):
        counts.append(seq.kv.n)
        if seq not in seqs:
            seqs.append(seq)

    engine.step_hooks.insert(0, observe)  # sees the cache before the compressor
    engine.step_hooks.append(observe)  # and after it
    retire = engine._retire

    def retire_after_reading(seq):  # the cache as the request ends, before its blocks go back to the pool
        FINAL[seq.id] = (seq.kv.n, seq.kv.dense())
        retire(seq)

    engine._retire = retire_after_reading
    engine.add_request(req, events.append)
    engine.run_until_done()
    return events, counts, seqs[0]


FINAL: dict[str, tuple] = {}  # request id -> (valid slots, DenseKV) when it retired


@pytest.mark.parametrize("policy", COMPRESSING)
def test_bounded_footprint_prefill_included(make_engine, policy):
    """Invariant 2: never more than budget + interval + max_lag slots, and admission reserved exactly that."""
    engine = make_engine(prefill_chunk=64)
    req = request(policy)
    events, counts, seq = run_with_trace(engine, req)
    c = req.compression
    bound = c.budget + c.interval + c.max_lag
    assert max(counts) <= bound
    assert seq.kv.capacity == bound
    final = events[-1]
    assert isinstance(final, FinishEvent) and final.usage.generated_tokens == 60
    assert final.usage.peak_kv_slots <= bound
    assert final.usage.peak_kv_bytes == final.usage.peak_kv_slots * engine.pool.slot_bytes
    evictions = [e for e in events if isinstance(e, EvictionEvent)]
    assert evictions and all(e.slots_after == c.budget for e in evictions)
    assert final.usage.evicted_tokens == sum(e.evicted for e in evictions)
    assert final.usage.compression_events == len(evictions)
    # The whole sequence went through: 161 prompt + 59 fed-back tokens, most of them evicted or merged (CASK).
    assert final.usage.merged_tokens == sum(e.merged for e in evictions)
    assert final.usage.evicted_tokens + final.usage.merged_tokens == 161 + 59 - FINAL[seq.id][0]


def test_evicted_slots_are_really_free(make_engine):
    """Invariant 1: the pool's byte accounting follows compaction; the freed slots take new tokens."""
    engine = make_engine(prefill_chunk=64)
    used = []
    engine.step_hooks.append(lambda e, seq: used.append((seq.kv.n, e.pool.used_bytes, e.pool.reserved_bytes,
                                                         e.pool.used_blocks)))
    engine.generate([request("snapkv")])
    assert min(n for n, *_ in used) == 48  # it compressed
    for n, used_bytes, reserved, blocks in used:
        assert used_bytes == n * engine.pool.slot_bytes  # bytes in use = valid slots x bytes per slot
        assert reserved == (48 + 8 + 4) * engine.pool.slot_bytes
        assert blocks == engine.pool.blocks_for(n)  # physically held: exactly the blocks its valid slots need
    assert engine.pool.used_blocks == 0 and engine.pool.free_blocks == engine.pool.num_blocks
    assert engine.pool.used_bytes == 0 and engine.pool.reserved_bytes == 0


def test_positions_survive_eviction_and_new_tokens_use_true_positions(make_engine, tiny_model):
    """Invariant 3: slots keep their logical position; layer-0 keys equal a full run's at those positions."""
    engine = make_engine(prefill_chunk=64)
    events, _, seq = run_with_trace(engine, request("h2o", n=40))
    n, dense = FINAL[seq.id]
    positions = dense.positions
    assert bool((positions[..., 1:] > positions[..., :-1]).all())  # strictly increasing in every row
    assert int(positions.max()) == seq.num_computed - 1  # the newest token sits at its absolute position
    assert bool((positions[..., :4] == torch.arange(4)).all())  # sinks kept
    # Layer-0 keys depend only on the token and its position: compare against an uncompressed forward.
    tokens = torch.tensor([seq.token_ids[:seq.num_computed]])
    captured = {}

    def capture(layer, q, k, v):
        if layer == 0:
            captured["k"] = k[0]
        from decoder_service.model import causal_attention
        return causal_attention(layer, q, k, v)

    with torch.no_grad():
        tiny_model.model(tokens, torch.arange(tokens.shape[1])[None], capture)
    full_k = captured["k"]  # [T, H, D]
    for h in range(dense.k.shape[1]):
        assert torch.allclose(dense.k[0, h], full_k[positions[0, h], h], atol=1e-5)


def test_per_head_keep_sets_differ_but_counts_are_equal(make_engine):
    """Invariant 4: per-head policies keep different slots per (layer, head), always the same number."""
    engine = make_engine(prefill_chunk=64)
    _, _, seq = run_with_trace(engine, request("h2o"))
    n, dense = FINAL[seq.id]
    positions = dense.positions.reshape(-1, n)
    distinct = {tuple(row.tolist()) for row in positions}
    assert len(distinct) > 1  # not one global set
    assert positions.shape[1] == n  # dense: one valid count for every row


def test_stale_and_superseded_decisions(make_engine):
    """Invariant 5: slots appended after the snapshot are kept; old or superseded decisions are dropped."""
    from policy_service.local import InProcessPolicy

    engine = make_engine(prefill_chunk=64)
    engine.step_hooks.remove(engine.compressor)  # drive the compressor by hand
    seqs = []
    engine.step_hooks.append(lambda e, s: seqs.append(s) if s not in seqs else None)
    req = request("h2o", budget=40, interval=8, n=200)
    req.compression.max_lag = 3
    engine.add_request(req, lambda ev: None)
    while not seqs or seqs[0].pending > 1:
        engine.step()
    seq = seqs[0]
    comp = engine.compressor
    first, _ = comp.snapshot(engine, seq)
    assert comp.apply(engine, seq, first, InProcessPolicy().decide(first, "h2o")) and seq.kv.n == 40
    # A frame, then two more decode steps before its decision arrives (staleness 2 <= max_lag 3).
    frame, _ = comp.snapshot(engine, seq)
    decision = InProcessPolicy().decide(frame, "h2o")
    engine.step()
    engine.step()
    newest = seq.kv.dense().positions[0, 0, seq.kv.n - 2:seq.kv.n].tolist()
    assert comp.apply(engine, seq, frame, decision)
    assert seq.kv.n == 40 + 2  # the plan's 40 plus the 2 slots appended after the snapshot
    assert seq.kv.dense().positions[0, 0, seq.kv.n - 2:seq.kv.n].tolist() == newest
    # The next frame is superseded once another plan lands first.
    old, _ = comp.snapshot(engine, seq)
    newer, _ = comp.snapshot(engine, seq)
    assert comp.apply(engine, seq, newer, InProcessPolicy().decide(newer, "h2o"))
    assert not comp.apply(engine, seq, old, InProcessPolicy().decide(old, "h2o"))
    # Too late: more than max_lag steps after the snapshot.
    late, _ = comp.snapshot(engine, seq)
    for _ in range(4):
        engine.step()
    assert not comp.apply(engine, seq, late, InProcessPolicy().decide(late, "h2o"))
    assert seq.usage.dropped_decisions == 2
    engine.abort(seq.id)


@pytest.mark.parametrize("policy", ["full", *COMPRESSING])
def test_budget_above_length_is_bit_identical_to_uncompressed(make_engine, policy):
    """Invariant 7: `full`, or any policy whose budget is never reached, reproduces the reference exactly."""
    [reference] = make_engine().generate([request("full", budget=0, n=30)])
    [result] = make_engine().generate([request(policy, budget=0 if policy == "full" else 400, n=30)])
    assert result.token_ids == reference.token_ids
    assert result.usage.compression_events == 0


def test_compression_changes_the_output_when_it_bites(make_engine):
    """A sanity check on the test above: the same policies at a small budget do change the tokens."""
    [reference] = make_engine().generate([request("full", budget=0, n=30)])
    [squeezed] = make_engine().generate([request("streaming_llm", budget=24, n=30)])
    assert squeezed.usage.compression_events > 0 and squeezed.token_ids != reference.token_ids


def test_stochastic_policy_is_reproducible_by_seed(make_engine):
    """Invariant 8: same seed, same decisions and tokens; another seed, other decisions."""
    def keeps(seed):
        engine = make_engine(prefill_chunk=64)
        kept = []
        engine.step_hooks.append(lambda e, s: kept.append(s.kv.dense().positions.clone()))
        [result] = engine.generate([request("vase", seed=seed, window_queries=16)])
        return result, kept

    (a, ka), (b, kb), (c, kc) = keeps(11), keeps(11), keeps(12)
    assert a.token_ids == b.token_ids and a.usage.seed == 11
    assert all(torch.equal(x, y) for x, y in zip(ka, kb))
    assert any(not torch.equal(x, y) for x, y in zip(ka, kc))


def test_policy_failure_falls_back_and_is_reported(make_engine):
    """Invariant 6 (local part): a failing scorer never stalls generation; the fallback is counted."""
    engine = make_engine(prefill_chunk=64)

    class Broken:
        asynchronous = False

        def describe(self, policy, params=None):
            from policy_service.local import InProcessPolicy

            return InProcessPolicy().describe(policy, params)

        def decide(self, frame, policy, params=None):
            raise RuntimeError("scorer exploded")

    engine.compressor.policy = Broken()
    events = []
    engine.add_request(request("h2o", n=30), events.append)
    engine.run_until_done()
    final = events[-1]
    evictions = [e for e in events if isinstance(e, EvictionEvent)]
    assert final.usage.generated_tokens == 30
    assert final.usage.fallbacks == len(evictions) > 0
    assert all(e.fallback and e.policy == "streaming_llm" and "scorer exploded" in e.reason for e in evictions)


def test_bad_policy_parameters_are_invalid_argument(make_engine):
    from decoder_service.requests import InvalidRequest

    with pytest.raises(InvalidRequest, match="no parameter"):
        make_engine().add_request(request("snapkv", kernal=3), lambda ev: None)
    with pytest.raises(InvalidRequest, match="lam must be in"):
        make_engine().add_request(request("rkv", lam=2), lambda ev: None)


def test_session_turns_stay_compressed(make_engine):
    """A multi-turn session keeps its compressed KV between turns and stays within the bound."""
    engine = make_engine(prefill_chunk=64)
    req = request("tova", n=20)
    req.create_session = True
    [first] = engine.generate([req])
    follow = request("tova", n=20, prompt=list(range(200, 260)))
    follow.request_id, follow.session_id = "r2", first.session_id
    [second] = engine.generate([follow])
    assert second.usage.cached_tokens > 0
    assert second.usage.peak_kv_slots <= 48 + 8 + 4
    session, resident = engine.get_session(first.session_id)
    assert resident <= 48 + 8 + 4 and len(session.token_ids) == 161 + 20 + 60 + 20


# ---- plans under lag and span drops ---------------------------------------------------------------------------

def running_sequence(engine, n_tokens=60):
    """A full-cache sequence that has prefilled `n_tokens` and sampled (the tests apply plans to it by hand)."""
    engine.add_request(GenerationRequest("p", list(range(3, 3 + n_tokens - 1)),
                                         SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)),
                       lambda ev: None)
    engine.step()
    return engine.running[0]


def frame_of(engine, seq, keep, sinks=2, window=4):
    from decoder_service.statistics import build_frame
    from kvpilot_protocol.policy import StatsSpec

    return build_frame(1, "p", seq.kv, None, StatsSpec(frozenset()), seq.token_ids, [], keep=keep, sinks=sinks,
                       window=window, num_heads=engine.model_config.num_heads, step=0, seed=0)


def test_merge_plan_applies_after_the_sequence_decoded_past_its_snapshot(make_engine):
    from kvpilot_protocol.frame import Decision, MergePlanSpec

    engine = make_engine()
    seq = running_sequence(engine)
    frame = frame_of(engine, seq, keep=40)
    n0 = frame.n
    for _ in range(3):
        engine.step()  # three more slots arrive while the (remote) decision is out
    assert seq.kv.n == n0 + 3
    groups = [[i] for i in range(20)] + [[i, i + 1] for i in range(20, n0 - 1, 2)]
    if (n0 - 20) % 2:
        groups.append([n0 - 1])
    plan = MergePlanSpec(groups=groups, weights=[[1.0 / len(g)] * len(g) for g in groups], anchors=[g[-1] for g in groups])
    late_positions = seq.kv.dense().positions[0, 0, n0:n0 + 3].clone()
    assert engine.compressor.apply(engine, seq, frame, Decision(frame_id=1, plan=plan, policy="test"))
    assert seq.kv.n == len(groups) + 3
    assert torch.equal(seq.kv.dense().positions[0, 0, len(groups):seq.kv.n], late_positions)  # kept, as singletons
    assert seq.usage.merged_tokens == sum(len(g) - 1 for g in groups) and seq.usage.fallbacks == 0


def test_span_drop_on_a_per_head_compressed_cache_keeps_equal_counts_and_the_budget(make_engine):
    from kvpilot_protocol.frame import Decision, KeepSet, SpanDrop

    engine = make_engine()
    seq = running_sequence(engine)
    n = seq.kv.n
    L, H = seq.kv.pool.num_layers, seq.kv.pool.num_kv_heads
    # First a per-head compaction: each (layer, head) keeps a different 50 of the n slots.
    gen = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.sort(torch.cat([torch.arange(2), 2 + torch.randperm(n - 2, generator=gen)[:48]])).values
                        for _ in range(L * H)]).view(L, H, 50)
    assert engine.compressor.apply(engine, seq, frame_of(engine, seq, keep=50), Decision(1, KeepSet(keep), "test"))
    # Then drop the span of positions [10, 30): heads lose different numbers of slots.
    positions = seq.kv.dense().positions.clone()
    lost = ((positions >= 10) & (positions < 30)).sum(-1)
    assert lost.min() != lost.max()
    frame = frame_of(engine, seq, keep=30)
    assert engine.compressor.apply(engine, seq, frame, Decision(2, SpanDrop([(10, 30)]), "test"))
    after = seq.kv.dense().positions
    assert seq.kv.n <= 30 and seq.kv.n == min(30, int((50 - lost).min()))  # equal counts, within budget
    assert not bool(((after >= 10) & (after < 30)).any())  # the span is gone from every head
    assert bool((after[:, :, :2] == torch.arange(2)).all())  # the sinks stay
    assert bool((after[:, :, -1] == positions[:, :, -1]).all())  # the most recent slot stays
