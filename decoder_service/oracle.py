"""Golden Eviction's oracle (ForesightKV): the attention a reference trace's *future* queries pay to each key.

Evaluation only. It needs the trace the run is going to produce, so it exists only where a harness knows that
trace (`kvpilot eval` / `bench pareto`: the full-cache greedy reference of the episode; `bench fidelity`: the
teacher-forced reference itself). It is handed to the engine on `GenerationRequest.oracle`, never over gRPC.

What it holds. One full-cache forward over the reference trace x_0 .. x_{T-1} with an explicit softmax gives,
per layer, the attention A^h[t, p] that query t pays to key p. It is reduced as ForesightKV does:
  * over the query heads of each KV group (mean), so it speaks per (layer, KV head) like the cache;
  * over blocks of `block` consecutive queries (mean), the blocks aligned on the request's compression points;
  * a suffix max over blocks: suffix[l, h, j, p] = max over blocks j' >= j of the block mean.

The grid. A bounded sequence is compressed back to `budget` slots whenever it holds budget + interval
(decoder_service/compression.py), so with keep-set plans its compression points are the positions
budget + interval, budget + 2 interval, ...: every position congruent to `budget` modulo `interval`. The
blocks are therefore `interval` queries long and start at positions congruent to `origin = budget % interval`
(the first block, [0, origin), may be shorter).

Which queries count as future. At a compression point `now` (the position of the next token to be fed; the
cache holds positions < now), the queries that will ever read the cache being compressed are those at
positions now, now + 1, ...: the future blocks are the block that starts at `now` (the `interval` queries
that run before the next compression) and every later one. The block just fed (positions now - interval ..
now - 1) does not count: its queries have already attended over the uncompressed cache, so counting it (as
ForesightKV's j >= t does) would only protect keys that no remaining query needs. A slot's score is
`suffix[l, h, j(now), position]`: the largest block-averaged attention any future block pays it. Were `now`
off the grid (a merge plan, input-only tokens), the block containing it counts, its past queries included.

Exactness. The oracle is the reference trace's attention. In teacher-forced replay the run is that trace, so
it is exact; in free generation it is exact only while the golden run follows the reference token for token,
and past the reference's end (or for keys at positions it never had) it has no evidence (score 0).

Memory: L x H x (T / block + 1) x T float32, held as long as the request (4 layers, 6 KV heads, a 2,000-token
trace in blocks of 8: 46 MiB; 6 layers, 2 KV heads, 4,000 tokens: 92 MiB). The forward itself holds one
layer's probabilities for `chunk` query rows at a time ([Hq, chunk, T]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from decoder_service.model import Transformer


@dataclass
class FutureAttention:
    """Per (layer, KV head): the suffix max over query blocks of the reference trace's block-averaged attention."""

    suffix: Tensor  # [L, H, num_blocks, T] float32: max over blocks >= j of the mean attention block j pays key p
    block: int  # queries per block: the request's compression interval
    origin: int  # blocks start at positions congruent to origin modulo block: budget % interval

    @property
    def length(self) -> int:
        """T: the reference trace's positions (queries and keys)."""
        return self.suffix.shape[-1]

    @property
    def num_blocks(self) -> int:
        return self.suffix.shape[2]

    def block_of(self, position: int) -> int:
        """Index of the block that holds `position` (block 0 may be the short [0, origin))."""
        return block_index(position, self.block, self.origin)

    def lookup(self, positions: Tensor, now: int) -> Tensor:
        """`future_attention` of the cached slots at the compression point `now`: [L, H, n] float32.

        positions: [L, H, n] the slots' logical positions. Slots at positions the reference never had, and
        every slot once `now` is past the reference's end, score 0 (no evidence)."""
        L, H, _ = positions.shape
        if (L, H) != tuple(self.suffix.shape[:2]):
            raise ValueError(f"the oracle is for {tuple(self.suffix.shape[:2])} (layers, KV heads), the cache has "
                             f"{(L, H)}: it was computed on another model")
        j = self.block_of(now)
        if j >= self.num_blocks:
            return torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
        row = self.suffix[:, :, j].to(positions.device)  # [L, H, T]
        known = positions < self.length
        scores = torch.gather(row, 2, positions.clamp(max=self.length - 1).long())
        return scores.masked_fill(~known, 0.0)

    def matches(self, interval: int, budget: int) -> bool:
        """Whether the grid is the one a request compressing every `interval` back to `budget` uses."""
        return self.block == interval and self.origin == budget % interval


def block_index(position, block: int, origin: int):
    """Block of a position (int or tensor) on the grid of `block`-long blocks starting at origin + k * block."""
    return (position + (block - origin) % block) // block


class BlockAttentionRecorder:
    """An `AttentionFn` (decoder_service.model) with an explicit float32 softmax that records, per layer, the
    block-averaged attention over the KV group [H, num_blocks, T] and returns the attention output as usual.

    Query rows are processed `chunk` at a time, so at most [Hq, chunk, T] probabilities exist at once."""

    def __init__(self, length: int, block: int, origin: int, chunk: int = 256):
        self.block, self.origin, self.chunk = block, origin, chunk
        self.blocks = block_index(torch.arange(length), block, origin)  # [T] block of each query row
        self.num_blocks = int(self.blocks[-1]) + 1 if length else 0
        self.per_layer: dict[int, Tensor] = {}

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.shape[0] != 1:
            raise ValueError("the oracle forward takes one trace (batch 1)")
        hq, h, d = q.shape[2], k.shape[2], q.shape[3]
        group = hq // h
        t = q.shape[1]
        qf = q[0].transpose(0, 1).float()  # [Hq, T, D]
        kf = k[0].transpose(0, 1).float().repeat_interleave(group, dim=0)  # [Hq, T, D]
        vf = v[0].transpose(0, 1).float().repeat_interleave(group, dim=0)
        blocks = self.blocks.to(q.device)
        sums = torch.zeros(h, self.num_blocks, t, dtype=torch.float32, device=q.device)
        out = torch.empty_like(qf)
        keys = torch.arange(t, device=q.device)
        for start in range(0, t, self.chunk):
            rows = torch.arange(start, min(t, start + self.chunk), device=q.device)
            scores = torch.matmul(qf[:, rows], kf.transpose(-1, -2)) / math.sqrt(d)  # [Hq, c, T]
            scores = scores.masked_fill(keys[None, None, :] > rows[None, :, None], float("-inf"))  # causal
            probs = torch.softmax(scores, dim=-1)
            out[:, rows] = torch.matmul(probs, vf)
            grouped = probs.view(h, group, len(rows), t).mean(dim=1)  # [H, c, T]: mean over the KV group
            sums.index_add_(1, blocks[rows], grouped)  # sum each block's queries
        counts = torch.bincount(blocks, minlength=self.num_blocks).clamp(min=1).to(sums.dtype)
        self.per_layer[layer] = sums / counts[None, :, None]  # block means
        return out.transpose(0, 1)[None].to(q.dtype)


def suffix_max(block_means: Tensor) -> Tensor:
    """Max over blocks j' >= j along dim -2 (the block axis of [..., num_blocks, T])."""
    flipped = torch.flip(block_means, dims=[-2])
    return torch.flip(torch.cummax(flipped, dim=-2).values, dims=[-2])


@torch.inference_mode()
def future_attention(model: Transformer, token_ids: list[int], block: int, origin: int = 0,
                     chunk: int = 256) -> FutureAttention:
    """The oracle of a reference trace: one full-cache forward over `token_ids` (positions 0 .. T-1, <bos>
    included) with an explicit softmax, reduced layer by layer (see the module docstring)."""
    if block < 1 or not 0 <= origin < block:
        raise ValueError(f"blocks of {block} queries starting at {origin} (mod {block}): need block >= 1, "
                         "0 <= origin < block")
    if not token_ids:
        raise ValueError("the reference trace is empty")
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    recorder = BlockAttentionRecorder(len(token_ids), block, origin, chunk)
    last = torch.tensor([len(token_ids) - 1], device=device)  # logits are not needed: compute one row only
    model(ids, torch.arange(len(token_ids), device=device)[None], recorder, logits_at=last)
    layers = [suffix_max(recorder.per_layer.pop(i)) for i in range(model.config.num_layers)]
    return FutureAttention(suffix=torch.stack(layers), block=block, origin=origin)


def reference_oracle(model: Transformer, trace: list[int], interval: int, budget: int) -> FutureAttention:
    """The oracle for a request compressing every `interval` tokens back to `budget`, from the reference trace
    it will follow (<bos> first). The trace's last token is sampled but never fed, so its query never runs:
    the forward covers trace[:-1]."""
    return future_attention(model, trace[:-1] if len(trace) > 1 else trace, block=interval, origin=budget % interval)
