"""TestStream: windows, late data, dedupe across windows and batch bounds,
with the watermark and processing time moved by hand, on the real tiny model."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from transforms.dedupe import DedupeByTweetId
from transforms.inference import BatchStats, RunSentiment, local_handler
from transforms.records import Tweet, iso_from_seconds
from transforms.windowing import WindowByEventTime

T0 = 1_795_000_000  # a whole multiple of 2 s, so windows start at T0, T0+2, ...

pytestmark = pytest.mark.slow


def tweet(tweet_id: str, text: str = "a perfectly ordinary day") -> Tweet:
    return Tweet(tweet_id, text, None, None, "en", "{}", f"test:{tweet_id}")


def _streaming_pipeline() -> TestPipeline:
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return TestPipeline(options=options)


def _job(tweets, model_dir, max_batch_size=64, wait=0.5, window_seconds=2.0, lateness=3600,
         dedupe_shards=None):
    windowed = (tweets
                | DedupeByTweetId(ttl_seconds=600, shards=dedupe_shards)
                | WindowByEventTime(window_seconds, lateness))
    results, dead = windowed | RunSentiment(local_handler(str(model_dir)), max_batch_size, wait)
    return results, dead


def _summary(result):
    return (result.tweet_id, result.window_start, result.late)


class _Collect(beam.DoFn):
    """Records what reaches it, per test, in this process (the DirectRunner
    runs in-process). ``assert_that`` is not used here: with the job's late
    trigger it checks each pane on its own, and the Python DirectRunner does
    not hold its watermark for output of the batching timers."""

    seen: dict[str, list] = {}

    def __init__(self, name, fn):
        self._name, self._fn = name, fn

    def process(self, element):
        _Collect.seen.setdefault(self._name, []).append(self._fn(element))


def _collect(pcoll, name, fn=_summary):
    _Collect.seen[name] = []
    pcoll | f"Collect{name}" >> beam.ParDo(_Collect(name, fn))


def test_window_assignment(tiny_model_dir):
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements([TimestampedValue(tweet("1"), T0 + 0.5),
                             TimestampedValue(tweet("2"), T0 + 1.9),
                             TimestampedValue(tweet("3"), T0 + 2.0),
                             TimestampedValue(tweet("4"), T0 + 5.5)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, dead = _job(p | stream, tiny_model_dir)
        _collect(results, "results")
        _collect(dead, "dead", lambda d: d)
    assert sorted(_Collect.seen["results"]) == [
        ("1", iso_from_seconds(T0), False), ("2", iso_from_seconds(T0), False),
        ("3", iso_from_seconds(T0 + 2), False), ("4", iso_from_seconds(T0 + 4), False)]
    assert _Collect.seen["dead"] == []


def test_late_tweets_are_scored_and_flagged(tiny_model_dir):
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements([TimestampedValue(tweet("on-time"), T0 + 1)])
              # The watermark passes the end of [T0, T0+2): the window closes.
              .advance_watermark_to(T0 + 10)
              .add_elements([TimestampedValue(tweet("late"), T0 + 1.5),
                             TimestampedValue(tweet("fresh"), T0 + 10.5)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p | stream, tiny_model_dir)
        _collect(results, "results")
    assert sorted(_Collect.seen["results"]) == sorted([
        ("on-time", iso_from_seconds(T0), False),
        ("late", iso_from_seconds(T0), True),
        ("fresh", iso_from_seconds(T0 + 10), False)])


@pytest.mark.parametrize("shards", [None, 0], ids=["sharded", "per-id"])
def test_dedupe_across_windows(tiny_model_dir, shards):
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements([TimestampedValue(tweet("7"), T0 + 0.5)])
              .advance_watermark_to(T0 + 6)
              # The same id again, three windows later (a redelivery).
              .add_elements([TimestampedValue(tweet("7"), T0 + 6.5),
                             TimestampedValue(tweet("8"), T0 + 6.5)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p | stream, tiny_model_dir, dedupe_shards=shards)
        _collect(results, "ids", lambda r: r.tweet_id)
    assert sorted(_Collect.seen["ids"]) == ["7", "8"]


def test_batches_respect_max_size_and_stay_in_their_window(tiny_model_dir):
    BatchStats.reset()
    same_length = [TimestampedValue(tweet(f"a{i}", "the same length text here"), T0 + 0.1 * i)
                   for i in range(7)]
    other_window = [TimestampedValue(tweet(f"b{i}", "the same length text here"), T0 + 2.5)
                    for i in range(2)]
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements(same_length + other_window)
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p | stream, tiny_model_dir, max_batch_size=3, wait=60)
        _collect(results, "windows", lambda r: r.window_start)
    assert sorted(_Collect.seen["windows"]) == (
        [iso_from_seconds(T0)] * 7 + [iso_from_seconds(T0 + 2)] * 2)
    # 7 tweets in one window with max 3 -> 3, 3, 1; 2 in the next window -> 2.
    assert BatchStats.elements == 9
    assert BatchStats.largest <= 3
    assert sorted(BatchStats.sizes) == [1, 2, 3, 3]


def test_tweets_from_separate_bundles_share_a_batch(tiny_model_dir):
    """Two bundles, one window and length bucket: one batch. Beam's batching
    key used to change from bundle to bundle (see ``_stable_batch_keys``),
    which made this [1, 1].

    The processing-time bound (``--max_batch_wait_seconds``) cannot be shown
    with a TestStream: Beam sets that timer from the wall clock and the test
    clock starts at 0. ``tests/test_direct_pubsub.py`` shows it on the
    emulator, with batches flushed by the wait inside a one-hour window.
    """
    BatchStats.reset()
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements([TimestampedValue(tweet("w1"), T0 + 1)])
              .add_elements([TimestampedValue(tweet("w2"), T0 + 2)])
              .advance_watermark_to_infinity())
    with _streaming_pipeline() as p:
        results, _ = _job(p | stream, tiny_model_dir, max_batch_size=64, wait=60,
                          window_seconds=3600)
        _collect(results, "ids", lambda r: r.tweet_id)
    assert sorted(_Collect.seen["ids"]) == ["w1", "w2"]
    assert BatchStats.sizes == [2]


class _SetState:
    def __init__(self):
        self.items = set()

    def read(self):
        return self.items

    def add(self, value):
        self.items.add(value)

    def clear(self):
        self.items = set()


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


def test_sharded_dedupe_forgets_an_id_after_two_rotations():
    """The sharded layout's generations, with the DoFn called directly (a
    TestStream cannot drive its wall-clock timer: the test clock starts at 0)."""
    from transforms.dedupe import _ShardedDedupeFn

    fn = _ShardedDedupeFn(ttl_seconds=10)
    current, previous, armed, timer = _SetState(), _SetState(), _ValueState(), _Timer()

    def offer(tweet_id):
        return list(fn.process((0, tweet(tweet_id)), current, previous, armed, timer))

    assert len(offer("9")) == 1 and timer.at is not None
    assert offer("9") == []  # duplicate within the generation
    fn.rotate(current, previous, armed, timer)
    assert offer("9") == []  # still remembered in the previous generation
    fn.rotate(current, previous, armed, timer)
    assert len(offer("9")) == 1  # forgotten after ttl: state stays bounded
    fn.rotate(current, previous, armed, timer)
    fn.rotate(current, previous, armed, timer)
    assert current.items == set() and previous.items == set() and armed.read() is None


def test_per_id_dedupe_expiry_clears_its_key():
    from transforms.dedupe import _DedupeFn

    fn = _DedupeFn(ttl_seconds=10)
    seen, timer = _ValueState(), _Timer()
    assert len(list(fn.process(("9", tweet("9")), seen, timer))) == 1
    assert list(fn.process(("9", tweet("9")), seen, timer)) == []
    fn.expire(seen)
    assert len(list(fn.process(("9", tweet("9")), seen, timer))) == 1


def test_the_batching_key_is_one_per_process():
    # Beam keys batches by a per-process UUID from a Shared handle that keeps
    # only the last acquired object alive; transforms.inference pins one.
    import gc

    from apache_beam.transforms import util
    from apache_beam.utils.shared import Shared

    import transforms.inference  # noqa: F401  installs the pinned key

    first = util.WithLengthBucketKey(len, [10])
    first.setup()
    key = first.key
    del first
    Shared().acquire(lambda: util.SharedKey(), "something else")  # evicts the keepalive
    gc.collect()
    second = util.WithLengthBucketKey(len, [10])
    second.setup()
    assert second.key == key
