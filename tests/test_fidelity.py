"""Teacher-forced replay fidelity (`kvpilot bench fidelity`) on the bundled model: the engine's forced-token path,
the metrics on known answers (the full cache is the reference itself; a tiny budget is not), golden against
StreamingLLM, and the command's CSV / PNG / table."""
from __future__ import annotations

import argparse
import csv

import pytest
import torch

from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.requests import (FinishEvent, FinishReason, GenerationRequest, InvalidRequest, ReplayStep,
                                      SamplingParams, Usage)
from kvpilot.bench import fidelity
from kvpilot.evaluate import compression_for, episodes_for, mean_reference_tokens
from kvpilot.models import BUNDLED_MODEL
from policy_service.local import InProcessPolicy

EPISODES = 2


@pytest.fixture(scope="module")
def engine():
    return Engine(load_checkpoint(BUNDLED_MODEL), EngineConfig(kv_pool_bytes=16 << 20), policy=InProcessPolicy())


@pytest.fixture(scope="module")
def cases(engine):
    return fidelity.references(engine, episodes_for("multihop", EPISODES))


def measure(engine, cases, policy, budget=0):
    return fidelity.measure(engine, "multihop", "default", cases, compression_for(policy, budget), 0.0)


def test_references_are_the_episodes_with_their_model_tokens_marked(engine, cases):
    assert len(cases) == EPISODES
    for case in cases:
        assert case.trace[0] == engine.model_config.bos_token_id
        assert engine.tokenizer.decode(case.trace[:case.prompt_len]).strip().startswith("Q:")
        assert len(case.scored) == len(case.forced) and 0 < sum(case.scored) < len(case.forced)  # tool outputs too


def test_metrics_on_a_known_answer():
    """Hand-made records: 4 scored steps (a tool token in between is forced but not scored)."""
    case = fidelity.ReplayCase(episode_seed=7, trace=[0, 5, 6, 10, 11, 99, 12, 13], prompt_len=3,
                               scored=[True, True, False, True, True])
    steps = [ReplayStep(10, -0.1, 10, True, 3), ReplayStep(11, -2.0, 4, True, 4), ReplayStep(99, -9.0, 2, False, 5),
             ReplayStep(12, -0.3, 12, True, 4), ReplayStep(13, -1.0, 8, False, 5)]
    event = FinishEvent(FinishReason.LENGTH, Usage(peak_kv_slots=6, compression_events=1), replay=steps)
    e = fidelity.episode_fidelity(case, event, task="t", difficulty="default", policy="p", budget=4, budget_frac=0.5)
    assert (e.scored_tokens, e.top1, e.top5, e.first_mismatch) == (4, 0.5, 0.75, 1)
    assert e.nll == pytest.approx((0.1 + 2.0 + 0.3 + 1.0) / 4)
    assert e.saved_end == pytest.approx(1 - 5 / 7) and e.saved_peak == pytest.approx(1 - 6 / 7)
    perfect = fidelity.episode_fidelity(case, FinishEvent(FinishReason.LENGTH, Usage(peak_kv_slots=7), replay=[
        ReplayStep(t, -0.01, t, True, 7) for t in case.forced]), task="t", difficulty="default", policy="full",
        budget=0, budget_frac=1.0)
    row = fidelity.aggregate([e, perfect], seconds=1.0)
    assert row.top1 == pytest.approx(6 / 8) and row.first_mismatch == 1 and row.mismatched == 0.5


def test_forced_tokens_drive_the_engine_and_record_every_step(engine, cases):
    case = cases[0]
    request = GenerationRequest("forced", case.trace[:case.prompt_len], SamplingParams(
        temperature=1.0, seed=3, max_new_tokens=len(case.forced), ignore_eos=True),  # forcing overrides sampling
        compression=compression_for("streaming_llm", 40), forced_tokens=case.forced)
    [done] = engine.generate([request])
    assert done.finish_reason is FinishReason.LENGTH and done.token_ids == case.forced
    assert [s.token for s in done.replay] == case.forced
    assert max(s.kv_slots for s in done.replay) <= 40 + 8 + 4 and done.usage.compression_events > 0
    for forced, message in (([], "empty"), ([10**6], "outside the vocabulary"), (case.forced + [5], "exceed")):
        bad = GenerationRequest("bad", [5, 6], SamplingParams(max_new_tokens=len(case.forced)), forced_tokens=forced)
        with pytest.raises(InvalidRequest, match=message):
            engine.add_request(bad, lambda ev: None)


def test_full_cache_replay_is_the_reference(engine, cases):
    """Policy `full`: top-1 and top-5 1.0, no mismatch, and every step's log-probability (tool tokens included,
    where the model is far from certain) equals a plain full forward's over the trace."""
    events = fidelity.replay(engine, cases, compression_for("full", 0))
    labels = dict(task="multihop", difficulty="default", policy="full", budget=0, budget_frac=1.0)
    episodes = [fidelity.episode_fidelity(case, event, **labels) for case, event in zip(cases, events)]
    row = fidelity.aggregate(episodes, seconds=0.0)
    assert (row.top1, row.top5, row.mismatched, row.saved_end) == (1.0, 1.0, 0.0, 0.0)
    assert all(e.first_mismatch is None for e in episodes)
    nll, scored = 0.0, 0
    for case, event in zip(cases, events):
        with torch.no_grad():
            logits = engine.model(torch.tensor([case.trace[:-1]]), torch.arange(len(case.trace) - 1)[None])[0]
        logprobs = torch.log_softmax(logits.float(), -1)
        targets = torch.tensor(case.trace[1:])
        reference = logprobs[torch.arange(len(targets)), targets][case.prompt_len - 1:]  # the forced tokens
        replayed = torch.tensor([s.logprob for s in event.replay])
        torch.testing.assert_close(replayed, reference, atol=1e-3, rtol=1e-4)
        assert reference.min() < -1.0  # the comparison has teeth: some forced (tool) tokens are uncertain
        mask = torch.tensor(case.scored)
        nll -= float(reference[mask].sum())
        scored += int(mask.sum())
    assert row.scored_tokens == scored
    assert row.nll == pytest.approx(nll / scored, abs=1e-5)


def test_a_tiny_budget_loses_agreement_and_golden_beats_streaming_llm(engine, cases):
    """16 slots (4 sinks + 8 window + 4 chosen) of ~190: the replay cannot stay faithful everywhere."""
    streaming, _ = measure(engine, cases, "streaming_llm", budget=16)
    assert streaming.top1 < 1.0 and streaming.mismatched > 0 and streaming.compression_events > 0
    assert streaming.saved_end > 0.8
    # At the same budget the oracle, exact in replay, is at least as faithful as recency (a check, not numbers).
    golden, _ = measure(engine, cases, "golden", budget=16)
    assert golden.fallbacks == 0 and golden.compression_events == streaming.compression_events
    assert golden.top1 >= streaming.top1 and golden.nll <= streaming.nll
    assert golden.saved_end == pytest.approx(streaming.saved_end)


def test_command_writes_csv_episodes_plot_and_table(engine, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    fidelity.add_arguments(parser)
    args = parser.parse_args(["--tasks", "multihop", "--episodes", "1", "--policies", "full,streaming_llm",
                              "golden", "--fracs", "0.25", "--threads", "2", "--out", str(tmp_path)])
    assert fidelity.run(args) == 0
    with (tmp_path / "fidelity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["policy"], r["budget_frac"]) for r in rows] == [("full", "1.0"), ("streaming_llm", "0.25"),
                                                               ("golden", "0.25")]
    assert float(rows[0]["top1"]) == 1.0 and all(int(r["episodes"]) == 1 for r in rows)
    mean_len = mean_reference_tokens(episodes_for("multihop", 1), engine.tokenizer)
    assert int(rows[1]["budget"]) == round(0.25 * mean_len)  # the budget pareto gives the same fraction
    with (tmp_path / "fidelity_episodes.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "fidelity.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "teacher-forced replay fidelity" in out and "golden" in out


def test_policy_specs_carry_parameters():
    from kvpilot.evaluate import parse_policy_spec

    assert parse_policy_spec("rkv") == ("rkv", {})
    assert parse_policy_spec("vase:window_queries=64:smooth_kernel=5") == (
        "vase", {"window_queries": "64", "smooth_kernel": "5"})
    with pytest.raises(ValueError, match="key=value"):
        parse_policy_spec("vase:window_queries")
