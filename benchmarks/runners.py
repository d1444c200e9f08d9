"""The runners side by side, in one run: file, streaming backlog, live latency.

    python benchmarks/runners.py [--model_dir DIR] [--n 1000] [--rate 50]
        [--seconds 30] [--runners direct,direct-off,prism,flink-1,flink-2]

For each runner, on the same tweets (``common.varied_texts``) and model:

- ``file_tps``: the job on a JSONL file of n tweets, whole run, the model
  loaded beforehand in this process (Flink: its SDK workers load it, which
  is counted);
- ``backlog_tps``: n tweets waiting in the subscription (4 tweets per second
  of event time), the job started, tweets / seconds to the last result;
- ``live_tps``: the job running and warm, then n tweets at once;
- ``live_p50_ms`` / ``live_p99_ms``: publish -> subscriber, ``--rate``
  tweets/s for ``--seconds`` (``benchmarks/latency.py``);
- ``first_result_s``: from the backlog run's start to its first result;
  ``backlog_drain_tps``: the backlog from its first result to its last
  (without the runner's start-up: the embedded Flink's JVM and cluster).

Runners: ``direct`` (DirectRunner with runners/direct_runner.py),
``direct-off`` (``--direct_optimizations=off``: Beam's DirectRunner as it
ships), ``prism`` (PrismRunner), ``flink-P`` (embedded Flink at parallelism
P). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
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

from benchmarks import common, latency, throughput  # noqa: E402

_LOG = logging.getLogger("runners")
RUNNERS = {
    "direct": ("DirectRunner", []),
    "direct-off": ("DirectRunner", ["--direct_optimizations=off"]),
    "prism": ("PrismRunner", []),
    "flink-1": ("FlinkRunner", ["--parallelism=1"]),
    "flink-2": ("FlinkRunner", ["--parallelism=2"]),
}


def _file_tps(runner: str, flags: list[str], tweets, model_dir: str, redis_url: str) -> float:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        path = common.write_jsonl(tweets, Path(tmp) / "tweets.jsonl")
        argv = ["--input_file", str(path), "--redis_url", redis_url, "--model_dir", model_dir]
        started = time.monotonic()
        if runner == "FlinkRunner":
            from launcher.flink import flink_job

            with flink_job(["--flink_master=[local]", *flags, *argv]) as job:
                job.result.wait_until_finish()
        else:
            from pipeline.pipeline import make_options, profile_of, run
            from transforms.inference import local_handler

            local_handler(model_dir).load_model()
            job_argv = [f"--runner={runner}", *flags, *argv]
            # The SDK workers `python -m pipeline` would start (Prism: a worker pool).
            with profile_of(make_options(job_argv)).local_workers(job_argv) as worker_flags:
                started = time.monotonic()
                run(job_argv + worker_flags)
        seconds = time.monotonic() - started
    return round(redis.Redis.from_url(redis_url).xlen("sentiment:results") / seconds, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", default=str(ROOT / "models" / "bert_sentiment"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50, help="live load, tweets/s")
    p.add_argument("--seconds", type=float, default=30, help="live load duration")
    p.add_argument("--runners", default=",".join(RUNNERS))
    args = p.parse_args(argv)
    common.log_progress()

    from runners.local_servers import LocalPubSubEmulator, LocalRedis

    model_dir = common.model_dir_of(args.model_dir)
    texts = common.varied_texts()[:args.n]
    report = {"n": args.n, "model_dir": model_dir, "live_rate": args.rate,
              "model_only_tps": round(throughput.model_only(model_dir, texts), 1), "runners": {}}
    for name in args.runners.split(","):
        runner, flags = RUNNERS[name]
        row: dict = {}
        _LOG.info("%s: file", name)
        with LocalRedis() as server:
            tweets = common.make_tweets(args.n, 4, texts=texts)
            row["file_tps"] = _file_tps(runner, flags, tweets, model_dir, server.url)
            with LocalPubSubEmulator() as emulator:
                os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
                for mode in ("backlog", "live"):
                    _LOG.info("%s: %s", name, mode)
                    run = throughput.streaming_run(mode, 4, tweets, model_dir, server.url,
                                                   runner, flags, 900)
                    row[f"{mode}_tps"] = run["tps"]
                    if mode == "backlog":
                        row["first_result_s"] = run["first_result_s"]
                        row["backlog_drain_tps"] = run["first_to_last_tps"]
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        _LOG.info("%s: live latency", name)
        load = latency.measure(args.rate, args.seconds, model_dir, 2.0, warmup_seconds=5,
                               job_flags=tuple(flags), runner=runner)
        row.update(live_p50_ms=round(load["p50_ms"] or 0), live_p99_ms=round(load["p99_ms"] or 0),
                   live_missing=load["missing"])
        report["runners"][name] = row
        _LOG.info("%s: %s", name, row)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
