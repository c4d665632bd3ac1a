"""graph: walk a labelled directed graph; a single-pass trace.

Every node has one out-edge per label. The prompt lists all edges in random order, a start node and a
numbered walk of labels. The trace writes each step as `step node label next ;`: the label is what follows the
step number in the walk, the next node is what follows the pair `node label` in the edge list:

    prompt  G: n5 a n9 . n9 b n5 . n5 b n5 . n9 a n2 . ... start n5 steps 3 walk 1 a 2 b 3 a .
    model   1 n5 a n9 ; 2 n9 b n5 ; 3 n5 a n9 ; ans n9

Every edge of the graph may be needed at any step, so the whole edge list stays live to the end.

The `long` difficulty (v2): all 64 nodes with 4 labels (256 edges, ~1,000 prompt tokens) and walks of 49-63
steps (step numbers stop at 63, the largest number word), ~1,380-1,480 tokens per episode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvpilot.tasks.base import Episode, drawn_count, episode_rng
from kvpilot.tasks.vocab import LABELS, NODES, NUMBERS

TASK = "graph"


@dataclass(frozen=True)
class GraphParams:
    nodes: int
    steps: int
    labels: int = 2
    # Added for v2; repr=False keeps the RNG seeds of the v1 presets (see base.rng_key).
    spread: int = field(default=0, repr=False)  # steps drawn from [steps - spread, steps + spread]


DIFFICULTIES = {
    "easy": GraphParams(nodes=8, steps=4),
    "default": GraphParams(nodes=16, steps=8),
    "hard": GraphParams(nodes=32, steps=16),
    "long": GraphParams(nodes=64, steps=56, labels=4, spread=7),
}


def generate(seed: int, difficulty: str = "default", **knobs) -> Episode:
    params = resolve(difficulty, knobs)
    rng = episode_rng(TASK, seed, params)
    steps = drawn_count(rng, params.steps, params.spread)
    names = rng.sample(NODES, params.nodes)
    labels = LABELS[: params.labels]
    edges = {(node, label): rng.choice(names) for node in names for label in labels}
    listing = list(edges)
    rng.shuffle(listing)
    walk = [rng.choice(labels) for _ in range(steps)]
    start = rng.choice(names)

    node, lines = start, []
    for step, label in enumerate(walk, start=1):
        target = edges[(node, label)]
        lines.append(f"{step} {node} {label} {target} ;")
        node = target
    prompt = " ".join(
        ["G:"] + [f"{n} {lab} {edges[(n, lab)]} ." for n, lab in listing]
        + ["start", start, "steps", str(steps), "walk"]
        + [f"{step} {label}" for step, label in enumerate(walk, start=1)] + ["."]
    )
    return Episode(
        task=TASK, seed=seed, difficulty=difficulty, prompt=prompt,
        reference=[("model", " ".join(lines) + f" ans {node}")], answer=node, stop_strings=[],
    )


def resolve(difficulty: str, knobs: dict) -> GraphParams:
    base = DIFFICULTIES[difficulty]
    params = GraphParams(**{**base.__dict__, **knobs})
    if not (1 <= params.nodes <= len(NODES) and 1 <= params.labels <= len(LABELS) and 0 <= params.spread
            and 1 <= params.steps - params.spread and params.steps + params.spread < len(NUMBERS)):
        raise ValueError(f"bad graph parameters {params}")
    return params
