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

The `long` difficulty (v2, `labels=2`): documents needed again later. Every entity has a color and two labelled
links, and the prompt gives a numbered walk of labels (as in the graph task); a document lists the color and
one line per link, so every lookup still follows a two-word context (`k42 a` -> its a-link, `k42` -> color):

    prompt  Q: start k42 hops 3 walk 1 a 2 b 3 b . report end and color of start .
    model   <call> k42 </call>
    tool    <tool> #0 k17 red . k17 a k03 . k17 b k61 . k42 blue . k42 a k77 . k42 b k13 . </tool>
    model   1 k42 a k77 ; <call> k77 </call>
    tool    <tool> #1 k77 white . k77 a k90 . k77 b k42 . k33 red . k33 a k17 . k33 b k05 . </tool>
    model   2 k77 b k42 ; <call> k42 </call>
    tool    <tool> #2 #0 </tool>
    model   3 k42 b k13 ; start k42 blue ; ans k13 blue

The walk returns to entities it has looked up (`revisits`: a quarter of the hops, at steps 2..hops-1), and
then leaves them by their other label. The tool never shows a document twice: a call of an entity already
looked up answers `<tool> #i #k </tool>`, "see output #k". The hop after a return needs the link that the
model's own hop lines never copied, so the early output #k must be read again, many tool outputs later; and
the start's color is only in output #0 (distractors are entities off the walk, never the start). Tool outputs
are numbered by the hop (call i after hop line i gets #i); the tool reads the step from the turn's hop line.
With 16-24 hops of 7 documents (12 words each) an episode is ~1,150-1,800 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvpilot.tasks.base import Episode, drawn_count, episode_rng
from kvpilot.tasks.vocab import COLORS, ENTITIES, LABELS, TOOL_IDS

TASK = "multihop"
STOP = "</call>"


@dataclass(frozen=True)
class MultihopParams:
    hops: int
    docs: int  # documents per tool output (the called entity's one + distractors)
    entities: int = 100
    colors: int = 8
    # Added for v2; repr=False keeps the RNG seeds of the v1 presets (see base.rng_key).
    labels: int = field(default=1, repr=False)  # links per entity: 1 = the v1 chain, >= 2 = a labelled walk
    revisits: float = field(default=0.0, repr=False)  # share of hops returning to an entity looked up before
    spread: int = field(default=0, repr=False)  # hops drawn from [hops - spread, hops + spread]


DIFFICULTIES = {
    "easy": MultihopParams(hops=2, docs=4),
    "default": MultihopParams(hops=4, docs=8),
    "hard": MultihopParams(hops=8, docs=12),
    "long": MultihopParams(hops=20, docs=7, labels=2, revisits=0.25, spread=4),
}


@dataclass
class MultihopEpisode(Episode):
    params: MultihopParams = field(default=DIFFICULTIES["default"], repr=False)
    chain: list[str] = field(default_factory=list, repr=False)  # start, hop 1, ..., end
    color: dict[str, str] = field(default_factory=dict, repr=False)
    link: dict[str, str] = field(default_factory=dict, repr=False)

    def tool_response(self, model_turn_text: str, dropped: frozenset[int] = frozenset()) -> str | None:
        """Reply to the last `<call> X </call>` of the turn; None when the turn calls nothing (final answer).
        (A chain never points back at an earlier output, so `dropped` changes nothing here.)

        The output id is the called entity's index on the true chain (0, 1, ... for a correct run); any
        off-chain call gets id `hops + 1`. Distractors depend only on the episode and the called entity.
        """
        words = model_turn_text.split()
        if "<call>" not in words:
            return None
        at = len(words) - 1 - words[::-1].index("<call>")
        called = words[at + 1] if at + 1 < len(words) else None
        tool_id = self.chain.index(called) if called in self.chain else len(self.chain)  # hops + 1
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


def generate(seed: int, difficulty: str = "default", **knobs) -> Episode:
    params = resolve(difficulty, knobs)
    if params.labels > 1:
        return generate_walk(seed, difficulty, params)
    rng = episode_rng(TASK, seed, params)
    hops = drawn_count(rng, params.hops, params.spread)
    names = ENTITIES[: params.entities]
    palette = COLORS[: params.colors]
    chain = rng.sample(names, hops + 1)  # distinct: no cycles on the path
    link = {}
    for e in names:
        link[e] = rng.choice([o for o in names if o != e])
    for a, b in zip(chain, chain[1:]):
        link[a] = b
    color = {e: rng.choice(palette) for e in names}

    start, end = chain[0], chain[-1]
    episode = MultihopEpisode(
        task=TASK, seed=seed, difficulty=difficulty,
        prompt=f"Q: start {start} hops {hops} . report end and color of start .",
        reference=[], answer=f"{end} {color[start]}", stop_strings=[STOP],
        params=params, chain=chain, color=color, link=link,
    )
    turn = f"<call> {start} </call>"
    for i, entity in enumerate(chain[:-1]):
        episode.reference.append(("model", turn))
        episode.reference.append(("tool", episode.tool_response(turn)))
        hop = f"{entity} {color[entity]} {link[entity]} ;"
        if i + 1 < hops:
            turn = f"{hop} <call> {link[entity]} </call>"
        else:
            turn = f"{hop} start {start} {color[start]} ; ans {episode.answer}"
    episode.reference.append(("model", turn))
    return episode


# ------------------------------------------------------------------------------ long: a labelled walk


@dataclass
class MultihopWalkEpisode(Episode):
    """The labelled-walk form (`labels >= 2`, the `long` difficulty): see the module docstring."""

    params: MultihopParams = field(default=DIFFICULTIES["long"], repr=False)
    path: list[str] = field(default_factory=list, repr=False)  # start, entity after step 1, ..., end (repeats)
    walk: list[str] = field(default_factory=list, repr=False)  # the label of steps 1..hops
    color: dict[str, str] = field(default_factory=dict, repr=False)
    edges: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    replies: list[str] = field(default_factory=list, repr=False)  # the tool's answer to call i of the walk

    @property
    def hops(self) -> int:
        return len(self.walk)

    def tool_response(self, model_turn_text: str, dropped: frozenset[int] = frozenset()) -> str | None:
        """Reply to the last `<call> X </call>` of the turn; None when the turn calls nothing (final answer).

        The call's step is the number of the hop line just before it (`3 k42 a k77 ; <call> k77 </call>`: step 3;
        a turn that is only a call is step 0). A call of the walk's entity at that step gets the reference
        reply: the documents, or `<tool> #i #k </tool>` when the entity was looked up before (at output k).
        Any other call gets documents with id `hops + 1` (distractors depend only on the episode and the entity).
        """
        words = model_turn_text.split()
        if "<call>" not in words:
            return None
        at = len(words) - 1 - words[::-1].index("<call>")
        called = words[at + 1] if at + 1 < len(words) else None
        if at == 0:
            step = 0
        elif at >= 5 and words[at - 1] == ";" and words[at - 5].isdigit():
            step = int(words[at - 5])
        else:
            step = None
        if step is not None and step < self.hops and self.path[step] == called:
            first = self.path.index(called)
            if first < step and first in dropped:  # the output it would point at was deleted: re-issue the call
                return render_walk_documents(self, called, step)
            return self.replies[step]
        tool_id = self.hops + 1
        if called not in self.color:
            return f"<tool> #{tool_id} error </tool>"
        return render_walk_documents(self, called, tool_id)


def walk_doc(episode: MultihopWalkEpisode, entity: str) -> str:
    """`k42 blue . k42 a k77 . k42 b k13 .`: the color, then one line per labelled link."""
    lines = [f"{entity} {episode.color[entity]} ."]
    lines += [f"{entity} {label} {episode.edges[(entity, label)]} ." for label in LABELS[: episode.params.labels]]
    return " ".join(lines)


def render_walk_documents(episode: MultihopWalkEpisode, called: str, tool_id: int) -> str:
    rng = episode_rng(TASK, episode.seed, episode.params, "call", called)
    # Distractors are entities off the walk: the start's color stays in output #0 only, and a document on the
    # walk is shown once, by its own call.
    on_walk = set(episode.path)
    pool = [e for e in episode.color if e not in on_walk and e != called]
    shown = rng.sample(pool, episode.params.docs - 1) + [called]
    rng.shuffle(shown)
    return " ".join(["<tool>", f"#{tool_id}"] + [walk_doc(episode, e) for e in shown] + ["</tool>"])


def generate_walk(seed: int, difficulty: str, params: MultihopParams) -> MultihopWalkEpisode:
    rng = episode_rng(TASK, seed, params)
    hops = drawn_count(rng, params.hops, params.spread)
    names = ENTITIES[: params.entities]
    labels = LABELS[: params.labels]
    start = rng.choice(names)
    wanted = max(1, round(params.revisits * hops)) if params.revisits > 0 else 0
    returns = set(rng.sample(range(2, hops), min(wanted, max(0, hops - 2))))  # arrivals at an old entity
    path, walk, edges = [start], [], {}
    for step in range(1, hops + 1):
        here = path[-1]
        label = rng.choice([lab for lab in labels if (here, lab) not in edges])  # a return leaves by a new label
        once = [e for e in dict.fromkeys(path) if path.count(e) == 1 and e != here]  # each has an unused label
        if step in returns and once:
            target = rng.choice(once)
        else:
            target = rng.choice([e for e in names if e not in path])
        edges[(here, label)] = target
        path.append(target)
        walk.append(label)
    for e in names:
        for label in labels:
            if (e, label) not in edges:
                edges[(e, label)] = rng.choice([o for o in names if o != e])
    color = {e: rng.choice(COLORS[: params.colors]) for e in names}

    end = path[-1]
    episode = MultihopWalkEpisode(
        task=TASK, seed=seed, difficulty=difficulty,
        prompt=" ".join([f"Q: start {start} hops {hops} walk"] + [f"{i} {lab}" for i, lab in enumerate(walk, start=1)]
                        + [". report end and color of start ."]),
        reference=[], answer=f"{end} {color[start]}", stop_strings=[STOP],
        params=params, path=path, walk=walk, color=color, edges=edges,
    )
    for i, entity in enumerate(path[:-1]):
        first = path.index(entity)
        seen = first < i  # looked up before: point back to that output
        episode.replies.append(f"<tool> #{i} #{first} </tool>" if seen else render_walk_documents(episode, entity, i))
    turn = f"<call> {start} </call>"
    for i in range(hops):
        episode.reference.append(("model", turn))
        episode.reference.append(("tool", episode.replies[i]))
        hop = f"{i + 1} {path[i]} {walk[i]} {path[i + 1]} ;"
        if i + 1 < hops:
            turn = f"{hop} <call> {path[i + 1]} </call>"
        else:
            turn = f"{hop} start {start} {color[start]} ; ans {episode.answer}"
    episode.reference.append(("model", turn))
    return episode


def last_uses(episode: Episode) -> list[int]:
    """The last model turn that reads each tool output of the reference trace (SideQuest's labels).

    Model turn t (0-based) comes before tool output #t; turn t + 1 writes the hop line from output #t's
    document. In the chain form output #t is read by turn t + 1 only, and output #0 again by the final turn
    (the start's color). In the walk form a return's reply `#i #k` points back at output #k, so turn i + 1 reads
    #k (and #i); every output is thereby last read by the turn after the latest visit of its entity, and #0 by
    the final turn. An output whose last use is <= t is obsolete once turn t is written."""
    hops = episode.hops if isinstance(episode, MultihopWalkEpisode) else len(episode.chain) - 1
    last = list(range(1, hops + 1))  # output #t is read by turn t + 1
    if isinstance(episode, MultihopWalkEpisode):
        for i, entity in enumerate(episode.path[:-1]):
            first = episode.path.index(entity)
            last[first] = max(last[first], i + 1)
    last[0] = hops  # the final turn restates the start's color, in output #0 only
    return last


def resolve(difficulty: str, knobs: dict) -> MultihopParams:
    base = DIFFICULTIES[difficulty]
    params = MultihopParams(**{**base.__dict__, **knobs})
    most = params.hops + params.spread  # the most hops an episode can have
    if not (0 <= params.spread < params.hops and most + 1 <= params.entities and 1 <= params.docs
            and 1 <= params.labels and 0 <= params.revisits <= 1):
        raise ValueError(f"bad multihop parameters {params}")
    # Distractors: any entity but the called one and the start (v1), entities off the walk (labelled walk).
    if params.docs - 1 > params.entities - (2 if params.labels == 1 else most + 2):
        raise ValueError(f"multihop parameters {params}: too few entities for {params.docs} documents per output")
    if params.revisits and params.labels < 2:
        raise ValueError("multihop revisits need labels >= 2 (with one link per entity a return would loop)")
    if most + 2 > len(TOOL_IDS) or params.entities > len(ENTITIES) or params.colors > len(COLORS) \
            or params.labels > len(LABELS) or most > 63:
        raise ValueError(f"multihop parameters {params} exceed the vocabulary")
    return params
