"""The job on a real embedded Flink: Pub/Sub emulator -> Flink -> RunInference -> Redis.

Needs the jars of ``make jars`` (``python -m launcher fetch-jars``; the test
fails with that hint when they are missing), Java 17, the Pub/Sub emulator and
redis-server. ``python -m launcher flink --flink_master=[local]`` starts
Beam's Flink job server and a Python SDK worker pool on 127.0.0.1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import jars
from tests.streams import publish, result_ids, sample_messages, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def flink_jars():
    if not jars.is_fetched():
        pytest.fail(f"the Flink job server is not in {jars.jars_dir()}: run `make jars` "
                    "(python -m launcher fetch-jars; Maven Central)")


def _log_errors(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines()
            if " ERROR " in line or line.startswith("Caused by")]


@pytest.mark.timeout(360)
def test_flink_streams_pubsub_through_the_model_to_redis(pubsub_names, redis_url,
                                                         tiny_model_dir):
    """N valid tweets in, exactly N results; one dead letter per bad message; a
    tweet published twice scored once; every message acknowledged; the job
    cancelled cleanly and no error in the job server's log."""
    import redis
    from apache_beam.runners.runner import PipelineState

    from launcher.flink import flink_job

    good = sample_messages(40)
    now = good[0][1]["event_ts"]
    bad = [(b"{not json", {"tweet_id": "bad-1", "event_ts": now}),
           (json.dumps({"id": "77", "created_at": now}).encode(),  # no text
            {"tweet_id": "77", "event_ts": now})]
    twice = good[5]
    argv = ["--flink_master=[local]", "--parallelism=1", "--checkpointing_interval_ms=2000",
            f"--input_subscription={pubsub_names['subscription']}",
            f"--model_dir={tiny_model_dir}", f"--redis_url={redis_url}", "--window_seconds=1"]
    client = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    with flink_job(argv) as job:
        publish(pubsub_names["topic"], good + bad + [twice])
        wait_for(lambda: len(set(result_ids(client))) >= len(good)
                 and client.xlen("sentiment:deadletter") >= len(bad), 240,
                 "every result and dead letter")
        first_to_all = time.monotonic() - started
        time.sleep(3)  # a double, if any, would land by now
        assert job.result.state == PipelineState.RUNNING
        server_log = job.servers["flink-job-server"].log_path
    assert job.final_state == PipelineState.CANCELLED, "the job was not cancelled cleanly"

    ids = result_ids(client)
    assert sorted(ids) == sorted(attrs["tweet_id"] for _, attrs in good)  # once each
    assert client.xlen("sentiment:deadletter") == len(bad)
    stats = {k.decode(): int(v) for k, v in client.hgetall("sentiment:stats").items()}
    assert stats["results"] == len(good)
    one = json.loads(client.xrange("sentiment:results", count=1)[0][1][b"result"])
    assert one["label"] in ("negative", "neutral", "positive")
    assert one["event_time"] == now and one["published_at"]
    # Every message reached its end and was acknowledged: nothing comes back.
    from google.cloud import pubsub_v1

    leftover = pubsub_v1.SubscriberClient().pull(
        subscription=pubsub_names["subscription"], max_messages=100, timeout=5)
    assert len(leftover.received_messages) == 0
    assert _log_errors(server_log) == []
    print(f"flink: all results {first_to_all:.1f}s after launch")


def _launcher(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", "flink", *argv], cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ))


@pytest.mark.timeout(600)
def test_flink_job_killed_mid_stream_then_restarted_loses_and_doubles_nothing(
        pubsub_names, redis_url, tiny_model_dir, tmp_path):
    """SIGKILL the launcher (its job server and SDK workers die with it, as on
    a crashed machine) while tweets stream, start it again on the same
    subscription: every tweet ends as exactly one result. The job
    acknowledges a message only once its result is in Redis, so what the
    killed job had pulled comes back when its 15 s lease lapses, and the
    sink's SET NX keeps one result per tweet id."""
    import redis

    n = 600
    messages = sample_messages(n, offset=10**6)
    argv = ["--flink_master=[local]", "--checkpointing_interval_ms=2000",
            f"--input_subscription={pubsub_names['subscription']}",
            f"--model_dir={tiny_model_dir}", f"--redis_url={redis_url}",
            "--pubsub_lease_seconds=15"]
    client = redis.Redis.from_url(redis_url)
    first = _launcher(argv, tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: "launcher.flink: submitted " in (tmp_path / "first.log").read_text(),
                 180, "the first job to be submitted")
        publish(pubsub_names["topic"], messages)
        wait_for(lambda: client.xlen("sentiment:results") >= 1, 180, "a first result",
                 every=0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        at_kill = client.xlen("sentiment:results")
        assert at_kill < n, "the first job finished before it was killed: nothing was tested"
        second = _launcher(argv, tmp_path / "second.log")
        wait_for(lambda: len(set(result_ids(client))) >= n, 400, "every tweet after the restart")
        time.sleep(20)  # past a lease: a redelivered copy would be written by now
        second.send_signal(signal.SIGTERM)
        assert second.wait(90) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    ids = result_ids(client)
    assert len(ids) == len(set(ids)) == n  # lost 0, doubled 0
    assert sorted(ids) == sorted(attrs["tweet_id"] for _, attrs in messages)
    second_log = (tmp_path / "second.log").read_text()
    assert "job ended CANCELLED" in second_log
    assert "bertstream summary" in second_log  # the same summary as the DirectRunner's
    # A healthy run of the launcher is quiet: no warning, no traceback, no TensorFlow lines.
    assert [line for line in second_log.splitlines()
            if any(n in line for n in ("WARNING", "Traceback", "E0000", "I0000"))] == []


@pytest.mark.timeout(360)
def test_flink_reads_the_emulator_through_the_java_pubsub_read(pubsub_names, redis_url,
                                                                tiny_model_dir):
    """``--pubsub_read=xlang``: Beam's Java PubsubIO, expanded by the launcher's
    expansion service (EMBEDDED in the Flink JVM, no Docker), finds the
    emulator through --java_pubsub_root_url; Flink acknowledges at checkpoints.
    It stalled in 3 of 4 starts without --finish_bundle_before_checkpointing
    (the launcher's), so this also guards that flag."""
    import redis

    from launcher.flink import flink_job

    messages = sample_messages(10, offset=2 * 10**6)
    argv = ["--flink_master=[local]", "--checkpointing_interval_ms=2000", "--pubsub_read=xlang",
            f"--input_subscription={pubsub_names['subscription']}",
            f"--model_dir={tiny_model_dir}", f"--redis_url={redis_url}"]
    client = redis.Redis.from_url(redis_url)
    with flink_job(argv) as job:
        assert "--java_pubsub_root_url=http://" + os.environ["PUBSUB_EMULATOR_HOST"] in job.argv
        assert any(a.startswith("--beam_services=") for a in job.argv)
        publish(pubsub_names["topic"], messages)
        wait_for(lambda: len(set(result_ids(client))) >= len(messages), 270, "every result")
    assert sorted(set(result_ids(client))) == sorted(a["tweet_id"] for _, a in messages)
