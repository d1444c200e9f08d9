"""The summary explains what the job saw (issue 25): tweets already scored in a
reused Redis, input that is not JSON Lines, a streaming demo that stops once its
input has run dry; and a healthy run prints no warning and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertstream.config import RedisConfig
from pipeline.summary import Snapshot, Summary, exit_code, render

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("WARNING", "Traceback", "ERROR", "E0000", "W0000", "I0000", "cuInit",
         "Resource module", "oneDNN supports", "absl::")


def job(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.split("json: ", 1)[1].splitlines()[0])


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def test_render_explains_and_points_where_to_look():
    config = RedisConfig()
    s = Summary(read=10, results=0, already_written=0, duplicates_skipped=0, dead_lettered=10,
                late=0, seconds=1.0, mean_batch_size=None, max_batch_size=None,
                padding_efficiency_estimate=None, first_dead_letter="parse: invalid JSON")
    text = render(s, "redis://h:1/0", config, "redis-cli -u redis://h:1/0", "tweets.csv")
    assert "10 of 10 inputs were dead-lettered (parse: invalid JSON)" in text
    assert "is tweets.csv JSON Lines" in text
    assert "look:               redis-cli -u redis://h:1/0 XRANGE sentiment:deadletter" in text
    assert "mean batch" not in text and "unknown" not in text  # nothing said when not known
    assert exit_code(s) == 1
    fine = s._replace(results=8, dead_lettered=2, read=10, mean_batch_size=8.0, max_batch_size=8)
    text = render(fine, "redis://h:1/0", config, "redis-cli", None)
    assert "note:" not in text and "mean batch 8.0, max 8" in text
    assert "XRANGE sentiment:results" in text
    assert exit_code(fine) == 0
    assert exit_code(s._replace(read=0, dead_lettered=0)) == 0  # nothing came: not an error


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_reused_redis_says_why_nothing_new_was_written(redis_url, tiny_model_dir):
    first = job("--model_dir", str(tiny_model_dir), "--redis_url", redis_url)
    assert first.returncode == 0, first.stderr[-3000:]
    assert noise(first.stdout + first.stderr) == []  # a healthy run is quiet
    again = job("--model_dir", str(tiny_model_dir), "--redis_url", redis_url)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = summary_of(again.stdout)
    assert (summary["results"], summary["already_written"]) == (0, 292)
    assert "292 tweets already had a result in this Redis" in again.stdout
    assert "another database" in again.stdout


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["csv", "pretty-json"])
def test_a_file_that_is_not_json_lines_fails_and_says_so(kind, redis_url, tiny_model_dir,
                                                         tmp_path):
    rows = [{"id": str(1880000000000000000 + i), "text": f"tweet number {i}",
             "created_at": "2026-11-20T10:00:00.000Z"} for i in range(3)]
    path = tmp_path / ("tweets.csv" if kind == "csv" else "tweets.json")
    if kind == "csv":
        path.write_text("id,text,created_at\n" + "".join(
            f"{r['id']},{r['text']},{r['created_at']}\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=2) + "\n")
    done = job("--input_file", str(path), "--model_dir", str(tiny_model_dir),
               "--redis_url", redis_url)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    summary = summary_of(done.stdout)
    assert summary["results"] == 0 and summary["dead_lettered"] == summary["read"] > 0
    assert f"is {path} JSON Lines" in done.stdout
    assert "dead-lettered (parse: " in done.stdout
    assert "XRANGE sentiment:deadletter" in done.stdout


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_streaming_demo_stops_with_its_whole_summary_once_its_input_ran_dry(
        pubsub_names, redis_url, tiny_model_dir):
    """--stop_after_idle_seconds: no race with the last message (the README's
    replay then stop gave `read 299`)."""
    from tests.streams import PacedPublisher, sample_messages

    messages = sample_messages(120, offset=9 * 10**6)
    stream = PacedPublisher(pubsub_names["topic"], messages, per_second=60)
    started = time.monotonic()
    stream.start()
    done = job("--input_subscription", pubsub_names["subscription"], "--redis_url", redis_url,
               "--model_dir", str(tiny_model_dir), "--stop_after_idle_seconds", "5",
               timeout=280)
    stream.join(30)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary_of(done.stdout)["read"] == len(messages)
    assert "no new input for 5 s: stopping" in done.stderr
    assert time.monotonic() - started < 120
    assert noise(done.stdout + done.stderr) == []


def test_a_snapshot_names_the_last_dead_letter(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    config = RedisConfig(url=redis_url)
    assert Snapshot.take(config) == Snapshot({}, "0")
    entry = client.xadd("sentiment:deadletter", {"stage": "parse", "reason": "x"}).decode()
    assert Snapshot.take(config).last_dead_letter == entry


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_wrong_redis_port_says_what_it_waits_for(tiny_model_dir):
    from runners.local_servers import free_port

    done = job("--model_dir", str(tiny_model_dir), "--no_local_redis", "--redis_retries", "2",
               "--redis_url", f"redis://127.0.0.1:{free_port()}/0", timeout=100)
    assert done.returncode == 2
    assert done.stderr.count("waiting for Redis at redis://127.0.0.1:") == 2
    assert "attempt 1 of 3 failed" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --redis_url redis://127.0.0.1:")
