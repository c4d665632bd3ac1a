"""Synthetic multi-step tasks for the bundled reasoning model.

`make_episode(task, seed, difficulty, **knobs)` returns a deterministic `Episode`; `TASKS` maps each task
name to its generator. Knobs override one field of the difficulty preset (e.g. `hops=6` for multihop).

Difficulties: easy, default and hard (v1: ~100-500 tokens per episode) and long (v2: 1,000-2,000 tokens; many
hops over larger tool outputs with documents read again later, long programs, long walks). `long` is a level
like the others, so the trainer's curriculum, `kvpilot eval --difficulty` and the benchmarks take it as is.
"""
from __future__ import annotations

from kvpilot.tasks import graph, multihop, variables
from kvpilot.tasks.base import Episode, Segment

TASKS = {
    "multihop": multihop.generate,
    "variables": variables.generate,
    "graph": graph.generate,
}
DIFFICULTIES = ("easy", "default", "hard", "long")
V1_DIFFICULTIES = DIFFICULTIES[:3]  # what the bundled v1 reasoner was trained on


def make_episode(task: str, seed: int, difficulty: str = "default", **knobs) -> Episode:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r} (known: {sorted(TASKS)})")
    if difficulty not in DIFFICULTIES:
        raise KeyError(f"unknown difficulty {difficulty!r} (known: {DIFFICULTIES})")
    return TASKS[task](seed, difficulty, **knobs)


__all__ = ["TASKS", "DIFFICULTIES", "V1_DIFFICULTIES", "Episode", "Segment", "make_episode"]
