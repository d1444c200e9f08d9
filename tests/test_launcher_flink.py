"""The job on a real embedded Flink: Pub/Sub emulator -> Flink -> RunInference -> Redis.

Needs the jars from ``python -m launcher fetch-jars`` (skips with that hint when
they are missing), Java 17, the Pub/Sub emulator and redis-server. Pub/Sub is
read through Beam's cross-language Java transform, expanded by the launcher's
own expansion service (EMBEDDED in the Flink JVM, no Docker).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from launcher import jars

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "pipeline" / "data" / "sample_tweets.jsonl"

pytestmark = [
    pytest.mark.flink, pytest.mark.slow, pytest.mark.integration,
    pytest.mark.skipif(not jars.is_fetched(),
                       reason="run `python -m launcher fetch-jars` first (Maven Central)"),
]


def sample_messages(n: int) -> list[tuple[bytes, dict[str, str]]]:
    """``n`` distinct good tweets as Pub/Sub ``(data, attributes)``, stamped now
    (event time = publish time, so windows close as the watermark follows)."""
    from ingest.message import BadTweet, format_time, to_message

    out, seen = [], set()
    now = format_time(datetime.now(UTC))
    for line in SAMPLE.read_bytes().splitlines():
        try:
            message = to_message(json.loads(line))
        except (ValueError, BadTweet):
            continue
        if message.tweet_id in seen:
            continue
        seen.add(message.tweet_id)
        out.append((message.data, {"tweet_id": message.tweet_id, "event_ts": now}))
        if len(out) == n:
            break
    assert len(out) == n, f"the sample has fewer than {n} good tweets"
    return out


def publish(topic: str, messages: list[tuple[bytes, dict[str, str]]]) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    for future in [publisher.publish(topic, data, **attrs) for data, attrs in messages]:
        future.result(timeout=30)


def wait_for_stream(client, key: str, count: int, timeout_s: float, result=None,
                    distinct: bytes | None = None) -> int:
    """Waits until the Redis stream has ``count`` entries (or the job ended)."""
    from apache_beam.runners.runner import PipelineState

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # With ``distinct``, count distinct values of that field: a read that is
        # at least once can make xlen overcount.
        seen = (len({f[distinct] for _, f in client.xrange(key)}) if distinct
                else client.xlen(key))
        if seen >= count:
            break
        if result is not None and PipelineState.is_terminal(result.state):
            break
        time.sleep(0.5)
    return client.xlen(key)


class _XAdd:
    """A tiny Redis sink for the read-only test (the project's sink is tested elsewhere)."""

    def __init__(self, url: str):
        self.url = url

    def __call__(self, source_and_bytes):
        import redis

        source_id, data = source_and_bytes
        redis.Redis.from_url(self.url).xadd("read:test", {"source": source_id, "data": data})


@pytest.mark.timeout(360)
def test_flink_reads_the_emulator_through_the_xlang_pubsub_source(pubsub_names, redis_url):
    """ReadTweets on embedded Flink: the Java PubsubIO (expanded by our expansion
    service, EMBEDDED) finds the emulator through --java_pubsub_root_url."""
    import apache_beam as beam
    import redis
    from apache_beam.runners.runner import PipelineState

    import launcher.common  # noqa: F401 - registers the Java-side options
    from launcher.expansion import LocalExpansionService
    from launcher.flink import FlinkLaunch, RunningJob
    from pipeline.pipeline import ReadTweets, make_options

    launch = FlinkLaunch.parse(["--flink_master=[local]", "--checkpointing_interval_ms=2000",
                                f"--input_subscription={pubsub_names['subscription']}"])
    messages = sample_messages(5)
    client = redis.Redis.from_url(redis_url)
    with LocalExpansionService(launch.expansion_jar) as service:
        argv = launch.argv(service.address)
        assert "--java_pubsub_root_url=http://" + pubsub_emulator_host() in argv
        options = make_options(argv)
        p = beam.Pipeline(options=options)
        p | "ReadTweets" >> ReadTweets(options) | "XAdd" >> beam.Map(_XAdd(redis_url))
        job = RunningJob(p.run(), argv, 0.0)
        try:
            publish(pubsub_names["topic"], messages)
            # Generous: on 2 busy cores Flink's start-up alone can take a minute.
            got = wait_for_stream(client, "read:test", len(messages), 270, job.result,
                                  distinct=b"data")
            assert job.result.state == PipelineState.RUNNING
        finally:
            state = job.cancel()
    assert state == PipelineState.CANCELLED
    # The read is at least once: a message whose ack (at checkpoint
    # finalization) came after its deadline is delivered again. The project's
    # sink dedupes by tweet id; this raw test sink does not, so compare sets.
    assert got >= len(messages)
    data = {fields[b"data"] for _, fields in client.xrange("read:test")}
    assert data == {d for d, _ in messages}


def pubsub_emulator_host() -> str:
    return os.environ["PUBSUB_EMULATOR_HOST"]


# Python SDK 2.77 against the Beam Java 2.62 Flink runner (the newest served here):
# the runner cannot decode the KV<id, Tweet row> the Python stage emits
# (ArrayIndexOutOfBounds in PaneInfoCoder), and Flink keeps restarting the task,
# so the test would only wait out its timeout. Opt in once the job server matches.
@pytest.mark.skipif(not os.environ.get("BERTSTREAM_FLINK_E2E"),
                    reason="needs a job server matching the Python SDK (2.77); the 2.62 one "
                           "fails on the keyed stage: set BERTSTREAM_FLINK_E2E=1 to run")
@pytest.mark.timeout(240)
def test_flink_streams_pubsub_through_the_model_to_redis(pubsub_names, redis_url,
                                                         tiny_model_dir):
    import redis
    from apache_beam.runners.runner import PipelineState

    from launcher.flink import flink_job

    good = sample_messages(12)
    now = good[0][1]["event_ts"]
    bad = [(b"{not json", {"tweet_id": "bad-1", "event_ts": now}),
           (json.dumps({"id": "77", "created_at": now}).encode(),  # no text
            {"tweet_id": "77", "event_ts": now})]
    argv = ["--flink_master=[local]", "--environment_type=LOOPBACK", "--parallelism=1",
            "--checkpointing_interval_ms=2000",
            f"--input_subscription={pubsub_names['subscription']}",
            f"--model_dir={tiny_model_dir}", f"--redis_url={redis_url}",
            "--window_seconds=1", "--max_batch_wait_seconds=0.2"]
    client = redis.Redis.from_url(redis_url)
    with flink_job(argv) as job:
        assert any(a.startswith("--beam_services=") for a in job.argv)
        publish(pubsub_names["topic"], good + bad)
        results = wait_for_stream(client, "sentiment:results", len(good), 150, job.result)
        dead = wait_for_stream(client, "sentiment:deadletter", len(bad), 30, job.result)
        assert job.result.state == PipelineState.RUNNING
    assert job.result.state == PipelineState.CANCELLED, "the job was not cancelled cleanly"

    assert results == len(good)
    assert dead == len(bad)
    entries = client.xrange("sentiment:results")
    ids = {json.loads(fields[b"result"])["tweet_id"] for _, fields in entries}
    assert ids == {attrs["tweet_id"] for _, attrs in good}
    one = json.loads(entries[0][1][b"result"])
    assert one["label"] in ("negative", "neutral", "positive")
    assert set(one["probabilities"]) == {"negative", "neutral", "positive"}
