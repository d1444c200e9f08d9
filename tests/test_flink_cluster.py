"""The job on a Flink cluster of separate processes, as Kubernetes runs it.

``python -m launcher flink-cluster up --taskmanagers 2`` starts a JobManager and
two TaskManagers (JVMs of their own, 1 slot each), the Beam job server and the
Python SDK worker pool on 127.0.0.1; the job goes to it exactly as to a remote
cluster (``python -m launcher flink --flink_master=REST <submit_flags> ...``),
from the real Pub/Sub emulator to a real redis-server. Then things break: a
TaskManager is SIGKILLed mid-stream, the job is stopped with a savepoint and
resumed at another parallelism, the JobManager is SIGKILLed. Each time every
tweet ends as exactly one result (lost 0, doubled 0).

The figures (recovery times) are printed; ``pytest -s`` shows them.
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
from launcher.flink_rest import FlinkRest
from ops.metrics import FLINK
from tests.streams import PacedPublisher, publish, result_ids, sample_messages, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.integration]
NOISE = ("WARNING", "Traceback", "ERROR")


def cluster_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "flink-cluster", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def last_json(done: subprocess.CompletedProcess) -> dict:
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pubsub_emulator):
    if not jars.is_fetched():
        pytest.fail(f"the Flink jars are not in {jars.jars_dir()}: run `make jars`")
    cluster_dir = tmp_path_factory.mktemp("flink-cluster")
    done = cluster_cli("up", "--taskmanagers", "2", "--cluster_dir", str(cluster_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    state = last_json(done)
    state["dir"] = cluster_dir
    yield state
    cluster_cli("down", "--cluster_dir", str(cluster_dir))


def status(cluster) -> dict:
    done = cluster_cli("status", "--cluster_dir", str(cluster["dir"]), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return last_json(done)


_SUBMITTED: list["Submitted"] = []


@pytest.fixture(autouse=True)
def _no_job_left_running(request):
    """A test that fails mid-way leaves no job holding the cluster's slots
    for the next one: its launchers are stopped (SIGTERM cancels the job)."""
    yield
    if not _SUBMITTED:
        return
    for job in list(_SUBMITTED):
        _SUBMITTED.remove(job)
        if job.proc.poll() is None:
            try:
                job.stop(60)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait(10)
    if "cluster" in request.fixturenames:
        rest = FlinkRest(request.getfixturevalue("cluster")["rest"])
        for found in rest.jobs():
            if found["state"] in ("RUNNING", "RESTARTING", "CREATED"):
                rest.cancel(found["id"])


class Submitted:
    """``python -m launcher flink`` against the cluster, as a user runs it."""

    def __init__(self, cluster, log: Path, *flags: str):
        _SUBMITTED.append(self)
        self.log = log
        argv = [sys.executable, "-m", "launcher", "flink", f"--flink_master={cluster['rest']}",
                *cluster["submit_flags"], *flags]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "submitted" in self.text() or self.proc.poll() is not None, 120,
                 "the job to be submitted")
        assert self.proc.poll() is None, self.text()[-3000:]
        self.name = self.text().split("submitted ", 1)[1].split()[0]
        self.rest = FlinkRest(cluster["rest"])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def flink_id(self) -> str:
        return wait_for(lambda: (self.rest.job_named(self.name) or {}).get("id"), 60,
                        "Flink to list the job")

    def flink_state(self) -> str:
        return self.rest.state(self.flink_id())

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def job_flags(subscription: str, redis_url: str, model_dir, *more: str) -> list[str]:
    return [f"--input_subscription={subscription}", f"--redis_url={redis_url}",
            f"--model_dir={model_dir}", "--checkpointing_interval_ms=2000",
            "--pubsub_lease_seconds=15", *more]


def exactly_once(client, messages) -> None:
    ids = result_ids(client)
    assert len(ids) == len(set(ids)), "a tweet was scored twice"
    assert sorted(ids) == sorted(a["tweet_id"] for _, a in messages), "a tweet was lost"


def test_up_returns_the_cluster_it_started(cluster):
    assert cluster["rest"].startswith("127.0.0.1:")
    assert len(cluster["taskmanager_pids"]) == 2 and cluster["registered_taskmanagers"] == 2
    for pid in (cluster["jobmanager_pid"], *cluster["taskmanager_pids"],
                cluster["job_server_pid"], cluster["worker_pool_pid"]):
        assert alive(pid)
    assert any(f.startswith("--environment_config=127.0.0.1:") for f in cluster["submit_flags"])
    now = status(cluster)
    for key in ("rest", "jobmanager_pid", "taskmanager_pids", "submit_flags"):
        assert now[key] == cluster[key]
    # Everything listens on loopback only.
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    pids = {str(p) for p in (cluster["jobmanager_pid"], *cluster["taskmanager_pids"],
                             cluster["job_server_pid"], cluster["worker_pool_pid"])}
    for line in listening.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            assert line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


@pytest.mark.timeout(300)
def test_every_tweet_once_and_sigterm_cancels_the_job(cluster, pubsub_names, redis_url,
                                                      tiny_model_dir, tmp_path):
    import redis
    from google.cloud import pubsub_v1

    good = sample_messages(60, offset=5 * 10**6)
    now = good[0][1]["event_ts"]
    bad = [(b"{not json", {"tweet_id": "bad-1", "event_ts": now}),
           (json.dumps({"id": "78", "created_at": now}).encode(), {"tweet_id": "78",
                                                                   "event_ts": now})]
    client = redis.Redis.from_url(redis_url)
    job = Submitted(cluster, tmp_path / "job.log", "--parallelism=2",
                    *job_flags(pubsub_names["subscription"], redis_url, tiny_model_dir))
    publish(pubsub_names["topic"], good + bad + [good[7], good[8]])
    wait_for(lambda: len(set(result_ids(client))) >= len(good)
             and client.xlen("sentiment:deadletter") >= len(bad), 180, "every result")
    time.sleep(3)  # a double would land by now
    assert job.flink_state() == "RUNNING"
    flink_id = job.flink_id()
    # What the Grafana dashboard reads through Flink's Prometheus reporter
    # (ops/metrics.py FLINK): named as that reporter names what Flink lists.
    # (Flink's REST lists what its metric fetcher last collected, every 10 s.)
    missing = set(FLINK)
    deadline = time.monotonic() + 60
    while missing and time.monotonic() < deadline:
        missing = set(FLINK) - job.rest.prometheus_names(flink_id)
        time.sleep(2)
    assert not missing, f"the running job has no {sorted(missing)}"
    assert job.stop() == 0, job.text()[-3000:]
    assert job.rest.state(flink_id) == "CANCELED"  # Flink's word, not only Beam's
    assert "job ended CANCELED" in job.text()
    assert [line for line in job.text().splitlines() if any(n in line for n in NOISE)] == []
    exactly_once(client, good)
    assert client.xlen("sentiment:deadletter") == len(bad)
    stats = {k.decode(): int(v) for k, v in client.hgetall("sentiment:stats").items()}
    assert stats["results"] == len(good)
    leftover = pubsub_v1.SubscriberClient().pull(
        subscription=pubsub_names["subscription"], max_messages=100, timeout=5)
    assert len(leftover.received_messages) == 0  # every message acknowledged


@pytest.mark.timeout(420)
def test_a_taskmanager_killed_mid_stream_loses_and_doubles_nothing(
        cluster, pubsub_names, redis_url, tiny_model_dir, tmp_path):
    """Parallelism 2 over the two TaskManagers; one is SIGKILLed while tweets
    stream in. The supervisor starts a new one (as Kubernetes replaces a
    pod), Flink restarts the job from its last checkpoint, and what the dead
    TaskManager had pulled comes back from Pub/Sub when its lease lapses."""
    import redis

    messages = sample_messages(1200, offset=6 * 10**6)
    client = redis.Redis.from_url(redis_url)
    job = Submitted(cluster, tmp_path / "job.log", "--parallelism=2",
                    *job_flags(pubsub_names["subscription"], redis_url, tiny_model_dir))
    stream = PacedPublisher(pubsub_names["topic"], messages, per_second=100)
    stream.start()
    wait_for(lambda: client.xlen("sentiment:results") >= 150, 120, "results before the kill",
             every=0.05)
    flink_id = job.flink_id()
    restarts = job.rest.restarts(flink_id)
    victim = status(cluster)["taskmanager_pids"][0]
    os.kill(victim, signal.SIGKILL)
    killed, at_kill = time.monotonic(), client.xlen("sentiment:results")
    # Flink may restart the job within a second of the loss, faster than a
    # poll of its state sees: its restart count says it did.
    wait_for(lambda: job.rest.restarts(flink_id) > restarts
             or job.rest.state(flink_id) != "RUNNING", 60, "Flink to see the loss", every=0.1)
    wait_for(lambda: job.rest.state(flink_id) == "RUNNING", 120, "the job to run again",
             every=0.2)
    running_again = time.monotonic() - killed
    stream.join(60)
    wait_for(lambda: len(set(result_ids(client))) >= len(messages), 240, "every tweet")
    all_in = time.monotonic() - killed
    time.sleep(5)
    now = status(cluster)
    assert job.stop() == 0, job.text()[-3000:]
    exactly_once(client, messages)
    assert victim not in now["taskmanager_pids"] and now["registered_taskmanagers"] == 2
    assert now["restarts"].get("taskmanager-1", 0) >= 1
    print(f"taskmanager kill: {at_kill} of {len(messages)} results at the kill; job RUNNING "
          f"again after {running_again:.1f}s; every tweet after {all_in:.1f}s; lost 0, "
          f"doubled 0")


@pytest.mark.timeout(420)
def test_stop_with_savepoint_then_resume_at_parallelism_2(cluster, pubsub_names, redis_url,
                                                         tiny_model_dir, tmp_path):
    """Flink's stop-with-savepoint while tweets stream in, then the same job
    from the savepoint at parallelism 2; the stream never pauses."""
    import redis

    messages = sample_messages(1200, offset=7 * 10**6)
    client = redis.Redis.from_url(redis_url)
    flags = job_flags(pubsub_names["subscription"], redis_url, tiny_model_dir)
    first = Submitted(cluster, tmp_path / "first.log", "--parallelism=1", *flags)
    stream = PacedPublisher(pubsub_names["topic"], messages, per_second=100)
    stream.start()
    wait_for(lambda: client.xlen("sentiment:results") >= 150, 120, "results before the stop",
             every=0.05)
    done = cluster_cli("savepoint", "--cluster_dir", str(cluster["dir"]), "--job",
                       first.flink_id())
    assert done.returncode == 0, done.stderr[-3000:]
    saved = last_json(done)
    assert saved["state"] == "FINISHED" and saved["savepoint"].startswith("file:")
    at_stop = client.xlen("sentiment:results")
    assert first.proc.wait(60) == 0, first.text()[-3000:]  # the job ended: the launcher too
    assert stream.sent < len(messages), "the stream ended before the stop: nothing was tested"
    second = Submitted(cluster, tmp_path / "second.log", "--parallelism=2",
                       f"--savepoint_path={saved['savepoint']}", "--allow_non_restored_state",
                       *flags)
    stream.join(60)
    wait_for(lambda: len(set(result_ids(client))) >= len(messages), 240, "every tweet")
    time.sleep(5)
    assert second.stop() == 0, second.text()[-3000:]
    exactly_once(client, messages)
    print(f"savepoint: {at_stop} of {len(messages)} results at the stop, resumed at "
          f"parallelism 2 from {saved['savepoint']}; lost 0, doubled 0")


@pytest.mark.timeout(480)
def test_the_jobmanager_killed_then_the_job_resumed_from_its_last_checkpoint(
        cluster, pubsub_names, redis_url, tiny_model_dir, tmp_path):
    """Without HA a JobManager takes its jobs with it. The supervisor starts a
    new one (as Kubernetes restarts the pod), the TaskManagers register with
    it again, and the job is submitted again from its newest retained
    checkpoint (what the Flink operator's HA does by itself)."""
    import redis

    messages = sample_messages(1200, offset=8 * 10**6)
    client = redis.Redis.from_url(redis_url)
    flags = job_flags(pubsub_names["subscription"], redis_url, tiny_model_dir)
    first = Submitted(cluster, tmp_path / "first.log", "--parallelism=2", *flags)
    flink_id = first.flink_id()
    stream = PacedPublisher(pubsub_names["topic"], messages, per_second=100)
    stream.start()
    checkpoints = Path(cluster["checkpoints"]) / flink_id
    wait_for(lambda: client.xlen("sentiment:results") >= 150
             and any((p / "_metadata").exists() for p in checkpoints.glob("chk-*")), 120,
             "results and a completed checkpoint", every=0.1)
    old = status(cluster)
    os.kill(old["jobmanager_pid"], signal.SIGKILL)
    killed, at_kill = time.monotonic(), client.xlen("sentiment:results")
    back = wait_for(lambda: (s := status(cluster))["registered_taskmanagers"] == 2
                    and s["jobmanager_pid"] != old["jobmanager_pid"] and s, 180,
                    "a new JobManager with both TaskManagers")
    assert back["restarts"].get("jobmanager") == 1
    assert back["jobs"] == []  # no HA: the new JobManager knows no job
    latest = back["latest_checkpoints"][flink_id]
    first.stop()
    second = Submitted(cluster, tmp_path / "second.log", "--parallelism=2",
                       f"--savepoint_path={latest}", *flags)
    resumed = time.monotonic() - killed
    stream.join(60)
    wait_for(lambda: len(set(result_ids(client))) >= len(messages), 240, "every tweet")
    all_in = time.monotonic() - killed
    time.sleep(5)
    assert second.stop() == 0, second.text()[-3000:]
    exactly_once(client, messages)
    print(f"jobmanager kill: {at_kill} of {len(messages)} results at the kill; resubmitted "
          f"from {Path(latest).name} after {resumed:.1f}s; every tweet after {all_in:.1f}s; "
          f"lost 0, doubled 0")


def test_down_stops_every_process_it_started(cluster):
    pids = [cluster["supervisor_pid"], *status(cluster)["taskmanager_pids"]]
    now = status(cluster)
    pids += [now["jobmanager_pid"], now["job_server_pid"], now["worker_pool_pid"]]
    done = cluster_cli("down", "--cluster_dir", str(cluster["dir"]), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [pid for pid in pids if alive(pid)] == []
    assert cluster_cli("status", "--cluster_dir", str(cluster["dir"])).returncode == 1
