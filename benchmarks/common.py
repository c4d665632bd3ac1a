"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import csv
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def write_csv(path: Path, rows: list[dict], digits: int = 4) -> Path:
    """Write rows (dicts with the same keys) as CSV, rounding floats; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, digits) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return path


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads, the same in every engine benchmark."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 when another job shares the cores)")


def apply_device_arguments(args: argparse.Namespace) -> tuple[torch.dtype, str]:
    """Set the thread count; return the dtype and a name for the device (what the CSV rows record)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return getattr(torch, args.dtype), name


def print_table(rows: list[dict], cols: list[str]) -> None:
    """Print the chosen columns of rows as a right-aligned text table."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))
