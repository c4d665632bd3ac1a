"""The Pareto sweep end to end on the bundled model (tiny: one task, two policies, two budgets), and its CSV join."""
from __future__ import annotations

import argparse
import csv

import pytest

from kvpilot.bench import pareto


def sweep_args(out) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pareto.add_arguments(parser)
    return parser.parse_args(["--tasks", "multihop", "--policies", "streaming_llm", "h2o", "--fracs", "0.25", "0.75",
                              "--n", "3", "--threads", "2", "--out", str(out)])


def test_area_under_curve_is_normalised():
    assert pareto.area_under_curve([0.1, 0.5], [1.0, 1.0]) == pytest.approx(1.0)
    assert pareto.area_under_curve([0.5, 0.1, 0.3], [1.0, 0.0, 0.5]) == pytest.approx(0.5)
    assert pareto.area_under_curve([0.25], [0.4]) == pytest.approx(0.4)


def test_sweep_writes_csv_auc_and_plot_and_joins(tmp_path):
    assert pareto.run(sweep_args(tmp_path)) == 0
    with (tmp_path / "pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["policy"], r["budget_frac"]) for r in rows] == [
        ("full", "1.0"), ("streaming_llm", "0.25"), ("streaming_llm", "0.75"), ("h2o", "0.25"), ("h2o", "0.75")]
    full = rows[0]
    assert float(full["mean_evicted"]) == 0
    for r in rows[1:]:
        assert int(r["n"]) == 3 and int(r["compression_events"]) > 0
        # Compression really bounds the cache (the exact budget + interval + lag bound: test_compression.py).
        assert float(r["mean_peak_kv_slots"]) < float(full["mean_peak_kv_slots"])
    with (tmp_path / "pareto_auc.csv").open() as f:
        aucs = {r["policy"]: float(r["auc"]) for r in csv.DictReader(f)}
    assert set(aucs) == {"streaming_llm", "h2o"} and all(0 <= a <= 1 for a in aucs.values())
    assert (tmp_path / "pareto.png").stat().st_size > 10_000

    # Join the finished sweep with a copy relabelled as the hard difficulty: each (task, difficulty) gets its
    # own table, AUC rows and plot panel, and nothing runs again.
    joined = tmp_path / "joined"
    other = tmp_path / "other.csv"
    other.write_text((tmp_path / "pareto.csv").read_text().replace(",default,", ",hard,"))
    args = sweep_args(joined)
    args.from_csv = [tmp_path / "pareto.csv", other]
    assert pareto.run(args) == 0
    with (joined / "pareto_auc.csv").open() as f:
        joined_aucs = list(csv.DictReader(f))
    assert {(r["task"], r["policy"]) for r in joined_aucs} == {
        (t, p) for t in ("multihop", "multihop/hard") for p in ("streaming_llm", "h2o")}
    assert {float(r["auc"]) for r in joined_aucs} == set(aucs.values())
