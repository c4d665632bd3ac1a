"""The `long` task variants (bundled reasoner v2): determinism, exact-match checking, trace lengths measured with
the bundled tokenizer, and in multihop documents that must be read again many hops after they were shown."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpilot.tasks import TASKS, make_episode
from kvpilot.tasks.base import tool_output_id
from kvpilot.tasks.vocab import COLORS, ENTITIES, LABELS, VARIABLES, token_ids

TOKENIZER = Path(__file__).resolve().parents[1] / "kvpilot" / "assets" / "reasoner" / "tokenizer.json"
seeds = st.integers(min_value=0, max_value=2**40)


def model_text(episode) -> str:
    return " ".join(text for role, text in episode.reference if role == "model")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))  # the committed v1 tokenizer: long episodes need no new word


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_long_episode(task):
    a, b = make_episode(task, 5, "long"), make_episode(task, 5, "long")
    assert (a.prompt, a.reference, a.answer) == (b.prompt, b.reference, b.answer)
    c = make_episode(task, 6, "long")
    assert (a.prompt, a.reference) != (c.prompt, c.reference)
    assert a.difficulty == "long"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_checker_accepts_the_reference_and_rejects_a_corrupted_answer(task):
    for seed in range(10):
        episode = make_episode(task, seed, "long")
        text = model_text(episode)
        assert episode.is_correct(text) and episode.is_correct(text + " <eos> junk")
        head, answer = text.rsplit(" ans ", 1)
        words = answer.split()
        # Swap the first answer word for another word of its kind (entity, node or digit): exact match only.
        pool = {"multihop": ENTITIES, "variables": [str(i) for i in range(10)], "graph": [w for w in token_ids()
                if w.startswith("n") and w[1:].isdigit()]}[task]
        wrong = next(w for w in pool if w != words[0])
        assert not episode.is_correct(" ".join([head, "ans", wrong, *words[1:]]))
        assert not episode.is_correct(head)  # no answer
        assert not episode.is_correct(text + " " + words[-1])  # trailing word
        if task == "multihop":  # the start's color is part of the answer
            other = next(c for c in COLORS if c != words[1])
            assert not episode.is_correct(f"{head} ans {words[0]} {other}")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_long_traces_are_1000_to_2000_tokens(task, tokenizer):
    """Prompt + tool outputs + generated words, <bos> and <eos> included, over 20 episodes."""
    unk = tokenizer.token_to_id("<unk>")
    lengths = []
    for seed in range(20):
        episode = make_episode(task, seed, "long")
        ids = tokenizer.encode(episode.training_text, add_special_tokens=False).ids
        assert unk not in ids and len(ids) == episode.num_words
        lengths.append(len(ids) + 1)
    assert 1000 <= statistics.mean(lengths) <= 2000, lengths
    assert min(lengths) >= 900 and max(lengths) <= 2100, lengths  # no outlier: every episode is "long"
    assert len(set(lengths)) > 1  # lengths vary (spread)
    hard = statistics.mean(make_episode(task, seed, "hard").num_words for seed in range(5))
    assert statistics.mean(lengths) > 2.5 * hard


def parse_documents(reply: str) -> dict[str, dict[str, str]]:
    """`<tool> #i k42 blue . k42 a k77 . k42 b k13 . ... </tool>` -> {"k42": {"color": "blue", "a": "k77", ...}}."""
    words = reply.split()[2:-1]
    documents: dict[str, dict[str, str]] = {}
    while words:
        line = words[: words.index(".")]
        words = words[len(line) + 1:]
        entity = line[0]
        if len(line) == 2:
            documents.setdefault(entity, {})["color"] = line[1]
        else:
            assert len(line) == 3 and line[1] in LABELS
            documents.setdefault(entity, {})[line[1]] = line[2]
    return documents


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_multihop_long_answer_follows_the_tool_outputs_and_reuses_old_documents(seed):
    """Solve the episode from its text alone: follow the walk through the documents the tool showed, resolving
    `<tool> #i #k </tool>` ("see output k") to output k. Every episode returns to entities looked up before, and
    the link it then needs is in an output many turns back and in no earlier model text."""
    episode = make_episode("multihop", seed, "long")
    turns = episode.reference
    assert [role for role, _ in turns] == ["model", "tool"] * (len(turns) // 2) + ["model"]
    words = episode.prompt.split()
    start, hops = words[2], int(words[4])
    assert 16 <= hops <= 24 and words[5] == "walk"
    walk = words[6: 6 + 2 * hops]
    assert walk[0::2] == [str(i) for i in range(1, hops + 1)] and set(walk[1::2]) <= set(LABELS[:2])

    outputs: list[dict[str, dict[str, str]]] = []
    seen_model_text = episode.prompt
    node, reused = start, 0
    for i in range(hops):
        call, reply = turns[2 * i][1], turns[2 * i + 1][1]
        assert episode.tool_response(call) == reply  # the tool replays the reference, statelessly
        assert tool_output_id(reply) == i and call.endswith(f"<call> {node} </call>")
        reply_words = reply.split()
        if len(reply_words) == 4:  # `<tool> #i #k </tool>`: this entity's document is in output k
            k = int(reply_words[2][1:])
            assert k < i and node in outputs[k]
            document = outputs[k][node]
            outputs.append({})
            label = walk[2 * i + 1]
            # The link needed now was never copied by the model: only old output k (and the world) has it.
            assert f"{node} {label} {document[label]}" not in seen_model_text
            assert f"{node} {label} {document[label]}" in turns[2 * k + 1][1]
            reused += 1
        else:
            documents = parse_documents(reply)
            assert len(documents) == episode.params.docs and node in documents
            assert all(set(d) == {"color", "a", "b"} for d in documents.values())
            assert all(node not in earlier for earlier in outputs)  # a document is shown once
            outputs.append(documents)
            document = documents[node]
        seen_model_text += " " + call
        here, node = node, document[walk[2 * i + 1]]
        assert turns[2 * i + 2][1].startswith(f"{i + 1} {here} {walk[2 * i + 1]} {node} ; ")  # the hop line
    assert reused >= 2
    start_color = outputs[0][start]["color"]
    assert episode.answer == f"{node} {start_color}"
    assert episode.is_correct(model_text(episode))
    # The start's color is shown in output #0 only: the final answer needs the first document again.
    assert all(start not in documents for documents in outputs[1:])
    assert episode.tool_response(turns[-1][1]) is None


def test_multihop_long_tool_off_the_walk():
    episode = make_episode("multihop", 3, "long")
    hops = episode.hops
    off = next(e for e in ENTITIES if e not in episode.path)
    reply = episode.tool_response(f"<call> {off} </call>")
    assert tool_output_id(reply) == hops + 1 and off in parse_documents(reply)
    assert reply == make_episode("multihop", 3, "long").tool_response(f"1 k00 a k01 ; <call> {off} </call>")
    assert episode.tool_response("<call> zz </call>") == f"<tool> #{hops + 1} error </tool>"
    # The walk's second entity called at the wrong step is off the walk too, and gets its documents.
    wrong_step = episode.tool_response(f"7 {episode.path[0]} a {episode.path[1]} ; <call> {episode.path[1]} </call>")
    assert tool_output_id(wrong_step) == hops + 1


def test_variables_long_programs():
    for seed in range(20):
        episode = make_episode("variables", seed, "long")
        statements = episode.prompt.split(" ", 1)[1].rstrip(" .").split(" ; ")[:-1]
        assert 68 <= len(statements) <= 92
        targets = [s.split()[0] for s in statements]
        assert len(set(targets)) == len(targets)  # every variable is bound once
        assert targets[:32] == VARIABLES and targets[32:] == ENTITIES[: len(targets) - 32]  # x1..x32, then k00..


def test_graph_long_walks():
    for seed in range(20):
        episode = make_episode("graph", seed, "long")
        words = episode.prompt.split()
        at = words.index("start")
        assert (at - 1) // 4 == 64 * 4  # every node, four labels
        assert 49 <= int(words[at + 3]) <= 63


def test_long_knobs_and_limits():
    assert make_episode("multihop", 0, "long", hops=3, spread=0, revisits=0.5).hops == 3
    with pytest.raises(ValueError):
        make_episode("multihop", 0, "default", revisits=0.3)  # one link per entity: a return would loop
    with pytest.raises(ValueError):
        make_episode("multihop", 0, "long", hops=29)  # 29 + 4 hops: more tool outputs than #0..#31
    with pytest.raises(ValueError):
        make_episode("graph", 0, "long", steps=60)  # up to step 67: no number word past 63
    with pytest.raises(ValueError):
        make_episode("variables", 0, "long", statements=125)  # 137 names needed, 132 exist
