"""Synthetic multi-step tasks for the bundled reasoning model.

`make_episode(task, seed, difficulty, **knobs)` returns a deterministic `Episode`; `TASKS` maps each task
name to its generator. Knobs override one field of the difficulty preset (e.g. `hops=6` for multihop).
"""
from __future__ import annotations

from kvpilot.tasks import graph, multihop, variables
from kvpilot.tasks.base import Episode, Segment

TASKS = {
    "multihop": multihop.generate,
    "variables": variables.generate,
    "graph": graph.generate,
}
DIFFICULTIES = ("easy", "default", "hard")


def make_episode(task: str, seed: int, difficulty: str = "default", **knobs) -> Episode:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r} (known: {sorted(TASKS)})")
    if difficulty not in DIFFICULTIES:
        raise KeyError(f"unknown difficulty {difficulty!r} (known: {DIFFICULTIES})")
    return TASKS[task](seed, difficulty, **knobs)


__all__ = ["TASKS", "DIFFICULTIES", "Episode", "Segment", "make_episode"]
