"""A backlog drained by each runner, timed against its own start-up probe.

    python benchmarks/drain.py [--n 4200] [--rate 50] [--seconds 30]
        [--setups direct,flink-embedded,cluster-1,cluster-2] [--model_dir DIR]

Each setup runs the job as a user does, in a process of its own
(``python -m pipeline``, ``python -m launcher flink --flink_master=[local]``,
or ``python -m launcher flink --flink_master=REST <submit_flags>`` against
``python -m launcher flink-cluster up --taskmanagers K``, parallelism K):

1. probe: one tweet waiting; the job launched; ``startup_s`` = launch -> its
   result (process start, model load, the runner's own start);
2. backlog: ``--n`` tweets waiting (varied texts, 4 tweets per second of
   event time); the job launched; ``first_result_s`` and ``last_result_s``
   after the launch; ``drain_tps`` = n / (last_result_s - startup_s). Results
   land in chunks (a bundle at a time), so "first result to last" would
   mislead; it is kept as ``first_to_last_tps`` for reference;
3. live: the same job, warm, offered ``--rate`` tweets/s for ``--seconds``;
   publish -> subscriber p50 / p99 (``benchmarks/latency.py``'s load process).

Every setup gets its own redis-server and emulator topics. The last stdout
line is one JSON object, with each drain against the DirectRunner's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, latency, throughput  # noqa: E402

_LOG = logging.getLogger("drain")
SETUPS = ("direct", "flink-embedded", "cluster-1", "cluster-2")


def _subscription(name: str, tweets: list[dict]) -> tuple[str, str]:
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path("bertstream-bench", f"{name}-{time.time_ns()}")
    subscription = subscriber.subscription_path("bertstream-bench", topic.rsplit("/", 1)[1])
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    throughput._publish(publisher, topic, tweets)
    return topic, subscription


@contextlib.contextmanager
def _job(command: list[str], log: Path):
    """The job's process, launched now; SIGTERM (the documented stop) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    launched = time.time()
    try:
        yield proc, launched
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _wait_results(client, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while client.xlen("sentiment:results") < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _result_times(client) -> tuple[float, float]:
    _, first, last = throughput._result_times(client)
    return first, last


def _live(rate: float, seconds: float, topic: str, redis_url: str, emulator: str) -> dict:
    import numpy as np

    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    load = ctx.Process(target=latency._offer_load, args=(
        emulator, redis_url, topic, rate, seconds, 5.0, common.varied_texts()[:5000],
        child_end))
    load.start()
    published, received, _ = parent_end.recv()
    load.join()
    done = [t for t in published if t in received]
    ms = np.array([(received[t] - published[t]) * 1000 for t in done])
    return {"live_p50_ms": round(float(np.percentile(ms, 50))) if len(ms) else None,
            "live_p99_ms": round(float(np.percentile(ms, 99))) if len(ms) else None,
            "live_missing": len(published) - len(done)}


def run_setup(name: str, command: list[str], tweets: list[dict], args, redis_url: str,
              emulator: str, logs: Path) -> dict:
    import redis

    client = redis.Redis.from_url(redis_url)
    row: dict = {}
    # A running cluster's first job is colder than the next (its TaskManagers
    # and SDK workers load classes and the model once): probe it twice.
    for probe_run in range(2 if name.startswith("cluster") else 1):
        client.flushdb()
        _, probe = _subscription(f"{name}-probe", [dict(tweets[0], id="1")])
        with _job([*command, f"--input_subscription={probe}"],
                  logs / f"{name}-probe{probe_run}.log") as (_, launched):
            if not _wait_results(client, 1, 600):
                raise RuntimeError(f"{name}: no probe result; see {logs}")
            startup = round(_result_times(client)[0] - launched, 2)
        row["startup_s" if probe_run == 0 else "warm_startup_s"] = startup
    if "warm_startup_s" in row:
        row["cold_startup_s"], row["startup_s"] = row["startup_s"], row.pop("warm_startup_s")
    client.flushdb()
    topic, backlog = _subscription(f"{name}-backlog", tweets)
    with _job([*command, f"--input_subscription={backlog}"], logs / f"{name}-backlog.log") \
            as (proc, launched):
        complete = _wait_results(client, len(tweets), 900)
        first, last = _result_times(client)
        count = client.xlen("sentiment:results")
        row.update(complete=complete, results=count,
                   first_result_s=round(first - launched, 2),
                   last_result_s=round(last - launched, 2),
                   drain_tps=round(count / max(last - launched - row["startup_s"], 1e-3), 1),
                   first_to_last_tps=round((count - 1) / max(last - first, 1e-3), 1))
        _LOG.info("%s: backlog %s", name, row)
        row.update(_live(args.rate, args.seconds, topic, redis_url, emulator))
        if proc.poll() is not None:
            raise RuntimeError(f"{name}: the job exited ({proc.returncode}); see {logs}")
    _LOG.info("%s: %s", name, row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", default=str(ROOT / "models" / "bert_sentiment"))
    p.add_argument("--n", type=int, default=4200)
    p.add_argument("--rate", type=float, default=50, help="live load, tweets/s")
    p.add_argument("--seconds", type=float, default=30, help="live load duration")
    p.add_argument("--setups", default=",".join(SETUPS))
    args = p.parse_args(argv)
    common.log_progress()

    from runners.local_servers import LocalPubSubEmulator, LocalRedis, run_logs

    model_dir = common.model_dir_of(args.model_dir)
    texts = common.varied_texts()
    tweets = common.make_tweets(args.n, 4, texts=texts)
    report = {"n": args.n, "model_dir": model_dir, "live_rate": args.rate,
              "load_average_at_start": os.getloadavg()[0],
              "model_only_tps": round(throughput.model_only(model_dir, texts[:1000]), 1),
              "setups": {}}
    logs = run_logs("bench-drain")
    _LOG.info("job logs in %s", logs)
    for name in args.setups.split(","):
        with LocalRedis() as server, LocalPubSubEmulator() as emulator, \
                contextlib.ExitStack() as stack:
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
            job = ["--redis_url", server.url, "--model_dir", model_dir]
            if name == "direct":
                command = [sys.executable, "-m", "pipeline", "--runner=DirectRunner", *job]
            elif name == "flink-embedded":
                command = [sys.executable, "-m", "launcher", "flink", "--flink_master=[local]",
                           "--parallelism=1", *job]
            else:
                taskmanagers = int(name.split("-")[1])
                cluster_dir = logs / f"cluster-{taskmanagers}"
                up = subprocess.run(
                    [sys.executable, "-m", "launcher", "flink-cluster", "up", "--taskmanagers",
                     str(taskmanagers), "--cluster_dir", str(cluster_dir)],
                    cwd=ROOT, capture_output=True, text=True, check=True)
                stack.callback(subprocess.run, [sys.executable, "-m", "launcher", "flink-cluster",
                                                "down", "--cluster_dir", str(cluster_dir)],
                               cwd=ROOT, capture_output=True)
                cluster = json.loads(up.stdout.strip().splitlines()[-1])
                command = [sys.executable, "-m", "launcher", "flink",
                           f"--flink_master={cluster['rest']}", *cluster["submit_flags"],
                           f"--parallelism={taskmanagers}", *job]
            report["setups"][name] = run_setup(name, command, tweets, args, server.url,
                                               emulator.host, logs)
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    direct = report["setups"].get("direct", {}).get("drain_tps")
    if direct:
        for row in report["setups"].values():
            row["drain_vs_direct"] = round(row["drain_tps"] / direct, 2)
    report["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
