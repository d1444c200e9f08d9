"""The launchers without a cluster: --dry_run output (no secrets), the Dataflow
job description built by Beam's Dataflow runner, and the portable path through
Beam's Python local job service (PortableRunner) with a file input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.common import redact

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-pw"
SUBSCRIPTION = "projects/my-project/subscriptions/tweets-sub"


def launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def test_redact_masks_url_passwords_and_secret_keys():
    out = redact({"redis_url": f"redis://user:{SECRET}@redis:6379/0",
                  "x_token": "abc", "argv": [f"--redis_url=rediss://:{SECRET}@h/0"],
                  "model_dir": "/m"})
    assert SECRET not in json.dumps(out)
    assert out["redis_url"] == "redis://user:***@redis:6379/0"
    assert out["x_token"] == "***" and out["model_dir"] == "/m"


@pytest.mark.timeout(120)
def test_flink_dry_run_resolves_every_flag_without_secrets(tmp_path, tiny_model_dir):
    done = launcher("flink", "--dry_run", "--flink_master=[local]",
                    f"--input_subscription={SUBSCRIPTION}", f"--model_dir={tiny_model_dir}",
                    f"--redis_url=redis://bertstream:{SECRET}@redis:6379/0")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    out = json.loads(done.stdout)
    options = out["options"]
    assert options["runner"] == "FlinkRunner" and options["flink_master"] == "[local]"
    assert options["streaming"] is True
    # The launcher's own worker pool on 127.0.0.1 (LOOPBACK would bind every interface).
    assert options["environment_type"] == "EXTERNAL"
    assert options["environment_config"].startswith("127.0.0.1:")
    assert options["checkpointing_interval"] == 10000  # on by default
    # A barrier never strands a finished bundle's output (launcher/flink.py).
    assert options["finish_bundle_before_checkpointing"] is True
    assert options["flink_job_server_jar"].endswith("job-server-2.70.0.jar")
    assert options["redis_url"] == "redis://bertstream:***@redis:6379/0"
    # Pub/Sub through the job's own pull source: no expansion service.
    assert not options.get("beam_services") and out["expansion_service_jar"] is None
    assert options["max_bundle_time_mills"] == 100  # batches are cut from bundles


@pytest.mark.timeout(120)
def test_flink_dry_run_with_the_java_pubsub_read(tiny_model_dir):
    done = launcher("flink", "--dry_run", "--flink_master=[local]", "--pubsub_read=xlang",
                    f"--input_subscription={SUBSCRIPTION}", f"--model_dir={tiny_model_dir}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    services = out["options"]["beam_services"]
    assert list(services.values()) == ["127.0.0.1:<port chosen at start>"]
    assert out["java_environment_type"] == "EMBEDDED"


@pytest.mark.timeout(60)
def test_flink_dry_run_for_a_cluster_stages_the_setup_file(tiny_model_dir):
    done = launcher("flink", "--dry_run", "--flink_master=flink-rest:8081",
                    "--environment_type=EXTERNAL", "--environment_config=localhost:50000",
                    "--parallelism=4", "--checkpointing_interval_ms=60000",
                    f"--model_dir={tiny_model_dir}", "--max_bundle_time_mills=1000")
    assert done.returncode == 0, done.stderr
    options = json.loads(done.stdout)["options"]
    assert options["max_bundle_time_mills"] == 1000  # given: kept
    assert options["setup_file"] == str(ROOT / "setup.py")
    assert options["parallelism"] == 4
    assert options["checkpointing_interval"] == 60000
    assert options["environment_config"] == "localhost:50000"


def test_flink_external_needs_a_worker_pool():
    done = launcher("flink", "--dry_run", "--flink_master=flink-rest:8081",
                    "--environment_type=EXTERNAL")
    assert done.returncode == 2 and "--environment_config" in done.stderr


@pytest.mark.timeout(120)
def test_dataflow_dry_run_and_job_description(tmp_path, tiny_model_dir):
    job_file = tmp_path / "job.json"
    done = launcher("dataflow", "--dry_run", f"--job_file={job_file}", "--project=my-project",
                    "--region=europe-west1", "--temp_location=gs://bucket/tmp",
                    "--max_num_workers=3", f"--input_subscription={SUBSCRIPTION}",
                    f"--model_dir={tiny_model_dir}",
                    f"--redis_url=redis://:{SECRET}@10.0.0.3:6379/0")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr + job_file.read_text()
    options = json.loads(done.stdout)["options"]
    assert options["runner"] == "DataflowRunner" and options["streaming"] is True
    assert options["enable_streaming_engine"] is True
    assert options["setup_file"] == str(ROOT / "setup.py")
    assert options["max_num_workers"] == 3

    description = json.loads(job_file.read_text())
    assert description["job"]["type"] == "JOB_TYPE_STREAMING"
    components = description["pipeline"]["components"]
    transforms = components["transforms"].values()
    top = {t["uniqueName"] for t in transforms if "/" not in t["uniqueName"]}
    assert {"ReadTweets", "ParseTweets", "DedupeByTweetId", "WindowByEventTime",
            "RunSentiment", "WriteToRedis", "WriteDeadLetters"} <= top
    reads = [t for t in transforms if t.get("spec", {}).get("urn") == "beam:transform:pubsub_read:v1"]
    assert len(reads) == 1 and reads[0]["uniqueName"].startswith("ReadTweets/")
    import base64

    from apache_beam.portability.api import beam_runner_api_pb2

    payload = beam_runner_api_pb2.PubSubReadPayload.FromString(
        base64.b64decode(reads[0]["spec"]["payload"]))
    assert payload.subscription == SUBSCRIPTION
    assert payload.id_attribute == "tweet_id" and payload.timestamp_attribute == "event_ts"
    staged = [base64.b64decode(d["rolePayload"])
              for env in components["environments"].values()
              for d in env.get("dependencies", [])]
    assert any(b"workflow.tar.gz" in s for s in staged), "setup.py's sdist is not staged"


def test_dataflow_wants_a_gcs_temp_location():
    done = launcher("dataflow", "--dry_run", "--project=p-1", "--region=r",
                    "--temp_location=/tmp/x")
    assert done.returncode == 2 and "gs://" in done.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_portable_runner_local_job_service_with_a_file(redis_url, tiny_model_dir):
    """The portable path (Runner API -> job service -> SDK harness) through Beam's
    Python local job service, with a file (streaming from Pub/Sub on portable
    runners is covered by tests/test_prism.py and tests/test_launcher_flink.py)."""
    import redis

    from pipeline.options import SAMPLE_TWEETS
    from pipeline.pipeline import run

    result, _ = run(["--runner=PortableRunner", "--job_endpoint=embed",
                     "--environment_type=LOOPBACK", f"--model_dir={tiny_model_dir}",
                     f"--redis_url={redis_url}", f"--input_file={SAMPLE_TWEETS}"])
    assert result.state == "DONE"
    client = redis.Redis.from_url(redis_url)
    # sample_tweets.jsonl: 292 distinct good tweets, one duplicate, 7 bad lines.
    assert client.xlen("sentiment:results") == 292
    assert client.xlen("sentiment:deadletter") == 7


def test_a_server_started_dying_with_its_parent_dies_with_it(tmp_path):
    """The servers the launcher starts (job server, expansion service, worker
    pool, a local cluster's JVMs) are killed with it, even by SIGKILL; the
    request is made by an exec wrapper, so the child is the command itself."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from runners.local_servers import dying_with_parent\n"
        "child = subprocess.Popen(dying_with_parent(['sleep', '60']))\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")], cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        proc = Path(f"/proc/{child}")

        def running() -> bool:  # a zombie (killed, not yet reaped by init) is not
            try:
                return not (proc / "stat").read_text().split(") ")[1].startswith("Z")
            except FileNotFoundError:
                return False

        cmdline = b""
        while not cmdline.startswith(b"sleep\0") and time.monotonic() < deadline:
            cmdline = (proc / "cmdline").read_bytes()
            time.sleep(0.05)
        assert cmdline.split(b"\0")[:2] == [b"sleep", b"60"]  # exec'd in place: same pid
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running()
    finally:
        if parent.poll() is None:
            parent.kill()
