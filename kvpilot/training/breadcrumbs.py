"""Breadcrumbs training: where beacons go in a sequence and the block attention mask they are trained with.

A sequence is the prompt, then the model-written stream with a beacon after every c of its tokens (the beacon is
input only: it takes a position, but is never a target). Each token sees the prompt, the earlier beacons and its
own window (the tokens since the last beacon); a beacon sees the prompt, the earlier beacons and its window (the c
tokens before it). decoder_service/beacons.py reproduces this at run time by evicting each window once its beacon
has read it, and tests/test_breadcrumbs.py checks that the two give the same logits.

[INFERRED] Where the method notes are silent: no beacon after a window whose last token ends the sequence (at run
time the sequence is over before a beacon would be fed); the beacon's embedding starts as the mean of the
vocabulary's embeddings (a neutral point that reads as no particular word); tool outputs are not chunked (the
runtime folds generated tokens only), so the single-pass tasks (variables, graph) are where it applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BEACON = "<reserved_1>"  # claimed from the bundled vocabulary's reserved ids (SideQuest's trigger is <reserved_0>)


def insert_beacons(ids: list[int], prompt_len: int, c: int, beacon: int) -> tuple[list[int], list[bool]]:
    """`ids` with a beacon after every c tokens past the first `prompt_len` (none after a final full window).
    Returns the new ids and, per position, whether it is a beacon."""
    out, is_beacon = list(ids[:prompt_len]), [False] * prompt_len
    stream = ids[prompt_len:]
    for i, token in enumerate(stream, start=1):
        out.append(token)
        is_beacon.append(False)
        if i % c == 0 and i < len(stream):
            out.append(beacon)
            is_beacon.append(True)
    return out, is_beacon


def block_mask(is_beacon: list[bool], prompt_len: int) -> Tensor:
    """[T, T] bool, True where query i may attend key j: j <= i and (j in the prompt, or j a beacon, or j in i's
    window). A window is the run of tokens after the prompt between two beacons; a beacon belongs to the window
    it closes."""
    flags = torch.tensor(is_beacon, dtype=torch.bool)
    before = torch.cumsum(flags.long(), 0) - flags.long()  # beacons strictly before each position
    t = len(is_beacon)
    index = torch.arange(t)
    causal = index[None, :] <= index[:, None]
    prompt = index[None, :] < prompt_len
    same_window = (before[None, :] == before[:, None]) & (index[None, :] >= prompt_len)
    return causal & (prompt | flags[None, :] | same_window)


def masked_attention(mask: Tensor):
    """An AttentionFn (decoder_service.model) over the batch's own tokens with an explicit mask: [T, T] or
    [B, T, T] (True = may attend)."""
    def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        group = q.shape[2] // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        m = mask[None, None] if mask.dim() == 2 else mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m.to(q.device), enable_gqa=group > 1)
        return out.transpose(1, 2)
    return attention
