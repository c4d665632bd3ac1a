"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_csv(path: Path, rows: list[dict], digits: int = 4) -> Path:
    """Write rows (dicts with the same keys) as CSV, rounding floats; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return path
