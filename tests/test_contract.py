"""The message contract, once: the ingester and the job accept and refuse the same
messages with the same code and reason; the shared times, redaction and labels;
and the module stays free of Beam and TensorFlow."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.utils.timestamp import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertstream.config import redacted
from ingest.message import BadTweet, encode, parse_json, to_message
from tests.reliability.hostile import ODD_TEXT, hostile, json_value, long_text, rfc3339
from transforms import contract
from transforms.contract import MAX_MESSAGE_BYTES, BadMessage, check_tweet
from transforms.parse import DEAD_LETTER, _ParseFn, parse_tweet
from transforms.records import Envelope

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=600, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("module", ["bertstream.config", "bertstream.logs", "transforms.contract",
                                    "ingest.message", "ops.dashboard"])
def test_light_modules_import_neither_beam_nor_tensorflow(module):
    code = (f"import sys, {module}; heavy = [m for m in ('apache_beam', 'tensorflow') "
            "if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_one_labels_tuple():
    from model import data
    from ops import dashboard
    from transforms import records

    assert data.LABELS is dashboard.LABELS is records.LABELS is contract.LABELS
    assert contract.LABELS == ("negative", "neutral", "positive")


@pytest.mark.parametrize("text, utc", [
    ("2026-11-20T10:00:00.417Z", "2026-11-20T10:00:00.417Z"),
    ("2026-11-20T10:00:00z", "2026-11-20T10:00:00.000Z"),
    ("2026-11-20T11:30:00.123456789+01:30", "2026-11-20T10:00:00.123Z"),
    (" 2026-11-20T10:00:00.9999Z ", "2026-11-20T10:00:00.999Z"),  # truncated, never rounded up
])
def test_rfc3339_is_read_with_a_zone_and_written_in_utc_milliseconds(text, utc):
    stamp = contract.parse_rfc3339(text)
    assert stamp.tzinfo is not None and contract.format_rfc3339(stamp) == utc
    assert contract.iso_from_seconds(contract.seconds_from_iso(text)) == utc


@pytest.mark.parametrize("text", ["2026-11-20T10:00:00", "2026-11-20", "yesterday", ""])
def test_rfc3339_without_a_zone_is_refused(text):
    with pytest.raises(ValueError):
        contract.parse_rfc3339(text)


@pytest.mark.parametrize("text, shown", [
    ("redis://user:pw@redis:6379/0", "redis://user:***@redis:6379/0"),
    ("rediss://:pw@h/0", "rediss://:***@h/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis://u:p@ss@[::1]:6379", "redis://u:***@[::1]:6379"),  # an unencoded '@' too
    ("redis://user@h:6379", "redis://user@h:6379"),
    ("--redis_url=redis://u:a%2Fb@h/0 and http://x:y@z", "--redis_url=redis://u:***@h/0 and "
                                                          "http://x:***@z"),
])
def test_url_passwords_are_redacted(text, shown):
    assert redacted(text) == shown


def _outcome(call):
    """("refused", code, reason), or ("ok", the value)."""
    try:
        return "ok", call()
    except BadMessage as err:
        return "refused", err.code, str(err)


def _job(data: bytes, from_created_at: bool):
    """The ParseTweets DoFn on one message: ("dead", reason) or ("tweet", id, event_time)."""
    (out,) = _ParseFn(from_created_at).process(Envelope("t:1", data), Timestamp.of(1_795_000_000))
    if getattr(out, "tag", None) == DEAD_LETTER:
        return "dead", out.value.reason
    tweet = getattr(out, "value", out)
    return "tweet", tweet.tweet_id, tweet.event_time


def _field(good):
    """A field's value: absent (...), as it should be, or anything at all."""
    return st.one_of(good, st.just(...), json_value, st.sampled_from(ODD_TEXT))


# Decoded JSON, as the ingester gets it (a round trip joins "\ud83d\ude00" into one
# character, as any JSON reader does).
tweet_values = st.one_of(
    st.fixed_dictionaries({
        "id": _field(st.one_of(st.integers(0, 2**64).map(str), st.integers(-2**70, 2**70),
                               st.from_regex(r"[a-z0-9-]{1,70}", fullmatch=True))),
        "text": _field(st.one_of(st.text(min_size=1, max_size=80), long_text)),
        "created_at": _field(rfc3339),
        "author_id": _field(st.integers(0, 2**64).map(str)),
        "lang": _field(st.sampled_from(["en", "fr", "und"])),
        "entities": _field(st.builds(lambda n: "e" * n, st.integers(0, MAX_MESSAGE_BYTES))),
    }).map(lambda d: {k: v for k, v in d.items() if v is not ...}),
    json_value,
).map(lambda value: json.loads(json.dumps(value)))


@PROPERTY
@given(tweet_values)
def test_ingester_refuses_what_the_job_would_with_the_same_reason(value):
    """Whatever tweet object the ingester is handed, the job given the data the
    ingester publishes (or would have published) agrees: same code and reason,
    or the same id and event time."""
    ingester = _outcome(lambda: to_message(value))
    try:
        data = encode(value)
    except BadTweet as err:  # too deep to write out: there is nothing to publish
        assert ingester[0] == "refused" and ingester[1] in ("bad_json", err.code)
        return
    job = _outcome(lambda: parse_tweet(data, "t:1", require_created_at=True))
    if ingester[0] == "refused":
        assert job == ingester
        assert _job(data, True) == ("dead", ingester[2])
    else:
        message, tweet = ingester[1], job[1]
        assert message.data == data
        assert (tweet.tweet_id, tweet.event_time) == (message.tweet_id, message.event_ts)
        assert _job(data, True) == ("tweet", message.tweet_id, message.event_ts)
        assert _job(data, False)[:2] == ("tweet", message.tweet_id)  # Pub/Sub input


@PROPERTY
@given(st.one_of(hostile, tweet_values.map(lambda v: json.dumps(v).encode()))
       .filter(lambda raw: len(raw) <= MAX_MESSAGE_BYTES // 5))
def test_a_line_the_ingester_skips_is_one_a_file_run_dead_letters(raw):
    """A JSONL line: ``ingest replay`` and the job reading the same file agree.
    (Lines are at most a fifth of the size limit: re-encoding can grow a line,
    '9e15' to '9000000000000000.0', and the size rule applies to what is sent.)"""
    ingester = _outcome(lambda: to_message(parse_json(raw)))
    job = _job(raw, True)
    if ingester[0] == "refused":
        assert job == ("dead", ingester[2])
    else:
        assert job == ("tweet", ingester[1].tweet_id, ingester[1].event_ts)


@PROPERTY
@given(tweet_values)
def test_check_tweet_raises_nothing_but_bad_message(value):
    for required in (False, True):
        result = _outcome(lambda: check_tweet(value, required))  # noqa: B023
        if result[0] == "ok":
            fields = result[1]
            assert isinstance(fields.tweet_id, str) and fields.text.strip()
            assert fields.created is None or fields.created.tzinfo == dt.UTC
