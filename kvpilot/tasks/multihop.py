"""multihop: follow links through tool lookups; the agentic workload.

Each episode has a private world of entities (k00..k99), each with one color and one outgoing link. The model
calls a lookup tool on the current entity; the tool answers with a numbered output of several one-line
documents `entity color link .` in random order, one for the called entity and the rest distractors. The
model copies the hop (`k42 blue k77 ;`) and calls the next entity. After `hops` hops it restates the start
with its color and answers with the end entity and the color of the START entity:

    prompt  Q: start k42 hops 2 . report end and color of start .
    model   <call> k42 </call>
    tool    <tool> #0 k17 red k03 . k42 blue k77 . k05 green k42 . </tool>
    model   k42 blue k77 ; <call> k77 </call>
    tool    <tool> #1 k77 white k90 . k33 red k17 . k61 black k08 . </tool>
    model   k77 white k90 ; start k42 blue ; ans k90 blue

The start entity's color appears only in the first tool output and the first hop line (distractor documents
never describe the start entity), so a cache that keeps only recent tokens loses it; older tool outputs are
otherwise obsolete. Every lookup copies what follows a short context seen earlier: an entity is followed by
its color, and the pair `entity color` by its link (no filler word in between, which keeps it learnable).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvpilot.tasks.base import Episode, episode_rng
from kvpilot.tasks.vocab import COLORS, ENTITIES

TASK = "multihop"
STOP = "</call>"


@dataclass(frozen=True)
class MultihopParams:
    hops: int
    docs: int  # documents per tool output (the called entity's one + distractors)
    entities: int = 100
    colors: int = 8


DIFFICULTIES = {
    "easy": MultihopParams(hops=2, docs=4),
    "default": MultihopParams(hops=4, docs=8),
    "hard": MultihopParams(hops=8, docs=12),
}


@dataclass
class MultihopEpisode(Episode):
    params: MultihopParams = field(default=DIFFICULTIES["default"], repr=False)
    chain: list[str] = field(default_factory=list, repr=False)  # start, hop 1, ..., end
    color: dict[str, str] = field(default_factory=dict, repr=False)
    link: dict[str, str] = field(default_factory=dict, repr=False)

    def tool_response(self, model_turn_text: str) -> str | None:
        """Reply to the last `<call> X </call>` of the turn; None when the turn calls nothing (final answer).

        The output id is the called entity's index on the true chain (0, 1, ... for a correct run); any
        off-chain call gets id `hops + 1`. Distractors depend only on the episode and the called entity.
        """
        words = model_turn_text.split()
        if "<call>" not in words:
            return None
        at = len(words) - 1 - words[::-1].index("<call>")
        called = words[at + 1] if at + 1 < len(words) else None
        tool_id = self.chain.index(called) if called in self.chain else self.params.hops + 1
        if called not in self.link:
            return f"<tool> #{tool_id} error </tool>"
        return render_tool_output(self, called, tool_id)


def doc(episode: MultihopEpisode, entity: str) -> str:
    return f"{entity} {episode.color[entity]} {episode.link[entity]} ."


def render_tool_output(episode: MultihopEpisode, called: str, tool_id: int) -> str:
    rng = episode_rng(TASK, episode.seed, episode.params, "call", called)
    # The start entity is never a distractor: its color must stay only in the first output.
    pool = [e for e in episode.link if e not in (called, episode.chain[0])]
    shown = rng.sample(pool, episode.params.docs - 1) + [called]
    rng.shuffle(shown)
    return " ".join(["<tool>", f"#{tool_id}"] + [doc(episode, e) for e in shown] + ["</tool>"])


def generate(seed: int, difficulty: str = "default", **knobs) -> MultihopEpisode:
    params = resolve(difficulty, knobs)
    rng = episode_rng(TASK, seed, params)
    names = ENTITIES[: params.entities]
    palette = COLORS[: params.colors]
    chain = rng.sample(names, params.hops + 1)  # distinct: no cycles on the path
    link = {}
    for e in names:
        link[e] = rng.choice([o for o in names if o != e])
    for a, b in zip(chain, chain[1:]):
        link[a] = b
    color = {e: rng.choice(palette) for e in names}

    start, end = chain[0], chain[-1]
    episode = MultihopEpisode(
        task=TASK, seed=seed, difficulty=difficulty,
        prompt=f"Q: start {start} hops {params.hops} . report end and color of start .",
        reference=[], answer=f"{end} {color[start]}", stop_strings=[STOP],
        params=params, chain=chain, color=color, link=link,
    )
    turn = f"<call> {start} </call>"
    for i, entity in enumerate(chain[:-1]):
        episode.reference.append(("model", turn))
        episode.reference.append(("tool", episode.tool_response(turn)))
        hop = f"{entity} {color[entity]} {link[entity]} ;"
        if i + 1 < params.hops:
            turn = f"{hop} <call> {link[entity]} </call>"
        else:
            turn = f"{hop} start {start} {color[start]} ; ans {episode.answer}"
    episode.reference.append(("model", turn))
    return episode


def resolve(difficulty: str, knobs: dict) -> MultihopParams:
    base = DIFFICULTIES[difficulty]
    params = MultihopParams(**{**base.__dict__, **knobs})
    if not (1 <= params.hops and params.hops + 1 <= params.entities and 1 <= params.docs <= params.entities - 1):
        raise ValueError(f"bad multihop parameters {params}")
    if params.hops + 2 > 32 or params.entities > len(ENTITIES) or params.colors > len(COLORS):
        raise ValueError(f"multihop parameters {params} exceed the vocabulary")
    return params
