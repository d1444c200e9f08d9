"""Replay into the real Pub/Sub emulator: data, attributes, pacing, bad lines, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.message import BadTweet, parse_json, to_message
from ingest.replay import default_sample, replay

ROOT = Path(__file__).resolve().parent.parent


def pull_all(subscription: str, expect: int, timeout: float = 30.0, quiet_s: float = 1.5,
             stop_early=None) -> list:
    """Pulls (and acks) until ``expect`` messages came and then ``quiet_s`` passed with no
    more (so extras would be seen), or ``timeout``. ``stop_early(messages)`` may end it."""
    from google.api_core import exceptions as api_exceptions
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    got: list = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            try:
                response = subscriber.pull(subscription=subscription, max_messages=1000,
                                           timeout=5)
            except api_exceptions.DeadlineExceeded:
                response = None
            if response and response.received_messages:
                got.extend(response.received_messages)
                subscriber.acknowledge(subscription=subscription,
                                       ack_ids=[m.ack_id for m in response.received_messages])
                last_new = time.monotonic()
                if stop_early and stop_early(got):
                    break
                continue
            if len(got) >= expect and time.monotonic() - last_new >= quiet_s:
                break
            time.sleep(0.1)
    finally:
        subscriber.close()
    return got


def good_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, tweet as published) for every line replay should publish, in order."""
    out = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                message = to_message(parse_json(raw.rstrip(b"\n")))
            except BadTweet:
                continue
            out.append((number, json.loads(message.data)))
    return out


def _write(path: Path, tweets: list) -> Path:
    path.write_text("".join((t if isinstance(t, str) else json.dumps(t)) + "\n" for t in tweets))
    return path


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_replay_of_the_shipped_sample_into_the_emulator(pubsub_names):
    sample = default_sample()
    expected = good_lines(sample)
    assert len(expected) == 293

    totals = replay(None, pubsub_names["topic"], speed=0)

    assert (totals.received, totals.published, totals.failed, totals.bad) == (300, 293, 0, 7)
    assert [b.line for b in totals.bad_lines] == [21, 56, 91, 126, 171, 211, 251]
    messages = pull_all(pubsub_names["subscription"], expect=293)
    assert len(messages) == 293

    # Data and attributes: exactly the file's good tweets (the duplicate twice), ids as strings.
    by_line = sorted(expected, key=lambda e: e[1]["id"])
    pulled = sorted((json.loads(m.message.data) for m in messages), key=lambda t: t["id"])
    assert pulled == [tweet for _, tweet in by_line]
    for m in messages:
        tweet = json.loads(m.message.data)
        assert isinstance(tweet["id"], str) and int(tweet["id"]) > 2**53
        assert m.message.attributes["tweet_id"] == tweet["id"]
        assert m.message.attributes["event_ts"] == tweet["created_at"]
    ids = [m.message.attributes["tweet_id"] for m in messages]
    assert len(set(ids)) == 292  # one duplicate in the sample

    # Event times: the attribute carries each tweet's created_at, and publishing follows the
    # file. Pub/Sub orders nothing without ordering keys and the client sends batches
    # concurrently, so "follows" means: no message is published more than a batch's
    # round trip before one that comes earlier in the file.
    assert sorted(m.message.attributes["event_ts"] for m in messages) == sorted(
        t["created_at"] for _, t in expected)
    publish_times: dict[str, list[float]] = {}
    for m in messages:
        publish_times.setdefault(m.message.attributes["tweet_id"], []).append(
            m.message.publish_time.timestamp())
    for times in publish_times.values():
        times.sort()
    in_file_order = [publish_times[t["id"]].pop(0) for _, t in expected]
    latest_so_far = [max(in_file_order[: i + 1]) for i in range(len(in_file_order))]
    assert max(a - b for a, b in zip(latest_so_far, in_file_order, strict=True)) < 0.5


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_replay_keeps_inter_arrival_times_scaled_by_speed(pubsub_names, tmp_path):
    # 6 tweets one second apart, then a 2 s gap, at 10x: 0.1 s apart, then 0.2 s.
    offsets = [0, 1, 2, 3, 4, 6]
    tweets = [{"id": str(2**60 + i), "text": f"tweet {i}", "author_id": "1", "lang": "en",
               "created_at": f"2026-11-20T10:00:{s:02d}.000Z"} for i, s in enumerate(offsets)]
    path = _write(tmp_path / "paced.jsonl", tweets)

    started = time.monotonic()
    totals = replay(path, pubsub_names["topic"], speed=10, settings=_unbatched())
    took = time.monotonic() - started

    assert totals.published == 6 and totals.bad == 0
    assert took >= 0.6 * 0.95  # the file spans 6 s of event time
    messages = pull_all(pubsub_names["subscription"], expect=6)
    messages.sort(key=lambda m: m.message.publish_time.timestamp())
    event_ts = [m.message.attributes["event_ts"] for m in messages]
    assert event_ts == sorted(event_ts)
    published = [m.message.publish_time.timestamp() for m in messages]
    gaps = [b - a for a, b in zip(published, published[1:], strict=False)]
    wanted = [(b - a) / 10 for a, b in zip(offsets, offsets[1:], strict=False)]
    for gap, want in zip(gaps, wanted, strict=True):
        assert want - 0.05 <= gap <= want + 0.15, (gaps, wanted)


def _unbatched():
    from ingest.publish import PublishSettings
    return PublishSettings(max_messages=1, max_latency_s=0.0)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_replay_cli_reports_bad_lines_and_creates_the_topic(pubsub_emulator, tmp_path):
    topic = "projects/bertstream-test/topics/created-by-replay"
    path = _write(tmp_path / "mixed.jsonl", [
        {"id": "1", "text": "good one", "created_at": "2026-11-20T10:00:00.000Z"},
        "{not json",
        "",
        {"id": 12345678901234567890, "text": "numeric id", "created_at": "2026-11-20T10:00:01Z"},
        {"id": "3", "text": "   ", "created_at": "2026-11-20T10:00:02.000Z"},
    ])
    env = dict(os.environ, PUBSUB_EMULATOR_HOST=pubsub_emulator.host)
    missing = subprocess.run([sys.executable, "-m", "ingest", "replay", str(path), "--topic",
                              topic, "--speed", "0"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "--create-topic" in missing.stderr

    done = subprocess.run([sys.executable, "-m", "ingest", "replay", str(path), "--topic", topic,
                           "--speed", "0", "--create-topic", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["published"] == 2 and summary["bad"] == 2 and summary["bad_lines"] == [2, 5]
    assert "line 2 skipped: invalid JSON" in done.stderr
    assert "line 5 skipped: text is only whitespace" in done.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_loop_sends_later_passes_as_new_tweets(pubsub_names, tmp_path):
    import threading

    tweets = [{"id": str(2123717988971446272 + (i << 22) * 1000), "text": f"t{i}",
               "created_at": f"2026-11-20T10:00:0{i}.000Z"} for i in range(3)]
    path = _write(tmp_path / "loop.jsonl", tweets)
    stop = threading.Event()
    timer = threading.Timer(0.8, stop.set)  # 3 tweets over 2 s at 10x: ~3 passes
    timer.start()
    totals = replay(path, pubsub_names["topic"], speed=10, loop=True, stop=stop)
    timer.cancel()
    assert totals.published >= 6 and totals.failed == 0
    messages = pull_all(pubsub_names["subscription"], expect=totals.published)
    ids = [m.message.attributes["tweet_id"] for m in messages]
    assert len(ids) == totals.published == len(set(ids))
    ts = sorted(m.message.attributes["event_ts"] for m in messages)
    assert ts[3] == "2026-11-20T10:00:03.000Z"  # pass 2 starts 1 s after pass 1's last tweet


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_sigterm_during_replay_publishes_everything_read(pubsub_names):
    """SIGTERM mid-file: every line the ingester says it read is in Pub/Sub, once."""
    env = dict(os.environ, PUBSUB_EMULATOR_HOST=os.environ["PUBSUB_EMULATOR_HOST"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "replay", "--topic", pubsub_names["topic"],
         "--speed", "40", "--max-latency", "0.5", "--max-messages", "1000", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the first messages, then stop it mid-file (the sample spans ~10 min,
        # 15 s at 40x) while a half-second batch is still open.
        early = pull_all(pubsub_names["subscription"], expect=10**9, timeout=60,
                         stop_early=lambda got: len(got) >= 20)
        assert len(early) >= 20
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["received"] < 300, "SIGTERM came after the end of the file"
    messages = early + pull_all(pubsub_names["subscription"], expect=summary["published"] - len(early))
    expected = [t["id"] for n, t in good_lines(default_sample()) if n <= summary["received"]]
    assert summary["published"] == len(expected) and summary["failed"] == 0
    assert sorted(m.message.attributes["tweet_id"] for m in messages) == sorted(expected)
    assert "SIGTERM: stopping" in err
