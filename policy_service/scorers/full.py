"""`full`: keep everything; the uncompressed reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvpilot_protocol.frame import StatsFrame
from policy_service.scorers.base import Scorer


@dataclass
class Full(Scorer):
    """Keep every token (no compression; the reference for parity)."""

    name: ClassVar[str] = "full"

    def plan(self, frame: StatsFrame):
        return None
