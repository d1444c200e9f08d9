"""The typed records that flow through the graph, with Beam's RowCoder.

A tweet enters as bytes and leaves as exactly one of: a ``Result`` written to
Redis, a ``DeadLetter`` with a reason, or a count of skipped duplicates.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from typing import NamedTuple, Optional

import apache_beam as beam

LABELS = ("negative", "neutral", "positive")


class Tweet(NamedTuple):
    """A parsed tweet. Ids stay strings: X ids exceed 2**53."""

    tweet_id: str
    text: str
    created_at: Optional[str]
    author_id: Optional[str]
    lang: Optional[str]
    # The original message as received (UTF-8 JSON), kept so a failure after
    # parsing can still dead-letter the exact input for replay.
    raw: str
    # Where it came from: the Pub/Sub message id or FILE:LINE.
    source_id: str
    late: bool = False


class Result(NamedTuple):
    tweet_id: str
    text: str
    label: str
    score: float
    probabilities: Sequence[float]  # in LABELS order
    model_version: str
    event_time: str
    window_start: str
    window_end: str
    processed_at: str
    late: bool
    # Where the tweet came from (``pubsub:<message id>``...): for
    # acknowledgement only, not part of the published result.
    source_id: str = ""

    def to_json(self) -> str:
        """The result contract of DESIGN.md (one JSON object per tweet)."""
        body = self._asdict()
        del body["source_id"]
        body["probabilities"] = {k: float(v) for k, v in zip(LABELS, self.probabilities)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class DeadLetter(NamedTuple):
    """An input that could not become a result, and why.

    ``raw`` is the input as UTF-8 text, or base64 when it was not valid UTF-8
    (``encoding`` says which), so it can be replayed byte for byte.
    """

    stage: str
    reason: str
    raw: str
    encoding: str
    source_id: str
    tweet_id: Optional[str]
    failed_at: str

    @classmethod
    def of(cls, stage: str, reason: str, raw: bytes | str, source_id: str,
           tweet_id: str | None = None) -> DeadLetter:
        if isinstance(raw, str):
            text, encoding = raw, "utf-8"
        else:
            try:
                text, encoding = raw.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        return cls(stage, reason[:2000], text, encoding, source_id, tweet_id, now_iso())

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw) if self.encoding == "base64" else self.raw.encode()


def now_iso() -> str:
    return iso_from_seconds(dt.datetime.now(dt.UTC).timestamp())


def iso_from_seconds(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds, as X's API writes created_at."""
    stamp = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def seconds_from_iso(value: str) -> float:
    """Parses RFC 3339 (with 'Z' or an offset). Raises ValueError when it is not."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    stamp = dt.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {value!r}")
    return stamp.timestamp()


for _record in (Tweet, Result, DeadLetter):
    beam.coders.registry.register_coder(_record, beam.coders.RowCoder)
