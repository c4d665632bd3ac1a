"""Breadcrumbs' beacons at run time: the engine side of policy `breadcrumbs` (policy_service/scorers/breadcrumbs.py).

For a sequence whose policy description sets `beacon_interval` c, after every c generated tokens:
  1. right after the c-th token of a window is sampled, the checkpoint's beacon token is queued input-only
     (Engine.feed_input_only): the next step feeds [c-th token, beacon] together, and the next token is sampled
     from the beacon's logits, as in training, where the token after a window follows its beacon;
  2. after that step (the beacon's KV has read the window), the window's c slots are evicted (a SpanDrop over
     their positions through the ordinary compaction path): only the beacon's entry stays.
So each generated token sees the prompt, the earlier beacons and its own window, and each beacon its window: the
block mask the model was trained with (kvpilot/training/breadcrumbs.py), which the tests check logit for logit.
Usage counts beacons (`beacons`) and the evicted tokens; each fold is an eviction event.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Window:
    start: int = 0  # index in seq.generated where the open window starts
    beacon_queued: bool = False


class Beacons:
    """The engine's step hook for beacon policies (one per engine)."""

    def __init__(self):
        self.windows: dict[str, Window] = {}

    def __call__(self, engine, seq) -> None:
        c = seq.spec.beacon_interval
        if not c or seq.kv is None:
            return
        window = self.windows.setdefault(seq.id, Window())
        if window.beacon_queued:
            if seq.input_only:
                return  # not fed yet
            self.fold(engine, seq, window, c)
        if len(seq.generated) - window.start == c and seq.finish_reason is None:
            engine.feed_input_only(seq.id, [engine.loaded.beacon_token_id])
            window.beacon_queued = True
            seq.usage.beacons += 1

    def fold(self, engine, seq, window: Window, c: int) -> None:
        """Evict the window's c generated tokens: the beacon that follows them now holds what the model keeps."""
        base = len(seq.token_ids) - len(seq.generated)  # history index of the first generated token
        positions = seq.history_positions[base + window.start: base + window.start + c]
        window.start += c
        window.beacon_queued = False
        if positions:
            engine.compressor.drop_spans(engine, seq, [(positions[0], positions[-1] + 1)],
                                         reason="breadcrumbs: window folded into its beacon")

    def release(self, seq) -> None:
        self.windows.pop(seq.id, None)
