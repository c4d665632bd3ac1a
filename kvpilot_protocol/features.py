"""The weights behind the `kv_features` statistic, as they travel in a policy description.

A learned scorer whose first layer is linear in [key, value, statistics] (ForesightKV's fc1) splits that layer:
the key/value half, W_key and W_value [L, H, D, R], goes to the decoder once per (policy, params) in the
Describe answer, and the decoder sends k @ W_key + v @ W_value (R numbers per slot: 16 for ForesightKV)
instead of 2D raw numbers. Encoded as safetensors bytes so both sides read it without pickle.
"""
from __future__ import annotations

import torch
from safetensors.torch import load, save
from torch import Tensor

MAX_RANK = 256  # projection width a decoder accepts (ForesightKV uses 16; an identity projection is 2D)


def encode_feature_weights(key: Tensor, value: Tensor) -> bytes:
    if key.shape != value.shape or key.dim() != 4:
        raise ValueError(f"key and value weights must both be [L, H, D, R] (got {list(key.shape)} and {list(value.shape)})")
    return save({"key": key.detach().float().contiguous().cpu(), "value": value.detach().float().contiguous().cpu()})


def decode_feature_weights(blob: bytes) -> tuple[Tensor, Tensor]:
    """(W_key, W_value), each float32 [L, H, D, R]; ValueError for a blob that is not such a pair."""
    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"feature weights are not a safetensors blob ({exc})") from None
    if set(tensors) != {"key", "value"}:
        raise ValueError(f"feature weights must hold exactly 'key' and 'value' (got {sorted(tensors)})")
    key, value = tensors["key"], tensors["value"]
    if key.shape != value.shape or key.dim() != 4 or not 1 <= key.shape[-1] <= MAX_RANK:
        raise ValueError(f"feature weights must be [L, H, D, R] with 1 <= R <= {MAX_RANK} "
                         f"(got {list(key.shape)} and {list(value.shape)})")
    if not (torch.isfinite(key).all() and torch.isfinite(value).all()):
        raise ValueError("feature weights hold NaN or infinite values")
    return key, value
