"""SideQuest: last-use labels, the side thread's answer grammar, training examples, the `sidequest` policy, and the
decoder's side threads (a copy-on-write fork in the batch whose answer drops tool outputs at the next turn
boundary), in-process and remote."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given, settings, strategies as st

from decoder_service.requests import CompressionConfig, EvictionEvent, GenerationRequest, SamplingParams, SegmentKind
from kvpilot.tasks import make_episode
from kvpilot.tasks.multihop import MultihopWalkEpisode, last_uses
from kvpilot.training.sidequest_data import dropped_before, side_boundaries, side_example
from kvpilot_protocol.frame import SideThreadPlan, SpanDrop, StatsFrame
from kvpilot_protocol.policy import PolicyRejected
from policy_service.local import InProcessPolicy
from policy_service.scorers.sidequest import SideQuest
from policy_service.sidequest_grammar import TRIGGER, answer_words, parse_answer


# ---- labels ------------------------------------------------------------------------------------------------
def test_last_uses_of_a_hand_made_chain_and_walk():
    chain = make_episode("multihop", 0, "default", hops=3)
    assert last_uses(chain) == [3, 2, 3]  # #0 is read again by the final turn (the start's color)
    walk = MultihopWalkEpisode(task="multihop", seed=0, difficulty="long", prompt="", reference=[], answer="",
                               stop_strings=[], path=["k1", "k2", "k3", "k2", "k4"], walk=["a", "a", "a", "b"])
    # Turn 4 returns to k2: its reply points at output #1, so #1 is last read by turn 4, not 2.
    assert last_uses(walk) == [4, 4, 3, 4]


def test_last_uses_match_the_reference_trace():
    """Every output's last use is the last model turn whose hop line names an entity of that output's document."""
    for seed in range(5):
        episode = make_episode("multihop", seed, "long")
        last = last_uses(episode)
        turns = [text for role, text in episode.reference if role == "model"]
        for k, use in enumerate(last):
            entity = episode.path[k]
            first = episode.path.index(entity)
            readers = [t for t in range(1, len(turns)) if turns[t].split()[1] == entity]
            if first == k:
                assert use == max(readers + ([len(turns) - 1] if k == 0 else []))


# ---- the answer grammar -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, live, protected, drop, other", [
    ("#1 #3 .", {0, 1, 2, 3}, {3}, [1], dict(protected=[3])),
    (".", {0, 1}, set(), [], {}),
    ("#2 #2 #0 .", {0, 1, 2}, set(), [0, 2], dict(repeated=1)),
    ("#7 #1 .", {0, 1}, set(), [1], dict(unknown=[7])),
    ("#1 k42 .", {0, 1}, set(), [], dict(malformed=True)),
    ("#1 . #0", {0, 1}, set(), [], dict(malformed=True)),
    ("#40 .", {0, 1}, set(), [], dict(malformed=True)),  # not a word of the grammar (ids are #0..#31)
    ("#0 #1", {0, 1}, set(), [], dict(cut=True)),
])
def test_parse_answer(text, live, protected, drop, other):
    parsed = parse_answer(text, live, protected)
    assert parsed.drop == drop
    for name, value in other.items():
        assert getattr(parsed, name) == value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["#0", "#1", "#2", "#5", "#31", ".", "k42", "#", "drop"]), max_size=8),
       st.sets(st.integers(0, 5)), st.sets(st.integers(0, 5)))
def test_never_more_than_the_grammar_allows_is_dropped(words, live, protected):
    parsed = parse_answer(" ".join(words), live, protected)
    assert set(parsed.drop) <= live - protected and len(parsed.drop) == len(set(parsed.drop))
    grammatical = words and words[-1] == "." and all(w.startswith("#") and w[1:].isdigit() for w in words[:-1])
    if not grammatical:
        assert parsed.drop == []
    assert parse_answer(" ".join(answer_words(sorted(live))), live).drop == sorted(live)


# ---- training examples -------------------------------------------------------------------------------------
def test_side_examples_follow_the_runtime_world():
    episode = make_episode("multihop", 3, "long")
    last = last_uses(episode)
    for every in (1, 2, 3):
        for t in side_boundaries(episode, every):
            words, mask, positions = side_example(episode, every, t)
            gone, answer = dropped_before(episode, every, t)
            assert all(last[k] <= t + 1 for k in answer) and not set(answer) & gone
            assert words[words.index(TRIGGER) + 1:] == answer_words(answer)
            assert [w for w, m in zip(words, mask) if m] == answer_words(answer)  # only the answer is scored
            tool_ids = [int(w[1:]) for i, w in enumerate(words[:words.index(TRIGGER)]) if i and words[i - 1] == "<tool>"]
            assert not set(tool_ids) & gone and max(tool_ids) == t  # deleted outputs are gone, #t is the newest
            assert positions == sorted(positions) and positions[words.index(TRIGGER)] > positions[words.index(TRIGGER) - 1]
            # Positions keep the gaps the deletions left (the cache keeps positions).
            assert positions[words.index(TRIGGER)] == 1 + sum(len(text.split()) for text in
                                                              [episode.prompt] + [x for _, x in episode.reference[:2 * t + 2]])


def test_a_side_thread_names_the_output_its_turn_is_reading():
    """Hand-made chain (hard multihop: output #k read by turn k + 1 only, #0 again by the final turn): the
    deletion lands when the turn in progress ends, after its read, so the side thread after output #t names #t."""
    episode = make_episode("multihop", 5, "hard")
    outputs = sum(1 for role, _ in episode.reference if role == "tool")
    assert [dropped_before(episode, 1, t)[1] for t in side_boundaries(episode, 1)] == \
        [[]] + [[t] for t in range(1, outputs - 1)]
    assert [dropped_before(episode, 2, t)[1] for t in side_boundaries(episode, 2)] == \
        [[1]] + [[t - 1, t] for t in range(3, outputs - 1, 2)]


# ---- the policy --------------------------------------------------------------------------------------------
def side_frame(event: str, outputs: int, answer: str = "", cut: bool = False) -> StatsFrame:
    segments = [(10 + 20 * i, 25 + 20 * i, i) for i in range(outputs)]
    return StatsFrame(frame_id=1, session_id="s", n=200, keep=0, sinks=4, window=16, num_layers=2, num_kv_heads=2,
                      num_heads=4, step=0, seed=0, tool_segments=segments, side_event=event, side_answer=answer,
                      side_cut=cut)


def test_policy_asks_every_k_outputs_and_turns_answers_into_spans():
    policy = SideQuest(every=2, max_side_tokens=20, protect_latest=1)
    assert policy.plan(side_frame("turn", 1)) is None
    plan = policy.plan(side_frame("turn", 4))
    assert isinstance(plan, SideThreadPlan) and plan.prompt == TRIGGER and plan.max_tokens == 20 and plan.stop == "."
    drop = policy.plan(side_frame("answer", 4, "#0 #2 #3 #9 ."))  # #3 is the newest (protected), #9 unknown
    assert isinstance(drop, SpanDrop) and drop.spans == [(10, 25), (50, 65)]
    assert set(drop.guards) == {"unknown=1", "protected=1", "dropped=2"}
    void = policy.plan(side_frame("answer", 4, "#0 #2", cut=True))
    assert void.spans == [] and "cut" in void.guards


@pytest.mark.parametrize("params, message", [
    ({"every": "0"}, r"every must be in \[1, 32\]"),
    ({"max_side_tokens": "1"}, r"max_side_tokens must be in \[2, 64\]"),
    ({"protect_latest": "9"}, r"protect_latest must be in \[0, 8\]"),
    ({"base": "golden"}, "base is a token-level policy"),
    ({"base": "nope"}, "base is a token-level policy"),
    ({"every": "two"}, "not a valid int"),
])
def test_policy_parameters_are_validated(params, message):
    with pytest.raises(PolicyRejected, match=message):
        InProcessPolicy().describe("sidequest", params)


def test_the_hybrid_declares_its_base_statistics():
    spec = InProcessPolicy().describe("sidequest", {"base": "h2o"}).spec
    assert spec.names == {"side_thread", "cumulative_attention"}


# ---- the decoder's side threads ------------------------------------------------------------------------------
@dataclass
class DropOutputZero(SideQuest):
    """sidequest that drops tool output #0 whatever the side thread said (the tiny test model answers noise):
    the decoder's mechanics, apart from the parser above."""

    name: ClassVar[str] = "sidequest"

    def drop_plan(self, frame: StatsFrame) -> SpanDrop:
        spans = {index: (start, end) for start, end, index in frame.tool_segments}
        return SpanDrop([spans[0]] if 0 in spans else [], guards=("dropped=1",))


TOOL = [200 + i for i in range(24)]  # a 24-token tool output


def session_turns(engine, compression, turns=3, n=12):
    """A session: a prompt, then `turns - 1` tool outputs; returns each turn's final event and eviction events."""
    finals, evictions = [], []
    for turn in range(turns):
        request = GenerationRequest(f"t{turn}", list(range(20, 60)) if turn == 0 else TOOL,
                                    SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
                                    compression=compression, session_id="s", create_session=turn == 0,
                                    input_kind=SegmentKind.USER if turn == 0 else SegmentKind.TOOL)
        events = []
        engine.add_request(request, events.append)
        engine.run_until_done()
        finals.append(events[-1])
        evictions.append([e for e in events if isinstance(e, EvictionEvent)])
    return finals, evictions


def test_a_side_thread_drops_at_the_turn_boundary_and_never_touches_the_main_thread(make_engine):
    full_engine = make_engine()
    full, _ = session_turns(full_engine, CompressionConfig(), turns=2)
    engine = make_engine()
    engine.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
    baseline = engine.pool.free_blocks
    sizes = []

    def watch(engine_, seq):  # the main thread's cache during its turns: it never shrinks mid-turn
        if seq.session is not None and seq.finish_reason is None:
            sizes.append((seq.id, seq.kv.n))

    engine.step_hooks.append(watch)
    finals, evictions = session_turns(engine, CompressionConfig(policy="sidequest", params={"every": "1",
                                                                                          "max_side_tokens": "4"}), 2)
    second = finals[1]
    assert second.token_ids == full[1].token_ids  # the turn during which the side thread ran is unchanged
    u = second.usage
    assert u.side_threads == 1 and u.side_tokens == 4 and u.dropped_tool_outputs == 1 and u.evicted_tokens == len(TOOL)
    turn = [n for rid, n in sizes if rid == "t1"]
    assert turn == sorted(turn)  # nothing dropped mid-turn
    [event] = evictions[1]
    assert event.evicted == len(TOOL) and "side thread" in event.reason and event.step == len(second.token_ids)
    session, resident = engine.get_session("s")
    reference, _ = full_engine.get_session("s")
    assert session.token_ids == reference.token_ids  # side tokens never enter the history
    assert resident == len(session.token_ids) - 1 - len(TOOL)  # ... nor the KV; output #0's slots are gone
    assert [s.dropped for s in session.segments if s.kind == "tool"] == [True]
    engine.delete_session("s")
    assert engine.pool.free_blocks == baseline  # the fork's blocks and the session's came back
    engine.pool.check_consistency()


def test_a_session_re_prefilled_after_its_kv_was_dropped_keeps_its_deletions(make_engine):
    """Memory pressure took the parked KV: the next turn re-prefills from the history, skipping the dropped tool
    output (positions kept), so it peaks where the turn with the KV still parked does."""
    side = CompressionConfig(policy="sidequest", params={"every": "1", "max_side_tokens": "4"})
    peaks = []
    for lose_kv in (False, True):
        engine = make_engine()
        engine.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
        session_turns(engine, side, turns=2)
        history = len(engine.get_session("s")[0].token_ids)
        if lose_kv:
            assert engine._drop_idle_session() and engine.get_session("s")[1] == 0
        events = []
        engine.add_request(GenerationRequest("t2", TOOL, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True),
                                             compression=CompressionConfig(), session_id="s",
                                             input_kind=SegmentKind.TOOL), events.append)
        engine.run_until_done()
        assert events[-1].error is None
        peaks.append((events[-1].usage.peak_kv_slots, engine.get_session("s")[1]))
        engine.pool.check_consistency()
    assert peaks[1] == peaks[0]  # same slots with or without the KV kept: output #0 did not come back
    assert peaks[1][0] == history - len(TOOL) + len(TOOL) + 6 - 1  # history minus #0, the new output, 6 tokens


def test_a_side_thread_cut_at_its_allowance_is_void_and_counted(make_engine):
    full, _ = session_turns(make_engine(), CompressionConfig(), turns=3)
    engine = make_engine()
    finals, evictions = session_turns(engine, CompressionConfig(policy="sidequest", params={
        "every": "1", "max_side_tokens": "2"}), turns=3)
    assert [f.token_ids for f in finals] == [f.token_ids for f in full]  # the main thread is unaffected
    assert sum(f.usage.side_threads for f in finals) == 2 and sum(f.usage.side_cut for f in finals) >= 1
    assert sum(f.usage.dropped_tool_outputs for f in finals) == 0 and not any(evictions)


def test_remote_and_in_process_side_threads_drop_the_same_outputs(make_engine):
    from decoder_service.remote_policy import RemotePolicy
    from policy_service.server import BackgroundPolicyServer

    compression = CompressionConfig(policy="sidequest", params={"every": "1", "max_side_tokens": "4"})
    local = make_engine()
    local.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
    # Turns long enough (60 tokens) for the remote round trips to land inside them: a plan that arrives after its
    # turn ended starts no side thread (the main thread is never held for it).
    local_finals, _ = session_turns(local, compression, turns=3, n=60)
    with BackgroundPolicyServer(policies={"sidequest": DropOutputZero}) as server:
        client = RemotePolicy(server.address)
        try:
            assert client.wait_until_available(10)
            remote = make_engine()
            remote.compressor.policy = client
            remote_finals, _ = session_turns(remote, compression, turns=3, n=60)
        finally:
            client.close()
    dropped = lambda engine: [(s.index, s.dropped) for s in engine.get_session("s")[0].segments if s.kind == "tool"]  # noqa: E731
    assert dropped(remote) == dropped(local) == [(0, True), (1, False)]
    assert sum(f.usage.side_threads for f in remote_finals) == sum(f.usage.side_threads for f in local_finals) == 2
    assert remote.get_session("s")[1] == local.get_session("s")[1]  # the same KV is left


def test_side_threads_over_grpc_are_traced_and_counted(make_engine, spans):
    """The side thread's span is a child of the turn's generate span, with its tokens and answer; the final
    message's usage reports the side thread, and GetSession the dropped output."""
    from decoder_service.server import BackgroundServer
    from kvpilot.client import build_request, connect
    from kvpilot_protocol.v1 import decoder_pb2 as pb

    engine = make_engine()
    engine.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
    params = {"every": "1", "max_side_tokens": "4"}
    with BackgroundServer(engine) as decoder:
        stub = connect(decoder.address)
        first = list(stub.Generate(build_request(token_ids=list(range(20, 60)), max_new_tokens=8, temperature=0.0,
                                                 policy="sidequest", params=params, new_session=True)))[-1].complete
        second = list(stub.Generate(build_request(token_ids=TOOL, max_new_tokens=12, temperature=0.0, policy="sidequest",
                                                  params=params, session_id=first.session_id, tool_output=True)))
        info = stub.GetSession(pb.GetSessionRequest(session_id=first.session_id))
    u = second[-1].complete.usage
    assert u.side_threads == 1 and u.side_tokens == 4 and u.dropped_tool_outputs == 1 and u.evicted_tokens == len(TOOL)
    assert u.kv_reads > 0
    assert [s.dropped for s in info.segments if s.kind == "tool"] == [True]
    evictions = [r.eviction for r in second if r.WhichOneof("event") == "eviction"]
    assert len(evictions) == 1 and "side thread" in evictions[0].reason
    generates = [s for s in spans.get_finished_spans() if s.name.startswith("text_completion")]
    [side] = [s for s in spans.get_finished_spans() if s.name == "side_thread"]
    assert side.parent.span_id == generates[-1].context.span_id
    assert side.attributes["kvpilot.side.tokens"] == 4 and "kvpilot.side.answer" in side.attributes


def test_kv_reads_sum_the_slots_every_decode_step_attends(make_engine):
    [done] = make_engine().generate([GenerationRequest("r", list(range(20, 60)), SamplingParams(
        temperature=0, max_new_tokens=10, ignore_eos=True))])
    prompt = 41  # <bos> + 40
    assert done.usage.kv_reads == sum(prompt + j for j in range(1, 10))  # tokens 2..10 were decode steps


def test_a_side_thread_starts_even_when_the_batch_is_full(make_engine):
    """A fork must read its parent while the parent runs: max_running does not queue it behind the parent."""
    engine = make_engine(max_running=1)
    engine.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
    finals, _ = session_turns(engine, CompressionConfig(policy="sidequest", params={"every": "1", "max_side_tokens": "4"}),
                              turns=2)
    assert finals[1].usage.side_threads == 1 and finals[1].usage.side_tokens == 4  # it ran (cut at 4: a random model)


def test_the_fine_tuned_model_names_obsolete_outputs_and_keeps_its_answer():
    """The bundled SideQuest checkpoint on a held-out hard episode: its side threads answer in the grammar, the
    outputs it deletes lower the peak, and the answer stays right (the full benchmark: benchmarks/sidequest_peak.py)."""
    from decoder_service.checkpoint import load_checkpoint
    from decoder_service.engine import Engine, EngineConfig
    from kvpilot.agent import EpisodeRunner
    from kvpilot.models import BUNDLED_MODELS

    loaded = load_checkpoint(BUNDLED_MODELS["reasoner-v2-sidequest"])
    episode = make_episode("multihop", 0, "hard")
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=64 << 20), policy=InProcessPolicy())
    [full] = EpisodeRunner(engine).run([episode])
    [side] = EpisodeRunner(engine, compression=CompressionConfig(policy="sidequest", params={"every": "1"})).run([episode])
    assert full.correct and side.correct
    assert side.side_threads >= 6 and side.side_cut == 0 and side.dropped_tool_outputs >= 3
    assert side.peak_kv_slots <= 0.65 * full.peak_kv_slots
    assert side.total_tokens == full.total_tokens  # the main trace is the same: nothing it needed was dropped


def test_main_traces_with_drops_hide_only_what_no_later_turn_reads():
    from kvpilot.training.sidequest_data import hidden_mask, main_trace_with_drops

    for difficulty, seed in (("hard", 2), ("long", 4)):
        episode = make_episode("multihop", seed, difficulty)
        words, mask, hidden = main_trace_with_drops(episode, every=1)
        assert hidden and words == episode.training_words()[0] and mask == episode.training_words()[1]
        # The word index where each model turn starts, and each tool output's span.
        turns, outputs, at = [], [], len(episode.prompt.split())
        for role, text in episode.reference:
            (turns if role == "model" else outputs).append(at)
            at += len(text.split())
        last = last_uses(episode)
        for start, end, since in hidden:
            k = outputs.index(start)
            assert since > turns[last[k]]  # the turn that last reads output #k starts before it is hidden
        allowed = hidden_mask(len(words) + 1, hidden)
        start, end, since = hidden[0]
        assert not allowed[since + 1, start + 1] and allowed[since, start + 1] and allowed[since + 1, 0]


def test_side_thread_state_goes_with_its_session(make_engine):
    engine = make_engine()
    engine.compressor.policy = InProcessPolicy({"sidequest": DropOutputZero})
    session_turns(engine, CompressionConfig(policy="sidequest", params={"every": "1", "max_side_tokens": "4"}), 2)
    assert "s" in engine.side_threads.sessions
    engine.store.delete("s")  # expired or deleted elsewhere
    engine.expire_sessions()
    assert "s" not in engine.side_threads.sessions and engine.pool.used_blocks == 0


@pytest.mark.parametrize("argv, message", [
    (["--policies", "full,nope"], "--policies: unknown"),
    (["--first-seed", "1000000"], "--first-seed must be in"),
    (["--protect-latest", "9"], "--protect-latest must be in"),
    (["--pressure-mb", "0"], "--pressure-mb must be > 0"),
])
def test_the_peak_benchmark_refuses_bad_arguments_before_any_work(argv, message, capsys):
    from benchmarks.sidequest_peak import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
