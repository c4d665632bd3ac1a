"""Token sampling: greedy, temperature, top-k, top-p, with a per-request generator (reproducible by seed)."""
from __future__ import annotations

import torch
from torch import Tensor

from decoder_service.requests import SamplingParams


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] float32 on any device; the generator must live on the same device."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the most likely token always stays).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
