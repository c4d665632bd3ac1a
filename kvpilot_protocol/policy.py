"""What the decoder knows of a policy, and the interface every policy client offers it.

The decoder never builds a scorer. It asks its policy client to `describe(policy, params)`: the answer says
which statistics to compute (a StatsSpec) and validates the parameters; it is cached per (policy, params).
The in-process client (policy_service.local.InProcessPolicy) and the remote one
(decoder_service.remote_policy.RemotePolicy, over `Policy.Describe`) answer alike, so a policy that exists
only on the policy service works end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


# Names a policy may list beside its statistics that ask the decoder for a behaviour, not a tensor: `side_thread`
# (SideQuest) makes the decoder send "turn" and "answer" frames and run the side threads they plan.
CAPABILITIES = frozenset({"side_thread"})


@dataclass(frozen=True)
class StatsSpec:
    """What the decoder must compute for a policy."""

    names: frozenset[str]
    window_queries: int = 0  # queries kept in the ring for window_attention
    decay: float = 0.9  # gamma of decayed_attention
    projection_rank: int = 20  # columns of the Gaussian projection behind kv_projection
    # kv_features: the key/value half of a learned scorer's first linear layer, shipped by the policy once per
    # (policy, params) so the decoder sends 16-wide projections instead of raw keys and values
    # (kvpilot_protocol.features encodes it); model_fingerprint: sha256 of the weights it was trained on.
    feature_weights: bytes = b""
    model_fingerprint: str = ""
    # Breadcrumbs: after every `beacon_interval` generated tokens the decoder feeds the checkpoint's beacon token
    # (input only) and evicts those tokens once the beacon has read them (decoder_service/beacons.py); 0 = none.
    beacon_interval: int = 0


class ParameterError(ValueError):
    """A policy parameter that is unknown or outside its range (the message says which and why)."""


class PolicyRejected(ValueError):
    """The policy is unknown, or its parameters are invalid: the request is answered INVALID_ARGUMENT."""


class PolicyUnavailable(ConnectionError):
    """The policy service could not be asked (down, timed out)."""


@dataclass(frozen=True)
class PolicyDescription:
    policy: str
    summary: str = ""
    spec: StatsSpec = field(default_factory=lambda: StatsSpec(frozenset()))
    parameters: tuple[tuple[str, str, str], ...] = ()  # (name, type, default)
    provisional: bool = False  # made up while the service was unreachable: never cached


FULL = PolicyDescription(policy="full", summary="Keep everything (the reference).")


class PolicyClient(Protocol):
    """In-process clients decide synchronously (`asynchronous = False`, `decide`); remote ones take frames
    with `submit` and hand decisions back through `poll` in a later engine step (`forget` drops one)."""

    asynchronous: bool

    def describe(self, policy: str, params: dict[str, str]) -> PolicyDescription: ...
    def policies(self) -> list[str]: ...
