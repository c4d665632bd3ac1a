"""Frames and decisions <-> policy.proto messages. Tensors as raw little-endian bytes, never pickled."""
from __future__ import annotations

import sys

import numpy as np
import torch

from kvpilot_protocol.v1 import policy_pb2 as pb
from kvpilot_protocol.frame import Decision, KeepSet, MergePlanSpec, SideThreadPlan, SpanDrop, StatsFrame
from kvpilot_protocol.policy import PolicyDescription, StatsSpec

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
assert sys.byteorder == "little", "raw tensor bytes are little-endian; a big-endian host would need byteswaps"


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {t.dtype} cannot travel (supported: {sorted(DTYPES)})")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16: ship its bits
    return pb.Tensor(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def tensor_from_pb(m: pb.Tensor) -> torch.Tensor:
    if m.dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {m.dtype!r}")
    dtype = DTYPES[m.dtype]
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    array = np.frombuffer(m.data, dtype=np_dtype)
    expected = int(np.prod(m.shape)) if len(m.shape) else 1
    if array.size != expected:
        raise ValueError(f"tensor of shape {list(m.shape)} needs {expected} values, got {array.size}")
    t = torch.from_numpy(array.copy()).reshape(tuple(m.shape))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def frame_to_pb(frame: StatsFrame, policy: str, params: dict[str, str], request_id: str = "") -> pb.StatsFrame:
    return pb.StatsFrame(
        frame_id=frame.frame_id, session_id=frame.session_id, request_id=request_id, policy=policy, params=params,
        n=frame.n, prompt_len=frame.prompt_len,
        keep=frame.keep, sinks=frame.sinks, window=frame.window, num_layers=frame.num_layers,
        num_kv_heads=frame.num_kv_heads, num_heads=frame.num_heads, step=frame.step, seed=frame.seed,
        stats={name: tensor_to_pb(t) for name, t in frame.stats.items()},
        tool_segments=[pb.ToolSegment(start=s, end=e, index=i) for s, e, i in frame.tool_segments],
        side_event=frame.side_event, side_answer=frame.side_answer, side_cut=frame.side_cut, turn=frame.turn,
    )


def frame_from_pb(m: pb.StatsFrame) -> StatsFrame:
    return StatsFrame(
        frame_id=m.frame_id, session_id=m.session_id, n=m.n, keep=m.keep, sinks=m.sinks, window=m.window,
        num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, num_heads=m.num_heads, step=m.step, seed=m.seed,
        stats={name: tensor_from_pb(t) for name, t in m.stats.items()},
        tool_segments=[(s.start, s.end, s.index) for s in m.tool_segments], prompt_len=m.prompt_len,
        side_event=m.side_event, side_answer=m.side_answer, side_cut=m.side_cut, turn=m.turn,
    )


def decision_to_pb(d: Decision, session_id: str = "", replica: str = "", error: str = "",
                   request_id: str = "") -> pb.Decision:
    m = pb.Decision(frame_id=d.frame_id, session_id=session_id, request_id=request_id, policy=d.policy, seed=d.seed,
                    latency_ms=d.latency_s * 1e3, replica=replica, error=error)
    plan = d.plan
    if plan is None:
        m.keep_all.SetInParent()
    elif isinstance(plan, KeepSet):
        m.keep.indices.CopyFrom(tensor_to_pb(plan.indices.to(torch.int64)))
    elif isinstance(plan, MergePlanSpec):
        offsets = [0]
        for g in plan.groups:
            offsets.append(offsets[-1] + len(g))
        m.merge.group_offsets.CopyFrom(tensor_to_pb(torch.tensor(offsets, dtype=torch.int64)))
        m.merge.sources.CopyFrom(tensor_to_pb(torch.tensor([s for g in plan.groups for s in g], dtype=torch.int64)))
        m.merge.weights.CopyFrom(tensor_to_pb(torch.tensor([w for ws in plan.weights for w in ws], dtype=torch.float32)))
        m.merge.anchors.CopyFrom(tensor_to_pb(torch.tensor(plan.anchors, dtype=torch.int64)))
    elif isinstance(plan, SpanDrop):
        m.span_drop.spans.extend(pb.Span(start=s, end=e) for s, e in plan.spans)
    elif isinstance(plan, SideThreadPlan):
        m.side_thread.CopyFrom(pb.SideThread(prompt=plan.prompt, max_tokens=plan.max_tokens, stop=plan.stop))
    else:
        raise TypeError(f"cannot serialise plan {type(plan).__name__}")
    m.guards.extend(getattr(plan, "guards", ()))
    return m


def decision_from_pb(m: pb.Decision) -> Decision:
    which = m.WhichOneof("plan")
    plan = None
    if which == "keep":
        plan = KeepSet(tensor_from_pb(m.keep.indices))
    elif which == "merge":
        offsets = tensor_from_pb(m.merge.group_offsets).tolist()
        sources = tensor_from_pb(m.merge.sources).tolist()
        weights = tensor_from_pb(m.merge.weights).tolist()
        groups = [sources[a:b] for a, b in zip(offsets, offsets[1:])]
        plan = MergePlanSpec(groups=groups, weights=[weights[a:b] for a, b in zip(offsets, offsets[1:])],
                             anchors=tensor_from_pb(m.merge.anchors).tolist())
    elif which == "span_drop":
        plan = SpanDrop([(s.start, s.end) for s in m.span_drop.spans])
    elif which == "side_thread":
        plan = SideThreadPlan(m.side_thread.prompt, m.side_thread.max_tokens, m.side_thread.stop)
    if plan is not None and m.guards:
        plan.guards = tuple(m.guards)
    return Decision(frame_id=m.frame_id, plan=plan, policy=m.policy, seed=m.seed, latency_s=m.latency_ms / 1e3,
                    note=m.error)


def description_to_pb(d: PolicyDescription) -> pb.PolicyDescription:
    return pb.PolicyDescription(
        policy=d.policy, summary=d.summary, statistics=sorted(d.spec.names), window_queries=d.spec.window_queries,
        decay=d.spec.decay, projection_rank=d.spec.projection_rank, feature_weights=d.spec.feature_weights,
        model_fingerprint=d.spec.model_fingerprint, beacon_interval=d.spec.beacon_interval,
        parameters=[pb.Parameter(name=n, type=t, default=v) for n, t, v in d.parameters])


def description_from_pb(m: pb.PolicyDescription) -> PolicyDescription:
    spec = StatsSpec(frozenset(m.statistics), window_queries=m.window_queries, decay=m.decay,
                     projection_rank=m.projection_rank or StatsSpec(frozenset()).projection_rank,
                     feature_weights=m.feature_weights, model_fingerprint=m.model_fingerprint,
                     beacon_interval=m.beacon_interval)
    return PolicyDescription(policy=m.policy, summary=m.summary, spec=spec,
                             parameters=tuple((p.name, p.type, p.default) for p in m.parameters))
