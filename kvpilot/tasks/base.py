"""The Episode: one deterministic task instance, as the trainer, the evaluators and the KV policies see it.

An episode is a conversation. The prompt is the first user turn; `reference` is the teacher-forcing
continuation as alternating model turns and tool outputs. Joining prompt and reference texts with spaces and
ending with `<eos>` gives the training sequence; the loss applies to model text (and the final `<eos>`) only.
All text is space-separated words of the vocabulary in `kvpilot.tasks.vocab`.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

EOS = "<eos>"
ANSWER_MARK = "ans"  # the model writes `ans <answer words>` as its last words


@dataclass(frozen=True)
class Segment:
    """A contiguous span of the episode's sequence: the prompt, one model turn, or one tool output.

    Tool outputs carry their id (the `#i` after `<tool>`) so a policy can drop an obsolete one by id.
    """

    kind: str  # "prompt" | "model" | "tool"
    text: str
    tool_id: int | None = None

    @property
    def num_words(self) -> int:
        return len(self.text.split())


@dataclass
class Episode:
    task: str
    seed: int
    difficulty: str
    prompt: str
    reference: list[tuple[str, str]]
    answer: str
    stop_strings: list[str]

    @property
    def generation_limit(self) -> int:
        """Tokens the model may write over the whole episode: twice the reference trace, plus slack. Every
        runner (quick_eval, the engine's EpisodeRunner, gRPC) stops there, so a model that loops after losing
        its context costs bounded time (the tokenizer is word-level: one word, one token)."""
        return 2 * sum(len(text.split()) for role, text in self.reference if role == "model") + 16

    def tool_response(self, model_turn_text: str, dropped: frozenset[int] = frozenset()) -> str | None:
        """The environment's reply to one model turn; None when the turn is final. Single-pass tasks: always None.
        `dropped`: ids of tool outputs the model's memory management deleted from its context (SideQuest): a reply
        that would point back at one re-issues its content instead (see MultihopWalkEpisode)."""
        return None

    def extract_answer(self, model_text: str) -> str | None:
        """The words after the last `ans` of the model's whole generated text, up to `<eos>`."""
        words = model_text.split()
        if EOS in words:
            words = words[: words.index(EOS)]
        if ANSWER_MARK not in words:
            return None
        last = len(words) - 1 - words[::-1].index(ANSWER_MARK)
        answer = " ".join(words[last + 1:])
        return answer or None

    def is_correct(self, model_text: str) -> bool:
        return self.extract_answer(model_text) == self.answer

    @property
    def segments(self) -> list[Segment]:
        """Prompt, then the reference turns in order; tool segments know their id."""
        out = [Segment("prompt", self.prompt)]
        for role, text in self.reference:
            out.append(Segment(role, text, tool_output_id(text) if role == "tool" else None))
        return out

    @property
    def training_text(self) -> str:
        """The full teacher-forcing sequence (without `<bos>`, which the engine and trainer add)."""
        return " ".join([self.prompt] + [text for _, text in self.reference] + [EOS])

    def training_words(self) -> tuple[list[str], list[bool]]:
        """Words of `training_text` and, per word, whether the model wrote it (the loss mask)."""
        words = self.prompt.split()
        mask = [False] * len(words)
        for role, text in self.reference:
            piece = text.split()
            words += piece
            mask += [role == "model"] * len(piece)
        words.append(EOS)
        mask.append(True)
        return words, mask

    @property
    def num_words(self) -> int:
        return sum(segment.num_words for segment in self.segments) + 1  # + <eos>


def tool_output_id(text: str) -> int | None:
    """`<tool> #3 ...` -> 3."""
    words = text.split()
    if len(words) >= 2 and words[0] == "<tool>" and words[1].startswith("#") and words[1][1:].isdigit():
        return int(words[1][1:])
    return None


def episode_rng(task: str, seed: int, knobs: object, *salt: object) -> random.Random:
    """A private RNG per (task, seed, knobs[, salt]): string seeds hash with SHA-512, stable across runs and
    independent of PYTHONHASHSEED, so every episode (and every tool reply) is reproducible."""
    return random.Random("/".join(rng_key(part) for part in (task, seed, knobs, *salt)))


def rng_key(part: object) -> str:
    """The text a part contributes to an RNG seed: str(part), except for a parameter dataclass, whose fields
    added after v1 are declared `repr=False` and appear (after a `+`) only when they differ from their
    default. So a v1 preset keeps its v1 seed text, hence its v1 episodes, whatever fields are added later."""
    if not dataclasses.is_dataclass(part) or isinstance(part, type):
        return str(part)
    extra = [f"{f.name}={getattr(part, f.name)!r}" for f in dataclasses.fields(part)
             if not f.repr and getattr(part, f.name) != f.default]
    return repr(part) + ("+" + ",".join(extra) if extra else "")


def drawn_count(rng: random.Random, count: int, spread: int) -> int:
    """`count`, or with a spread a count drawn uniformly from [count - spread, count + spread]. No draw when the
    spread is 0, so the episodes of presets without a spread are unchanged."""
    return rng.randint(count - spread, count + spread) if spread else count
