"""The message contract (docs/architecture.md, "Contracts"), checked in one place.

The ingester (``ingest/message.py``) checks a tweet before it publishes it and
the job (``ParseTweets``) checks every message it reads, both with
``check_tweet``: what one refuses the other refuses, with the same code and
reason. Also here, because the job, the ingester and the dashboard share them:
the RFC 3339 times of the records, the order of the model's ``LABELS``, and the
redaction of passwords in URLs.

Deliberately free of Beam and TensorFlow (a test checks): the ingester and the
dashboard import it and stay small.

Example::

    from transforms.contract import BadMessage, check_tweet, read_message

    try:
        raw, value = read_message(data)
        fields = check_tweet(value, require_created_at=True)
    except BadMessage as err:
        print(err.code, err.reason)  # e.g. "bad_id", "id has whitespace ..."
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, NamedTuple

# The model's classes, in the order of its probabilities.
from model.data import LABELS  # noqa: E402,F401 - the model's output order, defined with its data

# Limits. X posts are at most 25,000 characters (long posts); a message over
# 1 MiB is not a tweet and is refused before any JSON parsing, which also
# bounds the cost of hostile input. X ids are decimal, but any id that can be a
# Redis key and a Pub/Sub attribute (no whitespace or control character) is
# accepted: replays and tests use ids such as "bad-1".
MAX_TEXT_CHARS = 25_000
MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_CHARS = 64
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BAD_ID_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_OPTIONAL_FIELDS = ("author_id", "lang")


class BadMessage(ValueError):
    """A message that breaks the contract: ``code`` for metrics, ``reason`` (``str()``) for people."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class TweetFields(NamedTuple):
    """What ``check_tweet`` read. Ids are strings: X ids exceed 2**53."""

    tweet_id: str
    text: str
    created_at: str | None  # as written
    author_id: str | None
    lang: str | None
    created: dt.datetime | None  # created_at in UTC; None when absent


def check_size(data: bytes) -> None:
    """Refuses a message over ``MAX_MESSAGE_BYTES``, before it is decoded."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage("too_large", f"message is {len(data)} bytes, over the "
                                      f"{MAX_MESSAGE_BYTES}-byte (1 MiB) limit")


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadMessage("not_utf8", f"not UTF-8: byte {data[err.start]:#04x} at position "
                                     f"{err.start} ({err.reason})") from None


def load_json(data: bytes | str) -> Any:
    """Parses UTF-8 JSON; integers stay exact (an id above 2**53 survives)."""
    text = _utf8(data) if isinstance(data, bytes) else data
    # A byte order mark before the JSON (what Windows editors and Excel write
    # at the start of a UTF-8 file) is ignored, as RFC 8259 section 8.1 allows
    # a parser to; json.loads refuses it.
    text = text.removeprefix("\ufeff")
    try:
        return json.loads(text)
    except RecursionError:
        raise BadMessage("bad_json", "invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as err:
        where = f"column {err.colno}" if err.lineno == 1 else f"line {err.lineno} column {err.colno}"
        raise BadMessage("bad_json", f"invalid JSON: {err.msg} ({where})") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise BadMessage("bad_json", f"invalid JSON: {err}") from None


def read_message(data: bytes) -> tuple[str, Any]:
    """A message's data as the job reads it: size, then UTF-8, then JSON.

    Returns:
      The data as text and its parsed JSON value (for ``check_tweet``).
    """
    check_size(data)
    text = _utf8(data)
    return text, load_json(text)


def _json_type(value: Any) -> str:
    """How JSON names a value's type, for reasons."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_id(value: Any) -> str:
    """A tweet id as the contract's string. Raises BadMessage (missing_id, bad_id)."""
    if value is None or value == "":
        raise BadMessage("missing_id", "no id")
    if isinstance(value, float):
        raise BadMessage("bad_id", f"id is a float ({value!r}); ids must be strings or integers "
                                   "(a float above 2**53 is already rounded)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadMessage("bad_id", f"id is {_json_type(value)}, not a string or an integer")
    if isinstance(value, int):
        if abs(value) >= 10 ** MAX_ID_CHARS:
            raise BadMessage("bad_id", f"id is over {MAX_ID_CHARS} characters")
        value = str(value)
    if len(value) > MAX_ID_CHARS or _BAD_ID_CHAR.search(value):
        raise BadMessage("bad_id", "id has whitespace or control characters, or is over "
                                   f"{MAX_ID_CHARS} characters: {value[:MAX_ID_CHARS]!r}")
    return value


def _check_text(value: Any) -> str:
    if value is None:
        raise BadMessage("missing_text", "no text")
    if not isinstance(value, str):
        raise BadMessage("bad_text", f"text is {_json_type(value)}, not a string")
    if not value.strip():
        raise BadMessage("empty_text", "text is empty" if not value else "text is only whitespace")
    if len(value) > MAX_TEXT_CHARS:
        raise BadMessage("text_too_long", f"text has {len(value)} characters, over the "
                                          f"{MAX_TEXT_CHARS}-character limit")
    if _LONE_SURROGATE.search(value):
        raise BadMessage("bad_text", "text is not valid Unicode (a lone UTF-16 surrogate)")
    return value


def _check_created_at(value: Any, required: bool) -> dt.datetime | None:
    if value is None:
        if required:
            raise BadMessage("missing_created_at", "no created_at (the event time)")
        return None
    if not isinstance(value, str):
        raise BadMessage("bad_created_at", f"created_at is {_json_type(value)}, not a string")
    try:
        return parse_rfc3339(value).astimezone(dt.UTC)
    except (ValueError, OverflowError):  # overflow: a year 1 or 9999 time moved to UTC
        raise BadMessage("bad_created_at", "created_at is not RFC 3339 with a time zone: "
                                           f"{value[:40]!r}") from None


def _check_optional(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadMessage("bad_field", f"{field} is {_json_type(value)}, not a string")
    value = str(value)
    if _LONE_SURROGATE.search(value):
        raise BadMessage("bad_field", f"{field} is not valid Unicode (a lone UTF-16 surrogate)")
    return value


def check_tweet(value: Any, require_created_at: bool = False) -> TweetFields:
    """Checks one decoded message against the contract.

    Args:
      value: the parsed JSON of a message (an X API v2 tweet object).
      require_created_at: refuse a tweet without ``created_at``, where it is
        the event time (file input, and the ingester's ``event_ts``). When
        present it must be RFC 3339 with a time zone either way.

    Returns:
      The fields the job reads; other fields are left as they are.

    Raises:
      BadMessage: the first rule broken, in the order id, text, created_at,
        the optional fields. Never anything else, whatever ``value`` is.
    """
    if not isinstance(value, dict):
        raise BadMessage("not_object", f"{_json_type(value)}, not a JSON object")
    if "id" not in value and "data" in value:
        # What X's endpoints answer, the filtered stream's lines included:
        # worth a reason of its own rather than "no id".
        raise BadMessage("api_response", 'an X API response ({"data": ...}), not a tweet '
                                         'object: send the tweet under "data", one a line')
    tweet_id = check_id(value.get("id"))
    text = _check_text(value.get("text"))
    created = _check_created_at(value.get("created_at"), require_created_at)
    author_id, lang = (_check_optional(value.get(f), f) for f in _OPTIONAL_FIELDS)
    return TweetFields(tweet_id, text, value.get("created_at"), author_id, lang, created)


def parse_rfc3339(value: str) -> dt.datetime:
    """An aware datetime from RFC 3339 ('Z' or an offset, any fraction).

    Raises ValueError for anything else, a missing time zone included.
    """
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    stamp = dt.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        raise ValueError(f"no time zone in {value[:40]!r}")
    return stamp


def format_rfc3339(stamp: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds (``2026-11-20T10:00:00.417Z``), as X writes
    created_at and Beam's timestamp_attribute reads it."""
    # isoformat truncates to the millisecond and, unlike strftime, pads years below 1000.
    return stamp.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def seconds_from_iso(value: str) -> float:
    """Epoch seconds from RFC 3339. Raises ValueError when it is not."""
    return parse_rfc3339(value).timestamp()


def iso_from_seconds(seconds: float) -> str:
    """``format_rfc3339`` of epoch seconds."""
    return format_rfc3339(dt.datetime.fromtimestamp(seconds, dt.UTC))


def now_iso() -> str:
    return format_rfc3339(dt.datetime.now(dt.UTC))
