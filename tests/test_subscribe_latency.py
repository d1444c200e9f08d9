"""The subscriber's latency column (issue 20): publish -> result where the result
has a Pub/Sub publish time, else event time -> result, and it says which."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ops.subscribe import LEGEND, Printer, latency_of

ROOT = Path(__file__).resolve().parent.parent


def result(tweet_id: str, **times: str) -> dict:
    return {"tweet_id": tweet_id, "text": "a lovely day", "label": "positive", "score": 0.9,
            "window_start": "2026-11-20T10:00:00.000Z", **times}


def test_latency_is_publish_to_result_when_published():
    body = result("1", event_time="2026-11-20T10:00:00.000Z",
                  published_at="2026-12-01T12:00:00.000Z",
                  processed_at="2026-12-01T12:00:00.750Z")
    assert latency_of(body) == (pytest.approx(0.75), "pub")


def test_latency_of_file_input_is_from_the_event_time_and_says_so():
    body = result("2", event_time="2026-11-20T10:00:00.000Z", published_at="",
                  processed_at="2026-11-20T10:00:03.500Z")
    assert latency_of(body) == (pytest.approx(3.5), "event")


def test_latency_without_times_is_nan():
    value, kind = latency_of(result("3"))
    assert math.isnan(value) and kind == "event"


def test_printed_line_carries_the_kind():
    out = io.StringIO()
    printer = Printer(out)
    printer.result(json.dumps(result("4", event_time="2026-11-20T10:00:00.000Z",
                                     published_at="2026-12-01T12:00:00.000Z",
                                     processed_at="2026-12-01T12:00:01.250Z")))
    assert out.getvalue().split()[:4] == ["positive", "0.90", "1.25s", "pub"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_subscriber_prints_the_legend_and_replays_with_publish_latency(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.xadd("sentiment:results", {"tweet_id": "5", "result": json.dumps(
        result("5", event_time="2026-11-20T10:00:00.000Z",
               published_at="2026-12-01T12:00:00.000Z",
               processed_at="2026-12-01T12:00:00.400Z"))})
    done = subprocess.run(
        [sys.executable, "-m", "ops.subscribe", "--redis_url", redis_url, "--from-start",
         "--max-results", "1"], cwd=ROOT, capture_output=True, text=True, timeout=45)
    assert done.returncode == 0, done.stderr
    assert LEGEND in done.stderr
    assert done.stdout.splitlines()[0].split()[:4] == ["positive", "0.90", "0.40s", "pub"]
