"""``ParseTweets``: an ``Envelope`` -> ``Tweet``, or a dead letter with a reason."""

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.contract import (
    BadMessage,
    check_tweet,
    format_rfc3339,
    iso_from_seconds,
    read_message,
    seconds_from_iso,
)
from transforms.records import DeadLetter, Envelope, Tweet

DEAD_LETTER = "dead_letter"
STAGE = "parse"


def parse_tweet(data: bytes, source_id: str, require_created_at: bool = False) -> Tweet:
    """Parses one message by the contract (``transforms.contract.check_tweet``, which the
    ingester applies too). Raises BadMessage with the reason; never anything else.

    The record's ``event_time`` is ``created_at`` in UTC where it has one.
    """
    raw, value = read_message(data)
    fields = check_tweet(value, require_created_at)
    event_time = format_rfc3339(fields.created) if fields.created else ""
    return Tweet(fields.tweet_id, fields.text, fields.created_at, fields.author_id, fields.lang,
                 raw, source_id, event_time)


class _ParseFn(beam.DoFn):
    def __init__(self, timestamp_from_created_at: bool):
        self._timestamp_from_created_at = timestamp_from_created_at
        self._parsed = Metrics.counter("ParseTweets", "parsed")
        self._dead = Metrics.counter("ParseTweets", "dead_lettered")

    def process(self, envelope: Envelope, timestamp=beam.DoFn.TimestampParam):
        try:
            tweet = parse_tweet(envelope.data, envelope.source_id,
                                require_created_at=self._timestamp_from_created_at)
        except BadMessage as err:
            self._dead.inc()
            Metrics.counter("ParseTweets", f"dead_letter_{err.code}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                STAGE, str(err), envelope.data, envelope.source_id, ack_id=envelope.ack_id))
            return
        self._parsed.inc()
        tweet = tweet._replace(published_at=envelope.published_at, ack_id=envelope.ack_id)
        if self._timestamp_from_created_at:
            # created_at, to the millisecond: the record's event_time and the element's
            # timestamp agree (batching re-stamps elements from event_time).
            yield beam.window.TimestampedValue(tweet, seconds_from_iso(tweet.event_time))
        else:
            yield tweet._replace(event_time=iso_from_seconds(float(timestamp)))


class ParseTweets(beam.PTransform):
    """Parses ``Envelope``s into ``Tweet`` records.

    Bad input never raises: it goes to the ``dead_letter`` output with the
    reason the message contract (``transforms.contract``) gives, and is counted
    as ``dead_letter_<code>`` (bad_json, not_utf8, missing_id, bad_id,
    empty_text, text_too_long, ...). Ids stay strings.

    Args:
      timestamp_from_created_at: give each tweet its ``created_at`` as event
        time (file input). Pub/Sub input already carries the ``event_ts``
        attribute's time. Either way the record's ``event_time`` holds it.

    Returns:
      A tuple of outputs: ``tweets`` and ``dead_letter``.
    """

    def __init__(self, timestamp_from_created_at: bool = False):
        super().__init__()
        self._timestamp_from_created_at = timestamp_from_created_at

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_ParseFn(self._timestamp_from_created_at)).with_outputs(
            DEAD_LETTER, main="tweets")
