"""What crosses the decoder -> policy boundary: a statistics frame in, a decision plan out.

The same dataclasses serve the in-process policy and, serialised as raw little-endian tensors, the remote
policy service (policy.proto). Slot indices always refer to the frame's snapshot: slot i of (layer, head) is
the i-th valid slot of that row when the frame was taken; slots are in position order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Statistics a scorer may declare (DESIGN: "only those the active policy declares" are computed).
# Shapes use L layers, H KV heads, Hq query heads, n valid slots.
STATISTICS = {
    "window_attention": "[L, Hq, n] attention of the last `window_queries` queries, averaged over them",
    "last_attention": "[L, Hq, n] attention of the most recent query (TOVA)",
    "cumulative_attention": "[L, H, n] attention received so far, summed over queries and the KV group (H2O)",
    "decayed_attention": "[L, H, n] the same with exponential decay per step (gamma = decay)",
    "key_norm": "[L, H, n] L2 norm of the (post-RoPE) key",
    "value_norm": "[L, H, n] L2 norm of the value",
    "value_range": "[L, H, n] max - min over the value vector's dimensions (VaSE)",
    "key_redundancy": "[L, H, n] R-KV redundancy: softmax over slots of mean cosine similarity to other keys",
    "kv_projection": "[L, H, n, 2] (|k G|^2, |v G|^2) for a Gaussian G [D, r] drawn from the frame's seed (VaSE-DKV)",
    "attention_features": "[L, Hq, n, 6] ForesightKV's attention statistics of the last `window_queries` queries "
                          "per query head: max, min, sum, and the sums over the last 8, 16 and 32",
    "kv_features": "[L, H, n, R] k @ W_key + v @ W_value (post-RoPE key, value) with the policy's weights "
                   "(StatsSpec.feature_weights): a learned scorer's first layer, applied beside the KV",
    "keys_pre_rope_mean": "[n, D] mean over layers and KV heads of L2-normalised pre-RoPE keys (CASK similarity; "
                          "slot i averages every row's slot i: meaningful when all rows hold the same positions)",
    "trig_scores": "[L, Hq, n] TriAttention's raw score of each key per query head, from the model's calibration "
                   "(decoder_service/calibration.py) at the next token's position",
    "future_attention": "[L, H, n] evaluation only (golden): max over the future blocks of `interval` queries "
                        "(from the next position on) of the reference trace's attention to the slot, averaged "
                        "over the block's queries and the KV group (decoder_service/oracle.py)",
    "positions": "[L, H, n] logical position of each slot",
    "token_ids": "[L, H, n] token id at each slot's position",
    "segment_ids": "[L, H, n] tool-output segment index of each slot (-1 outside tool outputs)",
}


@dataclass
class StatsFrame:
    """A snapshot of one sequence's cache, with the statistics its policy asked for."""

    frame_id: int
    session_id: str
    n: int  # valid slots per (layer, KV head) at the snapshot
    keep: int  # slots the plan should keep (protected ones included)
    sinks: int  # slots [0, sinks) are protected
    window: int  # slots [n - window, n) are protected
    num_layers: int
    num_kv_heads: int
    num_heads: int
    step: int  # tokens generated so far
    seed: int  # for stochastic policies: derived from the request seed and the frame id
    stats: dict[str, Tensor] = field(default_factory=dict)
    tool_segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start pos, end pos, index)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the statistics live
    prompt_len: int = 0  # logical positions < prompt_len hold the first turn's prompt (a session's first turn)
    # Side threads (policies that declare `side_thread`; see policy.proto): "" = a compression frame, "turn" = a
    # session turn began, "answer" = the side thread finished with `side_answer` (cut: it ran out of tokens).
    side_event: str = ""
    side_answer: str = ""
    side_cut: bool = False
    turn: int = 0  # the session's turns before this one

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def protected_mask(self, device=None) -> Tensor:
        """[n] bool: sinks and the recent window."""
        mask = torch.zeros(self.n, dtype=torch.bool, device=device or self.device)
        mask[: self.sinks] = True
        if self.window:
            mask[max(0, self.n - self.window):] = True
        return mask

    def generator(self) -> torch.Generator:
        """Seeded from the frame, on the frame's device (a CPU generator cannot drive GPU sampling)."""
        return torch.Generator(device=self.device).manual_seed(self.seed)


@dataclass
class KeepSet:
    """Slots to keep: global [k] (same for every layer and head) or per head [L, H, k]. Sorted ascending."""

    indices: Tensor
    guards: tuple[str, ...] = ()  # regime guards that fired while planning (CASK), reported with the event

    @property
    def per_head(self) -> bool:
        return self.indices.dim() == 3

    @property
    def count(self) -> int:
        return self.indices.shape[-1]


@dataclass
class MergePlanSpec:
    """Global merge plan (CASK): output slot j is the weighted value sum of `groups[j]`, keyed by `anchors[j]`.

    Groups are disjoint, ordered by their smallest source; a kept slot is a group of one."""

    groups: list[list[int]]
    weights: list[list[float]]
    anchors: list[int]
    guards: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.groups)


@dataclass
class SpanDrop:
    """Token ranges [start, end) in logical positions to drop (model-driven policies: obsolete tool outputs)."""

    spans: list[tuple[int, int]]
    guards: tuple[str, ...] = ()


@dataclass
class SideThreadPlan:
    """Run a side thread (SideQuest): fork the session's cache, feed `prompt`, generate greedily up to `max_tokens`
    or `stop`; its text comes back in an "answer" frame. Its tokens never enter the session."""

    prompt: str
    max_tokens: int
    stop: str = ""
    guards: tuple[str, ...] = ()


Plan = KeepSet | MergePlanSpec | SpanDrop | SideThreadPlan


@dataclass
class Decision:
    frame_id: int
    plan: Plan | None  # None: keep everything (nothing worth evicting)
    policy: str
    seed: int = 0
    latency_s: float = 0.0  # time the policy took to plan
    note: str = ""
