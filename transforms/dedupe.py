"""``DedupeByTweetId``: the first tweet per id passes, later copies are counted.

Beam's ``DeduplicatePerKey`` does the same state-plus-expiry-timer dance but
drops duplicates without a trace; the project promises that every input is a
result, a dead letter or a *counted* duplicate, so this DoFn counts them.

It runs in the global window, before event-time windowing, so a copy that
arrives in a later window is still caught. The Redis sink's ``SET NX`` is the
second line of defence once this state has expired.
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

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


class _DedupeFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, ttl_seconds: float):
        self._ttl = ttl_seconds
        self._unique = Metrics.counter("DedupeByTweetId", "unique")
        self._duplicates = Metrics.counter("DedupeByTweetId", "duplicates_skipped")

    def process(self, element, seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, tweet = element
        if seen.read():
            self._duplicates.inc()
            return
        seen.write(True)
        expiry.set(Timestamp.of(time.time() + self._ttl))
        self._unique.inc()
        yield tweet

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


class DedupeByTweetId(beam.PTransform):
    """Keeps the first ``Tweet`` per ``tweet_id`` for ``ttl_seconds`` of
    processing time; counts the rest in ``DedupeByTweetId/duplicates_skipped``."""

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS):
        super().__init__()
        self._ttl = ttl_seconds

    def expand(self, tweets):
        return (tweets
                | "KeyById" >> beam.Map(lambda t: (dedupe_key(t), t)).with_output_types(
                    tuple[str, Tweet])
                | "FirstPerId" >> beam.ParDo(_DedupeFn(self._ttl)))
