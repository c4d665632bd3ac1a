"""variables: evaluate a program of single-digit assignments (mod 10) in order; a single-pass trace.

Variables are x1, x2, ... in program order. The first few are constants; every later one combines two random
EARLIER variables (any of them, not only recent ones), so an early binding can be needed again late. The trace
copies each statement, looks up its operands by their bindings (`x2 := 7`: the value is whatever follows
the unique pair `x2 :=`), and writes the new binding:

    prompt  V: x1 = 3 ; x2 = 5 ; x3 = x2 - x1 ; x4 = x1 + x3 ; ask x4 .
    model   x1 = 3 ; x1 := 3 ; x2 = 5 ; x2 := 5 ; x3 = x2 - x1 ; x2 := 5 x1 := 3 x3 := 2 ;
            x4 = x1 + x3 ; x1 := 3 x3 := 2 x4 := 5 ; ans 5
"""
from __future__ import annotations

from dataclasses import dataclass

from kvpilot.tasks.base import Episode, episode_rng
from kvpilot.tasks.vocab import VARIABLES

TASK = "variables"
OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}


@dataclass(frozen=True)
class VariablesParams:
    statements: int
    constants: int = 2
    ops: str = "+-"


DIFFICULTIES = {
    "easy": VariablesParams(statements=6),
    "default": VariablesParams(statements=12),
    "hard": VariablesParams(statements=24, constants=3),
}


def generate(seed: int, difficulty: str = "default", **knobs) -> Episode:
    params = resolve(difficulty, knobs)
    rng = episode_rng(TASK, seed, params)
    names = VARIABLES[: params.statements]
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
        statements.append(f"{name} = {left} {op} {right}")
        trace.append(
            f"{name} = {left} {op} {right} ; {left} := {value[left]} {right} := {value[right]} {name} := {value[name]} ;"
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
    if not (1 <= params.constants and params.constants + 1 <= params.statements <= len(VARIABLES)):
        raise ValueError(f"bad variables parameters {params}")
    if params.constants < 2 and params.statements > params.constants:
        raise ValueError("variables needs at least two constants to draw two distinct operands")
    if not params.ops or any(op not in OPS for op in params.ops):
        raise ValueError(f"unknown operator in {params.ops!r}")
    return params
