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
