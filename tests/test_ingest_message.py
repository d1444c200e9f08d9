"""Unit tests for ingest: message encoding, rules planning, token handling, progress.

No servers here; the emulator and X stand-in tests are in test_ingest_replay.py
and test_ingest_xstream.py.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import pytest
import tweepy
from hypothesis import given
from hypothesis import strategies as st

from ingest.cli import build_parser, read_token
from ingest.logs import REDACTED, RedactFilter
from ingest.message import BadTweet, parse_json, to_message
from ingest.progress import Progress
from ingest.replay import _shifted, default_sample
from ingest.rules import plan_rules
from ingest.xstream import _reset_in

TWEET = {"id": "2123717988971446272", "text": "At the airport. Gate B12.",
         "created_at": "2026-11-20T10:00:00.000Z", "author_id": "9937658086697808507",
         "lang": "en"}


def test_message_follows_the_contract():
    message = to_message(dict(TWEET, referenced_tweets=[{"type": "quoted", "id": "1"}]))
    assert message.attributes == {"tweet_id": "2123717988971446272",
                                  "event_ts": "2026-11-20T10:00:00.000Z"}
    data = json.loads(message.data.decode("utf-8"))
    assert data["id"] == "2123717988971446272" and data["referenced_tweets"][0]["id"] == "1"
    assert data["text"] == TWEET["text"]


def test_event_ts_is_normalised_to_utc_milliseconds():
    message = to_message(dict(TWEET, created_at="2026-11-20T11:00:00.123456+01:00"))
    assert message.event_ts == "2026-11-20T10:00:00.123Z"


def test_numeric_id_above_2_53_is_not_rounded():
    raw = b'{"id": 2123717988971446273, "text": "hi", "created_at": "2026-11-20T10:00:00Z"}'
    message = to_message(parse_json(raw))
    assert message.tweet_id == "2123717988971446273"
    assert json.loads(message.data)["id"] == "2123717988971446273"


@given(st.integers(min_value=0, max_value=10**24))
def test_any_integer_id_survives_exactly(n):
    raw = json.dumps({"id": n, "text": "x", "created_at": "2026-11-20T10:00:00Z"})
    assert to_message(parse_json(raw)).tweet_id == str(n)


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "1", "text": "cut', "invalid JSON"),
    (b'[{"id": "1"}]', "an array, not a JSON object"),
    (b'{"text": "no id", "created_at": "2026-11-20T10:00:00Z"}', "no id"),
    (b'{"id": "1", "text": "", "created_at": "2026-11-20T10:00:00Z"}', "text is empty"),
    (b'{"id": "1", "text": " \\t ", "created_at": "2026-11-20T10:00:00Z"}', "only whitespace"),
    (b'\xff\xfe{"id": "1"}', "not UTF-8"),
    (b'{"id": "1", "text": 5, "created_at": "2026-11-20T10:00:00Z"}', "text is a number"),
    (b'{"id": 2.1237e18, "text": "x", "created_at": "2026-11-20T10:00:00Z"}', "already rounded"),
    (b'{"id": "12 ab", "text": "x", "created_at": "2026-11-20T10:00:00Z"}', "whitespace"),
    (b'{"id": "1", "text": "x"}', "no created_at"),
    (b'{"id": "1", "text": "x", "created_at": "yesterday"}', "not RFC 3339"),
    (b'{"id": "1", "text": "x", "created_at": "2026-11-20T10:00:00"}', "with a time zone"),
    (b'{"id": "1", "text": "x", "created_at": "2026-11-20T10:00:00Z", "lang": [1]}', "lang is an array"),
    (b'{"id": "1", "text": "' + b"x" * 25_001 + b'", "created_at": "2026-11-20T10:00:00Z"}',
     "25000-character limit"),
    (b'{"id": "1", "text": "\\ud800", "created_at": "2026-11-20T10:00:00Z"}', "lone UTF-16 surrogate"),
])
def test_bad_inputs_are_refused_with_a_reason(raw, reason):
    with pytest.raises(BadTweet, match=reason):
        to_message(parse_json(raw))


def test_any_id_without_whitespace_is_published_as_the_job_takes_it():
    assert to_message(dict(TWEET, id="bad-1")).attributes["tweet_id"] == "bad-1"


def test_message_over_the_jobs_1_mib_is_refused_before_publishing():
    # What the job would dead-letter as too_large never reaches Pub/Sub.
    with pytest.raises(BadTweet, match="over the 1048576-byte") as err:
        to_message(dict(TWEET, entities="x" * (1 << 20)))
    assert err.value.code == "too_large"
    assert len(to_message(dict(TWEET, entities="x" * 1_000_000)).data) <= 1 << 20


def test_unicode_survives_as_utf8():
    text = "cre\u0300me \u0634\u0643\u0631\u0627 👨\u200d👩\u200d👧 zero\u200bwidth"
    data = to_message(dict(TWEET, text=text)).data
    assert json.loads(data.decode("utf-8"))["text"] == text
    assert "\u0634".encode() in data  # raw UTF-8, not \\u escapes


def test_rule_plan_adds_missing_deletes_stale_keeps_the_rest():
    current = [tweepy.StreamRule("old rule", id="1"), tweepy.StreamRule("keep me", id="2")]
    plan = plan_rules(current, ["keep me", "new rule", "new rule", "  "])
    assert plan.add == ["new rule"]
    assert [r.id for r in plan.delete] == ["1"]
    assert [r.id for r in plan.keep] == ["2"]
    again = plan_rules([*plan.keep, tweepy.StreamRule("new rule", id="3")], ["keep me", "new rule"])
    assert not again.changes


def test_token_from_file_wins_and_errors_never_echo_it(tmp_path, monkeypatch):
    monkeypatch.setenv("X_BEARER_TOKEN", "env-token-not-real")
    assert read_token(None) == "env-token-not-real"
    token_file = tmp_path / "token"
    token_file.write_text("file-token-not-real\n")
    assert read_token(token_file) == "file-token-not-real"
    token_file.write_text("")
    with pytest.raises(ValueError, match="--bearer-token-file .* is empty"):
        read_token(token_file)
    monkeypatch.delenv("X_BEARER_TOKEN")
    with pytest.raises(ValueError, match="X_BEARER_TOKEN or pass --bearer-token-file"):
        read_token(None)


def test_help_shows_no_token_default(monkeypatch):
    monkeypatch.setenv("X_BEARER_TOKEN", "secret-token-not-real")
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert "secret-token-not-real" not in subparsers["x-stream"].format_help()


def test_redact_filter_scrubs_message_args_and_tracebacks():
    redact = RedactFilter(["tok-123"])
    try:
        raise RuntimeError("header Bearer tok-123")
    except RuntimeError:
        import sys
        record = logging.LogRecord("t", logging.DEBUG, __file__, 1, "Headers: %s",
                                   ({"Authorization": "Bearer tok-123"},), sys.exc_info())
    assert redact.filter(record)
    assert "tok-123" not in record.getMessage() and REDACTED in record.getMessage()
    assert "tok-123" not in record.exc_text


def test_reset_header_gives_seconds_until_reset():
    assert 9 < _reset_in(str(int(time.time()) + 10)) <= 10
    assert _reset_in(None) == 0 and _reset_in("garbage") == 0 and _reset_in("1") == 0


def test_loop_pass_shifts_time_and_snowflake_id_together():
    shifted = _shifted(dict(TWEET), 2, timedelta(seconds=600))
    assert shifted["created_at"] == "2026-11-20T10:20:00.000Z"
    assert int(shifted["id"]) - int(TWEET["id"]) == 2 * (600_000 << 22)
    assert _shifted(dict(TWEET, id=5), 1, timedelta(seconds=1))["id"] == str(5 + (1000 << 22))
    assert _shifted(["not", "a", "dict"], 1, timedelta(seconds=1)) == ["not", "a", "dict"]


def test_loop_pass_gives_a_non_numeric_id_a_suffix():
    shifted = _shifted(dict(TWEET, id="bad-1"), 2, timedelta(seconds=600))
    assert shifted["id"] == "bad-1~loop2" and shifted["created_at"] == "2026-11-20T10:20:00.000Z"
    assert to_message(shifted).tweet_id == "bad-1~loop2"
    # An id the contract refuses stays as it is, refused with the same reason every pass.
    assert _shifted(dict(TWEET, id="1 2"), 1, timedelta(seconds=1))["id"] == "1 2"
    with pytest.raises(BadTweet, match="over 64 characters"):
        to_message(_shifted(dict(TWEET, id="b" * 64), 1, timedelta(seconds=1)))


def test_progress_line_has_rate_and_eta():
    progress = Progress(total=100, tty=False)
    line = progress.line(50, 40)
    assert "50/100" in line and "lines/s" in line and "ETA" in line and "40 published" in line
    assert "ETA" not in Progress(total=100, tty=False, looping=True).line(50, 40)


def test_default_sample_is_the_shipped_file():
    path = default_sample()
    assert path.name == "sample_tweets.jsonl" and path.is_file()


@given(st.binary(max_size=300), st.text(max_size=200), st.text(max_size=40))
def test_message_size_is_exactly_the_protobuf_size(data, tweet_id, event_ts):
    from google.pubsub_v1 import types as gapic_types

    from ingest.message import TweetMessage

    message = TweetMessage(data, tweet_id, event_ts, None)
    proto = gapic_types.PubsubMessage(data=data, attributes=message.attributes)
    assert message.size == proto._pb.ByteSize()


def test_message_size_is_exact_for_large_messages():
    from google.pubsub_v1 import types as gapic_types

    message = to_message(dict(TWEET, entities="y" * 1_000_000))  # a 3-byte length
    proto = gapic_types.PubsubMessage(data=message.data, attributes=message.attributes)
    assert message.size == proto._pb.ByteSize()
