"""End-to-end throughput of the job on an embedded Flink, and its start-up time.

Starts the Pub/Sub emulator and a redis-server on 127.0.0.1, submits the job
with ``python -m launcher flink --flink_master=[local]`` (LOOPBACK), publishes
N tweets (the sample tweets, cycled with fresh ids, as the DirectRunner
benchmark uses) and times them into ``sentiment:results``. The last line of
output is one JSON object: start-up seconds (launch to RUNNING, and to the
first result), tweets/s, and the job's end state.

    python -m benchmarks.flink_throughput --n 2000 --model_dir models/bert_sentiment
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "pipeline" / "data" / "sample_tweets.jsonl"


def tweets(n: int) -> list[tuple[bytes, dict[str, str]]]:
    from ingest.message import BadTweet, format_time, to_message

    base = []
    for line in SAMPLE.read_bytes().splitlines():
        try:
            base.append(json.loads(line))
            to_message(base[-1])
        except (ValueError, BadTweet):
            base.pop()
    now = format_time(datetime.now(UTC))
    out = []
    for i in range(n):
        tweet = dict(base[i % len(base)], id=str(10**18 + i))
        message = to_message(tweet)
        out.append((message.data, {"tweet_id": message.tweet_id, "event_ts": now}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--timeout_s", type=float, default=600)
    flags = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import redis
    from apache_beam.runners.runner import PipelineState
    from google.cloud import pubsub_v1

    from launcher.flink import flink_job
    from pipeline.local_servers import LocalPubSubEmulator, LocalRedis

    report: dict = {"runner": "FlinkRunner [local] LOOPBACK", "n": flags.n}
    with LocalPubSubEmulator() as emulator, LocalRedis() as server:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        topic = publisher.topic_path("bertstream-bench", "tweets")
        subscription = subscriber.subscription_path("bertstream-bench", "tweets-sub")
        publisher.create_topic(name=topic)
        subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
        messages = tweets(flags.n)
        client = redis.Redis.from_url(server.url)
        launched = time.monotonic()
        with flink_job(["--flink_master=[local]", f"--parallelism={flags.parallelism}",
                        f"--input_subscription={subscription}", f"--model_dir={flags.model_dir}",
                        f"--redis_url={server.url}"]) as job:
            report["submit_s"] = round(time.monotonic() - launched, 2)
            published = time.monotonic()
            for future in [publisher.publish(topic, d, **a) for d, a in messages]:
                future.result(timeout=60)
            first = None
            deadline = published + flags.timeout_s
            while time.monotonic() < deadline:
                count = client.xlen("sentiment:results")
                if count and first is None:
                    first = time.monotonic()
                if count >= flags.n or PipelineState.is_terminal(job.result.state):
                    break
                time.sleep(0.2)
            done = time.monotonic()
            count = client.xlen("sentiment:results")
            report["state_while_running"] = str(job.result.state)
        report.update(
            results=count, final_state=str(job.result.state),
            startup_to_first_result_s=round(first - launched, 2) if first else None,
            tweets_per_s=round(count / (done - first), 1) if first and done > first else None,
            wall_s=round(done - published, 2))
    print(json.dumps(report))
    return 0 if count >= flags.n else 1


if __name__ == "__main__":
    sys.exit(main())
