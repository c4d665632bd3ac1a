"""Engine: continuous batching, chunked prefill, sampling, stop conditions, cancellation, admission, sessions."""
from __future__ import annotations

import pytest
import torch

from decoder_service.requests import (
    CompressionConfig,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ResourceExhausted,
    SamplingParams,
    SessionConflict,
    SessionNotFound,
    TokenEvent,
)

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 61)), [42], list(range(100, 117)) * 3]


def greedy(rid, prompt, n=16, **kw):
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), **kw)


def reference_greedy(model, prompt, n):
    """No cache at all: recompute the whole sequence for every token."""
    ids = [0] + list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) + 1:]


def test_engine_matches_cache_free_reference(make_engine, tiny_model):
    [result] = make_engine().generate([greedy("a", PROMPTS[1], n=12)])
    assert result.token_ids == reference_greedy(tiny_model.model, PROMPTS[1], 12)


def test_batch_equals_one_by_one(make_engine):
    batch = make_engine(prefill_chunk=16, max_batch_tokens=40).generate([greedy(f"r{i}", p) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        [alone] = make_engine().generate([greedy(f"r{i}", p)])
        assert batch[i].token_ids == alone.token_ids, f"request {i} differs in a batch"
        assert batch[i].usage.generated_tokens == 16


def test_requests_join_and_leave_between_steps(make_engine):
    engine = make_engine(prefill_chunk=8)
    done = {}
    engine.add_request(greedy("long", PROMPTS[1], n=30), lambda ev: isinstance(ev, FinishEvent) and done.setdefault("long", ev))
    for _ in range(6):
        engine.step()
    assert len(engine.running) == 1
    engine.add_request(greedy("late", PROMPTS[0], n=5), lambda ev: isinstance(ev, FinishEvent) and done.setdefault("late", ev))
    engine.step()
    assert len(engine.running) == 2  # joined mid-flight
    engine.run_until_done()
    assert done["late"].token_ids == make_engine().generate([greedy("x", PROMPTS[0], n=5)])[0].token_ids
    assert done["long"].token_ids == make_engine().generate([greedy("y", PROMPTS[1], n=30)])[0].token_ids
    assert engine.pool.reserved_slots == 0


def test_chunked_prefill_bounds_tokens_per_step(make_engine):
    engine = make_engine(prefill_chunk=10, max_batch_tokens=12)
    engine.add_request(greedy("a", PROMPTS[1], n=2), lambda ev: None)
    engine.step()
    assert engine.running[0].num_computed == 10  # 42 prompt tokens (with <bos>) take 5 steps
    engine.run_until_done()
    assert engine.steps == 5 + 1  # 5 prefill steps (the last one samples), 1 decode step


def test_sampling_is_reproducible_by_seed(make_engine):
    def sampled(seed):
        req = GenerationRequest("s", PROMPTS[0], SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=seed,
                                                                max_new_tokens=20, ignore_eos=True))
        return make_engine().generate([req])[0]

    a, b, c = sampled(1), sampled(1), sampled(2)
    assert a.token_ids == b.token_ids and a.usage.seed == 1
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(make_engine):
    req = GenerationRequest("k", PROMPTS[1], SamplingParams(temperature=0.7, top_k=1, seed=3, max_new_tokens=10, ignore_eos=True))
    assert make_engine().generate([req])[0].token_ids == make_engine().generate([greedy("g", PROMPTS[1], n=10)])[0].token_ids


def test_stop_token_and_eos_and_length(make_engine):
    [free] = make_engine().generate([greedy("a", PROMPTS[1], n=10)])
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    req = GenerationRequest("b", PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop_at]))
    [stopped] = make_engine().generate([req])
    assert stopped.finish_reason is FinishReason.STOP and stopped.matched_stop == stop_at
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert free.finish_reason is FinishReason.LENGTH


def test_stop_string_is_cut_and_never_streamed(make_engine, tiny_model):
    [free] = make_engine().generate([greedy("a", PROMPTS[1], n=24)])
    stop = free.text[6:9]
    assert len(stop) == 3
    streamed = []
    engine = make_engine()
    req = GenerationRequest("b", PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=24, stop=[stop], ignore_eos=True))
    engine.add_request(req, lambda ev: streamed.append(ev))
    engine.run_until_done()
    final = streamed[-1]
    assert final.finish_reason is FinishReason.STOP and final.matched_stop == stop
    assert final.text == free.text[:free.text.index(stop)]
    assert "".join(ev.text for ev in streamed if isinstance(ev, TokenEvent)) == final.text


def test_abort_frees_slots_at_once(make_engine):
    engine = make_engine()
    events = []
    engine.add_request(greedy("a", PROMPTS[1], n=50), events.append)
    engine.step()
    assert engine.pool.reserved_slots > 0
    assert engine.abort("a")
    assert engine.pool.reserved_slots == 0 and not engine.running
    assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason is FinishReason.ABORT


@pytest.mark.parametrize("bad, message", [
    (dict(input_ids=[]), "prompt is empty"),
    (dict(input_ids=[999999]), "outside the vocabulary"),
    (dict(sampling=SamplingParams(max_new_tokens=0)), "max_new_tokens must be >= 1"),
    (dict(sampling=SamplingParams(max_new_tokens=-5)), "max_new_tokens must be >= 1"),
    (dict(sampling=SamplingParams(max_new_tokens=10**9)), "exceeds the model's context"),
    (dict(input_ids=[7] * 600), "the model's context is 512"),
    (dict(sampling=SamplingParams(temperature=-1)), "temperature"),
    (dict(sampling=SamplingParams(top_p=0)), "top_p"),
    (dict(sampling=SamplingParams(min_p=1.5)), "min_p must be in"),
    (dict(sampling=SamplingParams(min_p=float("nan"))), "min_p must be in"),
    (dict(sampling=SamplingParams(repetition_penalty=0)), "repetition_penalty must be in"),
    (dict(sampling=SamplingParams(repetition_penalty=11)), "repetition_penalty must be in"),
    (dict(sampling=SamplingParams(presence_penalty=-2.5)), "presence_penalty must be in"),
    (dict(sampling=SamplingParams(frequency_penalty=3)), "frequency_penalty must be in"),
    (dict(sampling=SamplingParams(max_new_tokens=4, min_tokens=5)), "min_tokens must be in"),
    (dict(sampling=SamplingParams(min_tokens=-1)), "min_tokens must be in"),
    (dict(compression=CompressionConfig(policy="nope", budget=64)), "unknown policy 'nope'"),
    (dict(compression=CompressionConfig(policy="full", budget=10, sinks=4, window=16)), "must exceed the protected"),
])
def test_bad_requests_are_refused_with_a_reason(make_engine, bad, message):
    fields = dict(request_id="bad", input_ids=[5, 6])
    fields.update(bad)
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(GenerationRequest(**fields), lambda ev: None)
    assert not engine.waiting and engine.pool.reserved_slots == 0


def test_admission_control(make_engine):
    engine = make_engine(kv_pool_bytes=96 * 1024, max_waiting=2)  # 96 KiB / 512 bytes per slot = 12 blocks of 16
    assert engine.pool.capacity_slots == 192 and engine.pool.num_blocks == 12
    with pytest.raises(ResourceExhausted, match="whole KV pool holds 192"):
        engine.add_request(greedy("huge", [5] * 150, n=100), lambda ev: None)
    done = []
    for i in range(2):  # each reserves 1 + 90 + 30 = 121 slots (8 blocks): the second must wait
        engine.add_request(greedy(f"q{i}", [5 + i] * 90, n=30), lambda ev: isinstance(ev, FinishEvent) and done.append(ev))
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    engine.add_request(greedy("q2", [9] * 10, n=5), lambda ev: None)
    with pytest.raises(ResourceExhausted, match="already waiting"):
        engine.add_request(greedy("q3", [9] * 10, n=5), lambda ev: None)
    engine.run_until_done()
    assert len(done) == 2 and engine.pool.reserved_slots == 0


def test_cumulative_attention_statistics_add_up(make_engine, tiny_model):
    engine = make_engine()
    seqs = []
    retire = engine._retire
    engine._retire = lambda seq: (seqs.append(seq), retire(seq))
    # h2o declares cumulative attention; a budget above the length never compresses.
    compression = CompressionConfig(policy="h2o", budget=10_000)
    engine.generate([greedy("b", PROMPTS[1], n=6, compression=compression)])
    # Each query's attention sums to 1 per query head: per layer and KV head, the total is queries x group size.
    totals = seqs[0].stats.accumulators["cumulative_attention"].sum(-1)
    queries = len(PROMPTS[1]) + 1 + 5  # prompt with <bos>, then 5 fed back generated tokens
    assert torch.allclose(totals, torch.full_like(totals, queries * tiny_model.config.group_size), rtol=1e-5)


def test_session_continues_from_resident_kv(make_engine):
    engine = make_engine()
    [first] = engine.generate([greedy("t1", PROMPTS[0], n=8, create_session=True)])
    sid = first.session_id
    assert sid and engine.pool.reserved_slots > 0  # the session's KV stays parked
    [second] = engine.generate([greedy("t2", [50, 51, 52], n=8, session_id=sid)])
    assert second.usage.cached_tokens == 1 + len(PROMPTS[0]) + 7  # the last sampled token was never fed
    # Same tokens as one request over the whole history (re-prefill from scratch).
    history = [0] + PROMPTS[0] + first.token_ids + [50, 51, 52]
    [flat] = make_engine().generate([greedy("f", history[1:], n=8)])
    assert second.token_ids == flat.token_ids
    session, resident = engine.get_session(sid)
    assert session.turns == 2 and len(session.token_ids) == len(history) + 8 and resident == len(history) + 7
    assert [s.kind for s in session.segments] == ["user", "model", "user", "model"]


def test_session_errors(make_engine):
    engine = make_engine()
    with pytest.raises(SessionNotFound, match="unknown session"):
        engine.add_request(greedy("x", [5], session_id="nope"), lambda ev: None)
    engine.add_request(greedy("a", [5], create_session=True, session_id="s1"), lambda ev: None)
    with pytest.raises(SessionConflict, match="is generating"):
        engine.add_request(greedy("b", [6], session_id="s1"), lambda ev: None)
    engine.run_until_done()
    with pytest.raises(SessionConflict, match="already exists"):
        engine.add_request(greedy("c", [6], session_id="s1", create_session=True), lambda ev: None)
    engine.delete_session("s1")
    assert engine.pool.reserved_slots == 0
    with pytest.raises(SessionNotFound):
        engine.delete_session("s1")


def test_idle_session_kv_is_dropped_under_memory_pressure_and_reprefilled(make_engine):
    engine = make_engine(kv_pool_bytes=100 * 1024)
    [first] = engine.generate([greedy("t1", [5] * 50, n=10, create_session=True)])
    parked = engine.pool.reserved_slots
    assert parked > 0
    engine.generate([greedy("big", [7] * 100, n=60)])  # needs 161 of 200 slots: the parked KV must go
    assert engine.get_session(first.session_id)[1] == 0
    [second] = engine.generate([greedy("t2", [8, 9], n=6, session_id=first.session_id)])
    assert second.usage.cached_tokens == 0  # re-prefilled from the history
    history = [5] * 50 + first.token_ids + [8, 9]
    assert second.token_ids == make_engine().generate([greedy("f", history, n=6)])[0].token_ids



# ---- logit processors: penalties, min_tokens, min_p -------------------------------------------------------------
def test_penalties_and_min_tokens_on_a_hand_made_row():
    from decoder_service.sampling import apply_penalties

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), context=[0, 1, 1], generated=[], end_ids=[])
    torch.testing.assert_close(rep, torch.tensor([1.0, -4.0, 1.0, 0.5, 3.0]))  # positive / 2, negative x 2
    pen = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), context=[0, 2, 2],
                          generated=[2, 2, 3], end_ids=[])
    torch.testing.assert_close(pen, torch.tensor([2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 3.0]))
    early = apply_penalties(logits, SamplingParams(min_tokens=2), context=[], generated=[7], end_ids=[4])
    assert early[4] == float("-inf") and torch.equal(early[:4], logits[:4])
    late = apply_penalties(logits, SamplingParams(min_tokens=2), context=[], generated=[7, 8], end_ids=[4])
    assert torch.equal(late, logits)
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0]))  # the input row is left alone


def test_min_p_draws_only_tokens_near_the_top():
    from decoder_service.sampling import sample_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08]))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, min_p=0.25)  # threshold 0.125: tokens 2 and 3 are out
    drawn = {sample_token(logits, params, g) for _ in range(300)}
    assert drawn == {0, 1}
    assert {sample_token(logits, SamplingParams(temperature=1.0), g) for _ in range(300)} == {0, 1, 2, 3}


def test_min_tokens_holds_back_a_stop_token_and_penalties_change_greedy_output(make_engine):
    engine = make_engine()
    plain = engine.generate([greedy("p", PROMPTS[0], n=12)])[0]
    first = plain.token_ids[0]
    stopped = engine.generate([GenerationRequest("s", PROMPTS[0], SamplingParams(
        temperature=0, max_new_tokens=12, stop_token_ids=[first]))])[0]
    assert stopped.token_ids == [first] and stopped.finish_reason is FinishReason.STOP
    held = engine.generate([GenerationRequest("h", PROMPTS[0], SamplingParams(
        temperature=0, max_new_tokens=12, stop_token_ids=[first], min_tokens=3))])[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    penalized = engine.generate([GenerationRequest("f", PROMPTS[0], SamplingParams(
        temperature=0, max_new_tokens=12, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))])[0]
    unpenalized = engine.generate([greedy("u", PROMPTS[0], n=12)])[0]
    assert penalized.token_ids != unpenalized.token_ids and repeats(penalized.token_ids) <= repeats(unpenalized.token_ids)


def test_logprobs_are_the_models_distribution_at_each_step(make_engine, tiny_model):
    engine = make_engine()
    events = []
    engine.add_request(GenerationRequest("lp", PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=4,
                                                                         ignore_eos=True, logprobs=3)), events.append)
    while engine.has_work():
        engine.step()
    steps = [lp for e in events if isinstance(e, TokenEvent) for lp in e.logprobs]
    generated = [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]
    assert [lp.token_id for lp in steps] == generated and all(len(lp.top) == 3 for lp in steps)
    # Against a plain forward pass over the same tokens: the same log-probabilities, greedy = the top one.
    ids = torch.tensor([[0] + PROMPTS[0] + generated])
    with torch.no_grad():
        logits = tiny_model.model(ids, torch.arange(ids.shape[1])[None])[0]
    reference = torch.log_softmax(logits.float(), dim=-1)[len(PROMPTS[0]):len(PROMPTS[0]) + 4]
    for row, lp in zip(reference, steps):
        assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
        assert lp.top[0][0] == lp.token_id and [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
    with pytest.raises(InvalidRequest, match="logprobs must be in"):
        engine.add_request(GenerationRequest("bad", [5], SamplingParams(logprobs=21)), lambda ev: None)


def test_a_stop_string_ends_the_text_and_stays_only_when_asked(make_engine):
    engine = make_engine()
    plain = engine.generate([greedy("p", PROMPTS[1], n=24)])[0]
    text = plain.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text[i:i + 2].isprintable())
    cut = text.index(stop)

    def run(include: bool):
        return engine.generate([GenerationRequest("s", PROMPTS[1], SamplingParams(
            temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop], include_stop=include))])[0]

    dropped, kept = run(False), run(True)
    assert dropped.text == text[:cut] and dropped.finish_reason is FinishReason.STOP
    assert kept.text == text[:cut + len(stop)] and kept.matched_stop == stop
