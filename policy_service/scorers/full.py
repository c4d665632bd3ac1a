"""`full`: keep everything (the uncompressed reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Full:
    name: ClassVar[str] = "full"
    stats: ClassVar[frozenset[str]] = frozenset()
