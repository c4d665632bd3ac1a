"""Forking a running request's cache (GenerationRequest.fork_of): the child shares the parent's KV blocks
copy-on-write, runs as one more sequence in the batch, and neither changes the other's output."""
from __future__ import annotations

import pytest

from decoder_service.requests import FinishEvent, GenerationRequest, InvalidRequest, SamplingParams

PROMPT = list(range(20, 70))
SIDE = [7, 8, 9]


def greedy(rid, prompt, n, **kw):
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), **kw)


def run_with_fork(engine, fork_after: int):
    """Run the parent; after `fork_after` generated tokens, fork a side request from it. Returns
    (parent's final event, child's final event, the child's shared prefix, blocks the child shared at start)."""
    finals, seen = {}, {}

    def on_event(ev):
        if isinstance(ev, FinishEvent):
            finals[len(finals)] = ev

    def hook(engine_, seq):
        if seq.id == "main" and len(seq.generated) == fork_after and "child" not in seen:
            seen["prefix"] = seq.token_ids[:seq.num_computed]
            seen["child"] = engine_.add_request(greedy("side", SIDE, 6, fork_of="main"),
                                                lambda ev: isinstance(ev, FinishEvent) and seen.__setitem__("done", ev))
        if seq.id == "side" and "shared" not in seen:
            seen["shared"] = sum(engine_.pool.refcount[b] > 1 for b in seq.kv.blocks)

    engine.step_hooks.append(hook)
    engine.add_request(greedy("main", PROMPT, 20), on_event)
    engine.run_until_done()
    return finals[0], seen["done"], seen["prefix"], seen["shared"]


def test_a_fork_continues_the_parent_context_and_leaves_the_parent_unchanged(make_engine):
    engine = make_engine()
    baseline = (engine.pool.free_blocks, engine.pool.available_blocks)
    [alone] = make_engine().generate([greedy("main", PROMPT, 20)])
    parent, child, prefix, shared = run_with_fork(engine, fork_after=5)
    assert parent.token_ids == alone.token_ids  # the side thread never touched the main thread's cache
    assert shared > 0  # it read the parent's blocks without copying them
    [fresh] = make_engine().generate([greedy("fresh", prefix[1:] + SIDE, 6)])  # BOS is added again
    assert child.token_ids == fresh.token_ids  # same as re-reading the parent's context from scratch
    assert child.usage.cached_tokens == len(prefix)
    assert (engine.pool.free_blocks, engine.pool.available_blocks) == baseline  # every block came back
    engine.pool.check_consistency()


def test_fork_is_validated(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match="no running request 'nope'"):
        engine.add_request(greedy("side", SIDE, 4, fork_of="nope"), lambda ev: None)
    engine.add_request(greedy("main", PROMPT, 10), lambda ev: None)
    engine.step()
    with pytest.raises(InvalidRequest, match="cannot also use a session"):
        engine.add_request(greedy("side", SIDE, 4, fork_of="main", create_session=True), lambda ev: None)
    engine.run_until_done()
    assert engine.pool.used_blocks == 0


def test_a_fork_inherits_the_statistics_of_the_slots_it_shares(make_engine):
    from decoder_service.requests import CompressionConfig

    engine = make_engine()
    policy = CompressionConfig(policy="h2o", budget=400)
    seen = {}

    def hook(engine_, seq):
        if seq.id == "main" and len(seq.generated) == 4 and "forked" not in seen:
            seen["forked"] = True
            seen["parent"] = seq.stats.accumulators["cumulative_attention"][:, :, :seq.kv.n].clone()
            engine_.add_request(greedy("side", SIDE, 3, fork_of="main", compression=policy), lambda ev: None)
        if seq.id == "side" and "child" not in seen:
            seen["child"] = seq.stats.accumulators["cumulative_attention"][:, :, :seen["parent"].shape[-1]].clone()
            seen["prompt_tokens"] = seq.usage.prompt_tokens

    engine.step_hooks.append(hook)
    engine.add_request(greedy("main", PROMPT, 12, compression=policy), lambda ev: None)
    engine.run_until_done()
    assert seen["prompt_tokens"] == len(SIDE)  # no BOS in the middle of the parent's context
    # The child's first step added its own attention on top of what it inherited: never less, and not from zero.
    assert bool((seen["child"] >= seen["parent"] - 1e-6).all()) and seen["parent"].sum() > 0
    assert engine.pool.used_blocks == 0


def test_a_lease_fork_ends_when_its_parent_compacts_and_the_parent_is_unchanged(make_engine):
    """A side thread's fork leases the parent's full blocks; a compaction of the parent breaks it: it ends with
    ABORT (its answer void) at the next step, the parent's output is the same as alone, every block comes back."""
    from decoder_service.requests import CompressionConfig, FinishReason

    bounded = CompressionConfig(policy="streaming_llm", budget=40, interval=8, window=8)
    engine = make_engine()
    [alone] = make_engine().generate([greedy("main", PROMPT, 30, compression=bounded)])
    seen = {}

    def hook(engine_, seq):
        if seq.id == "main" and len(seq.generated) == 2 and "forked" not in seen:
            seen["forked"] = True
            engine_.add_request(greedy("side", SIDE, 30, fork_of="main", fork_lease=True),
                                lambda ev: isinstance(ev, FinishEvent) and seen.__setitem__("side", ev))
        if seq.id == "side" and "leased" not in seen:
            seen["leased"] = len(seq.kv.leased)

    engine.step_hooks.append(hook)
    finals = []
    engine.add_request(greedy("main", PROMPT, 30, compression=bounded),
                       lambda ev: isinstance(ev, FinishEvent) and finals.append(ev))
    engine.run_until_done()
    assert seen["leased"] > 0
    assert seen["side"].finish_reason == FinishReason.ABORT and seen["side"].usage.generated_tokens < 30
    assert finals[0].token_ids == alone.token_ids
    assert engine.pool.used_blocks == 0
    engine.pool.check_consistency()


def test_fork_lease_is_validated(make_engine):
    from decoder_service.requests import CompressionConfig

    engine = make_engine()
    with pytest.raises(InvalidRequest, match="fork_lease is for a fork that only appends"):
        engine.add_request(greedy("side", SIDE, 4, fork_lease=True), lambda ev: None)
    engine.add_request(greedy("main", PROMPT, 10), lambda ev: None)
    engine.step()
    with pytest.raises(InvalidRequest, match="no compression"):
        engine.add_request(greedy("side", SIDE, 4, fork_of="main", fork_lease=True,
                                  compression=CompressionConfig(policy="h2o", budget=40)), lambda ev: None)
    engine.run_until_done()
    assert engine.pool.used_blocks == 0
