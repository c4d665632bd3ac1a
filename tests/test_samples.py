"""n > 1 samples of one prompt (SamplingParams.n): the prompt is prefilled once, the other samples fork its KV
copy-on-write after the first token, and each sample is the run a single request with its seed would give."""
from __future__ import annotations

import pytest

from decoder_service.requests import (CompressionConfig, FinishEvent, GenerationRequest, InvalidRequest,
                                      SamplingParams, TokenEvent)

PROMPT = list(range(20, 70))  # 50 tokens: with BOS, three full blocks of 16 and one partial


def sampled(rid, n, seed=7, max_new=12, **kw):
    return GenerationRequest(rid, list(PROMPT), SamplingParams(temperature=1.0, seed=seed, n=n, max_new_tokens=max_new,
                                                               ignore_eos=True), **kw)


def run(engine, request, hook=None):
    """Events by sample index: (tokens streamed, final event)."""
    tokens, finals = {}, {}

    def on_event(ev):
        if isinstance(ev, TokenEvent):
            tokens.setdefault(ev.index, []).extend(ev.token_ids)
        elif isinstance(ev, FinishEvent):
            finals[ev.index] = ev

    if hook is not None:
        engine.step_hooks.append(hook)
    engine.add_request(request, on_event)
    engine.run_until_done()
    return tokens, finals


def test_each_sample_is_the_single_request_with_its_seed(make_engine):
    engine = make_engine()
    baseline = (engine.pool.free_blocks, engine.pool.available_blocks)
    tokens, finals = run(engine, sampled("r", n=3))
    assert sorted(finals) == [0, 1, 2] and all(f.error is None for f in finals.values())
    for index in range(3):
        assert tokens[index] == finals[index].token_ids
        [alone] = make_engine().generate([sampled(f"one{index}", n=1, seed=7 + index)])
        assert finals[index].token_ids == alone.token_ids, index  # sample i = the request with seed + i
        assert finals[index].usage.seed == 7 + index
    assert len({tuple(f.token_ids) for f in finals.values()}) > 1  # they are different samples
    assert finals[1].usage.prompt_tokens == finals[0].usage.prompt_tokens == len(PROMPT) + 1  # BOS added
    assert finals[1].usage.cached_tokens == len(PROMPT) + 1 and finals[0].usage.cached_tokens == 0
    assert (engine.pool.free_blocks, engine.pool.available_blocks) == baseline  # every block came back
    engine.pool.check_consistency()


def test_samples_share_the_prompt_blocks_without_copying_them(make_engine):
    engine = make_engine()
    seen = {}

    def hook(engine_, seq):  # the step after the forks: every sample is running
        samples = [s for s in engine_.running if s.request.request_id.startswith("r")]
        if len(samples) == 4 and "blocks" not in seen:
            seen["blocks"] = [list(s.kv.blocks) for s in samples]
            seen["refcounts"] = {b: engine_.pool.refcount[b] for s in samples for b in s.kv.blocks}

    run(engine, sampled("r", n=4), hook)
    full_prompt_blocks = (len(PROMPT) + 1) // engine.pool.block_size  # full blocks of the prompt (BOS + 50)
    first = seen["blocks"][0][:full_prompt_blocks]
    for blocks in seen["blocks"][1:]:
        assert blocks[:full_prompt_blocks] == first  # the same physical blocks
    assert all(seen["refcounts"][b] == 4 for b in first)  # held by all four, never copied


def test_greedy_samples_are_identical_and_a_bounded_policy_runs_per_sample(make_engine):
    engine = make_engine()
    request = GenerationRequest("g", list(PROMPT), SamplingParams(temperature=0, n=2, max_new_tokens=40, ignore_eos=True),
                                compression=CompressionConfig(policy="h2o", budget=48, interval=8))
    tokens, finals = run(engine, request)
    assert finals[0].token_ids == finals[1].token_ids
    assert all(f.usage.compression_events > 0 and f.usage.peak_kv_slots <= 48 + 8 + 4 for f in finals.values())
    assert engine.pool.used_blocks == 0


def test_aborting_the_request_aborts_every_sample(make_engine):
    engine = make_engine()
    finals = {}
    engine.add_request(sampled("r", n=3, max_new=30), lambda ev: isinstance(ev, FinishEvent) and finals.__setitem__(ev.index, ev))
    for _ in range(4):
        engine.step()
    assert len([s for s in engine.running if s.request.request_id.startswith("r")]) == 3
    assert engine.abort("r")
    assert sorted(finals) == [0, 1, 2] and {f.finish_reason.value for f in finals.values()} == {"abort"}
    assert engine.pool.used_blocks == 0


@pytest.mark.parametrize("change, message", [
    (dict(n=0), r"n must be in \[1, 16\]"),
    (dict(n=17), r"n must be in \[1, 16\]"),
])
def test_n_is_validated(make_engine, change, message):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(sampled("r", **change), lambda ev: None)


def test_n_with_a_session_or_a_fork_is_refused(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match="cannot continue or create a session"):
        engine.add_request(sampled("r", n=2, create_session=True), lambda ev: None)
    with pytest.raises(InvalidRequest, match="fork_of or forced_tokens"):
        engine.add_request(sampled("r", n=2, forced_tokens=[1, 2]), lambda ev: None)


def test_samples_that_do_not_fit_the_pool_are_refused_up_front(make_engine):
    engine = make_engine(kv_pool_bytes=1 << 20)
    [one] = engine.generate([sampled("one", n=1, max_new=100)])
    assert one.error is None
    with pytest.raises(Exception, match="lower max_new_tokens, n or set a compression budget"):
        engine.add_request(sampled("r", n=16, max_new=100), lambda ev: None)
