"""SideQuest's side-thread language: the prompt that puts the model in memory-management mode and the small
fixed grammar of its answer, shared by the `sidequest` policy (which parses answers) and the trainer (which
writes them).

    side prompt   <reserved_0>          one token after the forked context: the trigger. [INFERRED] The paper's
                                        trigger is a phrase ("memory management mode"); the bundled vocabulary
                                        has no such words, so the fine-tune claims the first reserved id, which
                                        no main trace ever contains.
    answer        #i #j ... .           the tool outputs to delete, by the id their text starts with
                                        (`<tool> #3 ...`), ascending, then `.`; `.` alone deletes nothing.
                                        [INFERRED] No rationale: the vocabulary has no words for one.

Parsing never drops more than the grammar allows: a word outside it makes the whole answer void (nothing is
dropped), an answer cut before its `.` is void, repeated ids count once, ids that name no live tool output or a
protected one are ignored; each case is counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TRIGGER = "<reserved_0>"
END = "."
MAX_TOOL_OUTPUTS = 32  # ids #0..#31 are words of the bundled vocabulary


def answer_words(ids: list[int]) -> list[str]:
    """The answer that deletes `ids` (what the trainer writes)."""
    return [f"#{i}" for i in sorted(set(ids))] + [END]


@dataclass
class ParsedAnswer:
    drop: list[int] = field(default_factory=list)  # live, unprotected ids to delete, ascending
    unknown: list[int] = field(default_factory=list)  # ids naming no live tool output (ignored)
    protected: list[int] = field(default_factory=list)  # ids the policy keeps whatever the answer says (ignored)
    repeated: int = 0  # ids named more than once (counted once)
    malformed: bool = False  # a word outside the grammar: nothing is dropped
    cut: bool = False  # no terminal `.` (the side thread ran out of tokens): nothing is dropped

    @property
    def void(self) -> bool:
        return self.malformed or self.cut


def parse_answer(text: str, live: set[int], protected: set[int] = frozenset()) -> ParsedAnswer:
    """Parse a side thread's answer. `live`: ids of tool outputs still in the cache; `protected`: ids never
    dropped (e.g. the latest output, which the next turn reads)."""
    out = ParsedAnswer()
    seen: set[int] = set()
    words = text.split()
    for at, word in enumerate(words):
        if word == END:
            if at != len(words) - 1:  # words after the end: not this grammar
                out.malformed = True
            break
        if not (word.startswith("#") and word[1:].isdigit() and int(word[1:]) < MAX_TOOL_OUTPUTS):
            out.malformed = True
            break
        i = int(word[1:])
        if i in seen:
            out.repeated += 1
            continue
        seen.add(i)
        if i not in live:
            out.unknown.append(i)
        elif i in protected:
            out.protected.append(i)
        else:
            out.drop.append(i)
    else:
        out.cut = True
    if out.void:
        out.drop = []
    out.drop.sort()
    return out
