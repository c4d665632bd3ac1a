"""variables: evaluate a program of single-digit assignments (mod 10) in order; a single-pass trace.

Variables are x1, x2, ... in program order. The first few are constants; every later one combines two random
EARLIER variables (any of them, not only recent ones), so an early binding can be needed again late:
`x3 diff x2 x1` is x3 = x2 - x1 (mod 10), `x4 sum x1 x3` is x4 = x1 + x3. The trace copies each statement,
looks up its operands by their bindings (`x2 := 7`: the value is whatever follows the unique pair `x2 :=`),
and writes the new binding:

    prompt  V: x1 = 3 ; x2 = 5 ; x3 diff x2 x1 ; x4 sum x1 x3 ; ask x4 .
    model   x1 = 3 ; x1 := 3 ; x2 = 5 ; x2 := 5 ; x3 diff x2 x1 ; x2 := 5 x1 := 3 x3 := 2 ;
            x4 sum x1 x3 ; x1 := 3 x3 := 2 x4 := 5 ; ans 5

The operator word comes right after the target, so every word of a statement follows a context of at most two
words that identifies it (`x3` -> its operator, `x3 diff` -> first operand, `diff x2` -> second operand).
With `x3 = x2 - x1` the operator sits three words after the only unique context and a small model guesses it.

The `long` difficulty (v2) is the same task with 68-92 statements (~1,350-1,800 tokens): past x32 the
variables continue with the entity words k00, k01, ... (`NAMES`; the vocabulary has no x33), so no new token
is needed. Every name is still bound once, and operands are still drawn from all earlier variables.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvpilot.tasks.base import Episode, drawn_count, episode_rng
from kvpilot.tasks.vocab import ENTITIES, VARIABLES

TASK = "variables"
NAMES = VARIABLES + ENTITIES  # x1..x32, then k00..k99 (long programs only: v1 presets stay within x1..x32)
OPS = {"sum": lambda a, b: (a + b) % 10, "diff": lambda a, b: (a - b) % 10, "prod": lambda a, b: (a * b) % 10}


@dataclass(frozen=True)
class VariablesParams:
    statements: int
    constants: int = 2
    ops: tuple[str, ...] = ("sum", "diff")
    # Added for v2; repr=False keeps the RNG seeds of the v1 presets (see base.rng_key).
    spread: int = field(default=0, repr=False)  # statements drawn from [statements - spread, statements + spread]


DIFFICULTIES = {
    "easy": VariablesParams(statements=6),
    "default": VariablesParams(statements=12),
    "hard": VariablesParams(statements=24, constants=3),
    "long": VariablesParams(statements=80, constants=4, spread=12),
}


def generate(seed: int, difficulty: str = "default", **knobs) -> Episode:
    params = resolve(difficulty, knobs)
    rng = episode_rng(TASK, seed, params)
    names = NAMES[: drawn_count(rng, params.statements, params.spread)]
    value: dict[str, int] = {}
    statements, trace = [], []
    for k, name in enumerate(names):
        if k < params.constants:
            value[name] = rng.randrange(10)
            statements.append(f"{name} = {value[name]}")
            trace.append(f"{name} = {value[name]} ; {name} := {value[name]} ;")
            continue
        left, right = rng.sample(names[:k], 2)
        op = rng.choice(params.ops)
        value[name] = OPS[op](value[left], value[right])
        statements.append(f"{name} {op} {left} {right}")
        trace.append(
            f"{name} {op} {left} {right} ; {left} := {value[left]} {right} := {value[right]} {name} := {value[name]} ;"
        )
    last = names[-1]
    answer = str(value[last])
    prompt = "V: " + " ; ".join(statements) + f" ; ask {last} ."
    return Episode(
        task=TASK, seed=seed, difficulty=difficulty, prompt=prompt,
        reference=[("model", " ".join(trace) + f" ans {answer}")], answer=answer, stop_strings=[],
    )


def resolve(difficulty: str, knobs: dict) -> VariablesParams:
    base = DIFFICULTIES[difficulty]
    params = VariablesParams(**{**base.__dict__, **knobs})
    if not (0 <= params.spread and 1 <= params.constants
            and params.constants + 1 <= params.statements - params.spread
            and params.statements + params.spread <= len(NAMES)):
        raise ValueError(f"bad variables parameters {params}")
    if params.constants < 2 and params.statements > params.constants:
        raise ValueError("variables needs at least two constants to draw two distinct operands")
    if isinstance(params.ops, str) or not params.ops or any(op not in OPS for op in params.ops):
        raise ValueError(f"operators must be a tuple of {sorted(OPS)}, got {params.ops!r}")
    return params
