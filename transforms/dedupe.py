"""``DedupeByTweetId``: the first tweet per id passes, later copies are counted.

Beam's ``DeduplicatePerKey`` does the same state-plus-expiry-timer dance but
drops duplicates without a trace; the project promises that every input is a
result, a dead letter or a *counted* duplicate, so this DoFn counts them.

It runs in the global window, before event-time windowing, so a copy that
arrives in a later window is still caught. The Redis sink's ``SET NX`` is the
second line of defence once this state has expired.

Two layouts of the same idea:

- per id (Dataflow, Flink): the key is the tweet id, with a processing-time
  timer that clears it after ``ttl_seconds``. Runners keep keyed state and
  timers in indexed stores, so this scales with the stream.
- sharded (the Python DirectRunner): the Python DirectRunner walks every key a
  stateful DoFn has ever seen on each timer tick
  (``watermark_manager.extract_transform_timers``), so one key per tweet makes
  a long run slow down linearly (measured: 55% of the job's CPU in that walk
  after 3,000 tweets). There the ids go to ``shards`` keys, each with two
  generations of ids (``SetState``) rotated every ``ttl_seconds / 2`` by a
  single timer: an id is remembered between ``ttl/2`` and ``ttl`` seconds.
  (Dataflow does not support ``SetState``, hence not the only layout.)
"""

from __future__ import annotations

import time
import zlib

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    SetStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from transforms import acks
from transforms.records import Tweet

DEFAULT_TTL_SECONDS = 600
# Source ids of tweets re-published from the dead letter start with this
# (``replay:<dead-letter entry id>/pubsub:<message id>``): a replay is a new
# attempt at a tweet whose first attempt failed after this step had already
# remembered its id, so it is deduplicated apart from that first attempt.
REPLAY_PREFIX = "replay:"


def dedupe_key(tweet: Tweet) -> str:
    """The tweet id, plus the replay's entry id for a replayed tweet."""
    if tweet.source_id.startswith(REPLAY_PREFIX):
        return f"{tweet.tweet_id}@{tweet.source_id.split('/', 1)[0]}"
    return tweet.tweet_id


class _AckSkippedMixin:
    """A counted duplicate is one of an input's ends (transforms/acks.py):
    its Pub/Sub message is acknowledged at the end of the bundle."""

    def start_bundle(self):
        self._skipped: list[str] = []

    def finish_bundle(self):
        if self._skipped:
            acks.done(self._skipped)
            self._skipped = []


class _DedupeFn(_AckSkippedMixin, beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, ttl_seconds: float):
        self._ttl = ttl_seconds
        self._unique = Metrics.counter("DedupeByTweetId", "unique")
        self._duplicates = Metrics.counter("DedupeByTweetId", "duplicates_skipped")
        self._skipped: list[str] = []

    def process(self, element, seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, tweet = element
        if seen.read():
            self._duplicates.inc()
            self._skipped.append(tweet.source_id)  # an end: acknowledged per bundle
            return
        seen.write(True)
        expiry.set(Timestamp.of(time.time() + self._ttl))
        self._unique.inc()
        yield tweet

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


class _ShardedDedupeFn(_AckSkippedMixin, beam.DoFn):
    CURRENT = SetStateSpec("current", StrUtf8Coder())
    PREVIOUS = SetStateSpec("previous", StrUtf8Coder())
    ARMED = ReadModifyWriteStateSpec("armed", BooleanCoder())
    ROTATE = TimerSpec("rotate", TimeDomain.REAL_TIME)

    def __init__(self, ttl_seconds: float):
        self._half = ttl_seconds / 2
        self._unique = Metrics.counter("DedupeByTweetId", "unique")
        self._duplicates = Metrics.counter("DedupeByTweetId", "duplicates_skipped")
        self._skipped: list[str] = []

    def process(self, element, current=beam.DoFn.StateParam(CURRENT),
                previous=beam.DoFn.StateParam(PREVIOUS), armed=beam.DoFn.StateParam(ARMED),
                rotate=beam.DoFn.TimerParam(ROTATE)):
        _, tweet = element
        key = dedupe_key(tweet)
        if key in current.read() or key in previous.read():
            self._duplicates.inc()
            self._skipped.append(tweet.source_id)
            return
        current.add(key)
        if not armed.read():
            armed.write(True)
            rotate.set(Timestamp.of(time.time() + self._half))
        self._unique.inc()
        yield tweet

    @on_timer(ROTATE)
    def rotate(self, current=beam.DoFn.StateParam(CURRENT),
               previous=beam.DoFn.StateParam(PREVIOUS), armed=beam.DoFn.StateParam(ARMED),
               rotate=beam.DoFn.TimerParam(ROTATE)):
        keys = set(current.read())
        previous.clear()
        for key in keys:
            previous.add(key)
        current.clear()
        if keys:  # the previous generation must expire in turn
            rotate.set(Timestamp.of(time.time() + self._half))
        else:
            armed.clear()


def _runs_on_python_direct_runner(pipeline) -> bool:
    return type(pipeline.runner).__name__ in (
        "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "TestDirectRunner")


class DedupeByTweetId(beam.PTransform):
    """Keeps the first ``Tweet`` per ``tweet_id`` for ``ttl_seconds`` of
    processing time; counts the rest in ``DedupeByTweetId/duplicates_skipped``.

    Args:
      ttl_seconds: how long an id is remembered.
      shards: use the sharded layout with this many keys, or 0 for the per-id
        layout; default (None): sharded (16) on the Python DirectRunner, per id
        elsewhere (see the module doc).
    """

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, shards: int | None = None):
        super().__init__()
        self._ttl = ttl_seconds
        self._shards = shards

    def expand(self, tweets):
        shards = self._shards
        if shards is None and _runs_on_python_direct_runner(tweets.pipeline):
            shards = 16
        if shards:
            return (tweets
                    | "KeyByShard" >> beam.Map(
                        lambda t, n=shards: (zlib.crc32(dedupe_key(t).encode()) % n, t)
                    ).with_output_types(tuple[int, Tweet])
                    | "FirstPerIdSharded" >> beam.ParDo(_ShardedDedupeFn(self._ttl)))
        return (tweets
                | "KeyById" >> beam.Map(lambda t: (dedupe_key(t), t)).with_output_types(
                    tuple[str, Tweet])
                | "FirstPerId" >> beam.ParDo(_DedupeFn(self._ttl)))
