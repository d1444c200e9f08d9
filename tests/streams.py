"""Streams of tweets for the tests that run the job as a user does: messages
built from the bundled sample, published to the emulator (at once or paced),
and the results read back from Redis."""

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "pipeline" / "data" / "sample_tweets.jsonl"


def sample_messages(n: int, offset: int = 0) -> list[tuple[bytes, dict[str, str]]]:
    """``n`` distinct good tweets as Pub/Sub ``(data, attributes)``, stamped now
    (event time = publish time, so windows close as the watermark follows)."""
    from ingest.message import BadTweet, format_time, to_message

    out, seen = [], set()
    now = format_time(datetime.now(UTC))
    for i, line in enumerate(SAMPLE.read_bytes().splitlines() * 20):
        try:
            tweet = json.loads(line)
            if not isinstance(tweet, dict):
                continue
            tweet["id"] = str(10**18 + offset + i)
            message = to_message(tweet)
        except (ValueError, BadTweet):
            continue
        if message.tweet_id in seen:
            continue
        seen.add(message.tweet_id)
        out.append((message.data, {"tweet_id": message.tweet_id, "event_ts": now}))
        if len(out) == n:
            break
    assert len(out) == n
    return out


def publish(topic: str, messages: list[tuple[bytes, dict[str, str]]]) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    for future in [publisher.publish(topic, data, **attrs) for data, attrs in messages]:
        future.result(timeout=30)


def wait_for(predicate, timeout_s: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def result_ids(client) -> list[str]:
    return [fields[b"tweet_id"].decode() for _, fields in client.xrange("sentiment:results")]


class PacedPublisher(threading.Thread):
    """Publishes ``messages`` at ``per_second`` in the background (a live
    stream while a test breaks things); ``join()`` re-raises a publish error."""

    def __init__(self, topic: str, messages: list[tuple[bytes, dict[str, str]]],
                 per_second: float):
        super().__init__(daemon=True)
        self.topic, self.messages, self.per_second = topic, messages, per_second
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient()
        started = time.monotonic()
        futures = []
        try:
            for i, (data, attrs) in enumerate(self.messages):
                delay = started + i / self.per_second - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(publisher.publish(self.topic, data, **attrs))
                self.sent = i + 1
            for future in futures:
                future.result(timeout=60)
        except BaseException as err:  # noqa: BLE001 - handed to the test in join()
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
