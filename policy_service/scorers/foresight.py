"""`foresight` (ForesightKV, arXiv 2602.03203): a tiny learned MLP per (layer, KV head) predicts which entries
the future will not need, trained on Golden Eviction labels (`kvpilot train-scorer foresight`).

Features of a cached slot of KV head h (the paper's x_n = [k_n, v_n, a_n]):
  k, v     the post-RoPE key and the value (D each). The wire does not carry them: fc1 is linear, so its
           key/value columns W_key, W_value [L, H, D, 16] go to the decoder once in the policy description
           (StatsSpec.feature_weights) and the frame carries `kv_features` = k W_key + v W_value, 16 numbers per
           slot instead of 2D (kvpilot_protocol/features.py).
  a        attention statistics: per query head of the group, `attention_features` over the last
           `window_queries` (128) queries: max, min, sum, sums over the last 8 / 16 / 32; then the carried
           cumulative and decayed (gamma 0.9) attention of the slot.
Scorer: eviction score = fc2(GELU(fc1(x))), fc1 (2D + 6G + 2) -> 16, fc2 16 -> 1, separate weights per
(layer, KV head); higher = evict. Action (`topk_prob_sample`): with d = n - keep slots to drop, take the 2d
highest eviction scores among the unprotected slots and sample d of them without replacement from the softmax
of those scores (the frame's seed: reproducible per frame); `sample=false` drops the top d instead.
The weights file (default: `foresight.safetensors` beside the bundled model, or KVPILOT_FORESIGHT_WEIGHTS)
names the model it was trained for (sha256 of its weights); the decoder refuses a file made for another model.

[DEVIATION] the paper has 8 statistics per query head (8G); kvpilot's decoder carries cumulative and decayed
            attention per KV head (summed over the group: `cumulative_attention`, `decayed_attention`), so the
            two carried ones enter once per KV head: 6G + 2 inputs.
[CHOICE] "sum over all cached queries" is the sum over the query ring (`window_queries`, 128): the paper's
         query cache is 1500-2048 queries until the first compression and the last 128 after it.
[CHOICE] protection is the request's sinks and recent window (the paper protects the last 128 tokens and no
         sinks: ask for window=128 sinks=0 to match it); the prompt is evictable, as in the paper.
[CHOICE] inputs are standardised during training and the standardisation is folded into fc1 (exact, fc1 is
         linear), so the file and the decoder see raw features.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kvpilot_protocol.features import encode_feature_weights
from kvpilot_protocol.frame import KeepSet, Plan, StatsFrame
from policy_service.scorers.base import ParameterError, Scorer, StatsSpec

WEIGHTS_FILE = "foresight.safetensors"
FORMAT = "kvpilot-foresight/1"
ATTENTION_STATS = 6  # per query head, from the decoder's `attention_features`
CARRIED = ("cumulative_attention", "decayed_attention")
WINDOW_QUERIES = 128
DECAY = 0.9


def bundled_weights_path(model: str = "reasoner-v2") -> Path:
    """The weights file beside a bundled model (read as data: no kvpilot import)."""
    spec = importlib.util.find_spec("kvpilot")
    root = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else Path(".")
    return root / "assets" / model / WEIGHTS_FILE


def default_weights_path() -> Path:
    """KVPILOT_FORESIGHT_WEIGHTS, else the file beside the default bundled model (reasoner v2)."""
    if os.environ.get("KVPILOT_FORESIGHT_WEIGHTS"):
        return Path(os.environ["KVPILOT_FORESIGHT_WEIGHTS"])
    return bundled_weights_path()


@dataclass
class ForesightWeights:
    """The MLP of every (layer, KV head), fc1 split by input: key, value, attention statistics."""

    w_key: Tensor  # [L, H, D, R]
    w_value: Tensor  # [L, H, D, R]
    w_attention: Tensor  # [L, H, 6G + 2, R]
    b1: Tensor  # [L, H, R]
    w2: Tensor  # [L, H, R]
    b2: Tensor  # [L, H]
    metadata: dict[str, str] = field(default_factory=dict)

    TENSORS: ClassVar[tuple[str, ...]] = ("w_key", "w_value", "w_attention", "b1", "w2", "b2")

    @property
    def shape(self) -> dict[str, int]:
        L, H, D, R = self.w_key.shape
        return {"layers": L, "kv_heads": H, "head_dim": D, "hidden": R,
                "group": (self.w_attention.shape[2] - len(CARRIED)) // ATTENTION_STATS}

    def save(self, path: str | Path, **metadata: str) -> Path:
        path = Path(path)
        meta = {**self.metadata, **{k: str(v) for k, v in metadata.items()}, "format": FORMAT,
                "shape": json.dumps(self.shape)}
        save_file({name: getattr(self, name).detach().float().contiguous() for name in self.TENSORS}, str(path),
                  metadata=meta)
        return path

    @classmethod
    def read(cls, path: str | Path) -> "ForesightWeights":
        path = Path(path)
        if not path.is_file():
            raise ParameterError(f"foresight: no weights file at {path}: train one (kvpilot train-scorer foresight "
                                 "--model DIR) or pass weights=PATH")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ParameterError(f"foresight: {path} is not a foresight weights file (format "
                                         f"{meta.get('format')!r}, expected {FORMAT!r})")
                tensors = {name: f.get_tensor(name).float() for name in cls.TENSORS}
        except ParameterError:
            raise
        except Exception as exc:  # safetensors' own errors: a truncated or foreign file
            raise ParameterError(f"foresight: cannot read {path} as safetensors ({exc})") from None
        weights = cls(**tensors, metadata=dict(meta))
        L, H, D, R = weights.w_key.shape
        expected = {"w_value": (L, H, D, R), "b1": (L, H, R), "w2": (L, H, R), "b2": (L, H)}
        bad = [n for n, s in expected.items() if tuple(getattr(weights, n).shape) != s]
        if bad or weights.w_attention.shape[:2] != (L, H) or weights.w_attention.shape[3] != R:
            raise ParameterError(f"foresight: {path} has inconsistent shapes ({bad or ['w_attention']})")
        return weights

    def eviction_scores(self, kv_part: Tensor, attention: Tensor) -> Tensor:
        """kv_part [L, H, n, R] (= k W_key + v W_value, the decoder's kv_features), attention [L, H, n, 6G + 2]
        -> eviction scores [L, H, n] (higher = evict)."""
        hidden = kv_part + torch.einsum("lhnf,lhfr->lhnr", attention, self.w_attention) + self.b1[:, :, None]
        return torch.einsum("lhnr,lhr->lhn", F.gelu(hidden), self.w2) + self.b2[:, :, None]


def attention_inputs(frame: StatsFrame) -> Tensor:
    """[L, H, n, 6G + 2]: each KV head's query heads' statistics (head-major), then its carried ones."""
    per_query = frame.stats["attention_features"].float()  # [L, Hq, n, 6]
    L, hq, n, s = per_query.shape
    h = frame.num_kv_heads
    grouped = per_query.view(L, h, hq // h, n, s).permute(0, 1, 3, 2, 4).reshape(L, h, n, (hq // h) * s)
    carried = [frame.stats[name].float()[..., None] for name in CARRIED]
    return torch.cat([grouped, *carried], dim=-1)


def sample_evictions(scores: Tensor, drop: int, generator: torch.Generator | None, sample: bool = True) -> Tensor:
    """Rows of eviction scores [R, n] (protected slots at -inf) -> the `drop` slots to evict per row [R, drop]:
    top-2·drop candidates, then `drop` of them sampled without replacement from their softmax (top-drop when
    not `sample`)."""
    top = torch.topk(scores, min(2 * drop, scores.shape[-1]), dim=-1)
    if not sample:
        return top.indices[:, :drop]
    probs = torch.softmax(top.values, dim=-1).nan_to_num(0.0)
    # A row whose candidates include protected (-inf) slots gives them probability 0: multinomial never draws
    # them while enough others remain (drop <= unprotected slots always: keep > protected).
    picks = torch.multinomial(probs, drop, replacement=False, generator=generator)
    return torch.gather(top.indices, 1, picks)


BUNDLED_NAMES = ("reasoner", "reasoner-v2")
_WEIGHTS: dict[str, ForesightWeights] = {}
_WEIGHTS_LOCK = threading.Lock()


@dataclass
class Foresight(Scorer):
    """ForesightKV: a learned MLP per (layer, KV head) on key, value and attention statistics, sampled eviction."""

    name: ClassVar[str] = "foresight"
    stats: ClassVar[frozenset[str]] = frozenset({"kv_features", "attention_features", *CARRIED})

    # A weights file's path, a bundled model's name (`reasoner`, `reasoner-v2`: the file beside it), or "" for
    # the default (KVPILOT_FORESIGHT_WEIGHTS, else beside the default model, reasoner v2).
    weights: str = ""
    sample: bool = True  # topk_prob_sample (paper); false: evict the top eviction scores

    def validate(self) -> None:
        if len(self.weights) > 4096:
            raise ParameterError("foresight: weights must be a path of at most 4096 characters")

    @property
    def path(self) -> Path:
        if not self.weights:
            return default_weights_path()
        if self.weights in BUNDLED_NAMES:
            return bundled_weights_path(self.weights)
        return Path(self.weights)

    def setup(self) -> None:
        self.model  # noqa: B018  (load once per process, at build time: a bad file is a clear error then)

    @property
    def model(self) -> ForesightWeights:
        key = str(self.path.resolve())
        with _WEIGHTS_LOCK:
            if key not in _WEIGHTS:
                _WEIGHTS[key] = ForesightWeights.read(self.path)
            return _WEIGHTS[key]

    def spec(self) -> StatsSpec:
        m = self.model
        return StatsSpec(self.stats, window_queries=WINDOW_QUERIES, decay=DECAY,
                         feature_weights=encode_feature_weights(m.w_key, m.w_value),
                         model_fingerprint=m.metadata.get("model_fingerprint", ""))

    def eviction_scores(self, frame: StatsFrame) -> Tensor:
        """[L, H, n] (higher = evict)."""
        model = self.model
        shape = model.shape
        if (frame.num_layers, frame.num_kv_heads, frame.group_size) != (shape["layers"], shape["kv_heads"], shape["group"]):
            raise ValueError(f"foresight weights are for [layers, KV heads, group] = "
                             f"{[shape['layers'], shape['kv_heads'], shape['group']]}, the frame has "
                             f"{[frame.num_layers, frame.num_kv_heads, frame.group_size]}")
        return model.eviction_scores(frame.stats["kv_features"].float(), attention_inputs(frame))

    def plan(self, frame: StatsFrame) -> Plan | None:
        if frame.n <= frame.keep:
            return None
        scores = self.eviction_scores(frame)
        L, H, n = scores.shape
        scores = scores.masked_fill(frame.protected_mask(scores.device), float("-inf"))
        drop = n - frame.keep
        evicted = sample_evictions(scores.reshape(L * H, n), drop, frame.generator(), self.sample)
        keep_mask = torch.ones(L * H, n, dtype=torch.bool, device=scores.device)
        keep_mask.scatter_(1, evicted, False)
        keep = keep_mask.nonzero()[:, 1].view(L, H, frame.keep)  # row-major: ascending within each row
        return KeepSet(keep)
