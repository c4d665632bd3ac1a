"""Tokenizer wrapper (Hugging Face `tokenizers`) with streaming detokenization."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int] | None = None, bos_token_id: int | None = None,
                 adds_bos: bool | None = None):
        self.inner = tokenizer
        self.eos_token_ids = list(eos_token_ids or [])
        self.bos_token_id = bos_token_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Whether a first prompt starts with BOS when the request does not say (see bos_rule); None: when the model
        # has a BOS id (kvpilot's own checkpoints, trained with one).
        self.adds_bos = bos_token_id is not None if adds_bos is None else adds_bos

    @classmethod
    def from_file(cls, path: str | Path, eos_token_ids: list[int] | None = None, bos_token_id: int | None = None) -> "TextTokenizer":
        inner = Tokenizer.from_file(str(path))
        return cls(inner, eos_token_ids, bos_token_id, adds_bos=bos_rule(inner, Path(path).parent, bos_token_id))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.inner.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def detokenizer(self, context_ids: list[int] = ()) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, list(context_ids))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas with `tokenizers`' DecodeStream.

    Decoding token by token would break multi-byte characters (byte-level BPE) and drop the spaces that word-level
    decoders put *between* tokens; DecodeStream decodes a short window that starts a few tokens back, emits only
    what the window added, and holds back an incomplete UTF-8 sequence until the next token completes it. It
    starts from the last few context tokens, so the first generated token gets the space it follows.
    """

    CONTEXT = 4

    def __init__(self, tokenizer: TextTokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(context_ids[-self.CONTEXT:]), skip_special_tokens=True)
        self.text = ""  # everything emitted so far (generated text only)

    def push(self, token_id: int) -> str:
        delta = self.stream.step(self.tokenizer.inner, token_id) or ""
        self.text += delta
        return delta


# A few sentences to train the byte-level BPE of the random-weight default model. Any text would do: the
# random model's output is noise; the tokenizer only has to be real (bytes in, bytes out, special tokens).
_RANDOM_MODEL_CORPUS = """
kvpilot serves long reasoning and agentic generation with a bounded key value cache.
The decoder streams attention statistics to a policy service that decides which cached tokens to evict.
Tool outputs arrive, are read, and later become obsolete; a good policy drops them and keeps what matters.
Question: which document links to the answer? Let us follow the chain one hop at a time.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' "
"""


def build_byte_level_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A small byte-level BPE tokenizer with <|bos|>, <|eos|>, <|pad|> special tokens (ids 0, 1, 2)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_RANDOM_MODEL_CORPUS] * 4, trainer=trainer)
    return tok


def bos_rule(inner: Tokenizer, directory: Path, bos_token_id: int | None) -> bool | None:
    """Does this tokenizer start a prompt with BOS? As transformers decides: tokenizer_config.json's
    `add_bos_token` when it says; otherwise, for a Hugging Face checkpoint (one with a tokenizer_config.json),
    whether tokenizer.json's post-processor adds it (Llama's does, Qwen's does not). None (no tokenizer_config.json,
    kvpilot's own checkpoints): the model's BOS id decides."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    probe = inner.encode("a", add_special_tokens=True).ids
    return bos_token_id is not None and bool(probe) and probe[0] == bos_token_id
