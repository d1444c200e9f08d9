"""Turns one tweet (a JSON line or a stream payload) into a Pub/Sub message.

The message format is the contract in docs/architecture.md: data is the UTF-8 JSON of the
X API v2 tweet object with ``id`` as a string, and the attributes are
``tweet_id`` (the pipeline's dedupe key) and ``event_ts`` (RFC 3339, the event
time the pipeline windows on). Everything that cannot honour that contract is
refused here with a reason, so both ingesters skip and report the same things.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

# The service refuses a PublishRequest over 10 MB (the client checks the same
# number before sending); a message that alone exceeds it can never be sent.
PUBSUB_MAX_REQUEST_BYTES = 10 * 1000 * 1000
# Room for the request's own fields (the topic name) next to one message.
_REQUEST_OVERHEAD_BYTES = 1000

_DIGITS = re.compile(r"[0-9]{1,25}")


class BadTweet(ValueError):
    """A line or payload that cannot become a message; ``str()`` is the reason."""


class TweetMessage(NamedTuple):
    """One Pub/Sub message, ready for ``PublisherClient.publish``."""

    data: bytes
    tweet_id: str
    event_ts: str
    event_time: datetime

    @property
    def attributes(self) -> dict[str, str]:
        return {"tweet_id": self.tweet_id, "event_ts": self.event_ts}

    @property
    def size(self) -> int:
        """Bytes on the wire as Pub/Sub counts them: the PubsubMessage protobuf.

        Computed by hand (it equals ``PubsubMessage(...)._pb.ByteSize()``, which a
        test checks): building the proto-plus message per tweet cost a fifth of
        the publish path's CPU.
        """
        return _message_size(self.data, self.attributes)


def _message_size(data: bytes, attributes: dict[str, str]) -> int:
    size = _field_size(len(data)) if data else 0
    for key, value in attributes.items():
        entry = _field_size(len(key.encode())) + _field_size(len(value.encode()))
        size += _field_size(entry)
    return size


def _field_size(length: int) -> int:
    """A length-delimited protobuf field with a one-byte tag: tag + varint(length) + body."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def parse_json(raw: bytes | str) -> Any:
    """Parses JSON without losing precision in tweet ids.

    Python's ``json`` keeps integers exact, unlike JavaScript, so an id that
    arrives as a number above 2**53 survives; a float id has already been
    rounded by whoever wrote it, so it is kept as a float here and refused in
    ``to_message``.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadTweet(f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadTweet(f"invalid JSON: {exc.msg} (column {exc.colno})") from None


def parse_time(value: Any) -> datetime:
    """Parses an RFC 3339 ``created_at`` (X writes ``2026-11-20T10:00:00.000Z``)."""
    if not isinstance(value, str) or not value:
        raise BadTweet("no created_at (the pipeline needs it as the event time)")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadTweet(f"created_at is not RFC 3339: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise BadTweet(f"created_at has no time zone: {value[:40]!r}")
    return parsed.astimezone(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the way X and Beam's timestamp_attribute write it."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _tweet_id(tweet: dict[str, Any]) -> str:
    value = tweet.get("id")
    if value is None:
        raise BadTweet("no id")
    if isinstance(value, (bool, float)):
        raise BadTweet(f"id is a {type(value).__name__} ({value!r}); ids must be strings or integers "
                       "(floats above 2**53 are already rounded)")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not _DIGITS.fullmatch(value):
        raise BadTweet(f"id is not a decimal number: {str(value)[:40]!r}")
    return value


def _json_type(value: Any) -> str:
    """How a JSON reader would name the value's type, for error messages."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def to_message(tweet: Any) -> TweetMessage:
    """Validates one tweet object and encodes it as the contract's message.

    Args:
      tweet: the parsed X API v2 tweet object (``payload["data"]`` on the stream).

    Returns:
      The message; its data is the tweet with ``id`` as a string.

    Raises:
      BadTweet: with the reason, for anything the pipeline could not use.
    """
    if not isinstance(tweet, dict):
        raise BadTweet(f"{_json_type(tweet)}, not a JSON object")
    tweet_id = _tweet_id(tweet)
    text = tweet.get("text")
    if not isinstance(text, str):
        raise BadTweet(f"text is {'missing' if text is None else _json_type(text)}, not a string")
    if not text.strip():
        raise BadTweet("text is empty" if not text else "text is only whitespace")
    event_time = parse_time(tweet.get("created_at"))
    tweet = {**tweet, "id": tweet_id}
    try:
        data = json.dumps(tweet, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        # JSON may carry "\ud800" escapes that decode to lone surrogates.
        raise BadTweet("text is not valid Unicode (lone surrogate)") from None
    message = TweetMessage(data, tweet_id, format_time(event_time), event_time)
    if message.size > PUBSUB_MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES:
        raise BadTweet(f"message is {message.size} bytes, over Pub/Sub's 10 MB limit "
                       f"({PUBSUB_MAX_REQUEST_BYTES} bytes per publish request)")
    return message


class RawMessage(NamedTuple):
    """A line that is not a valid tweet, published as it is (``replay --publish-bad``):
    the pipeline then dead-letters it with its own reason, as it does on a file."""

    data: bytes
    tweet_id: str  # "" when no valid id can be read from it
    event_ts: str = ""  # RFC 3339; "" leaves the event time to the publish time

    @property
    def attributes(self) -> dict[str, str]:
        attributes = {"tweet_id": self.tweet_id} if self.tweet_id else {}
        if self.event_ts:
            attributes["event_ts"] = self.event_ts
        return attributes

    @property
    def size(self) -> int:
        return _message_size(self.data, self.attributes)


def raw_message(raw: bytes, event_time: datetime | None = None) -> RawMessage:
    """``raw`` unchanged, with a ``tweet_id`` attribute where a valid id can be
    read, and ``event_time`` (if given) as its ``event_ts``.

    Raises:
      BadTweet: the line is too large for any Pub/Sub request.
    """
    tweet_id = ""
    try:
        tweet = parse_json(raw)
        if isinstance(tweet, dict):
            tweet_id = _tweet_id(tweet)
    except BadTweet:
        pass
    message = RawMessage(raw, tweet_id, format_time(event_time) if event_time else "")
    if message.size > PUBSUB_MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES:
        raise BadTweet(f"message is {message.size} bytes, over Pub/Sub's 10 MB limit "
                       f"({PUBSUB_MAX_REQUEST_BYTES} bytes per publish request)")
    return message
