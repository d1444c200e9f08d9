"""TestStream: windows, late data, dedupe and batching across windows, with the
watermark moved by hand, on the real tiny model and a real redis-server.

Messages enter as Pub/Sub would deliver them (``Envelope``s stamped with
their event time) and go through the job's own steps from ParseTweets to
WriteToRedis, so ``event_time``, the window fields, the per-window counts in
Redis and the late counts are all checked as a user would see them.
"""

import json
import random

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.transforms.window import TimestampedValue

from bertstream.config import RedisConfig
from transforms.dedupe import DedupeByTweetId
from transforms.inference import RunSentiment, TokenCounter, local_handler
from transforms.parse import ParseTweets
from transforms.records import Envelope, Tweet, iso_from_seconds
from transforms.redis_sink import WriteToRedis
from transforms.windowing import WindowByEventTime

T0 = 1_795_000_000  # a whole multiple of 2 s, so windows start at T0, T0+2, ...
WINDOW = 2.0

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def message(tweet_id: str, seconds: float, text: str = "a perfectly ordinary day"):
    body = json.dumps({"id": tweet_id, "text": text, "lang": "en"}).encode()
    return TimestampedValue(Envelope(f"pubsub:{tweet_id}-{seconds}", body), seconds)


def _streaming_pipeline() -> BeamTestPipeline:
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return BeamTestPipeline(options=options)


def _job(p, stream, model_dir, redis_url=None, max_batch_size=64, dedupe="per-id"):
    """ParseTweets -> DedupeByTweetId -> RunSentiment -> WindowByEventTime (->
    WriteToRedis): the job's graph after its source (pipeline.build).
    ``dedupe``: "per-id" or "redis" (the layouts, transforms/dedupe.py)."""
    parsed = p | stream | ParseTweets()
    layout = {"per-id": {},
              "redis": {"redis_config": RedisConfig(url=redis_url or "")}}[dedupe]
    tweets = (parsed.tweets | DedupeByTweetId(ttl_seconds=600, **layout)).tweets
    scored, dead = tweets | RunSentiment(local_handler(str(model_dir)), max_batch_size,
                                         TokenCounter.for_model(str(model_dir)))
    results = scored | WindowByEventTime(WINDOW, 3600)
    if redis_url:
        results | WriteToRedis(RedisConfig(url=redis_url))
    return results, dead


class _Collect(beam.DoFn):
    """Records what reaches it, per test, in this process (the DirectRunner
    runs in-process)."""

    seen: dict[str, list] = {}

    def __init__(self, name, fn):
        self._name, self._fn = name, fn

    def process(self, element):
        _Collect.seen.setdefault(self._name, []).append(self._fn(element))


def _collect(pcoll, name, fn):
    _Collect.seen[name] = []
    pcoll | f"Collect{name}" >> beam.ParDo(_Collect(name, fn))


def _fields(result):
    return (result.tweet_id, result.event_time, result.window_start, result.window_end,
            result.late)


def _batch_sizes(pipeline_result):
    found = pipeline_result.metrics().query(
        MetricsFilter().with_namespace("RunSentiment").with_name("batch_size"))
    values = [d.committed or d.attempted for d in found["distributions"]]
    return [v for v in values if v is not None and v.count]


def test_event_time_and_window_fields(tiny_model_dir):
    """``event_time`` is the tweet's own time to the millisecond (not its
    window's end), for tweets that share a window and for late ones."""
    stream = (BeamTestStream()
              .advance_watermark_to(T0)
              .add_elements([message("1", T0 + 0.417), message("2", T0 + 1.999),
                             message("3", T0 + 2.0), message("4", T0 + 5.5)])
              .advance_watermark_to(T0 + 10)
              .add_elements([message("5", T0 + 1.25)])  # late: [T0, T0+2) has closed
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, dead = _job(p, stream, tiny_model_dir)
        _collect(results, "results", _fields)
        _collect(dead, "dead", lambda d: d)
    w = iso_from_seconds
    assert sorted(_Collect.seen["results"]) == [
        ("1", w(T0 + 0.417), w(T0), w(T0 + 2), False),
        ("2", w(T0 + 1.999), w(T0), w(T0 + 2), False),
        ("3", w(T0 + 2.0), w(T0 + 2), w(T0 + 4), False),
        ("4", w(T0 + 5.5), w(T0 + 4), w(T0 + 6), False),
        ("5", w(T0 + 1.25), w(T0), w(T0 + 2), True)]
    assert _Collect.seen["dead"] == []


def _expected(schedule):
    """What the job must report for a schedule of ``(watermark, [(id, ts)])``
    steps: each tweet's window, and whether it is late. Lateness is observed
    with a timer at the end of each window that got a tweet (the watermark
    cannot be read): at each step the timers of those windows that the
    watermark has passed fire, and every window that ends at or before the
    latest of them is closed. A tweet is late when its window is known closed
    when it arrives (so a window that nobody saw open is known closed once a
    later window has closed, or after its own first tweet's timer)."""
    pending: set[float] = set()   # ends of windows seen, not yet known closed
    closed_through = float("-inf")
    out = {}
    for watermark, tweets in schedule:
        fired = {end for end in pending if end <= watermark}
        closed_through = max([closed_through, *fired])
        pending = {end for end in pending if end > closed_through}
        for tweet_id, ts in tweets:
            start = ts - (ts - T0) % WINDOW
            late = start + WINDOW <= closed_through
            out[tweet_id] = (iso_from_seconds(ts), iso_from_seconds(start),
                             iso_from_seconds(start + WINDOW), late)
            if not late:
                pending.add(start + WINDOW)
    return out


def test_many_windows_results_counts_and_late_counts_in_redis(tiny_model_dir, redis_url):
    """Tweets over 40 windows, in shuffled order, some arriving after their
    window closed: every result's window fields and late flag, the per-window
    counts in Redis and the late count are what event time says, although
    inference batches mix windows.

    On this schedule 38 of the 105 tweets are late (the per-window flag this
    replaced saw 32: it could not tell that a window nobody saw open had
    closed before its second tweet)."""
    import redis

    rng = random.Random(7)
    schedule, watermark, n = [], T0, 0
    for _ in range(20):
        tweets = []
        for _ in range(rng.randint(3, 8)):
            n += 1
            # Mostly near the watermark, some far behind it (late).
            behind = rng.choice([0, 0, 0, 1, 2, 10, 30])
            ts = max(T0, watermark - behind + rng.random() * 4)
            tweets.append((f"t{n}", round(ts, 3)))
        rng.shuffle(tweets)
        schedule.append((watermark, tweets))
        watermark += 4
    stream = BeamTestStream()
    for watermark, tweets in schedule:
        stream = stream.advance_watermark_to(watermark).add_elements(
            [message(i, ts, "some words " * (1 + int(ts) % 5)) for i, ts in tweets])
    stream = stream.advance_watermark_to_infinity()
    expected = _expected(schedule)

    with _streaming_pipeline() as p:
        results, _ = _job(p, stream, tiny_model_dir, redis_url, max_batch_size=16)
        _collect(results, "results", _fields)
    result = p.result

    got = {r[0]: r[1:] for r in _Collect.seen["results"]}
    assert got == expected
    assert sum(late for *_, late in expected.values()) >= 5  # the input does have late tweets
    client = redis.Redis.from_url(redis_url)
    # The late count the summary reports (the legacy DirectRunner loses
    # metric updates of later bundles, so the sink counts it in Redis).
    assert int(client.hget("sentiment:stats", "late")) == sum(
        late for *_, late in expected.values())
    windows: dict[str, int] = {}
    for _, start, _, _ in expected.values():
        windows[start] = windows.get(start, 0) + 1
    for start, count in windows.items():
        counts = client.hgetall(f"sentiment:window:{start}")
        assert sum(int(v) for v in counts.values()) == count, start
    assert len(windows) >= 30
    del result


@pytest.mark.parametrize("dedupe", ["per-id", "redis"])
def test_dedupe_across_windows(tiny_model_dir, dedupe, redis_url):
    stream = (BeamTestStream()
              .advance_watermark_to(T0)
              .add_elements([message("7", T0 + 0.5)])
              .advance_watermark_to(T0 + 6)
              # The same id again, three windows later (a redelivery), and a
              # copy of a new id in the same bundle.
              .add_elements([message("7", T0 + 6.5), message("8", T0 + 6.5),
                             message("8", T0 + 6.6)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p, stream, tiny_model_dir,
                          redis_url if dedupe == "redis" else None, dedupe=dedupe)
        _collect(results, "ids", lambda r: r.tweet_id)
    assert sorted(_Collect.seen["ids"]) == ["7", "8"]


def test_batches_respect_max_size_and_cross_windows(tiny_model_dir):
    """Nine tweets of one bundle in three windows, max 4: batches of 4, 4
    and 1, not one or more per window."""
    stream = (BeamTestStream()
              .advance_watermark_to(T0)
              .add_elements([message(f"a{i}", T0 + 0.7 * i, "the same length text here")
                             for i in range(9)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p, stream, tiny_model_dir, max_batch_size=4)
        _collect(results, "windows", lambda r: r.window_start)
    assert len(set(_Collect.seen["windows"])) == 3
    (sizes,) = _batch_sizes(p.result)
    assert (sizes.count, sizes.sum, sizes.max) == (3, 9, 4)


class _ValueState:
    value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    at = None

    def set(self, at):
        self.at = at


def _tweet(tweet_id: str) -> Tweet:
    return Tweet(tweet_id, "text", None, None, "en", "{}", f"test:{tweet_id}",
                 ack_id=f"ack-{tweet_id}")


def test_per_id_dedupe_expiry_clears_its_key():
    from apache_beam.utils.timestamp import Timestamp

    from transforms.dedupe import _FirstPerIdFn

    fn = _FirstPerIdFn(ttl_seconds=10)
    seen, timer = _ValueState(), _Timer()
    now = Timestamp.of(T0)
    assert list(fn.process(("9", _tweet("9")), now, seen, timer)) == [_tweet("9")]
    assert timer.at == now + 10  # event time: the tweet's own time plus the TTL
    assert [o.value for o in fn.process(("9", _tweet("9")), now, seen, timer)] == ["ack-9"]
    fn.expire(seen)
    assert list(fn.process(("9", _tweet("9")), now, seen, timer)) == [_tweet("9")]

