"""TriAttention's per-model calibration (arXiv 2604.04921) and the trigonometric key scores it gives.

TriAttention observes that pre-RoPE queries cluster around fixed non-zero centres, stable across positions.
View each RoPE frequency pair f of a head (dimensions f and f + D/2 in the "rotate half" layout) as the complex
number x_f = x[f] + i x[f + D/2]: RoPE multiplies it by e^{i w_f p}. A calibration pass records, for every
(layer, query head), the mean pre-RoPE query q̄_f (complex) and the mean modulus E|q_f|. With q̄ standing in for
the unknown future query, a cached key's expected logit at query-key distance Δ is a trigonometric series:

    s(Δ) = Σ_f |q̄_f||k_f| cos(w_f Δ + φ_f) + Σ_f (E|q_f| - |q̄_f|)|k_f|,   φ_f = arg(q̄_f conj(k_f))

(k_f: the key's pre-RoPE pair; the second sum stands for the query's spread around its centre). A key at
position p, scored when the next token is at position t, gets the mean of s(t - p + o) over the 17 offsets
o = 1, 2, 4, ..., 65536 (2^0 .. 2^16): `trig_scores`.

File `triattention_calibration.safetensors` beside the checkpoint (written by `kvpilot calibrate --model DIR`):
    q_mean_real, q_mean_imag  [L, Hq, D/2] float32   q̄_f
    q_abs_mean                [L, Hq, D/2] float32   E|q_f|
    metadata                  format, tokens, sequences, seed, command, created, weights_sha256 (the weights it
                              was measured on: `load_calibration` refuses a file made for other weights)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from decoder_service.model import ModelConfig, Transformer, causal_attention, invert_rope, rope_angles

CALIBRATION_FILE = "triattention_calibration.safetensors"
FORMAT = "kvpilot-triattention-calibration/1"
OFFSETS = tuple(2**i for i in range(17))  # 1, 2, 4, ..., 65536: the paper's geometric future offsets


class CalibrationError(ValueError):
    """A calibration file that does not belong to the checkpoint beside it (other weights or shapes)."""


@dataclass
class TrigCalibration:
    """Per (layer, query head, frequency pair): the mean pre-RoPE query and its mean modulus."""

    q_mean: Tensor  # complex64 [L, Hq, D/2]
    q_abs_mean: Tensor  # float32 [L, Hq, D/2]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q_abs_mean.shape)

    def to(self, device) -> "TrigCalibration":
        return TrigCalibration(self.q_mean.to(device), self.q_abs_mean.to(device), dict(self.metadata))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"q_mean_real": self.q_mean.real.float().contiguous().cpu(),
                   "q_mean_imag": self.q_mean.imag.float().contiguous().cpu(),
                   "q_abs_mean": self.q_abs_mean.float().contiguous().cpu()}
        save_file(tensors, path, metadata={"format": FORMAT, **{k: str(v) for k, v in self.metadata.items()}})
        return path

    @classmethod
    def read(cls, path: str | Path) -> "TrigCalibration":
        """The file as it is (no check against a model: see `load_calibration`)."""
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != FORMAT:
                raise CalibrationError(f"{path} is not a kvpilot TriAttention calibration (format "
                                       f"{metadata.get('format')!r}, expected {FORMAT!r})")
            real, imag, mod = (f.get_tensor(name) for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"))
        return cls(torch.complex(real.float(), imag.float()), mod.float(), metadata)


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the checkpoint's weight files (model.safetensors, or the shards of its index, by name)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    digest = hashlib.sha256()
    for name in files:
        if len(files) > 1:
            digest.update(name.encode() + b"\0")
        with open(model_dir / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def load_calibration(model_dir: str | Path, config: ModelConfig) -> TrigCalibration | None:
    """The calibration beside a checkpoint, checked against it; None when there is none.

    A file made for other weights (fingerprint) or another shape is an error that names the fix, never a
    silent fallback: scores from another model's query centres would be wrong without any sign of it."""
    model_dir = Path(model_dir)
    path = model_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    fix = f"rerun `kvpilot calibrate --model {model_dir}` (or delete {path.name})"
    calibration = TrigCalibration.read(path)
    expected = (config.num_layers, config.num_heads, config.head_dim // 2)
    if calibration.shape != expected:
        raise CalibrationError(f"{path} holds [L, Hq, D/2] = {list(calibration.shape)} but the model has "
                               f"{list(expected)}: {fix}")
    recorded = calibration.metadata.get("weights_sha256", "")
    actual = weights_fingerprint(model_dir)
    if recorded != actual:
        raise CalibrationError(f"{path} was measured on other weights (sha256 {recorded[:12] or 'missing'}..., "
                               f"the checkpoint's is {actual[:12]}...): {fix}")
    return calibration


# ---- measuring -----------------------------------------------------------------------------------------
class QueryRecorder:
    """An attention function (`decoder_service.model.AttentionFn`) that attends like `causal_attention` and
    accumulates, per (layer, query head, frequency pair), the sum of the pre-RoPE queries and of their moduli.

    The model hands over rotated queries; `forward` knows the positions it passes, so the recorder inverts
    RoPE with the same angles the model used."""

    def __init__(self, model: Transformer):
        c = model.config
        self.model = model
        self.half = c.head_dim // 2
        self.q_sum = torch.zeros(c.num_layers, c.num_heads, self.half, dtype=torch.complex128)
        self.abs_sum = torch.zeros(c.num_layers, c.num_heads, self.half, dtype=torch.float64)
        self.tokens = 0
        self._angles: tuple[Tensor, Tensor] | None = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cos, sin = self._angles
        pre = invert_rope(q.float(), cos, sin)  # [B, T, Hq, D]
        pairs = torch.complex(pre[..., : self.half], pre[..., self.half:]).to(torch.complex128)
        self.q_sum[layer] += pairs.sum(dim=(0, 1)).cpu()
        self.abs_sum[layer] += pairs.abs().sum(dim=(0, 1)).cpu()
        return causal_attention(layer, q, k, v)

    @torch.inference_mode()
    def observe(self, token_ids: list[int]) -> None:
        """One sequence, from position 0 (truncated to the model's context)."""
        token_ids = token_ids[: self.model.config.max_position_embeddings]
        device = next(self.model.parameters()).device
        ids = torch.tensor([token_ids], device=device)
        positions = torch.arange(len(token_ids), device=device)[None]
        cos, sin = rope_angles(positions, self.model.model.rotary_emb.inv_freq)
        self._angles = (cos[:, :, None, :], sin[:, :, None, :])  # [1, T, 1, D]: broadcast over heads
        self.model(ids, positions, self, logits_at=ids.new_zeros(1))  # logits of one row: we only want q
        self._angles = None
        self.tokens += len(token_ids)

    def result(self, **metadata) -> TrigCalibration:
        if self.tokens == 0:
            raise ValueError("no tokens observed: nothing to calibrate from")
        return TrigCalibration((self.q_sum / self.tokens).to(torch.complex64), (self.abs_sum / self.tokens).float(),
                               {"tokens": str(self.tokens), **{k: str(v) for k, v in metadata.items()}})


def calibrate(model: Transformer, sequences: Iterable[list[int]], **metadata) -> TrigCalibration:
    """Record the pre-RoPE query statistics over token sequences (each its own forward from position 0)."""
    recorder = QueryRecorder(model)
    count = 0
    for token_ids in sequences:
        recorder.observe(token_ids)
        count += 1
    return recorder.result(sequences=count, **metadata)


# ---- scoring -------------------------------------------------------------------------------------------
def trig_scores(calibration: TrigCalibration, keys: Tensor, inv_freq: Tensor, t: int) -> Tensor:
    """TriAttention's raw score of every cached key, per query head: [L, Hq, n] float32.

    keys: [L, H, n, D] as the pool stores them (post-RoPE: each key carries its own position's rotation, so rows
    holding different positions after per-head compaction are each scored at theirs); t: the next token's
    position. Query head hq reads KV head hq // (Hq / H) (the model's grouping).

    Computed in closed form, exactly equal to the per-offset sum over pre-RoPE keys in the module docstring:
    with k_post = k e^{i w p}, |q̄||k| cos(w Δ + φ) = Re[q̄ conj(k) e^{i w Δ}] and Δ = t - p + o, so

        mean_o s(t - p + o) = Re Σ_f Q_f conj(k_post_f) + Σ_f (E|q_f| - |q̄_f|)|k_post_f|,
        Q_f = q̄_f e^{i w_f t} mean_o e^{i w_f o}

    one dot product of each key with an effective query per head (a rotation preserves |k_f|), with no
    inversion and no [.., n, D/2, 17] intermediate. RoPE's attention scaling s_f is 1 for every RoPE variant
    kvpilot loads (default, linear, llama3), so it does not appear."""
    L, H, n, D = keys.shape
    half = D // 2
    hq = calibration.shape[1]
    device = keys.device
    w = inv_freq.to(device, torch.float64)  # [F]
    offsets = torch.tensor(OFFSETS, dtype=torch.float64, device=device)
    angle = w[:, None] * offsets[None, :]  # [F, 17]
    mean_phase = torch.complex(angle.cos().mean(-1), angle.sin().mean(-1))  # mean_o e^{i w o}
    now = torch.polar(torch.ones_like(w), w * t)  # e^{i w t}, in float64: t can be large
    q_mean = calibration.q_mean.to(device, torch.complex128)  # [L, Hq, F]
    effective = (q_mean * now * mean_phase).to(torch.complex64).view(L, H, hq // H, half)
    k = keys.float()
    k_re, k_im = k[..., :half], k[..., half:]  # [L, H, n, F]
    oscillating = (torch.einsum("lhgf,lhnf->lhgn", effective.real.contiguous(), k_re)
                   + torch.einsum("lhgf,lhnf->lhgn", effective.imag.contiguous(), k_im))
    spread = (calibration.q_abs_mean.to(device) - calibration.q_mean.to(device).abs()).view(L, H, hq // H, half)
    flat = torch.einsum("lhgf,lhnf->lhgn", spread.float(), torch.sqrt(k_re * k_re + k_im * k_im))
    return (oscillating + flat).reshape(L, hq, n)


def pre_rope_keys(keys: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Undo RoPE on cached keys [L, H, n, D] at their positions [L, H, n]: float32 pre-RoPE keys."""
    cos, sin = rope_angles(positions, inv_freq)
    return invert_rope(keys.float(), cos, sin)


def describe_calibration(calibration: TrigCalibration) -> str:
    """One line for logs and the CLI."""
    m = calibration.metadata
    L, hq, f = calibration.shape
    centre = (calibration.q_mean.abs() / calibration.q_abs_mean.clamp_min(1e-12)).mean()
    return (f"[{L} layers, {hq} query heads, {f} frequency pairs] from {m.get('tokens', '?')} tokens; "
            f"mean |E q_f| / E|q_f| = {float(centre):.3f} (1 = queries fully concentrated), "
            f"weights sha256 {m.get('weights_sha256', '?')[:12]}")

