"""A small greedy evaluator for the bundled model, independent of the serving engine.

It runs one episode at a time around `Transformer` with a plain growing KV cache: prefill the prompt,
decode greedily, and when the model's turn ends on a stop string (`</call>`) append the environment's
`tool_response` and keep going, until `<eos>` or a token limit. Used for accuracy checks during training and
in the bundled-model test; the engine-based harness is the reference for policy comparisons. Both return
kvpilot.agent's EpisodeResult, so their outcomes compare field by field.

`window` simulates a StreamingLLM cache (attention sinks + a recent window) with an attention mask:
every query, prompt and tool tokens included, sees only the first `sinks` positions and the most recent
ones, as if everything else had been evicted as it fell out of the window. Positions are never shifted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from decoder_service.model import Transformer
from decoder_service.tokenizer import TextTokenizer
from kvpilot.agent import EpisodeResult
from kvpilot.tasks import Episode, make_episode

EOS_WORD = "<eos>"


@dataclass(frozen=True)
class Window:
    """Keep `sinks` first tokens plus the most recent tokens, `budget` tokens in all."""

    budget: int
    sinks: int = 4

    @classmethod
    def fraction_of(cls, episode: Episode, fraction: float, sinks: int = 4) -> "Window":
        total = episode.num_words + 1  # + <bos>
        return cls(budget=max(sinks + 1, math.ceil(fraction * total)), sinks=sinks)


class CachedAttention:
    """AttentionFn with a per-layer KV cache (keys after RoPE) and an optional sink+window mask."""

    def __init__(self, num_layers: int, window: Window | None = None):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.window = window
        self.key_positions = torch.empty(0, dtype=torch.long)
        self.query_positions = torch.empty(0, dtype=torch.long)
        self.mask: Tensor | None = None

    def begin(self, positions: Tensor) -> None:
        """Call once before each forward with the new tokens' positions [T]; builds the shared mask."""
        self.query_positions = positions
        self.key_positions = torch.cat([self.key_positions, positions])
        q, k = positions[:, None], self.key_positions[None, :]
        mask = k <= q
        if self.window is not None:
            recent = self.window.budget - self.window.sinks
            mask &= (k < self.window.sinks) | (k > q - recent)
        self.mask = mask

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [1, T, Hq, D]; k, v: [1, T, Hkv, D]
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v], dim=1)
        keys, values = self.keys[layer], self.values[layer]
        group = q.shape[2] // keys.shape[2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask, enable_gqa=group > 1,
        )
        return out.transpose(1, 2)


@torch.no_grad()
def run_episode(
    model: Transformer,
    tokenizer: TextTokenizer,
    episode: Episode,
    window: Window | None = None,
    max_new_tokens: int | None = None,
) -> EpisodeResult:
    eos_ids = set(tokenizer.eos_token_ids) or {tokenizer.token_to_id(EOS_WORD)}
    if max_new_tokens is None:
        max_new_tokens = episode.generation_limit
    cache = CachedAttention(model.config.num_layers, window)
    position = 0

    def feed(ids: list[int]) -> Tensor:
        nonlocal position
        positions = torch.arange(position, position + len(ids))
        cache.begin(positions)
        logits = model(torch.tensor([ids]), positions[None], attention=cache, logits_at=torch.tensor([len(ids) - 1]))
        position += len(ids)
        return logits[0]

    logits = feed(tokenizer.encode(episode.prompt, add_bos=True))
    words: list[str] = []
    turn: list[str] = []
    turns = 1
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos_ids:
            break
        word = tokenizer.inner.id_to_token(token)
        words.append(word)
        turn.append(word)
        turn_text = " ".join(turn)
        if any(turn_text.endswith(stop) for stop in episode.stop_strings):
            reply = episode.tool_response(turn_text)
            turn = []
            if reply is not None:
                turns += 1
                logits = feed([token] + tokenizer.encode(reply))
                continue
        logits = feed([token])
    text = " ".join(words)
    return EpisodeResult(episode, text=text, correct=episode.is_correct(text),
                         answered=episode.extract_answer(text) is not None, turns=turns, total_tokens=position,
                         generated_tokens=len(words))


def count_correct(
    model: Transformer,
    tokenizer: TextTokenizer,
    task: str,
    seeds: range | list[int],
    difficulty: str = "default",
    window_fraction: float | None = None,
    sinks: int = 4,
) -> int:
    """Greedy exact matches over the given seeds."""
    correct = 0
    for seed in seeds:
        episode = make_episode(task, seed, difficulty)
        window = Window.fraction_of(episode, window_fraction, sinks) if window_fraction is not None else None
        correct += run_episode(model, tokenizer, episode, window).correct
    return correct
