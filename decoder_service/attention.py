"""Attention over the KV pool for one engine step, and the per-slot statistics it feeds.

The engine flattens every scheduled sequence's new tokens into one [1, N] batch. For each layer the model
hands over post-RoPE q/k/v of all N tokens; `PoolAttention` splits them back per sequence, writes the new
keys/values into the sequence's pool region and attends over its valid slots. Attention probabilities are
computed explicitly (not with a fused kernel) so that statistics can be read off them; the same arithmetic
runs whether or not a policy asks for statistics, so compression-free runs are bit-identical either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from decoder_service.kv_pool import SequenceKV

if TYPE_CHECKING:
    from decoder_service.statistics import SequenceStatistics


@dataclass
class Segment:
    """The slice [start, start + length) of the flat step batch that belongs to one sequence."""

    kv: SequenceKV
    stats: "SequenceStatistics | None"
    start: int
    length: int
    positions: Tensor  # [length] logical positions of the new tokens


class PoolAttention:
    """The `attention` callable the model gets during an engine step."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        for seg in self.segments:
            rows = slice(seg.start, seg.start + seg.length)
            seg.kv.write(layer, k[0, rows], v[0, rows])
            n_total = seg.kv.n + seg.length
            o, probs = attend(q[0, rows], seg.kv.k[layer, :, :n_total], seg.kv.v[layer, :, :n_total], seg.kv.n)
            if seg.stats is not None:
                seg.stats.observe(layer, q[0, rows], probs, seg.positions)
            out[0, rows] = o
        return out


def attend(q: Tensor, keys: Tensor, values: Tensor, n_prev: int) -> tuple[Tensor, Tensor]:
    """Causal attention of T new queries over S = n_prev + T slots (the new tokens are the last T).

    q: [T, Hq, D]; keys, values: [H, S, D]. Returns out [T, Hq, D] and probs [H, G*T, S] (float32),
    rows ordered (group head, query).
    """
    t, hq, d = q.shape
    h, s, _ = keys.shape
    g = hq // h
    qh = q.view(t, h, g, d).permute(1, 2, 0, 3).reshape(h, g * t, d).float()
    scores = torch.matmul(qh, keys.float().transpose(1, 2)) * (1.0 / math.sqrt(d))  # [H, G*T, S]
    if t > 1:
        # Query i (row r = group * T + i) sees the old slots and the new tokens up to itself.
        query_index = torch.arange(g * t, device=q.device) % t
        visible = torch.arange(s, device=q.device)[None, :] <= (n_prev + query_index)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float())  # [H, G*T, D]
    out = out.view(h, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d).to(q.dtype)
    return out, probs
