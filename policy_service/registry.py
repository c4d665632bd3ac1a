"""Policy registry: policy name -> scorer class. One scorer per file under policy_service/scorers/."""
from __future__ import annotations

from policy_service.scorers.full import Full

POLICIES: dict[str, type] = {cls.name: cls for cls in (Full,)}


def available_policies() -> list[str]:
    return sorted(POLICIES)


def policy_class(name: str) -> type:
    try:
        return POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; available: {', '.join(available_policies())}") from None
