"""Token sampling: penalties and min_tokens (`apply_penalties`), then greedy, or temperature, top-k, top-p and
min-p, with a per-request generator (reproducible by seed).

Numerically safe for every temperature the engine accepts: below GREEDY_TEMPERATURE sampling is greedy, the
rest runs in float32 with a max-subtracted softmax, and a logit row that is not a number fails the request
(SamplingError) instead of torch.multinomial raising inside the engine step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from decoder_service.requests import InternalError, SamplingParams, TokenLogprob


class SamplingError(InternalError):
    """The model produced logits that cannot be sampled (NaN): this request ends, others go on."""


NON_FINITE = "the model produced non-finite logits for this sequence; it cannot be sampled"


def unsampleable(logits: Tensor) -> Tensor:
    """Per row of logits [..., V]: a NaN anywhere, or no finite logit at all."""
    return torch.isnan(logits).any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)


def greedy_tokens(logits: Tensor) -> list[int | None]:
    """Greedy picks for a batch of rows [K, V] in one argmax; None where a row cannot be sampled, so that
    request alone fails with the same error `sample_token` raises."""
    logits = logits.float()
    picks = torch.argmax(logits, dim=-1).tolist()
    return [None if bad else pick for pick, bad in zip(picks, unsampleable(logits).tolist())]


def apply_penalties(logits: Tensor, params: SamplingParams, context: list[int], generated: list[int],
                    end_ids: list[int]) -> Tensor:
    """logits [V] -> a new row with the repetition penalty on every token of `context` (prompt, earlier turns
    and generated: HF/vLLM's rule, divide positive logits and multiply negative ones), the presence and
    frequency penalties on the `generated` tokens (OpenAI's rule), and `end_ids` (EOS, stop token ids) masked
    while fewer than `min_tokens` tokens are generated."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0 and context:
        seen = torch.tensor(sorted(set(context)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if len(generated) < params.min_tokens and end_ids:
        logits[torch.tensor(end_ids, device=logits.device)] = float("-inf")
    return logits


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] on any device; the generator must live on the same device."""
    logits = logits.float()
    if bool(unsampleable(logits)):
        raise SamplingError(NON_FINITE)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if bool(torch.isposinf(logits).any()):  # overflowed: the distribution is a point mass on the largest logits
        return int(torch.argmax(logits))
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs_sorted = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it already reaches top_p (the most likely token always stays).
        drop = (probs_sorted.cumsum(-1) - probs_sorted) >= params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:  # the most likely token always stays (its probability is the threshold's base)
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def forced_steps(logits: Tensor, tokens: list[int], top: int = 5) -> list[tuple[float, int, bool] | None]:
    """Teacher forcing (evaluation only): the model's view of forced tokens, for a batch of rows [K, V] at once.

    Per row: (log-probability of the forced token, the greedy pick, whether the forced token is in the top
    `top`); None where the row cannot be sampled (that request fails as a sampled one would)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    forced = torch.tensor(tokens, device=logits.device)
    picked = logprobs.gather(1, forced[:, None])[:, 0].tolist()
    argmax = torch.argmax(logits, dim=-1).tolist()  # the same pick as greedy_tokens
    in_top = (torch.topk(logits, min(top, logits.shape[-1]), dim=-1).indices == forced[:, None]).any(-1).tolist()
    bad = unsampleable(logits).tolist()
    return [None if b else (lp, a, t) for lp, a, t, b in zip(picked, argmax, in_top, bad)]


def token_logprob(logits: Tensor, token: int, top: int) -> TokenLogprob:
    """The picked token's log-probability under `logits` [V] (penalties applied, no temperature) and the `top`
    most likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.shape[-1])) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)
