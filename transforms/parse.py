"""``ParseTweets``: an ``Envelope`` -> ``Tweet``, or a dead letter with a reason."""

import json
import re
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import DeadLetter, Envelope, Tweet, iso_from_seconds, seconds_from_iso

DEAD_LETTER = "dead_letter"
STAGE = "parse"

# Limits, documented in the README. X posts are at most 25,000 characters
# (long posts); a message larger than 1 MiB is not a tweet and is refused
# before any JSON parsing, which also bounds the cost of hostile input.
MAX_TEXT_CHARS = 25_000
MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_CHARS = 64
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BAD_ID = re.compile(r"[\s\x00-\x1f]")


class ParseError(ValueError):
    """A reason to dead-letter, with a short code for the metrics."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def _optional_str(obj: dict, field: str) -> Optional[str]:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ParseError("bad_field", f"'{field}' must be a string, got {type(value).__name__}")
    return str(value)


def parse_tweet(data: bytes, source_id: str) -> Tweet:
    """Parses one message. Raises ParseError with the reason; never anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ParseError("too_large", f"message is {len(data)} bytes, over the "
                                      f"{MAX_MESSAGE_BYTES}-byte limit")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParseError("not_utf8", f"not valid UTF-8: {err}") from None
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ParseError("bad_json", "JSON nested too deeply") from None
    except ValueError as err:
        raise ParseError("bad_json", f"malformed JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ParseError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    tweet_id = obj.get("id")
    if tweet_id is None or tweet_id == "":
        raise ParseError("missing_id", "missing 'id'")
    if isinstance(tweet_id, bool) or not isinstance(tweet_id, (str, int)):
        # A float id has already lost digits (X ids exceed 2**53): refuse it.
        raise ParseError("bad_id", f"'id' must be a string, got {type(tweet_id).__name__}")
    tweet_id = str(tweet_id)
    if len(tweet_id) > MAX_ID_CHARS or _BAD_ID.search(tweet_id) or \
            _LONE_SURROGATE.search(tweet_id):
        raise ParseError("bad_id", "'id' has whitespace, control characters or is over "
                                   f"{MAX_ID_CHARS} characters")
    text = obj.get("text")
    if text is None:
        raise ParseError("missing_text", "missing 'text'")
    if not isinstance(text, str):
        raise ParseError("bad_text", f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ParseError("empty_text", "'text' is empty or whitespace only")
    if len(text) > MAX_TEXT_CHARS:
        raise ParseError("text_too_long", f"'text' has {len(text)} characters, over the "
                                          f"{MAX_TEXT_CHARS}-character limit")
    if _LONE_SURROGATE.search(text):
        raise ParseError("bad_text", "'text' contains a lone UTF-16 surrogate (not Unicode)")
    created_at = _optional_str(obj, "created_at")
    author_id = _optional_str(obj, "author_id")
    lang = _optional_str(obj, "lang")
    for value in (created_at, author_id, lang):
        if value is not None and _LONE_SURROGATE.search(value):
            raise ParseError("bad_field", "a field contains a lone UTF-16 surrogate")
    return Tweet(tweet_id, text, created_at, author_id, lang, raw, source_id)


class _ParseFn(beam.DoFn):
    def __init__(self, timestamp_from_created_at: bool):
        self._timestamp_from_created_at = timestamp_from_created_at
        self._parsed = Metrics.counter("ParseTweets", "parsed")
        self._dead = Metrics.counter("ParseTweets", "dead_lettered")

    def process(self, envelope: Envelope, timestamp=beam.DoFn.TimestampParam):
        try:
            tweet = parse_tweet(envelope.data, envelope.source_id)
            seconds = float(timestamp)
            if self._timestamp_from_created_at:
                seconds = _created_at_seconds(tweet)
        except ParseError as err:
            self._dead.inc()
            Metrics.counter("ParseTweets", f"dead_letter_{err.code}").inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.of(
                STAGE, str(err), envelope.data, envelope.source_id, ack_id=envelope.ack_id))
            return
        self._parsed.inc()
        tweet = tweet._replace(event_time=iso_from_seconds(seconds),
                               published_at=envelope.published_at, ack_id=envelope.ack_id)
        if self._timestamp_from_created_at:
            yield beam.window.TimestampedValue(tweet, seconds)
        else:
            yield tweet


def _created_at_seconds(tweet: Tweet) -> float:
    if tweet.created_at is None:
        raise ParseError("missing_created_at",
                         "missing 'created_at' (the event time of file input)")
    try:
        return seconds_from_iso(tweet.created_at)
    except ValueError:
        raise ParseError("bad_created_at", "'created_at' is not RFC 3339: "
                                           f"{tweet.created_at[:64]!r}") from None


class ParseTweets(beam.PTransform):
    """Parses ``Envelope``s into ``Tweet`` records.

    Bad input never raises: it goes to the ``dead_letter`` output with a
    reason (malformed JSON, not UTF-8, not an object, missing or empty text,
    text over ``MAX_TEXT_CHARS``, missing id, ...). Ids stay strings.

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
