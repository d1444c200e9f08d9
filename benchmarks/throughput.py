"""Throughput of the job against the model alone, at several event-time densities.

    python benchmarks/throughput.py [--n 1000] [--model_dir DIR]
        [--runner DirectRunner|PrismRunner|FlinkRunner] [--densities 0.5,4,50,200]
        [--modes backlog,live] [--no_file] [--job_flag=--direct_optimizations=off]

Tweets are real ones of every length (``common.varied_texts``: the shipped
sample and two collections of labelled tweets). Prints progress on stderr
and one JSON object as the last line of stdout:

- ``model_only_tps``: the SavedModel called directly on the same texts in
  batches of 32, in arrival order, one call at a time (the model is warm),
  before and after the runs (``model_only_tps_before`` / ``_after``: this
  machine's speed drifts) and their mean, which every ratio divides by;
- ``file``: the job on a JSONL file of the same tweets (``--runner
  DirectRunner``: Beam's FnApiRunner), whole run with the model loaded
  first; ``tps``, ``ratio`` and the mean batch;
- ``runs``: for each density (tweets per second of event time) and mode:
  ``backlog`` (the tweets wait in the subscription before the job starts, as
  after a restart or a burst) and ``live`` (the job is running and warm, then
  the tweets arrive at once). ``tps`` = tweets / seconds from the job's start
  (backlog; the model is already loaded in this process, as a restarted
  worker's would be after its first seconds) or from the first publish
  (live) to the last result in Redis; ``ratio`` = ``tps`` / ``model_only_tps``.
  On Flink the backlog figure includes the embedded cluster's start;
- ``startup_s``: the start-up probe, one tweet waiting when the job starts,
  to its result (the model already loaded in this process, as for every
  run); a backlog's ``drain_tps`` = ``n`` / (last result - ``startup_s``)
  and ``drain_ratio`` = ``drain_tps`` / ``model_only_tps``: the pace of the
  drain itself. ``first_to_last_tps`` (first result to last) is kept for
  reference only: results land a bundle at a time, so it overstates;
- ``mean_batch`` and ``tweets_batched`` (what RunSentiment's batch-size
  metric counted), where the runner reports metrics while the job runs
  (the DirectRunner does; Flink's job service does not);
- ``min_ratio``: the smallest ``ratio`` of the runs; ``min_drain_ratio``:
  the smallest backlog ``drain_ratio``.

The emulator and a redis-server are started on 127.0.0.1 and stopped at the
end. ``--runner FlinkRunner`` runs the job on an embedded Flink through
``python -m launcher flink`` (jars from ``make jars``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402

_LOG = logging.getLogger("throughput")
MODEL_BATCH = 32


def model_only(model_dir: str, texts: list[str]) -> float:
    from model.serving import LoadedModel

    model = LoadedModel(model_dir)
    batches = [texts[i:i + MODEL_BATCH] for i in range(0, len(texts), MODEL_BATCH)]
    model.probabilities(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        model.probabilities(batch)
    return len(texts) / (time.perf_counter() - started)


def _batch_stats(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(
        MetricsFilter().with_namespace("RunSentiment").with_name("batch_size"))
    count = total = 0
    for d in found["distributions"]:
        value = d.committed or d.attempted
        if value is not None and value.count:
            count, total = count + value.count, total + value.sum
    return {"mean_batch": round(total / count, 1) if count else None, "tweets_batched": total}


def file_run(tweets, model_dir: str, redis_url: str, runner: str) -> dict:
    import redis

    from pipeline.pipeline import run
    from transforms.inference import local_handler

    redis.Redis.from_url(redis_url).flushdb()
    # Loaded first, as in a job that has been running: a one-time cost.
    local_handler(model_dir).load_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = common.write_jsonl(tweets, Path(tmp) / "tweets.jsonl")
        result, seconds = run([f"--runner={runner}", "--input_file", str(path),
                               "--redis_url", redis_url, "--model_dir", model_dir])
    count = redis.Redis.from_url(redis_url).xlen("sentiment:results")
    return {"results": count, "seconds": round(seconds, 2), "tps": round(count / seconds, 1),
            **_batch_stats(result)}


@contextlib.contextmanager
def streaming_job(argv: list[str], runner: str):
    """The job, running, cancelled on exit."""
    if runner == "FlinkRunner":
        from launcher.flink import flink_job

        with flink_job(["--flink_master=[local]", *argv]) as job:
            yield job.result
        return
    import apache_beam as beam

    from pipeline.pipeline import build, make_options, profile_of

    argv = [f"--runner={runner}", *argv]
    # The SDK workers `python -m pipeline` would start (Prism: a worker pool).
    with profile_of(make_options(argv)).local_workers(argv) as worker_flags:
        options = make_options(argv + worker_flags)
        pipeline = beam.Pipeline(options=options)
        build(pipeline, options)
        result = pipeline.run()
        try:
            yield result
        finally:
            with contextlib.suppress(Exception):
                result.cancel()
            deadline = time.monotonic() + 60
            while str(result.state) not in ("CANCELLED", "DONE", "FAILED") and \
                    time.monotonic() < deadline:
                time.sleep(0.2)


def _publish(publisher, topic: str, tweets: list[dict]) -> None:
    futures = [publisher.publish(topic, json.dumps(t).encode(), tweet_id=t["id"],
                                 event_ts=t["created_at"]) for t in tweets]
    for future in futures:
        future.result(timeout=120)


def _result_times(client) -> tuple[int, float, float]:
    """(results, first and last XADD time in epoch seconds)."""
    first = client.xrange("sentiment:results", count=1)
    last = client.xrevrange("sentiment:results", count=1)
    ms = [int(entries[0][0].decode().split("-")[0]) / 1000 for entries in (first, last)]
    return client.xlen("sentiment:results"), ms[0], ms[1]


def _wait(client, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while client.xlen("sentiment:results") < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def streaming_run(mode: str, density: float, tweets: list[dict], model_dir: str,
                  redis_url: str, runner: str, job_flags: list[str], timeout: float) -> dict:
    import redis
    from google.cloud import pubsub_v1

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    name = f"{mode}-{str(density).replace('.', '_')}-{int(time.time() * 1000)}"
    topic = publisher.topic_path("bertstream-bench", name)
    subscription = subscriber.subscription_path("bertstream-bench", name)
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    argv = [f"--input_subscription={subscription}", f"--redis_url={redis_url}",
            f"--model_dir={model_dir}", *job_flags]
    n = len(tweets)
    if mode in ("backlog", "probe"):
        _publish(publisher, topic, tweets)
    started = time.time()
    batches: dict = {}
    with streaming_job(argv, runner) as result:
        if mode == "live":
            # A warm job: one tweet through first (the model loads, the
            # stages start), then the burst.
            _publish(publisher, topic, [dict(tweets[0], id="1")])
            _wait(client, 1, timeout)
            client.delete("sentiment:results")
            started = time.time()
            _publish(publisher, topic, tweets)
        finished = _wait(client, n, timeout)
        try:  # live metrics: the DirectRunner has them; a job service may not
            # They are committed after the bundle's outputs move on: wait
            # until they cover every tweet (or say nothing).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batches = _batch_stats(result)
                if batches.get("tweets_batched", 0) >= n:
                    break
                time.sleep(0.5)
            else:
                batches = {}
        except Exception as err:  # noqa: BLE001 - a figure, not the benchmark
            _LOG.info("no live batch metrics from %s: %s", runner, err)
    count, first, last = _result_times(client)
    out = {"mode": mode, "density": density, "results": count, "complete": finished,
           "first_result_s": round(first - started, 2),
           "seconds": round(last - started, 2),
           "tps": round(count / (last - started), 1) if last > started else None,
           # From the first result to the last: results land a bundle at a
           # time, so this overstates the pace (drain_tps is the figure).
           "first_to_last_tps": round((count - 1) / (last - first), 1) if last > first else None,
           **batches}
    _LOG.info("%s at %s tweets/s of event time: %s", mode, density, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000,
                   help="tweets per run (the model scores 4,000 in about 5 s, several "
                        "times the job's start-up)")
    p.add_argument("--model_dir", default=str(ROOT / "models" / "bert_sentiment"))
    p.add_argument("--runner", default="DirectRunner",
                   choices=("DirectRunner", "PrismRunner", "FlinkRunner"))
    p.add_argument("--densities", default="0.5,4,50,200",
                   help="tweets per second of event time, comma-separated")
    p.add_argument("--modes", default="backlog,live")
    p.add_argument("--no_file", action="store_true", help="skip the file run")
    p.add_argument("--job_flag", action="append", default=[],
                   help="an extra flag for the job, e.g. --job_flag=--direct_optimizations=off")
    p.add_argument("--timeout_s", type=float, default=900)
    args = p.parse_args(argv)
    common.log_progress()

    from runners.local_servers import LocalPubSubEmulator, LocalRedis

    model_dir = common.model_dir_of(args.model_dir)
    texts = common.varied_texts()
    sample = texts[:args.n]
    report: dict = {"runner": args.runner, "n": args.n, "model_dir": model_dir,
                    "job_flags": args.job_flag, "texts_pool": len(texts),
                    "mean_text_chars": round(sum(map(len, sample)) / len(sample), 1)}
    before = model_only(model_dir, sample)
    _LOG.info("model alone: %.1f tweets/s", before)
    # Loaded first, as in a worker that has been running: a one-time cost,
    # kept by Beam's Shared cache for every job this process starts.
    if args.runner != "FlinkRunner":
        from transforms.inference import local_handler

        local_handler(model_dir).load_model()
    with LocalRedis() as server:
        if not args.no_file:
            tweets = common.make_tweets(args.n, 200, texts=sample)
            report["file"] = file_run(tweets, model_dir, server.url, "DirectRunner")
            _LOG.info("file: %s", report["file"])
        with LocalPubSubEmulator() as emulator:
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
            runs = []
            if "backlog" in args.modes.split(","):
                # The start-up probe: one tweet waiting, the job launched, its
                # result; a backlog's drain is timed from there. Twice: the
                # first streaming job of a process pays one-time costs (about
                # 2 s here) that the runs after it do not.
                for attempt in range(2):
                    probe = streaming_run("probe", 4.0, common.make_tweets(
                        1, 4.0, texts=sample, id_base=10**18 - (attempt + 1) * 10**7),
                        model_dir, server.url, args.runner, args.job_flag, args.timeout_s)
                report["startup_s"] = probe["seconds"] if probe["complete"] else None
            for i, density in enumerate(float(d) for d in args.densities.split(",")):
                for mode in args.modes.split(","):
                    tweets = common.make_tweets(args.n, density, texts=sample,
                                                id_base=10**18 + i * 10**7)
                    run = streaming_run(mode, density, tweets, model_dir, server.url,
                                        args.runner, args.job_flag, args.timeout_s)
                    startup = report.get("startup_s")
                    if mode == "backlog":
                        # None: drained within the start-up's own noise.
                        run["drain_tps"] = None
                        if startup is not None and run["seconds"] > startup:
                            run["drain_tps"] = round(args.n / (run["seconds"] - startup), 1)
                    runs.append(run)
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    # The model alone again: this machine's speed drifts by a tenth and more
    # within a minute, so the runs are compared with the mean of the two.
    after = model_only(model_dir, sample)
    _LOG.info("model alone, after the runs: %.1f tweets/s", after)
    model_tps = report["model_only_tps"] = round((before + after) / 2, 1)
    report["model_only_tps_before"], report["model_only_tps_after"] = (round(before, 1),
                                                                       round(after, 1))
    if "file" in report:
        report["file"]["ratio"] = round(report["file"]["tps"] / model_tps, 3)
    for run in runs:
        if run["tps"]:
            run["ratio"] = round(run["tps"] / model_tps, 3)
        if run["mode"] == "backlog":
            run["drain_ratio"] = (round(run["drain_tps"] / model_tps, 3)
                                  if run["drain_tps"] else None)
    report["runs"] = runs
    ratios = [r.get("ratio") for r in runs if r.get("ratio") is not None]
    report["min_ratio"] = min(ratios) if ratios else None
    drains = [r["drain_ratio"] for r in runs if r.get("drain_ratio") is not None]
    report["min_drain_ratio"] = min(drains) if drains else None
    print(json.dumps(report))
    return 0 if all(r["complete"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
