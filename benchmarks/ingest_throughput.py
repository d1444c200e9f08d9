"""Publish throughput of ``replay --speed 0`` into a local Pub/Sub emulator.

Starts its own emulator on 127.0.0.1, writes N tweets (the shipped sample's
good tweets, repeated with fresh ids), replays them as fast as publishing
allows with the default batch settings and with larger batches, and prints one
JSON object as its last line. The emulator is a single JVM on the same machine,
so this measures the ingester plus the emulator, not Cloud Pub/Sub.

Usage: python benchmarks/ingest_throughput.py [--messages N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.message import BadTweet, parse_json, to_message  # noqa: E402
from ingest.publish import PublishSettings  # noqa: E402
from ingest.replay import default_sample, replay  # noqa: E402
from runners.local_servers import LocalPubSubEmulator  # noqa: E402

SETTINGS = {
    "default (100 msgs / 1 MB / 10 ms)": PublishSettings(),
    "large batches (1000 msgs / 5 MB / 50 ms)": PublishSettings(
        max_messages=1000, max_bytes=5_000_000, max_latency_s=0.05, flow_max_messages=10_000,
        flow_max_bytes=50_000_000),
}


def write_tweets(path: Path, n: int) -> int:
    """N good tweets from the sample, ids made unique; returns the bytes written."""
    good = []
    for raw in default_sample().read_bytes().splitlines():
        try:
            to_message(parse_json(raw))
        except BadTweet:
            continue
        good.append(json.loads(raw))
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            tweet = dict(good[i % len(good)], id=str(2**62 + i))
            out.write(json.dumps(tweet, ensure_ascii=False) + "\n")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results = {}
    with tempfile.TemporaryDirectory() as tmp, LocalPubSubEmulator() as emulator:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        path = Path(tmp) / "tweets.jsonl"
        size = write_tweets(path, args.messages)
        # Warm the emulator's JVM once so the first measured run is not the JIT's.
        replay(path, "projects/bench/topics/warmup", speed=0, create_topic=True)
        for name, settings in SETTINGS.items():
            rates = []
            for r in range(args.repeats):
                topic = f"projects/bench/topics/run-{len(results)}-{r}"
                totals = replay(path, topic, speed=0, settings=settings, create_topic=True)
                assert totals.published == args.messages and totals.failed == 0, totals
                rates.append(totals.rate)
            results[name] = {"messages_per_s_median": round(statistics.median(rates), 1),
                             "runs": [round(x, 1) for x in rates]}
    first = next(iter(results.values()))
    print(json.dumps({
        "benchmark": "ingest_throughput",
        "what": "replay --speed 0 into the local Pub/Sub emulator (published and acked msgs/s)",
        "messages": args.messages, "avg_message_bytes": round(size / args.messages),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "messages_per_s": first["messages_per_s_median"],
        "by_settings": results,
    }))


if __name__ == "__main__":
    main()
