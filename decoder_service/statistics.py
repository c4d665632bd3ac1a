"""Per-slot statistics the decoder keeps for a sequence, and the frames it snapshots for its policy.

Only what the policy declares (a StatsSpec) is computed. Two kinds:
  carried  updated at every step from the attention probabilities: cumulative and decayed attention, and a
           ring of the last queries (with their positions) for window / last-query attention. Aligned with
           the sequence's logical slots [L, H, capacity] and gathered with the same plan as the KV.
  on demand computed from the cached K/V when a frame is taken: norms, value range, R-KV redundancy,
           random projections, window attention of the query ring, positions, token and segment ids, the
           mean pre-RoPE key (RoPE undone at each slot's position) and TriAttention's trigonometric scores
           (from the model's calibration: decoder_service/calibration.py).
  oracle   evaluation only: `future_attention`, read from the request's reference-trace oracle
           (decoder_service/oracle.py) at the compression point.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

import kvpilot_kernels as kernels
from decoder_service.calibration import TrigCalibration, pre_rope_keys, trig_scores
from decoder_service.kv_pool import SequenceKV
from decoder_service.oracle import FutureAttention
from kvpilot_protocol.features import decode_feature_weights
from kvpilot_protocol.frame import StatsFrame
from kvpilot_protocol.policy import StatsSpec

CARRIED = {"cumulative_attention", "decayed_attention"}
RING = {"window_attention", "last_attention", "attention_features"}
FORESIGHT_SUMS = (8, 16, 32)  # ForesightKV's short-window attention sums (features 4-6)


def ring_size(spec: StatsSpec) -> int:
    ring = spec.window_queries if spec.names & {"window_attention", "attention_features"} else 0
    return max(ring, 1) if "last_attention" in spec.names else ring


def statistics_bytes(spec: StatsSpec, num_layers: int, num_kv_heads: int, num_heads: int, head_dim: int,
                     capacity: int) -> int:
    """Memory a SequenceStatistics holds outside the KV pool (admission control counts it: invariant 9)."""
    carried = len(spec.names & CARRIED) * num_layers * num_kv_heads * capacity * 4
    ring = ring_size(spec)
    return carried + ring * (num_layers * num_heads * head_dim * 4 + 8)


class SequenceStatistics:
    def __init__(self, spec: StatsSpec, num_layers: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 capacity: int, device: torch.device):
        self.spec = spec
        self.shape = (num_layers, num_kv_heads)
        self.accumulators: dict[str, Tensor] = {
            name: torch.zeros(num_layers, num_kv_heads, capacity, dtype=torch.float32, device=device)
            for name in spec.names & CARRIED
        }
        ring = ring_size(spec)
        self.ring_size = ring
        self.queries = torch.zeros(num_layers, num_heads, ring, head_dim, device=device) if ring else None
        self.query_positions = torch.zeros(ring, dtype=torch.long, device=device) if ring else None
        self.queries_seen = 0  # total queries observed (ring index = count % ring_size)

    @property
    def needs_probabilities(self) -> bool:
        return bool(self.accumulators)

    @property
    def ready(self) -> bool:
        """Whether every declared statistic has evidence: a query ring with no query yet has none (a parked
        session continued under a new policy compresses before its first step)."""
        return self.ring_size == 0 or self.queries_seen > 0

    @property
    def nbytes(self) -> int:
        ring = sum(t.numel() * t.element_size() for t in (self.queries, self.query_positions) if t is not None)
        return ring + sum(a.numel() * a.element_size() for a in self.accumulators.values())

    # ---- carried statistics (called by the attention backend, once per layer per step) -------------
    def observe(self, layer: int, q: Tensor, attention: Tensor | None, positions: Tensor) -> None:
        """q: [T, Hq, D] new queries; attention: [H, T, S] their attention probabilities summed over each KV
        head's group of query heads (None when no carried statistic is kept); positions: [T] their logical
        positions."""
        t = q.shape[0]
        if self.accumulators and attention is None:
            raise ValueError("carried statistics need the attention probabilities of every step")
        if "cumulative_attention" in self.accumulators:
            self.accumulators["cumulative_attention"][layer, :, :attention.shape[-1]] += attention.sum(dim=1)
        if "decayed_attention" in self.accumulators:
            # Each query decays what came before it by gamma: the last one counts fully.
            s = attention.shape[-1]
            weights = self.spec.decay ** torch.arange(t - 1, -1, -1, device=attention.device, dtype=attention.dtype)
            acc = self.accumulators["decayed_attention"][layer]
            acc.mul_(self.spec.decay ** t)
            acc[:, :s] += torch.einsum("hts,t->hs", attention, weights)
        if self.queries is not None:
            last_layer = layer == self.queries.shape[0] - 1  # every layer saw the same tokens: advance once
            if t == 1:  # a decode token: one slot of the ring (the common case, kept to a single copy)
                slot = self.queries_seen % self.ring_size
                self.queries[layer, :, slot] = q[0]
                if last_layer:
                    self.query_positions[slot] = positions[0]
                    self.queries_seen += 1
                return
            keep = min(t, self.ring_size)
            slots = (self.queries_seen + t - keep + torch.arange(keep, device=q.device)) % self.ring_size
            self.queries[layer][:, slots] = q[-keep:].transpose(0, 1).to(self.queries.dtype)
            if last_layer:
                self.query_positions[slots] = positions[-keep:].to(self.query_positions.device)
                self.queries_seen += t

    # ---- keeping aligned with the pool region -------------------------------------------------------
    def resize(self, capacity: int, n_valid: int) -> None:
        for name, acc in self.accumulators.items():
            grown = acc.new_zeros(*acc.shape[:2], capacity)
            grown[:, :, :n_valid] = acc[:, :, :n_valid]
            self.accumulators[name] = grown

    def clone(self, capacity: int, n_valid: int) -> "SequenceStatistics":
        """An independent copy (a forked sequence inherits the evidence of the slots it shares)."""
        twin = copy.copy(self)
        twin.accumulators = {name: acc.clone() for name, acc in self.accumulators.items()}
        twin.queries = None if self.queries is None else self.queries.clone()
        twin.query_positions = None if self.query_positions is None else self.query_positions.clone()
        twin.resize(capacity, n_valid)
        return twin

    def gather(self, keep: Tensor, n_valid: int) -> None:
        """Apply a keep plan ([k] global or [L, H, k] per head) to the carried statistics."""
        for acc in self.accumulators.values():
            k = keep.shape[-1]
            kept = acc[:, :, keep] if keep.dim() == 1 else torch.gather(acc[:, :, :n_valid], 2, keep)
            acc[:, :, :k] = kept
            acc[:, :, k:] = 0

    def merge(self, groups: list[list[int]], n_valid: int) -> None:
        """After a merge plan: a representative carries the summed attention of its group."""
        for acc in self.accumulators.values():
            merged = torch.stack([acc[:, :, g].sum(-1) for g in groups], dim=-1)
            acc[:, :, :len(groups)] = merged
            acc[:, :, len(groups):] = 0


def build_frame(frame_id: int, session_id: str, kv: SequenceKV, stats: SequenceStatistics | None, spec: StatsSpec,
                position_tokens: list[int], tool_segments: list[tuple[int, int, int]], *, keep: int, sinks: int,
                window: int, num_heads: int, step: int, seed: int, prompt_len: int = 0,
                rope_inv_freq: Tensor | None = None, calibration: TrigCalibration | None = None,
                oracle: FutureAttention | None = None, next_position: int | None = None) -> StatsFrame:
    """position_tokens: the token fed at each logical position; tool_segments: (start, end, index) in positions;
    prompt_len: positions below it are the first turn's prompt. rope_inv_freq (the model's rotary inverse
    frequencies [D/2]) is needed for keys_pre_rope_mean and trig_scores, calibration for trig_scores.
    oracle (evaluation only: the request's reference-trace oracle) is needed for future_attention, read at
    next_position, the logical position of the next token to be fed (default: one past the newest slot)."""
    n = kv.n
    dense = kv.dense()
    L, H = dense.k.shape[:2]
    frame = StatsFrame(frame_id=frame_id, session_id=session_id, n=n, keep=keep, sinks=sinks, window=window,
                       num_layers=L, num_kv_heads=H, num_heads=num_heads, step=step, seed=seed,
                       tool_segments=list(tool_segments), device=dense.k.device, prompt_len=prompt_len)
    names = spec.names
    keys, values, positions = dense
    out = frame.stats
    for name in names & CARRIED:
        out[name] = stats.accumulators[name][:, :, :n].clone()
    if names & RING:
        if stats is None or not stats.ready:
            raise ValueError("no query observed yet: window and last-query attention are undefined")
        window_probs = ring_attention(stats, keys, positions)  # [L, Hq, w, n], oldest query first
        if "window_attention" in names:
            out["window_attention"] = window_probs[:, :, -spec.window_queries:].mean(dim=2)
        if "last_attention" in names:
            out["last_attention"] = window_probs[:, :, -1]
        if "attention_features" in names:
            out["attention_features"] = attention_features(window_probs[:, :, -spec.window_queries:])
    if "key_norm" in names:
        out["key_norm"] = keys.float().norm(dim=-1)
    if "value_norm" in names:
        out["value_norm"] = values.float().norm(dim=-1)
    if "value_range" in names:
        v32 = values.float()
        out["value_range"] = v32.amax(dim=-1) - v32.amin(dim=-1)
    if "key_redundancy" in names:
        out["key_redundancy"] = torch.stack([kernels.key_redundancy(keys[layer]) for layer in range(L)])
    if "kv_projection" in names:
        rank = spec.projection_rank
        gen = torch.Generator(device="cpu").manual_seed(seed)  # CPU: the same G for a seed on every device
        g = (torch.randn(keys.shape[-1], rank, generator=gen) / math.sqrt(rank)).to(keys.device)
        out["kv_projection"] = torch.stack(
            [(keys.float() @ g).pow(2).sum(-1), (values.float() @ g).pow(2).sum(-1)], dim=-1)
    if "kv_features" in names:
        w_key, w_value = feature_weights(spec.feature_weights)
        if w_key.shape[:3] != (L, H, keys.shape[-1]):
            raise ValueError(f"kv_features weights are [L, H, D] = {list(w_key.shape[:3])}, the model's KV is "
                             f"{[L, H, keys.shape[-1]]}")
        out["kv_features"] = (torch.einsum("lhnd,lhdr->lhnr", keys.float(), w_key.to(keys.device))
                              + torch.einsum("lhnd,lhdr->lhnr", values.float(), w_value.to(keys.device)))
    if names & {"keys_pre_rope_mean", "trig_scores"} and rope_inv_freq is None:
        raise ValueError("keys_pre_rope_mean and trig_scores need the model's rotary frequencies (rope_inv_freq)")
    if "keys_pre_rope_mean" in names:
        # Each row is un-rotated at its own positions, then slot i is averaged over the rows: one token's vector
        # when every row holds the same positions (global keep sets), a blend of tokens otherwise.
        pre = pre_rope_keys(keys, positions, rope_inv_freq)
        out["keys_pre_rope_mean"] = torch.nn.functional.normalize(pre, dim=-1).mean(dim=(0, 1))
    if "trig_scores" in names:
        if calibration is None:
            raise ValueError("trig_scores needs the model's TriAttention calibration (kvpilot calibrate --model DIR)")
        now = int(positions.max()) + 1 if n else 0  # the position of the next token
        out["trig_scores"] = trig_scores(calibration, keys, rope_inv_freq, now)
    if "future_attention" in names:
        if oracle is None:
            raise ValueError("future_attention needs the request's oracle (evaluation only: GenerationRequest.oracle)")
        now = next_position if next_position is not None else (int(positions.max()) + 1 if n else 0)
        out["future_attention"] = oracle.lookup(positions, now)
    if names & {"positions", "token_ids", "segment_ids"}:
        out["positions"] = positions.clone()
    if "token_ids" in names:
        out["token_ids"] = torch.tensor(position_tokens, device=positions.device)[positions]
    if "segment_ids" in names:
        segment = torch.full((len(position_tokens),), -1, dtype=torch.long, device=positions.device)
        for start, end, index in tool_segments:
            segment[start:end] = index
        out["segment_ids"] = segment[positions]
    return frame


def attention_features(probs: Tensor) -> Tensor:
    """ForesightKV's per-query-head statistics from ring attention [L, Hq, w, n] (queries oldest first):
    [L, Hq, n, 6] = max, min and sum over the w queries, then the sums over the last 8, 16 and 32. A query older
    than a key gives it 0 (causality), so the min of a recent key is 0, as in the paper's query cache."""
    columns = [probs.amax(dim=2), probs.amin(dim=2), probs.sum(dim=2)]
    columns += [probs[:, :, -last:].sum(dim=2) for last in FORESIGHT_SUMS]
    return torch.stack(columns, dim=-1)


_FEATURE_WEIGHTS: dict[bytes, tuple[Tensor, Tensor]] = {}


def feature_weights(blob: bytes) -> tuple[Tensor, Tensor]:
    """Decoded kv_features weights, cached per blob (a policy ships the same one for every session)."""
    if blob not in _FEATURE_WEIGHTS:
        if not blob:
            raise ValueError("kv_features needs the policy's feature weights (StatsSpec.feature_weights)")
        if len(_FEATURE_WEIGHTS) >= 8:
            _FEATURE_WEIGHTS.pop(next(iter(_FEATURE_WEIGHTS)))
        _FEATURE_WEIGHTS[blob] = decode_feature_weights(blob)
    return _FEATURE_WEIGHTS[blob]


def ring_attention(stats: SequenceStatistics, keys: Tensor, key_positions: Tensor) -> Tensor:
    """Attention of the ring's queries over the current slots: [L, Hq, w, n] (queries oldest first).

    A query attends only to keys at or before its own position (causality as when it was computed)."""
    w = min(stats.queries_seen, stats.ring_size)
    order = (stats.queries_seen - w + torch.arange(w, device=keys.device)) % stats.ring_size
    q = stats.queries[:, :, order].float()  # [L, Hq, w, D]
    qpos = stats.query_positions[order]
    L, hq, _, d = q.shape
    h = keys.shape[1]
    k = keys.float().repeat_interleave(hq // h, dim=1)  # [L, Hq, n, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)  # [L, Hq, w, n]
    kpos = key_positions.repeat_interleave(hq // h, dim=1)[:, :, None, :]  # [L, Hq, 1, n]
    scores = scores.masked_fill(kpos > qpos[None, None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)
