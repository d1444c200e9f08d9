"""Quiet by default (issue 29): no TensorFlow or absl start-up line, nothing that
looks like a fault, in a command's output unless --log_level debug asks.
(tests/test_summary.py checks the same of a whole run on the bundled sample.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("E0000", "I0000", "W0000", "cuInit", "Resource module", "oneDNN supports", "absl::",
         "Traceback")
# A logged warning (a help text may name the level WARNING among its choices).
WARNING_LINE = re.compile(r"^(\S+ \S+ )?WARNING\b")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", [
    ["pipeline", "--help"],
    ["launcher", "flink", "--help"],
    ["model", "predict", "--help"],
    ["ops.subscribe", "--help"],
    ["ops.dashboard", "--help"],
    ["ops.replay_deadletter", "--help"],
    ["ingest", "replay", "--help"],
])
def test_help_is_quiet(command):
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert [line for line in output.splitlines()
            if any(n in line for n in NOISE) or WARNING_LINE.match(line)] == []


@pytest.mark.timeout(300)
def test_debug_shows_tensorflows_own_lines_again(tiny_model_dir):
    done = subprocess.run([sys.executable, "-m", "model", "--log_level", "debug", "predict",
                           "--model", str(tiny_model_dir), "a fine day"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cuda" in done.stderr.lower() or "I0000" in done.stderr


GENERATOR_DATASET = """
from bertstream import logs
logs.quiet_generator_datasets()
import tensorflow as tf
spec = tf.TensorSpec([None], tf.int32)
for batch in tf.data.Dataset.from_generator(lambda: iter([[1, 2]]), output_signature=spec):
    print(batch.numpy().tolist())
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_builds_generator_dataset_is_quiet_unless_debug(level):
    """Training feeds Keras from a generator dataset, whose first iteration
    in a process logs tf.data's malloc "Memory patch" line in the middle of
    the build's progress; model.build makes that first iteration filtered."""
    done = subprocess.run([sys.executable, "-c", GENERATOR_DATASET], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "BERTSTREAM_LOG_LEVEL": level})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[1, 2]"]
    patch_lines = [line for line in done.stderr.splitlines() if "Memory patch" in line]
    assert len(patch_lines) == (1 if level == "debug" else 0), done.stderr[-2000:]
    if level == "info":
        assert [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)] == []


@pytest.mark.timeout(600)
def test_a_model_build_is_quiet(tmp_path):
    """What a newcomer's `make run` shows while the model trains: progress,
    and no TensorFlow line that looks like a fault (tf.data's I0000 line). A
    tiny build in a cache of its own, so it trains, with the downloaded wheels
    shared."""
    from tests.conftest import CACHE

    (tmp_path / "cache").mkdir()
    (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "wheels").symlink_to(CACHE / "wheels")
    done = subprocess.run(
        [sys.executable, "-m", "model", "build", "--tiny", "--max-train-rows", "64",
         "--max-eval-rows", "48", "--cache-dir", str(tmp_path / "cache"),
         "--out", str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True,
        timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "train step" in output  # it trained, and said so
    assert [line for line in output.splitlines()
            if any(n in line for n in NOISE) or "WARNING" in line] == [], output[-3000:]
