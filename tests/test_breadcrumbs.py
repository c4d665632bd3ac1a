"""Breadcrumbs: beacons and the block mask, and the correctness test that the runtime is the model's training world:
the engine's incremental decode with beacons (feed the beacon after every c generated tokens, evict the window)
gives the same logits as one forward over the same sequence with the training block mask."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from decoder_service.engine import Engine, EngineConfig
from decoder_service.requests import CompressionConfig, EvictionEvent, GenerationRequest, InvalidRequest, SamplingParams
from kvpilot.training.breadcrumbs import block_mask, insert_beacons, masked_attention
from kvpilot_protocol.policy import PolicyRejected
from policy_service.local import InProcessPolicy

BEACON = 7
PROMPT = list(range(20, 44))


def test_insert_beacons_and_the_block_mask_by_hand():
    ids, flags = insert_beacons([1, 2, 3, 10, 11, 12, 13, 14], prompt_len=3, c=2, beacon=9)
    assert ids == [1, 2, 3, 10, 11, 9, 12, 13, 9, 14] and flags == [False] * 5 + [True] + [False] * 2 + [True, False]
    mask = block_mask(flags, prompt_len=3)
    seen = lambda i: [j for j in range(len(ids)) if mask[i, j]]  # noqa: E731
    assert seen(2) == [0, 1, 2]  # the prompt is causal
    assert seen(4) == [0, 1, 2, 3, 4]  # the first window
    assert seen(5) == [0, 1, 2, 3, 4, 5]  # its beacon reads it
    assert seen(6) == [0, 1, 2, 5, 6]  # the next window sees the prompt and the beacon, not the folded tokens
    assert seen(8) == [0, 1, 2, 5, 6, 7, 8]
    assert seen(9) == [0, 1, 2, 5, 8, 9]
    assert insert_beacons([1, 10, 11], 1, 2, 9)[0] == [1, 10, 11]  # no beacon after a final full window


@pytest.mark.parametrize("c", [2, 4, 5])
def test_incremental_decode_with_beacons_equals_the_training_mask_forward(tiny_model, c):
    loaded = dataclasses.replace(tiny_model, beacon_token_id=BEACON)
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=2 << 20), policy=InProcessPolicy())
    compression = CompressionConfig(policy="breadcrumbs", params={"c": str(c)})
    events = []
    engine.add_request(GenerationRequest("r", PROMPT, SamplingParams(temperature=0, max_new_tokens=17, ignore_eos=True),
                                         compression=compression), events.append)
    engine.run_until_done()
    done = events[-1]
    generated = done.token_ids
    assert len(generated) == 17 and done.usage.beacons == (17 - 1) // c
    folds = [e for e in events if isinstance(e, EvictionEvent)]
    # A beacon fed with the last token is never folded: the sequence is over.
    assert len(folds) == done.usage.beacons - int((17 - 1) % c == 0) and all(e.evicted == c for e in folds)
    assert done.usage.peak_kv_slots <= 1 + len(PROMPT) + done.usage.beacons + c + 1  # prompt + beacons + a window

    # The same sequence through the model in one pass with the training mask.
    bos = tiny_model.config.bos_token_id
    prompt = [bos] + PROMPT
    ids, flags = insert_beacons(prompt + generated, len(prompt), c, BEACON)
    with torch.no_grad():
        logits = tiny_model.model(torch.tensor([ids]), torch.arange(len(ids))[None],
                                  attention=masked_attention(block_mask(flags, len(prompt))))[0]
    # Each generated token is predicted at the position just before it (a beacon, after a window).
    where = [i - 1 for i in range(len(prompt), len(ids)) if not flags[i]]
    assert [int(logits[i].argmax()) for i in where] == generated  # greedy decode = the masked forward's picks
    forced = GenerationRequest("f", PROMPT, SamplingParams(temperature=0, max_new_tokens=17, ignore_eos=True),
                               compression=compression, forced_tokens=generated)
    [replayed] = engine.generate([forced])
    expected = torch.log_softmax(logits[where].float(), -1)[torch.arange(len(where)), torch.tensor(generated)]
    assert torch.allclose(torch.tensor([s.logprob for s in replayed.replay]), expected, atol=1e-4)
    assert engine.pool.used_blocks == 0


def test_breadcrumbs_needs_a_beacon_trained_checkpoint(make_engine):
    with pytest.raises(InvalidRequest, match="needs a beacon-trained checkpoint"):
        make_engine().add_request(GenerationRequest("r", PROMPT, compression=CompressionConfig(policy="breadcrumbs")),
                                  lambda ev: None)


@pytest.mark.parametrize("c", ["1", "257", "x"])
def test_c_is_validated(c):
    with pytest.raises(PolicyRejected, match="c must be in|not a valid"):
        InProcessPolicy().describe("breadcrumbs", {"c": c})


def test_under_a_budget_the_oldest_beacons_go_and_the_prompt_stays(tiny_model):
    loaded = dataclasses.replace(tiny_model, beacon_token_id=BEACON)
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=2 << 20), policy=InProcessPolicy())
    prompt = 1 + len(PROMPT)
    seen = {}

    def watch(engine_, seq):
        kv = seq.kv
        seen["positions"] = engine_.pool.positions[0, 0, kv.slot_map[:kv.n]].tolist()
        seen["all_beacons"] = [p for p, t in enumerate(seq.position_tokens) if t == BEACON and p >= prompt]

    engine.step_hooks.append(watch)
    compression = CompressionConfig(policy="breadcrumbs", budget=prompt + 6, interval=4, window=2, sinks=4,
                                    params={"c": "2"})
    [done] = engine.generate([GenerationRequest("r", PROMPT, SamplingParams(temperature=0, max_new_tokens=40,
                                                                            ignore_eos=True), compression=compression)])
    assert done.usage.compression_events > done.usage.beacons  # beacon folds and budget compressions
    kept = seen["positions"]
    assert kept[:prompt] == list(range(prompt))  # the whole prompt stays
    beacons = [p for p in kept if p in set(seen["all_beacons"])]
    assert 0 < len(beacons) < len(seen["all_beacons"])  # some beacons were dropped ...
    assert beacons == seen["all_beacons"][-len(beacons):]  # ... the oldest ones


def test_the_bundled_student_runs_with_beacons():
    """The committed beacon-trained checkpoint is accepted and folds its windows (its accuracy is in
    benchmarks/results/breadcrumbs.md)."""
    from decoder_service.checkpoint import load_checkpoint
    from kvpilot.agent import EpisodeRunner
    from kvpilot.models import BUNDLED_MODELS
    from kvpilot.tasks import make_episode
    from kvpilot.training.breadcrumbs import BEACON

    student = load_checkpoint(BUNDLED_MODELS["reasoner-v2-breadcrumbs"])
    assert student.beacon_token_id == student.tokenizer.token_to_id(BEACON)
    engine = Engine(student, EngineConfig(kv_pool_bytes=16 << 20), policy=InProcessPolicy())
    episode = make_episode("variables", 0, "default")
    [full] = EpisodeRunner(engine).run([episode])
    [folded] = EpisodeRunner(engine, compression=CompressionConfig(policy="breadcrumbs", params={"c": "8"})).run([episode])
    assert folded.evicted_tokens >= 8 * 5 and folded.peak_kv_slots < 0.6 * full.peak_kv_slots


@pytest.mark.parametrize("argv, message", [
    (["--cs", "4,x"], "--cs takes comma-separated integers"),
    (["--per-c", "4"], "--per-c takes KEY:DIR pairs"),
    (["--per-c", "5:somewhere"], "--per-c keys must be beacon intervals listed in --cs"),
    (["--also", ":dir"], "--also takes KEY:DIR pairs"),
    (["--episodes", "0"], "--episodes must be >= 1"),
    (["--baselines", "tova,nope"], "--baselines: unknown policies"),
])
def test_the_breadcrumbs_pareto_refuses_bad_arguments(argv, message):
    from benchmarks.breadcrumbs_pareto import main

    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--model", "reasoner-v2-breadcrumbs", *argv])


def test_the_breadcrumbs_pareto_puts_per_c_students_beside_the_variable_one(tmp_path):
    """One episode, one c: the variable-c student, a per-c student and an extra student at that c, the baselines
    at the main student's peak; rows name their student, curves with one point get no AUAC."""
    import csv

    from benchmarks.breadcrumbs_pareto import main

    out = tmp_path / "table.csv"
    student = "reasoner-v2-breadcrumbs"
    assert main(["--model", student, "--per-c", f"8:{student}", "--also", f"again:{student}", "--cs", "8",
                 "--tasks", "graph", "--episodes", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    beacons = {r["student"]: r for r in rows if r["policy"] == "breadcrumbs"}
    assert set(beacons) == {"variable-c", "per-c 8", "again"}
    # The same checkpoint at the same c: the same greedy result whichever row it is under.
    assert beacons["variable-c"]["accuracy"] == beacons["per-c 8"]["accuracy"] == beacons["again"]["accuracy"]
    assert beacons["variable-c"]["peak_kv"] == beacons["per-c 8"]["peak_kv"]
    assert {r["policy"] for r in rows} >= {"teacher (full cache)", "student (full cache)", "tova", "streaming_llm"}
    budget = round(float(beacons["variable-c"]["peak_kv"])) - 4
    assert all(int(r["budget"]) == max(9, budget) for r in rows if r["policy"] in ("tova", "streaming_llm"))
    assert all(r["auac"] == "" for r in rows)  # one c: no curve to integrate
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("name, trained", [("reasoner-v2-breadcrumbs", [4, 8, 16]), ("reasoner-v2-breadcrumbs-c4", [4]),
                                           ("reasoner-v2-breadcrumbs-c8", [8]), ("reasoner-v2-breadcrumbs-c16", [16]),
                                           ("reasoner-v2-breadcrumbs-rl", [4, 8, 16])])
def test_each_bundled_student_names_its_c_and_the_commands_that_made_it(name, trained):
    import json

    from kvpilot.models import BUNDLED_MODELS

    directory = BUNDLED_MODELS[name]
    assert json.loads((directory / "breadcrumbs.json").read_text())["trained_c"] == trained
    stages = json.loads((directory / "training.json").read_text())["stages"]
    assert all(s["command"].startswith("kvpilot train-") for s in stages)
    distilled = [s for s in stages if s["command"].startswith("kvpilot train-model")][-1]
    assert f"--breadcrumbs {','.join(map(str, trained))} " in distilled["command"]
    for stage in stages:  # each stage's curve is beside the model
        assert (directory / stage["history"]).read_text().strip()
