"""ParseTweets: a DoFn-level check of every reason, then the transform in a TestPipeline."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.contract import MAX_TEXT_CHARS, BadMessage
from transforms.parse import ParseTweets, parse_tweet
from transforms.records import DeadLetter, Envelope, Result


def _tweet(**fields) -> bytes:
    body = {"id": "1850000000000000001", "text": "hello", "created_at": "2026-11-20T10:00:00.000Z"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize("data, code", [
    (b"{not json", "bad_json"),
    (b"\xff\xfe\x00garbage", "not_utf8"),
    (b"[1, 2, 3]", "not_object"),
    (b'"just a string"', "not_object"),
    (_tweet(id=...), "missing_id"),
    (_tweet(id=""), "missing_id"),
    (json.dumps({"data": json.loads(_tweet()), "matching_rules": []}).encode(), "api_response"),
    (_tweet(id=1.5e18), "bad_id"),
    (_tweet(id=True), "bad_id"),
    (_tweet(id="12 34"), "bad_id"),
    (_tweet(id="12\x7f"), "bad_id"),
    (_tweet(id="x" * 65), "bad_id"),
    (_tweet(text=...), "missing_text"),
    (_tweet(text=""), "empty_text"),
    (_tweet(text=" \t\n\u3000 "), "empty_text"),
    (_tweet(text=12), "bad_text"),
    (_tweet(text=["a"]), "bad_text"),
    (_tweet(text="x" * (MAX_TEXT_CHARS + 1)), "text_too_long"),
    (b'{"id": "1", "text": "lone \\ud800 surrogate"}', "bad_text"),
    (_tweet(author_id={"x": 1}), "bad_field"),
    # created_at is optional on Pub/Sub input, but when present it must be a time.
    (_tweet(created_at="yesterday"), "bad_created_at"),
    (_tweet(created_at="2026-11-20T10:00:00"), "bad_created_at"),  # no time zone
    (_tweet(created_at=1795168800), "bad_created_at"),
    (_tweet(created_at="9999-12-31T23:59:59-01:00"), "bad_created_at"),  # past 9999 in UTC
    (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
    (b" " * (2 << 20), "too_large"),
])
def test_bad_input_is_refused_with_a_reason(data, code):
    with pytest.raises(BadMessage) as err:
        parse_tweet(data, "test:1")
    assert err.value.code == code
    assert str(err.value)


@pytest.mark.parametrize("text", [
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "RTL: مرحبا بالعالم שלום עולם",
    "zero\u200bwidth\u200d joiners\ufeff",
    "combining e\u0301 a\u0300 n\u0303",
    "NUL \x00 inside",
    "surrogate pair as escape: \U0001F600",
])
def test_unicode_passes_unchanged(text):
    tweet = parse_tweet(_tweet(text=text), "test:1")
    assert tweet.text == text


def test_a_byte_order_mark_before_the_json_is_ignored():
    assert parse_tweet("\ufeff".encode() + _tweet(), "file:1").tweet_id == "1850000000000000001"
    with pytest.raises(BadMessage) as err:  # only before the document
        parse_tweet(b'{"id": "1",\xef\xbb\xbf "text": "hi"}', "file:1")
    assert err.value.code == "bad_json"


def test_ids_stay_exact_strings():
    big = 2**63 + 12345  # far over 2**53: a float would lose the last digits
    tweet = parse_tweet(f'{{"id": {big}, "text": "hi"}}'.encode(), "s")
    assert tweet.tweet_id == str(big)
    assert parse_tweet(_tweet(id="1850000000000000001"), "s").tweet_id == "1850000000000000001"


def test_ids_need_not_be_decimal_and_file_input_needs_created_at():
    assert parse_tweet(_tweet(id="bad-1"), "s").tweet_id == "bad-1"
    assert parse_tweet(_tweet(created_at=...), "s").event_time == ""
    with pytest.raises(BadMessage) as err:
        parse_tweet(_tweet(created_at=...), "s", require_created_at=True)
    assert err.value.code == "missing_created_at"
    tweet = parse_tweet(_tweet(created_at="2026-11-20T11:00:00.123456+01:00"), "s")
    assert tweet.event_time == "2026-11-20T10:00:00.123Z"
    assert tweet.created_at == "2026-11-20T11:00:00.123456+01:00"  # kept as written


def test_dead_letter_keeps_raw_bytes():
    raw = b"\xff\xfe not utf8"
    dead = DeadLetter.of("parse", "why", raw, "f:1")
    assert dead.encoding == "base64" and dead.raw_bytes() == raw
    dead = DeadLetter.of("parse", "why", b'{"a": 1}', "f:2")
    assert dead.encoding == "utf-8" and dead.raw == '{"a": 1}'


def test_result_json_contract():
    result = Result("1", "t", "positive", 0.9, [0.05, 0.05, 0.9], "3", "2026-11-20T10:00:00.000Z",
                    "2026-11-20T10:00:00.000Z", "2026-11-20T10:00:02.000Z",
                    "2026-11-20T10:00:03.000Z", False)
    body = json.loads(result.to_json())
    assert set(body) >= {"tweet_id", "text", "label", "score", "probabilities", "model_version",
                         "event_time", "window_start", "window_end", "processed_at"}
    assert body["probabilities"] == {"negative": 0.05, "neutral": 0.05, "positive": 0.9}


def test_parse_tweets_transform_splits_outputs():
    inputs = [Envelope("f:1", _tweet(id="1", text="good", created_at="2026-11-20T10:00:02.417Z")),
              Envelope("f:2", b"{bad"), Envelope("f:3", _tweet(id="2", text="   ")),
              Envelope("f:4", _tweet(id="3", created_at="yesterday")),
              Envelope("f:5", _tweet(id="4", created_at=...))]
    with BeamTestPipeline() as p:
        out = p | beam.Create(inputs) | ParseTweets(timestamp_from_created_at=True)
        # A file's event time is created_at, to the millisecond, in the record.
        assert_that(out.tweets | "Ids" >> beam.Map(
                        lambda t: (t.tweet_id, t.source_id, t.event_time)),
                    equal_to([("1", "f:1", "2026-11-20T10:00:02.417Z")]), label="tweets")
        assert_that(out.dead_letter | "Reasons" >> beam.Map(lambda d: (d.source_id, d.stage)),
                    equal_to([("f:2", "parse"), ("f:3", "parse"), ("f:4", "parse"),
                              ("f:5", "parse")]), label="dead")
