"""A Llama / Qwen2 / Qwen3-family decoder in plain torch, readable in one sitting.

Module and parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so that a
checkpoint's state dict loads as is. The model never owns a KV cache: every attention layer hands its
post-RoPE queries, keys and values to an `attention` callable (see `AttentionFn`). The engine passes one that
writes into the KV pool and attends over the cached slots; training and reference checks pass
`causal_attention`, which attends over the tokens of the batch alone.

Family differences, all switched by `ModelConfig`:
  Llama   optional bias on q/k/v/o (`attention_bias`), Llama-3 RoPE frequency scaling
  Qwen2   bias on q/k/v (never on o)
  Qwen3   RMSNorm on each head of q and k before RoPE (`qk_norm`)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in config.json
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention checkpoints are not supported")
        num_heads = hf["num_attention_heads"]
        # transformers >= 5 nests RoPE settings under "rope_parameters"; older configs keep them at top level.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in ("default", "llama3", "linear"):
                raise ValueError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3)")
            if rope_type == "default":
                rope_scaling = None
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            model_type=model_type,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def to_hf_config(self) -> dict:
        """A config.json that transformers' Llama/Qwen2/Qwen3ForCausalLM and our loader both read."""
        architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        hf = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.qkv_bias
        return hf

    def as_dict(self) -> dict:
        return asdict(self)


class AttentionFn(Protocol):
    """Attention for one layer. q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (q and k already rotated).
    Returns [B, T, Hq, D]. Implementations may store k/v (the engine's KV pool) and read older slots."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def causal_attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention over the batch's own tokens only (no cache): training and reference forward passes."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the weight dtype, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout of Hugging Face checkpoints, with optional Llama-3 / linear scaling."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        scaling = config.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: [B, T] (any integer dtype) -> cos, sin: [B, T, 1, D] in float32."""
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def llama3_scaled_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama-3.1 long-context frequency scaling: slow down low frequencies, keep high ones, blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, D]; rotate pairs (i, i + D/2) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def invert_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Undo `apply_rope` with the same angles: rotate each pair (i, i + D/2) back by the position's angle.

    A rotation's inverse is the rotation by the opposite angle, so this is apply_rope with -sin; rotate then
    invert gives the pre-RoPE vector back up to float rounding. Any shape [..., D] with cos/sin broadcasting."""
    return apply_rope(x, cos, -sin)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [..., D] in float32 for integer positions [...]: the angles `RotaryEmbedding` gives the model
    (the same float32 product), for any layout of positions (the pool's [L, H, n] included)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, hq * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hq * d, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        b, t, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(layer, q, k, v)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        x = x + self.self_attn(layer, self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embeddings + decoder layers + final norm; the `model.` prefix of a HF checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        positions: Tensor,  # [B, T] absolute (logical) positions
        attention: AttentionFn = causal_attention,
        logits_at: Tensor | None = None,  # [K] flat indices into B*T: only these rows get logits
    ) -> Tensor:
        """Returns logits [B, T, V], or [K, V] when `logits_at` selects rows (the engine's last tokens)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(i, x, cos, sin, attention)
        x = self.model.norm(x)
        if logits_at is not None:
            x = x.reshape(-1, x.shape[-1])[logits_at]
        return self.lm_head(x).float()

    @torch.no_grad()
    def init_random(self, seed: int, std: float = 0.02) -> "Transformer":
        """Deterministic random weights (normal for matrices, small for biases, ones for norms)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
