"""`make run` needs only what the default run uses (issue 20): the venv, redis-server
and the model. Maven, a JDK, the Pub/Sub emulator, Go (Prism) and chromium are
set up by the targets that use them, so a machine without them still runs it.

A machine without them is simulated with a PATH of symlinks to the few tools
the run needs; the emulator's launcher lives outside PATH, so ``make -n`` also
shows that no recipe of `make run` looks for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What `make run`'s recipes and the job call by name; nothing else is on PATH.
RUN_TOOLS = ("make", "bash", "sh", "env", "id", "touch", "python3", "redis-server")
ABSENT = ("mvn", "java", "javac", "go", "chromium", "chromedriver", "dpkg", "gcloud")
NOT_FOR_RUN = ("fetch-jars", "fetch-crd", "find_pubsub_emulator", "go install", "chromium")


def bare_path(tmp_path: Path, tools: tuple[str, ...] = RUN_TOOLS) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.fail(f"`{tool}` is not installed (make setup installs redis-server)")
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def make(tmp_path: Path, *args: str, path: str, timeout: float = 60,
         cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "TMPDIR": str(tmp_path)}
    if cache is not None:
        env["BERTSTREAM_CACHE"] = str(cache)
    return subprocess.run([shutil.which("make"), "--no-print-directory", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_make_run_sets_up_only_what_the_default_run_uses(tmp_path):
    path = bare_path(tmp_path)
    for tool in ABSENT:
        assert shutil.which(tool, path=path) is None
    done = make(tmp_path, "-n", "run", path=path)
    assert done.returncode == 0, done.stderr
    for needle in NOT_FOR_RUN:
        assert needle not in done.stdout, f"`make run` would run {needle}:\n{done.stdout}"
    assert "-m model build --out models/bert_sentiment" in done.stdout
    # `make test` still sets everything up.
    plan = make(tmp_path, "-n", "test", path=path).stdout
    for needle in ("fetch-jars", "fetch-crd", "find_pubsub_emulator"):
        assert needle in plan, f"`make test` no longer runs {needle}"


@pytest.mark.timeout(60)
def test_make_prism_without_go_says_what_to_install(tmp_path):
    done = make(tmp_path, "prism", path=bare_path(tmp_path), cache=tmp_path / "cache")
    assert done.returncode != 0
    assert "go is needed to build Prism" in done.stdout


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_run_succeeds_without_maven_java_or_the_emulator(tmp_path, tiny_model_dir):
    """The real `make run` (set-up, then the job on the bundled sample) on the tiny
    model. The venv step is taken as done (`-o`): it is the one every target shares,
    needs python3 only, and `make -n` above shows its commands."""
    path = bare_path(tmp_path)
    # A Redis URL where nothing answers: the job starts its own redis-server.
    done = make(tmp_path, "-o", ".venv/.installed", "run", f"MODEL_DIR={tiny_model_dir}",
                "MODEL_BUILD_FLAGS=--tiny", "RUN_ARGS=--redis_url redis://127.0.0.1:1/0",
                path=path, timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert "bertstream summary" in lines
    for row in ("  read                300", "  results             292",
                "  duplicates skipped  1", "  dead-lettered       7"):
        assert row in lines, done.stdout
