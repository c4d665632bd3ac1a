"""Attention over the paged KV pool for one engine step: one call per layer for every sequence in the step.

The engine flattens every scheduled sequence's new tokens (decode tokens and prefill chunks alike) into one
[1, N] batch. `PoolAttention` is built once per step: it knows where each sequence's new tokens go (physical
slots, through its block table) and which physical slots each sequence reads. For each layer the model hands
over post-RoPE q/k/v of all N tokens; the call

  1. writes the N new keys/values into the pool with one indexed store,
  2. gathers every sequence's slots through its block table into a padded [B, H, S, D] batch,
  3. attends once for the whole batch (a masked dense op: invariant 4 gives every row of a sequence the same
     valid count, so only the sequence length and causality are masked),
  4. feeds the sequences whose policy keeps carried statistics.

Sequences are split into sub-batches by two questions. Does the policy keep cumulative/decayed attention
(explicit float32 probabilities, read by its statistics) or not (`scaled_dot_product_attention`)? Is it a
decode token or a prefill chunk (a decode token is never padded to a chunk's length)? Statistics are fed only
once the whole forward has succeeded, so a batch retried sequence by sequence counts nobody twice. On a GPU, a step of decode tokens only runs the Triton paged decode kernel
(kernels.paged_decode_attention), which reads the pool through the block tables and fuses the statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

import kvpilot_kernels as kernels
from decoder_service.kv_pool import KVPool, SequenceKV

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

    @property
    def needs_probabilities(self) -> bool:
        return self.stats is not None and self.stats.needs_probabilities


class _Group:
    """Index tensors of one padded sub-batch [B sequences, T_max queries, S_max slots], shared by every layer."""

    def __init__(self, segments: list[Segment], device: torch.device):
        self.segments = segments
        b = len(segments)
        self.t_max = t_max = max(s.length for s in segments)
        self.lengths = [s.kv.n + s.length for s in segments]  # slots each sequence reads (new tokens included)
        self.s_max = s_max = max(self.lengths)
        # Physical slots each sequence reads, padded with the pool's zero slot (masked out; never another
        # sequence's data, so a fault in one cannot reach the others): one index_select per layer.
        maps = [seg.kv.slot_map[:length] for seg, length in zip(segments, self.lengths)]
        pad = segments[0].kv.pool.pad_slot
        self.gather = torch.nn.utils.rnn.pad_sequence(maps, batch_first=True, padding_value=pad).reshape(-1)
        # Each (sequence, query) of the padded batch; padded queries repeat the sequence's last one.
        queries = [(seg, min(t, seg.length - 1)) for seg in segments for t in range(t_max)]
        self.rows = torch.tensor([seg.start + q for seg, q in queries], dtype=torch.long, device=device)  # flat rows
        # Query t sees the old slots and the new tokens up to itself (invariant 4: no per-head mask needed).
        last_visible = torch.tensor([seg.kv.n + q for seg, q in queries], device=device).view(b, t_max, 1)
        self.visible = torch.arange(s_max, device=device).view(1, 1, s_max) <= last_visible  # [B, T_max, S_max]
        real = [i * t_max + t for i, seg in enumerate(segments) for t in range(seg.length)]
        self.real = torch.tensor(real, dtype=torch.long, device=device)  # padded-batch rows that are real queries
        self.out_rows = self.rows.index_select(0, self.real)  # their rows in the flat step batch


class PoolAttention:
    """The `attention` callable the model gets during an engine step."""

    def __init__(self, segments: list[Segment], pool: KVPool, use_kernel: bool | None = None):
        self.segments, self.pool = segments, pool
        device = pool.device
        for seg in segments:
            seg.kv.prepare_append(seg.length)
        self.write_slots = torch.cat([seg.kv.write_slots(seg.length) for seg in segments])
        # Logical positions of the new tokens, written once for every (layer, head) row; they become valid
        # when the engine advances each sequence after the forward (nothing is valid if it fails).
        new_positions = torch.cat([seg.positions for seg in segments]).to(pool.positions.device)
        pool.positions.index_copy_(2, self.write_slots, new_positions.expand(*pool.positions.shape[:2], -1))
        decode_only = all(s.length == 1 for s in segments)
        if use_kernel is None:
            use_kernel = decode_only and kernels.use_triton(pool.k)
        self.use_kernel = use_kernel and decode_only
        if self.use_kernel:
            self._prepare_kernel(device)
            self.groups = []
        else:
            # Sub-batches by (probabilities needed, decode or prefill): padding a decode token to a prefill
            # chunk's length would multiply its work (and memory) by the chunk length.
            buckets: dict[tuple[bool, bool], list[Segment]] = {}
            for seg in segments:
                buckets.setdefault((seg.needs_probabilities, seg.length == 1), []).append(seg)
            self.groups = [(members, _Group(members, device), explicit)
                           for (explicit, _), members in buckets.items()]
        # Statistics are observed after the whole forward succeeded (`apply_statistics`): a batch that fails
        # and is retried sequence by sequence must not count any sequence's attention twice.
        self.observations: list[tuple] = []

    def _prepare_kernel(self, device: torch.device) -> None:
        tables = [s.kv.blocks[:self.pool.blocks_for(s.kv.n + 1)] for s in self.segments]
        width = max(len(t) for t in tables)
        pad = self.pool.num_blocks  # the pool's zero block (masked by seq_lens anyway)
        self.block_tables = torch.tensor([t + [pad] * (width - len(t)) for t in tables], dtype=torch.int32,
                                         device=device)
        self.seq_lens = torch.tensor([s.kv.n + 1 for s in self.segments], dtype=torch.int32, device=device)
        self.kernel_stats = any(s.needs_probabilities for s in self.segments)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool = self.pool
        pool.k[layer].index_copy_(1, self.write_slots, k[0].transpose(0, 1).to(pool.dtype))
        pool.v[layer].index_copy_(1, self.write_slots, v[0].transpose(0, 1).to(pool.dtype))
        if self.use_kernel:
            return self._kernel_call(layer, q)
        out = torch.empty_like(q[0])
        for members, group, explicit in self.groups:
            o, probs = self._attend(layer, q[0], group, explicit)
            out.index_copy_(0, group.out_rows, o.reshape(-1, *o.shape[2:]).index_select(0, group.real))
            for i, seg in enumerate(members):
                if seg.stats is not None:
                    attention = None
                    if probs is not None:
                        attention = probs[i, :, :, :seg.length, :group.lengths[i]].sum(dim=1)  # [H, T, S]
                    self.observations.append((seg.stats, layer, q[0, seg.start:seg.start + seg.length], attention,
                                              seg.positions))
        return out.unsqueeze(0)

    def _attend(self, layer: int, q: Tensor, group: _Group, explicit: bool) -> tuple[Tensor, Tensor | None]:
        """Attention of one padded sub-batch: out [B, T, Hq, D]; with `explicit`, probabilities [B, H, G, T, S]."""
        pool = self.pool
        h, d = pool.num_kv_heads, pool.head_dim
        b, t, s = len(group.segments), group.t_max, group.s_max
        # index_select, not advanced indexing: several times faster on the CPU for this gather.
        keys = pool.k[layer].index_select(1, group.gather).view(h, b, s, d).transpose(0, 1)  # [B, H, S, D]
        values = pool.v[layer].index_select(1, group.gather).view(h, b, s, d).transpose(0, 1)
        queries = q.index_select(0, group.rows).view(b, t, -1, d)  # [B, T, Hq, D]
        hq = queries.shape[2]
        g = hq // h
        if not explicit:
            qh = queries.transpose(1, 2)  # [B, Hq, T, D]
            out = F.scaled_dot_product_attention(qh, keys.to(qh.dtype), values.to(qh.dtype),
                                                 attn_mask=group.visible[:, None], enable_gqa=g > 1)
            return out.transpose(1, 2), None
        qh = queries.view(b, t, h, g, d).permute(0, 2, 3, 1, 4).reshape(b, h, g * t, d).float()
        scores = torch.matmul(qh, keys.float().transpose(-1, -2)) * (1.0 / math.sqrt(d))  # [B, H, G*T, S]
        mask = group.visible[:, None, None].expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.matmul(probs, values.float())  # [B, H, G*T, D]
        out = out.view(b, h, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d).to(queries.dtype)
        return out, probs.view(b, h, g, t, s)

    def _kernel_call(self, layer: int, q: Tensor) -> Tensor:
        pool = self.pool
        out, attention = kernels.paged_decode_attention(
            q[0], pool.k[layer], pool.v[layer], self.block_tables, self.seq_lens, pool.block_size,
            with_stats=self.kernel_stats)
        for i, seg in enumerate(self.segments):
            if seg.stats is not None:
                summed = attention[i, :, None, :seg.kv.n + 1] if seg.needs_probabilities else None  # [H, 1, S]
                self.observations.append((seg.stats, layer, q[0, seg.start:seg.start + 1], summed, seg.positions))
        return out.unsqueeze(0)

    def apply_statistics(self) -> None:
        """Feed the step's attention to the sequences' statistics, once the whole forward has succeeded."""
        for stats, layer, q, attention, positions in self.observations:
            stats.observe(layer, q, attention, positions)
        self.observations.clear()


def attend(q: Tensor, keys: Tensor, values: Tensor, n_prev: int) -> tuple[Tensor, Tensor]:
    """Reference: causal attention of T new queries over S = n_prev + T dense slots (the new tokens last).

    q: [T, Hq, D]; keys, values: [H, S, D]. Returns out [T, Hq, D] and probs [H, G*T, S] (float32), rows
    ordered (group head, query). Tests compare the batched paged path against it."""
    t, hq, d = q.shape
    h, s, _ = keys.shape
    g = hq // h
    qh = q.view(t, h, g, d).permute(1, 2, 0, 3).reshape(h, g * t, d).float()
    scores = torch.matmul(qh, keys.float().transpose(1, 2)) * (1.0 / math.sqrt(d))  # [H, G*T, S]
    if t > 1:
        query_index = torch.arange(g * t, device=q.device) % t
        visible = torch.arange(s, device=q.device)[None, :] <= (n_prev + query_index)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float())  # [H, G*T, D]
    out = out.view(h, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d).to(q.dtype)
    return out, probs
