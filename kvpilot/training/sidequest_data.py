"""SideQuest training examples: side threads forked from the bundled tasks' multihop traces, labelled by each tool
output's last use (kvpilot.tasks.multihop.last_uses).

A side thread at boundary t runs after tool output #t (every `every` outputs, the policy's cadence). It sees the
main context as the runtime forks it: `<bos>`, the prompt, the turns and outputs up to #t, minus the outputs that
earlier side threads deleted (their positions stay as they were: a deletion removes KV slots, it does not
renumber positions), then the trigger at the next position; it answers with the outputs it may delete: every
output still there whose last use is at or before turn t + 1, the turn in progress. A deletion lands when that
turn ends, after its last read, so the output the turn is reading (#t) is named too: waiting for the next side
thread would keep it one more turn (measured: the peak then stays at 0.58 of the full cache's on hard multihop,
with the lag of one turn the floor). [INFERRED] The label is the episode's true last use,
future returns included, which the side thread cannot always foresee from what it sees (a return's entity is
named only when the walk gets there); the runtime counts a dropped output that was needed again (the agent
re-issues the call).
"""
from __future__ import annotations

import random

from kvpilot.tasks.base import Episode
from kvpilot.tasks.multihop import last_uses
from policy_service.sidequest_grammar import TRIGGER, answer_words

EVERY_CHOICES = (1, 2, 3, 4)  # cadences seen in training (the policy's `every`)


def obsolete(last: list[int], boundary: int, gone: set[int]) -> list[int]:
    """The outputs a side thread after output #boundary names: read for the last time by turn boundary + 1 (the
    turn in progress, whose end the deletion waits for) or earlier, and not deleted yet."""
    return [k for k in range(boundary + 1) if last[k] <= boundary + 1 and k not in gone]


def side_boundaries(episode: Episode, every: int) -> list[int]:
    """Tool outputs after which a side thread runs: #every-1, #2*every-1, ... (not after the last output)."""
    outputs = sum(1 for role, _ in episode.reference if role == "tool")
    return [t for t in range(every - 1, outputs - 1, every)]


def dropped_before(episode: Episode, every: int, boundary: int) -> tuple[set[int], list[int]]:
    """(outputs deleted by the side threads before `boundary`, the answer at `boundary`), all answered as labelled."""
    last = last_uses(episode)
    gone: set[int] = set()
    for t in side_boundaries(episode, every):
        answer = obsolete(last, t, gone)
        if t == boundary:
            return gone, answer
        gone |= set(answer)
    raise ValueError(f"no side thread after output #{boundary} at every={every}")


def side_example(episode: Episode, every: int, boundary: int) -> tuple[list[str], list[bool], list[int]]:
    """(words after <bos>, loss mask, positions with <bos> at 0) of the side thread after output #boundary."""
    gone, answer = dropped_before(episode, every, boundary)
    words, mask, positions = [], [], []
    position = 1
    pieces = [("user", episode.prompt)] + list(episode.reference)
    tool = -1
    for role, text in pieces:
        piece = text.split()
        if role == "tool":
            tool += 1
        if not (role == "tool" and tool in gone):
            words += piece
            positions += range(position, position + len(piece))
        position += len(piece)
        if role == "tool" and tool == boundary:
            break
    mask = [False] * len(words)
    reply = [TRIGGER] + answer_words(answer)
    words += reply
    mask += [False] + [True] * (len(reply) - 1)
    positions += range(position, position + len(reply))
    return words, mask, positions


def random_side_example(episode: Episode, rng: random.Random) -> tuple[list[str], list[bool], list[int]] | None:
    """One side thread of the episode at a random cadence and boundary (None if the episode has none)."""
    every = rng.choice(EVERY_CHOICES)
    boundaries = side_boundaries(episode, every)
    if not boundaries:
        return None
    return side_example(episode, every, rng.choice(boundaries))


def main_trace_with_drops(episode: Episode, every: int) -> tuple[list[str], list[bool], list[tuple[int, int, int]]]:
    """The episode's main trace as the runtime leaves it under sidequest, for the main thread to train on: (words
    after <bos>, loss mask, hidden spans). Each side thread's deletions (answered as labelled) apply at the end of
    the next model turn, so every token from the following tool output on stops seeing them: a hidden span
    (key start, key end, first query that no longer sees it), word indices after <bos>. Nothing is hidden that a
    later turn reads, so the task stays solvable; the main thread learns to work with the holes."""
    words, mask = episode.training_words()
    starts, position = [], len(episode.prompt.split())  # where each tool output starts and ends
    for role, text in episode.reference:
        n = len(text.split())
        if role == "tool":
            starts.append((position, position + n))
        position += n
    hidden = []
    gone: set[int] = set()
    last = last_uses(episode)
    for t in side_boundaries(episode, every):
        answer = obsolete(last, t, gone)
        gone |= set(answer)
        if t + 1 < len(starts):  # applied at the end of turn t + 1: output #t+1 and later do not see them
            hidden += [(starts[k][0], starts[k][1], starts[t + 1][0]) for k in answer]
    return words, mask, hidden


def hidden_mask(length: int, hidden: list[tuple[int, int, int]], offset: int = 1):
    """[T, T] bool attention mask: causal, minus the hidden spans (word indices shifted by `offset` for <bos>)."""
    import torch

    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    for start, end, since in hidden:
        allowed[since + offset:, start + offset:end + offset] = False
    return allowed
