"""The throughput benchmark's contract: one JSON object last, with the issue's keys.

The figures themselves are measured on the real model (README, "Benchmarks");
here a small run on the tiny model checks that every part runs and reports,
through the real emulator and a real redis-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_throughput_prints_every_figure_it_promises(tiny_model_dir):
    n = 60
    done = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--n", str(n), "--model_dir",
         str(tiny_model_dir), "--densities", "0.5,200", "--modes", "backlog,live",
         "--timeout_s", "240"],
        cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["runner"] == "DirectRunner" and out["n"] == n
    assert out["model_only_tps"] > 0 and out["mean_text_chars"] > 0
    assert out["file"]["results"] == n and out["file"]["tps"] > 0
    assert out["file"]["ratio"] == pytest.approx(
        out["file"]["tps"] / out["model_only_tps"], abs=1e-3)
    runs = {(r["density"], r["mode"]): r for r in out["runs"]}
    assert set(runs) == {(0.5, "backlog"), (0.5, "live"), (200.0, "backlog"), (200.0, "live")}
    for run in runs.values():
        assert run["complete"] and run["results"] == n, run
        assert run["tps"] > 0 and run["ratio"] == pytest.approx(
            run["tps"] / out["model_only_tps"], abs=1e-3)
    assert out["min_ratio"] == min(r["ratio"] for r in runs.values())
    # Backlogs are timed against the start-up probe (one tweet waiting).
    assert out["startup_s"] > 0
    drains = []
    for density in (0.5, 200.0):
        run = runs[(density, "backlog")]
        if run["seconds"] <= out["startup_s"]:  # drained within the start-up's noise
            assert run["drain_tps"] is None and run["drain_ratio"] is None
            continue
        assert run["drain_tps"] == pytest.approx(n / (run["seconds"] - out["startup_s"]), rel=0.01)
        assert run["drain_ratio"] == pytest.approx(run["drain_tps"] / out["model_only_tps"],
                                                   abs=1e-3)
        drains.append(run["drain_ratio"])
    assert out["min_drain_ratio"] == (min(drains) if drains else None)


@pytest.mark.timeout(600)
def test_train_step_times_both_precisions():
    """A two-step run on the default encoder: one JSON object last, a time per
    precision and length, and the speed-up of their medians."""
    run = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--lengths", "8", "--steps", "2",
         "--batch", "4", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=580, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    row = out["seconds_per_step"]["8"]
    assert row["float32"] > 0 and row["bfloat16"] > 0
    assert row["speedup"] == round(row["float32"] / row["bfloat16"], 2)
    assert row["runs"] == {"float32": [row["float32"]], "bfloat16": [row["bfloat16"]]}


@pytest.mark.timeout(600)
def test_shadow_benchmark_reports_each_mode(tiny_model_dir):
    done = subprocess.run(
        [sys.executable, "benchmarks/shadow.py", "--n", "80", "--model_dir", str(tiny_model_dir),
         "--modes", "no-shadow,shadow-all", "--rate", "20", "--seconds", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    plain, shadow = out["modes"]["no-shadow"], out["modes"]["shadow-all"]
    for row in (plain, shadow):
        assert row["drain_tps"] > 0 and row["startup_s"] > 0 and row["live_missing"] == 0
    assert plain["drain_vs_no_shadow"] == 1.0
    assert shadow["drain_vs_no_shadow"] == pytest.approx(
        shadow["drain_tps"] / plain["drain_tps"], abs=0.01)
    # Version 2 scored the backlog in shadow and never served.
    assert shadow["shadow_state"] == "shadow" and shadow["shadow_scored"] >= 80
    assert shadow["served_by"] == ["1"]


@pytest.mark.timeout(600)
def test_latency_reports_each_load_in_the_issue_keys(tiny_model_dir):
    """Two short loads on the tiny model, the capacity given: one JSON object
    last with capacity_tps and runs[{load, rate_tps, p50_ms, p99_ms,
    p99_ms_per_10s, missing}], and the SLO load the runs support."""
    run = subprocess.run(
        [sys.executable, "benchmarks/latency.py", "--model_dir", str(tiny_model_dir),
         "--capacity", "40", "--loads", "0.25,0.5", "--seconds", "6", "--trickle", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=580, check=False)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["capacity_tps"] == 40 and out["target_ms"] == 3000
    assert [r["load"] for r in out["runs"]] == [0.25, 0.5]
    for r in out["runs"]:
        assert r["rate_tps"] == pytest.approx(r["load"] * 40)
        assert r["missing"] == 0, r
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["p99_ms_per_10s"] and all(p > 0 for p in r["p99_ms_per_10s"])
        assert r["within_target"] == (r["p99_ms"] <= 3000 and
                                      max(r["p99_ms_per_10s"]) <= 3000)
    held = [r["load"] for r in out["runs"] if r["within_target"]]
    assert out["slo_load"] == (max(held) if held else None)
    assert run.returncode == (0 if len(held) == 2 else 1), run.stderr[-3000:]
    assert out["trickle"] is None
