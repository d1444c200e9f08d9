"""``ingest replay --publish-bad``: the sample's bad lines reach Pub/Sub as they are,
so a streaming job dead-letters them as a file run does (issue 20's walkthrough)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from ingest.message import BadTweet, raw_message
from ingest.replay import default_sample, replay
from tests.test_ingest_replay import pull_all
from tests.test_pipeline_integration import _start_streaming_job, _wait_for

ROOT = Path(__file__).resolve().parent.parent
# The sample's malformed lines (pipeline/data/README.md) and the id each one
# carries that is valid where the line is read as JSON.
BAD_LINES = {21: "", 56: "", 91: "", 126: "1990000000000000003",
             171: "1990000000000000004", 211: "", 251: "1990000000000000006"}


def test_raw_message_keeps_the_bytes_and_reads_an_id_where_it_can():
    assert raw_message(b'{"id": "12", "text": ""}').attributes == {"tweet_id": "12"}
    assert raw_message(b'{"id": 12.5, "text": "x"}').attributes == {}
    assert raw_message(b"\xff\xfe not utf-8").data == b"\xff\xfe not utf-8"
    assert raw_message(b'["an", "array"]').attributes == {}
    when = datetime(2026, 11, 20, 10, 0, 1, 500000, tzinfo=UTC)
    assert raw_message(b"{", when).attributes == {"event_ts": "2026-11-20T10:00:01.500Z"}
    with pytest.raises(BadTweet, match="10 MB"):
        raw_message(b"x" * 10_000_000)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_publish_bad_sends_the_sample_bad_lines_unchanged(pubsub_names):
    totals = replay(None, pubsub_names["topic"], speed=0, publish_bad=True)
    assert (totals.published, totals.failed, totals.bad, totals.bad_published) == (300, 0, 7, 7)
    assert [b.line for b in totals.bad_lines] == sorted(BAD_LINES)
    assert totals.as_dict()["bad_published"] == 7
    lines = default_sample().read_bytes().splitlines()
    got = pull_all(pubsub_names["subscription"], expect=300)
    bad_data = {lines[n - 1]: tweet_id for n, tweet_id in BAD_LINES.items()}
    bad = [m.message for m in got if m.message.data in bad_data]
    assert len(got) == 300 and len(bad) == 7
    assert {m.data: m.attributes.get("tweet_id", "") for m in bad} == bad_data
    # Each carries the event time of the line before it (the replay's clock),
    # not the publish time, which would move a job's watermark 11 days on.
    event_ts = {m.message.data: m.message.attributes.get("event_ts") for m in got}
    for number in BAD_LINES:
        before = json.loads(lines[number - 2])["created_at"]
        assert event_ts[lines[number - 1]] == before.replace("Z", "")[:23] + "Z"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_without_publish_bad_the_bad_lines_stay_out(pubsub_names):
    totals = replay(None, pubsub_names["topic"], speed=0)
    assert (totals.published, totals.bad, totals.bad_published) == (293, 7, 0)
    assert "bad_published" not in totals.as_dict()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_streaming_job_dead_letters_the_published_bad_lines(pubsub_names, redis_url,
                                                            tiny_model_dir):
    """The walkthrough's path: replay --publish-bad into a running job gives the file
    run's figures: 292 results, the duplicate skipped, 7 dead letters, none late.

    The 300 messages go in one Publish call: Pub/Sub does not order messages, and
    the replay's default batches of 100 are sent by concurrent threads, so on a
    loaded machine a later batch can arrive first and its tweets' windows close
    before the earlier ones come (counted late, rightly; 87-165 of them in runs
    beside the suite). One call keeps the arrival in the file's order, which is
    what "none late" is about."""
    client = redis.Redis.from_url(redis_url)
    result = _start_streaming_job(pubsub_names["subscription"], redis_url, tiny_model_dir)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ingest", "replay", "--topic", pubsub_names["topic"],
             "--speed", "0", "--publish-bad", "--max-messages", "1000", "--max-latency", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "line 21 published as it is: invalid JSON" in done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        assert summary["published"] == 300 and summary["bad_published"] == 7
        _wait_for(client, 292, 7)
    finally:
        result.cancel()
    assert client.xlen("sentiment:results") == 292
    stats = {k.decode(): int(v) for k, v in client.hgetall("sentiment:stats").items()}
    assert stats.get("late", 0) == 0 and stats.get("already_written", 0) == 0, stats
    dead = client.xrange("sentiment:deadletter")
    assert len(dead) == 7 and {f[b"stage"] for _, f in dead} == {b"parse"}
