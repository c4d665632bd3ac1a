"""Load and save Hugging Face-format checkpoint directories.

A directory holds config.json, model.safetensors (or shards listed in model.safetensors.index.json),
tokenizer.json and optionally generation_config.json, and optionally the TriAttention calibration measured on
its weights (triattention_calibration.safetensors, decoder_service/calibration.py), which policies that need
`trig_scores` require. Nothing is downloaded: paths only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from decoder_service.calibration import TrigCalibration, load_calibration
from decoder_service.model import ModelConfig, Transformer
from decoder_service.tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: TextTokenizer
    config: ModelConfig
    path: Path
    name: str
    calibration: TrigCalibration | None = None  # TriAttention's query centres, on the model's device
    # Breadcrumbs: the beacon token of a beacon-trained checkpoint (breadcrumbs.json beside it); None otherwise.
    beacon_token_id: int | None = None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    calibration: bool = True) -> LoadedModel:
    """calibration=False skips the TriAttention calibration (`kvpilot calibrate` replaces a stale one)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    hf_config = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_hf_config(hf_config)
    generation = path / "generation_config.json"
    if generation.is_file() and not config.eos_token_ids:
        eos = json.loads(generation.read_text()).get("eos_token_id")
        config.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    state = read_safetensors(path)
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    # Rotary inverse frequencies are computed, not stored: rebuild them on the real device.
    model.model.rotary_emb.__init__(config)
    model.model.rotary_emb.to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    tokenizer = TextTokenizer.from_file(path / "tokenizer.json", eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id)
    calibrated = load_calibration(path, config) if calibration else None  # a stale file is an error
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path, name=path.name,
                       calibration=None if calibrated is None else calibrated.to(device),
                       beacon_token_id=beacon_token(path, tokenizer))


BREADCRUMBS_FILE = "breadcrumbs.json"


def beacon_token(path: Path, tokenizer: TextTokenizer) -> int | None:
    """The beacon token id a beacon-trained checkpoint names in breadcrumbs.json (`{"beacon": "<reserved_1>", ...}`)."""
    file = path / BREADCRUMBS_FILE
    if not file.is_file():
        return None
    beacon = json.loads(file.read_text())["beacon"]
    token = tokenizer.token_to_id(beacon)
    if token is None:
        raise ValueError(f"{file} names the beacon {beacon!r}, which {path / 'tokenizer.json'} does not have")
    return token


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return load_file(single)


def save_checkpoint(model: Transformer, tokenizer_json: str | Path, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write config.json, safetensors (sharded when max_shard_bytes is set) and tokenizer.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if max_shard_bytes is None:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    src = Path(tokenizer_json)
    if src.resolve() != (path / "tokenizer.json").resolve():
        (path / "tokenizer.json").write_bytes(src.read_bytes())
    return path
