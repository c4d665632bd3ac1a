"""Input-only tokens and positions apart from the history (what Breadcrumbs' beacons need): a token fed with
`Engine.feed_input_only` gets a KV slot and a logical position, but is never sampled, streamed, added to the
visible text or to the session history."""
from __future__ import annotations

import pytest
import torch

from decoder_service.requests import FinishEvent, GenerationRequest, InvalidRequest, SamplingParams, TokenEvent

PROMPT = list(range(20, 61))
BEACON = 7


def greedy(rid, prompt, n, **kw):
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), **kw)


def run_with_beacon(engine, after: int, n: int):
    """Generate; once `after` tokens are out, feed one beacon input-only. Returns (events, sequence)."""
    events, seqs = [], []

    def hook(engine_, seq):
        if seq not in seqs:
            seqs.append(seq)
        if len(seq.generated) == after and not seq.input_only and seq.next_position == len(seq.token_ids) - 1:
            engine_.feed_input_only(seq.id, [BEACON])

    engine.step_hooks.append(hook)
    engine.add_request(greedy("b", PROMPT, n), events.append)
    engine.run_until_done()
    return events, seqs[0]


def test_a_beacon_is_fed_not_sampled_streamed_or_visible(make_engine):
    engine = make_engine()
    events, seq = run_with_beacon(engine, after=5, n=10)
    done = events[-1]
    assert isinstance(done, FinishEvent) and done.usage.generated_tokens == 10
    streamed = [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]
    assert streamed == done.token_ids and len(streamed) == 10  # the beacon is not among them
    assert seq.token_ids == [0] + PROMPT + done.token_ids  # nor in the history
    # ... but it holds a slot, at its own position, and every later token sits one position further.
    assert seq.next_position == len(seq.token_ids)  # history minus its last (unfed) token, plus the beacon
    bos_prompt = len(PROMPT) + 1
    assert seq.position_tokens[bos_prompt + 5] == BEACON


def test_tokens_after_a_beacon_equal_a_run_where_it_was_in_the_prompt(make_engine):
    """Same KV, same positions: generation after an input-only beacon equals feeding the beacon as input."""
    events, seq = run_with_beacon(make_engine(), after=5, n=10)
    generated = events[-1].token_ids
    [reference] = make_engine().generate([greedy("r", PROMPT + generated[:5] + [BEACON], 5)])
    assert generated[5:] == reference.token_ids


def test_positions_are_not_history_indices_after_a_beacon(make_engine):
    engine = make_engine()
    seen = {}
    retire = engine._retire

    def capture_then_retire(seq):  # the cache as it stands when the request ends, before its blocks are freed
        seen.update(positions=seq.kv.dense().positions[0, 0], n=seq.kv.n, history=len(seq.token_ids))
        retire(seq)

    engine._retire = capture_then_retire
    run_with_beacon(engine, after=3, n=6)
    assert torch.equal(seen["positions"], torch.arange(seen["n"]))  # dense logical positions, beacon included
    assert seen["n"] == seen["history"]  # history minus its last (unfed) token, plus one beacon


def test_input_only_tokens_are_validated(make_engine):
    engine = make_engine()
    engine.add_request(greedy("v", PROMPT, 4), lambda ev: None)
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.feed_input_only("v", [10**6])
    with pytest.raises(InvalidRequest, match="no request"):
        engine.feed_input_only("nope", [BEACON])
