"""Policy registry: policy name -> scorer class. One scorer per file under policy_service/scorers/."""
from __future__ import annotations

import dataclasses

from kvpilot_protocol.policy import PolicyDescription
from policy_service.scorers.base import Scorer
from policy_service.scorers.breadcrumbs import Breadcrumbs
from policy_service.scorers.cask import CASK
from policy_service.scorers.foresight import Foresight
from policy_service.scorers.full import Full
from policy_service.scorers.golden import Golden
from policy_service.scorers.h2o import H2O
from policy_service.scorers.knorm import Knorm
from policy_service.scorers.random_policy import Random
from policy_service.scorers.rkv import RKV
from policy_service.scorers.sidequest import SideQuest
from policy_service.scorers.snapkv import SnapKV
from policy_service.scorers.streaming_llm import StreamingLLM
from policy_service.scorers.tova import TOVA
from policy_service.scorers.triattention import TriAttention
from policy_service.scorers.vase import VaSE

POLICIES: dict[str, type[Scorer]] = {cls.name: cls for cls in (Full, Random, StreamingLLM, H2O, TOVA, SnapKV, Knorm, RKV, VaSE, CASK,
                                                             TriAttention, Foresight, Golden, SideQuest, Breadcrumbs)}


def available_policies() -> list[str]:
    return sorted(POLICIES)


def serving_policies() -> list[str]:
    """The policies a decoder can serve live: all but the evaluation-only oracles (golden)."""
    return [name for name in available_policies() if not POLICIES[name].eval_only]


def policy_class(name: str) -> type[Scorer]:
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; available: {', '.join(available_policies())}") from None


def make_scorer(name: str, params: dict[str, str] | None = None) -> Scorer:
    """Build a scorer from a policy name and the request's string parameters (raises KeyError/ParameterError)."""
    return policy_class(name).from_params(params)


def describe(scorer: Scorer) -> PolicyDescription:
    """What a decoder needs to know of a built scorer: its statistics and its parameters."""
    cls = type(scorer)
    doc = (cls.__doc__ or "").strip().splitlines()
    return PolicyDescription(policy=cls.name, summary=doc[0] if doc else "", spec=scorer.spec(),
                             parameters=tuple((f.name, type(f.default).__name__, str(getattr(scorer, f.name)))
                                              for f in dataclasses.fields(cls)))
