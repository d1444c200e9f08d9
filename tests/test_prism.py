"""The job on Prism, Beam's portable local runner (``--runner=PrismRunner``):
on the bundled file and streaming from the Pub/Sub emulator, with the job's
own pull source and its acknowledgement step.

Needs the Prism binary (``make prism`` builds it from the Go module proxy).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners.profiles import PRISM_HINT, find_prism

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def prism():
    if find_prism() is None:
        pytest.fail("Prism is not built: " + PRISM_HINT)


def _summary(stdout: str) -> dict:
    return json.loads(stdout.split("json: ", 1)[1].splitlines()[0])


@pytest.mark.timeout(300)
def test_the_bundled_file_on_prism(redis_url, tiny_model_dir):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--runner=PrismRunner", f"--redis_url={redis_url}",
         f"--model_dir={tiny_model_dir}"], cwd=ROOT, capture_output=True, text=True,
        timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = _summary(done.stdout)
    assert (summary["read"], summary["results"], summary["duplicates_skipped"],
            summary["dead_lettered"]) == (300, 292, 1, 7)


@pytest.mark.timeout(300)
def test_streaming_on_prism_scores_acknowledges_and_stops_cleanly(pubsub_names, redis_url,
                                                                  tiny_model_dir, tmp_path):
    import redis
    from google.cloud import pubsub_v1

    from tests.streams import publish, result_ids, sample_messages, wait_for

    good = sample_messages(60, offset=3 * 10**6)
    now = good[0][1]["event_ts"]
    bad = [(b"\xff\xfe not utf-8", {"tweet_id": "bad-9", "event_ts": now})]
    log = tmp_path / "prism.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--runner=PrismRunner",
             f"--input_subscription={pubsub_names['subscription']}", f"--redis_url={redis_url}",
             f"--model_dir={tiny_model_dir}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(redis_url)
    try:
        publish(pubsub_names["topic"], good + bad + [good[0]])
        wait_for(lambda: len(result_ids(client)) >= len(good)
                 and client.xlen("sentiment:deadletter") >= 1, 240, "results on Prism")
        time.sleep(3)
        job.send_signal(signal.SIGTERM)
        assert job.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert sorted(result_ids(client)) == sorted(a["tweet_id"] for _, a in good)
    assert client.xlen("sentiment:deadletter") == 1
    leftover = pubsub_v1.SubscriberClient().pull(
        subscription=pubsub_names["subscription"], max_messages=100, timeout=5)
    assert len(leftover.received_messages) == 0  # every end was acknowledged
    output = log.read_text()
    assert "bertstream summary" in output
    # Quiet: no warning or traceback (Beam's and Prism's routine lines are INFO).
    assert [line for line in output.splitlines()
            if any(n in line for n in ("WARNING", "ERROR", "Traceback", "E0000"))] == []


@pytest.mark.timeout(120)
def test_prism_workers_run_in_a_loopback_pool_of_their_own_while_the_job_runs():
    """`python -m pipeline --runner=PrismRunner` starts its SDK workers in a
    process of its own on 127.0.0.1 (Beam's LOOPBACK listens on every
    interface and puts the workers' shutdown in the job's output), and stops
    it after; an --environment_type the user gives is left alone."""
    import socket

    from pipeline.pipeline import make_options, profile_of

    argv = ["--runner=PrismRunner"]
    profile = profile_of(make_options(argv))
    with profile.local_workers(argv) as flags:
        assert flags[0] == "--environment_type=EXTERNAL"
        host, port = flags[1].removeprefix("--environment_config=").rsplit(":", 1)
        assert host == "127.0.0.1"
        socket.create_connection((host, int(port)), timeout=5).close()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
    given = argv + ["--environment_type=LOOPBACK"]
    with profile.local_workers(given) as flags:
        assert flags == []
    with profile_of(make_options(["--runner=DirectRunner"])).local_workers([]) as flags:
        assert flags == []
