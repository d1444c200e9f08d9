"""DedupeByTweetId's Redis layout (portable runners): claims in the sink's Redis.

The DoFn is driven bundle by bundle against a real redis-server; the whole
job with this layout runs on Flink in tests/test_launcher_flink.py.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
import redis
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from bertstream.config import RedisConfig
from transforms.dedupe import ALREADY, CLAIM_PREFIX, SKIPPED, _FirstPerIdInRedisFn
from transforms.records import Tweet


def _tweet(tweet_id: str, source: str = "") -> Tweet:
    return Tweet(tweet_id, "text", None, None, "en", "{}", source or f"pubsub:m-{tweet_id}",
                 event_time="2026-11-20T10:00:00.000Z", ack_id=f"ack-{tweet_id}-{source}")


def _bundle(fn, tweets, already: list | None = None):
    """(passed tweet ids, skipped ack ids) of one bundle; the ack ids of tweets
    found already written go to ``already``."""
    fn.start_bundle()
    out = []
    for tweet in tweets:
        out += list(fn.process(tweet, Timestamp.of(1), GlobalWindow()) or [])
    out += list(fn.finish_bundle() or [])
    passed, skipped = [], []
    for item in out:
        if isinstance(item, beam.pvalue.TaggedOutput):
            assert item.tag in (SKIPPED, ALREADY)
            assert isinstance(item.value, WindowedValue)
            if item.tag == ALREADY:
                assert already is not None, "a tweet was found already written"
                already.append(item.value.value)
            else:
                skipped.append(item.value.value)
        else:
            assert isinstance(item, WindowedValue) and item.timestamp == Timestamp.of(1)
            passed.append(item.value.tweet_id)
    return passed, skipped


@pytest.fixture
def fn(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    fn = _FirstPerIdInRedisFn(RedisConfig(url=redis_url), claim_seconds=30)
    fn.setup()
    yield fn
    fn.teardown()


def test_first_copy_passes_later_copies_are_skipped_with_their_ack_ids(fn, redis_url):
    passed, skipped = _bundle(fn, [_tweet("1"), _tweet("2"), _tweet("1", "pubsub:again")])
    assert passed == ["1", "2"] and skipped == ["ack-1-pubsub:again"]
    # A later bundle: both ids are claimed.
    passed, skipped = _bundle(fn, [_tweet("2", "pubsub:x"), _tweet("3")])
    assert passed == ["3"] and skipped == ["ack-2-pubsub:x"]
    ttl = redis.Redis.from_url(redis_url).ttl(CLAIM_PREFIX + "1")
    assert 0 < ttl <= 30


def test_an_id_with_a_result_in_redis_is_counted_as_already_written(fn, redis_url):
    """Not a duplicate: its result is there (an earlier run, or a redelivery after
    the write). Counted as the sink counts it, so the summary can say so."""
    client = redis.Redis.from_url(redis_url)
    client.set("sentiment:seen:9", "1")  # the sink wrote its result earlier
    already: list = []
    assert _bundle(fn, [_tweet("9")], already) == ([], [])
    assert already == ["ack-9-"]
    assert not client.exists(CLAIM_PREFIX + "9")
    assert int(client.hget("sentiment:stats", "already_written")) == 1


def test_a_replayed_dead_letter_is_not_a_copy_of_its_first_attempt(fn):
    # The first attempt was dead-lettered (no result); its claim is still there.
    assert _bundle(fn, [_tweet("5")]) == (["5"], [])
    replay = _tweet("5", "replay:1700000000000-0/pubsub:m-77")
    assert _bundle(fn, [replay]) == (["5"], [])


def test_a_claim_expires_so_a_redelivery_after_a_crash_is_scored(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    fn = _FirstPerIdInRedisFn(RedisConfig(url=redis_url), claim_seconds=1)
    fn.setup()
    try:
        assert _bundle(fn, [_tweet("4")]) == (["4"], [])
        client.pexpire(CLAIM_PREFIX + "4", 1)  # the claim's end, without waiting
        import time

        time.sleep(0.05)
        assert _bundle(fn, [_tweet("4", "pubsub:redelivered")]) == (["4"], [])
    finally:
        fn.teardown()


def test_scripts_forgotten_by_redis_are_loaded_again(fn, redis_url):
    """The scripts run by SHA1; a Redis that lost them (restarted, SCRIPT FLUSH)
    answers NOSCRIPT, and the bundle loads them and still claims in order."""
    client = redis.Redis.from_url(redis_url)
    assert _bundle(fn, [_tweet("1")]) == (["1"], [])
    client.script_flush()
    assert not any(client.script_exists(fn._sha))
    passed, skipped = _bundle(fn, [_tweet("1", "pubsub:b"), _tweet("6"), _tweet("6", "pubsub:c")])
    assert passed == ["6"] and skipped == ["ack-1-pubsub:b", "ack-6-pubsub:c"]
    assert all(client.script_exists(fn._sha))


def test_redis_unavailable_lets_every_tweet_through():
    fn = _FirstPerIdInRedisFn(RedisConfig(url="redis://127.0.0.1:1/0", retries=0), 30)
    fn.setup()
    try:
        passed, skipped = _bundle(fn, [_tweet("1"), _tweet("1", "pubsub:b")])
    finally:
        fn.teardown()
    # The sink, which writes each id once, is the line of defence then.
    assert passed == ["1", "1"] and skipped == []
