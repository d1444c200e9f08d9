"""A Pub/Sub publisher that never drops what it accepted.

Both ingesters hand tweets to one ``TweetPublisher``. It uses the client's own
batching and flow control (exposed as flags), checks every publish future in a
done-callback, and ``close()`` waits for every outstanding future before the
process exits, so SIGTERM or Ctrl-C flushes instead of dropping.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from google.api_core import exceptions as api_exceptions
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher import exceptions as publisher_exceptions

from ingest.message import BadTweet, RawMessage, TweetMessage

_LOG = logging.getLogger(__name__)

TOPIC_PATH = re.compile(r"projects/[^/\s]+/topics/[^/\s]+")


class PublishSettings(NamedTuple):
    """Batching and flow control for the publisher client (defaults are the client's,
    except flow control, which blocks instead of buffering without bound)."""

    max_messages: int = 100
    max_bytes: int = 1_000_000
    max_latency_s: float = 0.01
    flow_max_messages: int = 1000
    flow_max_bytes: int = 10_000_000
    publish_timeout_s: float = 60.0


class BadLine(NamedTuple):
    """An input the ingester skipped: where it was and why."""

    line: int
    reason: str


@dataclass
class Totals:
    """What one run did; the CLI prints it, tests and the pipeline read it.

    ``received`` counts inputs (file lines or stream payloads). Every received
    input is exactly one of: published, failed (Pub/Sub refused it after
    retries), bad (skipped with a reason), or not yet settled when a run was
    killed hard. With ``replay --publish-bad`` a bad line is published too:
    ``bad_published`` counts those, which are also in ``bad`` and in
    ``published`` (or ``failed``).
    """

    received: int = 0
    published: int = 0
    failed: int = 0
    bad: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    bad_published: int = 0
    elapsed_s: float = 0.0
    error: str = ""

    @property
    def rate(self) -> float:
        """Published messages per second over the run."""
        return self.published / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"received": self.received, "published": self.published, "failed": self.failed,
                "bad": self.bad, "bad_lines": [b.line for b in self.bad_lines],
                **({"bad_published": self.bad_published} if self.bad_published else {}),
                "elapsed_s": round(self.elapsed_s, 3), "messages_per_s": round(self.rate, 1),
                **({"error": self.error} if self.error else {})}


def check_topic_path(topic: str) -> str:
    """Fails fast, naming the flag, on a topic that is not a full resource path."""
    if not TOPIC_PATH.fullmatch(topic or ""):
        raise ValueError(f"--topic must look like projects/PROJECT/topics/TOPIC, got {topic!r}")
    return topic


def ensure_topic(client: pubsub_v1.PublisherClient, topic: str, create: bool) -> None:
    """Creates the topic when asked, or fails early when it is missing.

    A publisher-only service account may not be allowed to read topics; that
    is logged and publishing goes ahead (the first publish will say more).
    """
    try:
        client.get_topic(topic=topic)
        return
    except api_exceptions.NotFound:
        if not create:
            raise ValueError(f"topic {topic} does not exist: create it, or pass --create-topic"
                             ) from None
    except api_exceptions.PermissionDenied:
        _LOG.warning("cannot read topic %s (permission denied); publishing anyway", topic)
        return
    try:
        client.create_topic(name=topic)
        _LOG.info("created topic %s", topic)
    except api_exceptions.AlreadyExists:
        pass


class TweetPublisher:
    """Publishes ``TweetMessage`` objects and accounts for every one.

    Args:
      topic: ``projects/P/topics/T``.
      settings: batching, flow control and the per-publish timeout.
      create_topic: create the topic when it does not exist.

    ``publish`` may block while flow control is full: that is the backpressure
    that keeps a fast source (replay at ``--speed 0``) from buffering without
    bound. Honours ``PUBSUB_EMULATOR_HOST`` through the client library.
    """

    def __init__(self, topic: str, settings: PublishSettings = PublishSettings(),
                 create_topic: bool = False):
        self.topic = check_topic_path(topic)
        self.settings = settings
        self._client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=settings.max_messages, max_bytes=settings.max_bytes,
                max_latency=settings.max_latency_s),
            publisher_options=pubsub_v1.types.PublisherOptions(
                flow_control=pubsub_v1.types.PublishFlowControl(
                    message_limit=settings.flow_max_messages,
                    byte_limit=settings.flow_max_bytes,
                    limit_exceeded_behavior=pubsub_v1.types.LimitExceededBehavior.BLOCK)))
        ensure_topic(self._client, self.topic, create_topic)
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future] = set()
        self.published = 0
        self.failed = 0
        self._closed = False

    def publish(self, message: TweetMessage | RawMessage) -> None:
        """Queues one message; its future is checked when it settles.

        Raises:
          ingest.message.BadTweet: the client refused the message itself (too
            large for a request or for the flow-control limits).
        """
        if self._closed:
            raise RuntimeError("publish() after close()")
        try:
            future = self._client.publish(self.topic, message.data,
                                          timeout=self.settings.publish_timeout_s,
                                          **message.attributes)
        except (publisher_exceptions.MessageTooLargeError,
                publisher_exceptions.FlowControlLimitError) as exc:
            raise BadTweet("publish_refused", f"refused by the publisher client: {exc}") from None
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(lambda f, tid=message.tweet_id: self._settled(f, tid))

    def _settled(self, future: concurrent.futures.Future, tweet_id: str) -> None:
        error = future.exception()
        with self._lock:
            self._pending.discard(future)
            if error is None:
                self.published += 1
            else:
                self.failed += 1
        if error is not None:
            _LOG.error("publish of tweet %s failed: %s", tweet_id, error)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until every message handed to ``publish`` has settled.

        Returns:
          True when nothing is pending any more.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                return False
            concurrent.futures.wait(pending, timeout=left)

    def close(self) -> None:
        """Flushes, then stops the client's batching threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._client.stop()  # commits open batches; futures settle afterwards
        self.flush()
        n = self.pending
        if n:
            _LOG.error("%d messages still pending after close", n)
