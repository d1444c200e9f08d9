"""The throughput benchmark's contract: one JSON object last, with the issue's keys.

The figures themselves are measured by hand on the real model (README); here a
small run on the tiny model checks that every part runs and reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_throughput_prints_every_figure_it_promises(tiny_model_dir, redis_url):
    done = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--n", "120", "--model_dir",
         str(tiny_model_dir), "--redis_url", redis_url, "--skip_streaming"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("model_only_tps", "pipeline_tps", "ratio", "padding_efficiency",
                "fixed_pad_tps", "gemm_gflops", "flops_per_tweet", "ceiling_tps",
                "pipeline_one_thread_tps", "one_thread_ratio"):
        assert isinstance(out[key], (int, float)) and out[key] > 0, key
    assert out["direct_threads"] == 2
    assert out["ceiling_tps"] == pytest.approx(
        out["gemm_gflops"] * 1e9 / out["flops_per_tweet"], rel=1e-3)
    assert out["ratio"] == pytest.approx(out["pipeline_tps"] / out["model_only_tps"], rel=1e-3)
    assert 0 < out["padding_efficiency"] <= 1
    if out["precision"] == "bfloat16":
        assert out["gemm_bf16_gflops"] > 0 and out["model_vs_bf16_ceiling"] > 0
