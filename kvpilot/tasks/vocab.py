"""The bundled model's word-level vocabulary and its tokenizer.json.

One token per word: entity names, colors, digits, variable and node names and the structural words of the
three tasks. The order below is the id order and must never change for a trained model (append only; the
reserved tokens exist so that later fine-tunes, e.g. a memory-management side thread or beacon tokens, can
claim ids without resizing the embedding).
"""
from __future__ import annotations

from pathlib import Path

SPECIAL = ["<bos>", "<eos>", "<pad>", "<unk>"]
NUM_RESERVED = 16
RESERVED = [f"<reserved_{i}>" for i in range(NUM_RESERVED)]

ENTITIES = [f"k{i:02d}" for i in range(100)]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
TOOL_IDS = [f"#{i}" for i in range(32)]
NUMBERS = [str(i) for i in range(64)]
VARIABLES = [f"x{i}" for i in range(1, 33)]
NODES = [f"n{i}" for i in range(64)]
LABELS = ["a", "b", "c", "d"]

STRUCTURAL = [
    # shared
    ".", ";", "ans",
    # multihop
    "Q:", "start", "hops", "report", "end", "and", "color", "of", "<call>", "</call>", "<tool>", "</tool>", "->",
    "error",
    # variables
    "V:", "=", ":=", "sum", "diff", "prod", "ask",
    # graph
    "G:", "steps", "walk",
]

VOCAB: list[str] = SPECIAL + RESERVED + STRUCTURAL + ENTITIES + COLORS + TOOL_IDS + NUMBERS + VARIABLES + NODES + LABELS

BOS, EOS, PAD, UNK = SPECIAL


def token_ids() -> dict[str, int]:
    return {word: i for i, word in enumerate(VOCAB)}


def build_tokenizer(path: str | Path | None = None):
    """A `tokenizers.Tokenizer` over VOCAB (WordLevel, whitespace split; decoding joins words with spaces).

    Writes tokenizer.json to `path` when given. Special and reserved tokens are marked special, so decoding
    with skip_special_tokens hides them; structural words such as `<call>` are ordinary words.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    assert len(set(VOCAB)) == len(VOCAB), "duplicate word in the vocabulary"
    tokenizer = Tokenizer(models.WordLevel(vocab=token_ids(), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL + RESERVED])
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
    return tokenizer
