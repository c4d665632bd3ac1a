"""`breadcrumbs` (Breadcrumbs Reasoning): the model compresses its own reasoning into learned beacon tokens.

After every `c` generated tokens the decoder feeds the checkpoint's beacon token (input only: never sampled,
streamed or in the history; it takes the next position), whose KV reads those c tokens; then the c entries are
evicted and only the beacon's stays (decoder_service/beacons.py). The model must be beacon-trained
(`kvpilot train-model --breadcrumbs`, a breadcrumbs.json naming its beacon beside it); the decoder refuses the
policy for any other checkpoint. The prompt is never evicted.

Under a budget (`budget` > 0) smaller than prompt + beacons + c, the oldest beacons go first: the plan keeps the
prompt and the most recent slots (the newest beacons, then the open window). [INFERRED] The paper never bounds
the beacons; dropping the oldest keeps the summary of the recent reasoning, which the next steps read most.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import StatsSpec, TopKScorer, check_range

MAX_BEACON_INTERVAL = 256


@dataclass
class Breadcrumbs(TopKScorer):
    """A beacon every c generated tokens replaces them (beacon-trained checkpoints only)."""

    name: ClassVar[str] = "breadcrumbs"
    c: int = 8  # generated tokens per beacon

    def validate(self) -> None:
        check_range(self.name, "c", self.c, 2, MAX_BEACON_INTERVAL)

    def spec(self) -> StatsSpec:
        return StatsSpec(frozenset(), beacon_interval=self.c)

    def score(self, frame: StatsFrame) -> Tensor:
        # Slots are in position order; the prompt (never evicted by beacons, so the first prompt_len slots) stays.
        score = torch.arange(frame.n, dtype=torch.float32, device=frame.device)
        score[: min(frame.prompt_len, frame.n)] = float("inf")
        return score
