"""Which model a command runs: a checkpoint path, the bundled reasoner, or the project's random-weight model."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
# Checkpoints shipped with the package, by the short name `--model` accepts.
BUNDLED_MODELS = {"reasoner": ASSETS / "reasoner",  # v1: 6 heads over 6 KV heads, the earlier tables' model
                  "reasoner-v2": ASSETS / "reasoner-v2",  # grouped-query attention, long traces: the default
                  "reasoner-v2-sidequest": ASSETS / "reasoner-v2-sidequest",  # v2 fine-tuned for SideQuest
                  "reasoner-v2-breadcrumbs": ASSETS / "reasoner-v2-breadcrumbs",  # v2 + beacons, any c of 4/8/16
                  # Breadcrumbs students trained at one c each (the variable-c one above, trained further at that c)
                  **{f"reasoner-v2-breadcrumbs-c{c}": ASSETS / f"reasoner-v2-breadcrumbs-c{c}" for c in (4, 8, 16)},
                  # the variable-c student after Breadcrumbs' RL + distillation stage
                  "reasoner-v2-breadcrumbs-rl": ASSETS / "reasoner-v2-breadcrumbs-rl"}
DEFAULT_MODEL_NAME = "reasoner-v2"
BUNDLED_MODEL = BUNDLED_MODELS[DEFAULT_MODEL_NAME]  # what a command runs without --model
CACHE_DIR = Path(os.environ.get("KVPILOT_HOME", Path.home() / ".cache" / "kvpilot"))


def default_model_path() -> Path:
    """The bundled default model (reasoner v2) when present, else a small random-weight model made on first use."""
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    return ensure_random_model(CACHE_DIR / "random-llama-tiny")


def resolve_model(model: str | Path | None) -> Path:
    """`--model`: a checkpoint directory, a bundled model's short name (`reasoner-v2`, v1's `reasoner`, ...), or
    None for the default (reasoner-v2). A directory of that name in the working directory wins over the bundled one."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model)
    if not path.exists() and str(model) in BUNDLED_MODELS:
        return BUNDLED_MODELS[str(model)]
    return path


def ensure_random_model(path: Path, seed: int = 0) -> Path:
    """Create (once) a small Llama-architecture model with random weights and a byte-level BPE tokenizer.

    Same seed, same weights: the random model is part of the project, not a download."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    from decoder_service.checkpoint import save_checkpoint
    from decoder_service.model import ModelConfig, Transformer
    from decoder_service.tokenizer import build_byte_level_tokenizer

    tokenizer = build_byte_level_tokenizer(vocab_size=512)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0,
        bos_token_id=tokenizer.token_to_id("<|bos|>"), eos_token_ids=[tokenizer.token_to_id("<|eos|>")],
    )
    torch.manual_seed(seed)
    model = Transformer(config).init_random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so concurrent first runs never see half a checkpoint.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    tokenizer.save(str(tmp / "tokenizer.json"))
    save_checkpoint(model, tmp / "tokenizer.json", tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        pass
    return path
