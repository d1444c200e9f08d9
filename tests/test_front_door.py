"""The front door (issue 20): every mistake at start is one line that names the
flag and exits 2; a streaming job says when it reads and prints its summary on
SIGTERM; --help shows ``python -m pipeline`` and the defaults; a Dataflow dry
run needs no network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runners.local_servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def pipeline_cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    return lines[0]


# --- start-up errors --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_missing_subscription_is_one_line(pubsub_emulator, tiny_model_dir):
    missing = "projects/bertstream-test/subscriptions/nosuch"
    done = pipeline_cli("--input_subscription", missing, "--model_dir", str(tiny_model_dir))
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == f"error: --input_subscription {missing}: no such subscription"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_missing_topic_is_one_line(pubsub_emulator, tiny_model_dir):
    missing = "projects/bertstream-test/topics/nosuch"
    done = pipeline_cli("--input_topic", missing, "--model_dir", str(tiny_model_dir))
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == f"error: --input_topic {missing}: no such topic"


@pytest.mark.timeout(120)
def test_no_credentials_and_no_emulator_is_one_line(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    # No gcloud configuration, no metadata server: nowhere to find credentials.
    env.update(CLOUDSDK_CONFIG=str(tmp_path), NO_GCE_CHECK="true")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--input_subscription",
         "projects/p/subscriptions/s", "--model_dir", str(tiny_model_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith("error: --input_subscription projects/p/subscriptions/s: ")
    assert ("set PUBSUB_EMULATOR_HOST for the emulator, or Application Default Credentials "
            "for Google Cloud") in line


@pytest.mark.timeout(120)
def test_emulator_that_does_not_answer_is_one_line(tiny_model_dir):
    host = f"127.0.0.1:{free_port()}"
    done = pipeline_cli("--input_topic", "projects/p/topics/t",
                        "--model_dir", str(tiny_model_dir), env={"PUBSUB_EMULATOR_HOST": host})
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith("error: --input_topic projects/p/topics/t: no answer from "
                           f"the emulator at {host}")


@pytest.mark.timeout(120)
def test_missing_model_dir_names_the_flag(tmp_path):
    missing = tmp_path / "nosuch"
    done = pipeline_cli("--model_dir", str(missing))
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr).startswith(f"error: --model_dir {missing}: no SavedModel")


# --- a streaming job: the reading line, SIGTERM, the summary ----------------------------


def _tweet(i: int) -> tuple[bytes, dict[str, str]]:
    tweet_id = str(1_900_000_000_000_000_000 + i)
    created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 30 + i))
    body = {"id": tweet_id, "text": f"front door tweet number {i}, what a lovely day",
            "created_at": created, "author_id": "1", "lang": "en"}
    return json.dumps(body).encode(), {"tweet_id": tweet_id, "event_ts": created}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_a_streaming_job_with_its_summary(pubsub_names, redis_url,
                                                        tiny_model_dir):
    import redis
    from google.cloud import pubsub_v1

    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--runner=DirectRunner",
         "--input_subscription", pubsub_names["subscription"], "--redis_url", redis_url,
         "--no_local_redis", "--model_dir", str(tiny_model_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    err_lines: list[str] = []
    reading = threading.Event()

    def follow_stderr():
        for line in job.stderr:
            err_lines.append(line)
            if line.startswith("reading "):
                reading.set()

    follower = threading.Thread(target=follow_stderr, daemon=True)
    follower.start()
    try:
        assert reading.wait(180), "no 'reading' line:\n" + "".join(err_lines[-30:])
        line = next(x for x in err_lines if x.startswith("reading "))
        assert line.strip() == (f"reading {pubsub_names['subscription']}: waiting for tweets "
                                "(Ctrl-C or SIGTERM stops the job and prints the summary)")
        publisher = pubsub_v1.PublisherClient()
        for future in [publisher.publish(pubsub_names["topic"], data, **attrs)
                       for data, attrs in map(_tweet, range(5))]:
            future.result(timeout=30)
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 120
        while client.xlen("sentiment:results") < 5 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.xlen("sentiment:results") == 5, "".join(err_lines[-30:])
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(10)
    follower.join(10)
    assert job.returncode == 0, "".join(err_lines[-30:])
    assert "bertstream summary" in out
    assert "  results             5" in out.splitlines()


# --- help ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pipeline_help_names_the_command_and_shows_defaults():
    done = pipeline_cli("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m pipeline ")
    flat = " ".join(done.stdout.split())
    assert "fixed event-time window length (default: 2.0)" in flat
    assert "(default: redis://localhost:6379/0)" in flat
    assert "(default: None)" not in flat


@pytest.mark.timeout(120)
def test_model_build_help_gives_each_default_once():
    done = subprocess.run([sys.executable, "-m", "model", "build", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    assert "(default: None)" not in flat
    assert "training epochs (default 2; tiny: 1) --max-train-rows" in flat
    assert "(default: polar)" in flat


# --- a Dataflow dry run without the network ---------------------------------------------

# Run in the child before the launcher: any connection to a non-loopback host
# ends the process at once, naming the host, instead of retrying for minutes.
_NO_NETWORK = """
import os, runpy, socket, sys
_real = socket.getaddrinfo
def _loopback_only(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "0.0.0.0", ""):
        sys.stderr.write(f"NETWORK: tried to reach {host}\\n")
        sys.stderr.flush()
        os._exit(97)
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _loopback_only
sys.argv = ["launcher", *sys.argv[1:]]
runpy.run_module("launcher", run_name="__main__")
"""


def launcher_offline(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    return subprocess.run([sys.executable, "-c", _NO_NETWORK, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=150, env=env)


@pytest.mark.timeout(180)
def test_dataflow_dry_run_needs_no_network(tmp_path, tiny_model_dir):
    job_file = tmp_path / "job.json"
    done = launcher_offline("dataflow", "--dry_run", f"--job_file={job_file}",
                            "--project=my-project", "--region=europe-west1",
                            "--temp_location=gs://my-bucket/tmp",
                            "--input_subscription=projects/my-project/subscriptions/tweets",
                            f"--model_dir={tiny_model_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(job_file.read_text())["job"]["type"] == "JOB_TYPE_STREAMING"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag", ["--temp_location", "--staging_location"])
def test_dataflow_refuses_a_bucket_name_gcs_would_refuse(flag, tiny_model_dir):
    """``gs://BUCKET/tmp`` (upper case) made Beam look for a default bucket on
    Cloud Storage for two minutes; it is refused at once."""
    given = {"--temp_location": "gs://my-bucket/tmp"}
    given[flag] = "gs://BUCKET/tmp"
    done = launcher_offline("dataflow", "--dry_run", "--job_file=/dev/null", "--project=p",
                            "--region=europe-west1", f"--model_dir={tiny_model_dir}",
                            *[f"{k}={v}" for k, v in given.items()])
    assert done.returncode == 2, done.stderr[-3000:]
    assert one_line(done.stderr).startswith(f"error: {flag} gs://BUCKET/tmp: ")


# --- the documented commands (the walkthroughs themselves: tests/test_walkthroughs.py) -----


def _doc_block(doc: str, heading: str) -> str:
    text = (ROOT / doc).read_text()
    section = text[text.index(heading):]
    return section[section.index("```sh\n") + 6:section.index("\n```", section.index("```sh"))]


@pytest.mark.timeout(120)
def test_the_documented_evaluate_command_runs_on_the_shipped_sample(tiny_model_dir):
    line = next(x for x in _doc_block("docs/model.md", "# The model").splitlines()
                if " evaluate " in x)
    data = line.split("--data ", 1)[1].split()[0]
    done = subprocess.run([sys.executable, "-m", "model", "evaluate", "--model",
                           str(tiny_model_dir), "--data", data], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["n"] == 42 and out["skipped"] == 0
