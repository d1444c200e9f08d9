"""End to end on real parts: the Pub/Sub emulator, redis-server, the tiny
SavedModel and the streaming pipeline on the DirectRunner."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import apache_beam as beam
import pytest
import redis

from pipeline.pipeline import build, make_options

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAD_INPUTS = {
    "malformed": b'{"id": "9", "text": ',
    "not_utf8": b"\xff\xfe\xfa not utf-8",
    "not_object": b'["an", "array"]',
    "missing_id": b'{"text": "no id here"}',
    "empty_text": b'{"id": "91", "text": ""}',
    "whitespace_text": b'{"id": "92", "text": "  \\n\\t "}',
    "missing_text": b'{"id": "93"}',
    "text_not_string": b'{"id": "94", "text": 42}',
    "text_too_long": json.dumps({"id": "95", "text": "x" * 30_000}).encode(),
}
TEXTS = ["Loving the new coffee place on 5th, best latte in town ☕️",
         "My flight got cancelled again. Three hours on hold. Never again.",
         "Council meeting moved to Thursday 7pm, agenda attached",
         "مرحبا! The weather in Dubai is perfect today 🌞",
         "ok so the update broke my wifi 🙃 anyone else?",
         "Just finished a 10k run, legs are jelly but I feel great"]


def _publish(topic: str, items: list[tuple[bytes, dict]]) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    for future in [publisher.publish(topic, data, **attrs) for data, attrs in items]:
        future.result(timeout=30)


def _event_ts(i: int) -> str:
    stamp = time.gmtime(time.time() - 60 + i * 0.05)
    return time.strftime("%Y-%m-%dT%H:%M:%S", stamp) + f".{(i * 50) % 1000:03d}Z"


def _start_streaming_job(subscription: str, redis_url: str, model_dir: Path):
    options = make_options(["--runner=DirectRunner", "--input_subscription", subscription,
                            "--redis_url", redis_url, "--model_dir", str(model_dir)])
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return pipeline.run()


def _wait_for(client, results: int, dead: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (client.xlen("sentiment:results") >= results
                and client.xlen("sentiment:deadletter") >= dead):
            time.sleep(2)  # anything extra (a double) would land by now
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out: {client.xlen('sentiment:results')} results, "
                         f"{client.xlen('sentiment:deadletter')} dead letters")


def _stream_ids(client, stream="sentiment:results") -> list[str]:
    return [fields[b"tweet_id"].decode() for _, fields in client.xrange(stream)]


@pytest.mark.timeout(300)
def test_streaming_job_scores_every_tweet_once(pubsub_names, redis_url, tiny_model_dir):
    tweets = [{"id": str(1861000000000000000 + i), "text": TEXTS[i % len(TEXTS)] + f" #{i}",
               "created_at": _event_ts(i), "author_id": str(1000 + i), "lang": "en"}
              for i in range(40)]
    items = [(json.dumps(t, ensure_ascii=False).encode(),
              {"tweet_id": t["id"], "event_ts": t["created_at"]}) for t in tweets]
    # Duplicates: the same tweet published again (as a redelivery or a double send).
    items += [items[3], items[3], items[17]]
    items += [(data, {"tweet_id": "0", "event_ts": _event_ts(0)}) for data in BAD_INPUTS.values()]

    subscriber = subprocess.Popen(
        [sys.executable, "-m", "ops.subscribe", "--redis_url", redis_url, "--json",
         "--max-results", str(len(tweets)), "--timeout", "120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 30
        while client.pubsub_numsub("sentiment")[0][1] < 1:  # connected before the run
            assert time.monotonic() < deadline, "subscriber did not subscribe"
            time.sleep(0.1)
        _publish(pubsub_names["topic"], items)
        result = _start_streaming_job(pubsub_names["subscription"], redis_url, tiny_model_dir)
        try:
            _wait_for(client, len(tweets), len(BAD_INPUTS))
        finally:
            result.cancel()
        out, err = subscriber.communicate(timeout=60)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()

    ids = _stream_ids(client)
    assert sorted(ids) == sorted(t["id"] for t in tweets)  # one result each, none doubled
    for _, fields in client.xrange("sentiment:results", count=5):
        body = json.loads(fields[b"result"])
        assert body["label"] in ("negative", "neutral", "positive")
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
        assert body["window_end"] > body["window_start"]
    # event_time is the message's event_ts to the millisecond (not its window's end).
    sent = {t["id"]: t["created_at"] for t in tweets}
    for _, fields in client.xrange("sentiment:results"):
        body = json.loads(fields[b"result"])
        assert body["event_time"] == sent[body["tweet_id"]]
        assert body["window_start"] <= body["event_time"] < body["window_end"]
        assert body["published_at"]  # the Pub/Sub publish time
    dead = client.xrange("sentiment:deadletter")
    assert len(dead) == len(BAD_INPUTS)
    assert {f[b"stage"] for _, f in dead} == {b"parse"}
    assert all(f[b"reason"] for _, f in dead)
    # The exact input bytes are kept (base64 where they were not UTF-8).
    raw = {base64.b64decode(f[b"raw"]) if f[b"encoding"] == b"base64" else f[b"raw"]
           for _, f in dead}
    assert raw == set(BAD_INPUTS.values())
    received = {json.loads(line)["tweet_id"] for line in out.splitlines() if line.strip()}
    assert received == {t["id"] for t in tweets}, err
    stats = {k.decode(): int(v) for k, v in client.hgetall("sentiment:stats").items()}
    assert stats["results"] == len(tweets) and stats["dead_letters"] == len(BAD_INPUTS)


@pytest.mark.timeout(300)
def test_replayed_sample_feeds_the_running_pipeline(pubsub_names, redis_url, tiny_model_dir):
    """`python -m ingest replay` of the shipped sample into the emulator, the
    streaming job reading it: every distinct good tweet becomes one result."""
    from ingest.replay import default_sample

    sample = default_sample()
    good = {}
    for line in sample.read_bytes().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip() \
                and obj.get("id"):
            good[str(obj["id"])] = obj
    client = redis.Redis.from_url(redis_url)
    result = _start_streaming_job(pubsub_names["subscription"], redis_url, tiny_model_dir)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ingest", "replay", str(sample), "--topic",
             pubsub_names["topic"], "--speed", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        _wait_for(client, len(good), 0)
    finally:
        result.cancel()
    assert sorted(_stream_ids(client)) == sorted(good)


@pytest.mark.timeout(300)
def test_cli_embedded_default_summary(redis_url, tiny_model_dir):
    """`python -m pipeline --runner=DirectRunner` on the bundled sample."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "--model_dir",
         str(tiny_model_dir), "--redis_url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.split("json: ", 1)[1].splitlines()[0])
    assert summary["read"] == 300
    assert summary["results"] == 292
    assert summary["duplicates_skipped"] == 1
    assert summary["dead_lettered"] == 7
    assert "redis-cli" in proc.stdout and "sentiment:results" in proc.stdout
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("sentiment:results") == 292
    # Run it again: the sink writes nothing twice.
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "--model_dir",
         str(tiny_model_dir), "--redis_url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    summary = json.loads(again.stdout.split("json: ", 1)[1].splitlines()[0])
    assert summary["results"] == 0 and summary["already_written"] == 292
    assert client.xlen("sentiment:results") == 292


@pytest.mark.timeout(120)
def test_cli_starts_its_own_redis_when_none_answers(tiny_model_dir, tmp_path):
    from runners.local_servers import free_port

    sample = tmp_path / "few.jsonl"
    sample.write_text("\n".join(json.dumps({"id": str(i), "text": f"tweet {i}",
                                            "created_at": "2026-11-20T10:00:00.000Z"})
                                for i in range(5)) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner", "--model_dir",
         str(tiny_model_dir), "--input_file", str(sample),
         "--redis_url", f"redis://127.0.0.1:{free_port()}/0"],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting a redis-server of our own" in proc.stderr
    assert "is stopped; its data is in" in proc.stdout
    summary = json.loads(proc.stdout.split("json: ", 1)[1].splitlines()[0])
    assert summary["results"] == 5


def test_bad_flags_fail_with_the_flag_named(tmp_path):
    cases = [(["--input_file", str(tmp_path / "nope.jsonl")], "--input_file"),
             (["--max_batch_size", "0"], "--max_batch_size"),
             (["--input_topic", "projects/p/topics/t", "--input_file", "x"], "at most one"),
             (["--redis_url", "http://x"], "--redis_url"),
             (["--pubsub_lease_seconds", "5"], "--pubsub_lease_seconds")]
    for args, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)


def test_help_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--input_subscription", "--window_seconds", "--max_batch_size",
                 "--redis_url", "--redis_stream_maxlen", "--inference", "--model_dir"):
        assert flag in proc.stdout
