"""The typed records that flow through the graph, with Beam's RowCoder.

A message enters as an ``Envelope`` and leaves as exactly one of: a
``Result`` written to Redis, a ``DeadLetter`` with a reason, or a counted
duplicate. Each carries the ``ack_id`` of the Pub/Sub message it came from
(empty for files and for sources that acknowledge by themselves), which the
graph's ``AcknowledgeMessages`` step acknowledges once that end is reached.

No ``from __future__ import annotations`` here: Beam reads these classes'
annotations to build their schemas, and with postponed annotations every
field becomes the Python-only ``pythonsdk_any`` type that a Java runner
(Flink) cannot decode. ``tests/test_records.py`` checks the schemas.
"""

import base64
import json
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import apache_beam as beam

# The time helpers and LABELS live in the Beam-free contract module, which the
# ingester and the dashboard share; the transforms import them from here too.
from transforms.contract import LABELS, iso_from_seconds, now_iso, seconds_from_iso  # noqa: F401


class Envelope(NamedTuple):
    """One raw input: a Pub/Sub message or a line of a file, undecoded."""

    # Where it came from: ``pubsub:<message id>`` or ``FILE:LINE``.
    source_id: str
    data: bytes
    # The Pub/Sub ack id, when the graph acknowledges (see AcknowledgeMessages).
    ack_id: str = ""
    # RFC 3339 publish time of a Pub/Sub message; "" for a file.
    published_at: str = ""


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
    source_id: str
    # The event time (RFC 3339, ms): created_at for a file, the message's
    # event_ts attribute for Pub/Sub. Carried in the record because batching
    # re-stamps elements.
    event_time: str = ""
    published_at: str = ""
    ack_id: str = ""
    # Set by WindowByEventTime.
    window_start: str = ""
    window_end: str = ""
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
    published_at: str = ""
    # Not published: where the tweet came from, and its Pub/Sub ack id.
    source_id: str = ""
    ack_id: str = ""

    def to_json(self) -> str:
        """The result contract (docs/architecture.md): one JSON object per tweet."""
        body = self._asdict()
        del body["source_id"], body["ack_id"]
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
    ack_id: str = ""

    @classmethod
    def of(cls, stage: str, reason: str, raw: Union[bytes, str], source_id: str,
           tweet_id: Optional[str] = None, ack_id: str = "") -> "DeadLetter":
        if isinstance(raw, str):
            text, encoding = raw, "utf-8"
        else:
            try:
                text, encoding = raw.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        return cls(stage, reason[:2000], text, encoding, source_id, tweet_id, now_iso(), ack_id)

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw) if self.encoding == "base64" else self.raw.encode()


for _record in (Envelope, Tweet, Result, DeadLetter):
    beam.coders.registry.register_coder(_record, beam.coders.RowCoder)
