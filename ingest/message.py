"""Turns one tweet (a JSON line or a stream payload) into a Pub/Sub message.

The message format is the contract in docs/architecture.md: data is the UTF-8 JSON of the
X API v2 tweet object with ``id`` as a string, and the attributes are
``tweet_id`` (the pipeline's dedupe key) and ``event_ts`` (RFC 3339, the event
time the pipeline windows on). Tweets are checked by the job's own rules
(``transforms.contract``): what the job would dead-letter is refused here,
before publishing, with the reason the job would give, and both ingesters
skip and report the same things.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NamedTuple

from transforms.contract import (
    BadMessage,
    check_id,
    check_size,
    check_tweet,
    format_rfc3339,
    load_json,
)

# The contract's exception and time format under the names ingest's callers
# (and benchmarks/) use; ``BadTweet.code`` says which rule, ``str()`` the reason.
BadTweet = BadMessage
format_time = format_rfc3339

# The service refuses a PublishRequest over 10 MB (the client checks the same
# number before sending). A tweet never comes near it (the contract's 1 MiB
# does first); a line published as it is with --publish-bad can.
PUBSUB_MAX_REQUEST_BYTES = 10 * 1000 * 1000
# Room for the request's own fields (the topic name) next to one message.
_REQUEST_OVERHEAD_BYTES = 1000


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


# Lines and stream payloads are parsed as the job parses a message: exact
# integers (an id above 2**53 survives), BadTweet with the job's reason.
parse_json = load_json


def encode(tweet: Any) -> bytes:
    """The data ``to_message`` publishes for ``tweet``: compact UTF-8 JSON, an
    integer ``id`` written as a string.

    Raises:
      BadTweet: nested too deeply to write out.
    """
    if isinstance(tweet, dict) and isinstance(tweet.get("id"), int):
        try:
            tweet = {**tweet, "id": check_id(tweet["id"])}
        except BadTweet:
            pass  # check_tweet refuses it, with the reason
    try:
        try:
            text = json.dumps(tweet, ensure_ascii=False, separators=(",", ":"))
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON's "\ud800"), which UTF-8 cannot carry: escape
            # everything, as the JSON it came from did; the contract then decides.
            return json.dumps(tweet, separators=(",", ":")).encode("ascii")
    except RecursionError:
        raise BadTweet("bad_json", "invalid JSON: nested too deeply") from None


def to_message(tweet: Any) -> TweetMessage:
    """Checks one tweet object by the message contract and encodes it.

    The checks are the job's own (``transforms.contract``), on the data as it
    would be published, in the job's order: the size first, then the fields;
    ``created_at`` is required, as it becomes the ``event_ts`` attribute.

    Args:
      tweet: the parsed X API v2 tweet object (``payload["data"]`` on the stream).

    Returns:
      The message; its data is the tweet with ``id`` as a string.

    Raises:
      BadTweet: with the reason the job would give, for anything it would refuse.
    """
    try:
        data = encode(tweet)
    except BadTweet:  # too deep to write out: the job's reason first, where it has one
        check_tweet(tweet, require_created_at=True)
        raise
    check_size(data)
    fields = check_tweet(tweet, require_created_at=True)
    return TweetMessage(data, fields.tweet_id, format_rfc3339(fields.created), fields.created)


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
            tweet_id = check_id(tweet.get("id"))
    except BadTweet:
        pass
    message = RawMessage(raw, tweet_id, format_rfc3339(event_time) if event_time else "")
    if message.size > PUBSUB_MAX_REQUEST_BYTES - _REQUEST_OVERHEAD_BYTES:
        raise BadTweet("too_large_for_pubsub", f"message is {message.size} bytes, over "
                       f"Pub/Sub's 10 MB limit ({PUBSUB_MAX_REQUEST_BYTES} bytes per request)")
    return message
