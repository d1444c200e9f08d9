"""The latency target's contract (transforms/budget.py), without timing assertions.

A meter with a fixed cost stands in for the measured one, so every limit is
known: a lone tweet is pulled and scored at once, a burst is cut into pulls
and model calls that each fit their share of the target. The pulls run
against the real Pub/Sub emulator, the model calls through the job's own
handler wrapper and RunInference on the tiny SavedModel.
"""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.options import BertstreamOptions
from transforms import budget
from transforms.budget import BATCH_SHARE, BUNDLE_SHARE, CostMeter, LatencyBudget
from transforms.inference import LengthBatchedHandler, RunSentiment, Scores, local_handler
from transforms.records import Tweet


class FixedMeter(CostMeter):
    """A cost per tweet that the job's own calls do not move."""

    def __init__(self, ms_per_tweet: float | None):
        super().__init__()
        self.fixed = ms_per_tweet
        self.recorded: list[tuple[int, float]] = []

    def record(self, tweets, milliseconds):
        self.recorded.append((tweets, milliseconds))

    def ms_per_tweet(self):
        return self.fixed


@pytest.fixture
def meter(monkeypatch):
    fixed = FixedMeter(10.0)  # 10 ms a tweet
    monkeypatch.setattr(budget, "METER", fixed)
    return fixed


def test_limits_follow_the_measured_cost_and_the_target():
    target = LatencyBudget(3000)
    assert target.bundle_limit(1000, FixedMeter(None)) == 1000  # nothing measured yet
    assert target.bundle_limit(1000, FixedMeter(2.0)) == 1000  # the target is not binding
    assert target.bundle_limit(1000, FixedMeter(10.0)) == int(BUNDLE_SHARE * 3000 / 10.0)
    assert target.batch_limit(64, FixedMeter(2.0)) == 64  # cheap: the configured size
    assert target.batch_limit(64, FixedMeter(20.0)) == int(BATCH_SHARE * 3000 / 20.0)
    # A model slower than the whole target still lets one tweet through.
    assert target.batch_limit(64, FixedMeter(10_000.0)) == 1
    assert target.bundle_limit(1000, FixedMeter(10_000.0)) == budget.MIN_BUNDLE
    assert LatencyBudget(6000).bundle_limit(1000, FixedMeter(10.0)) > target.bundle_limit(
        1000, FixedMeter(10.0))
    with pytest.raises(ValueError, match="--latency_target_ms"):
        LatencyBudget(0)


def test_meter_averages_by_tweets():
    meter = CostMeter()
    assert meter.ms_per_tweet() is None
    meter.record(32, 64.0)
    assert meter.ms_per_tweet() == pytest.approx(2.0)
    meter.record(32, 128.0)  # 4 ms a tweet: moves the average part way
    assert 2.0 < meter.ms_per_tweet() < 4.0
    before = meter.ms_per_tweet()
    meter.record(1, 400.0)  # one slow lone tweet moves it less than a batch would
    assert meter.ms_per_tweet() - before < (400.0 - before) * budget.SMOOTHING


def test_the_option_defaults_to_the_window_plus_one_second():
    o = BertstreamOptions(["--window_seconds", "5"])
    assert o.latency_budget().target_ms == 6000
    o = BertstreamOptions(["--latency_target_ms", "1500"])
    assert o.latency_budget().target_ms == 1500
    with pytest.raises(ValueError, match="--latency_target_ms"):
        BertstreamOptions(["--latency_target_ms", "-1"]).validate_flags()


class _Recording(beam.ml.inference.base.ModelHandler):
    """Scores every text alike and records each call's size."""

    def __init__(self, calls_file: str):
        super().__init__()
        self._calls_file = calls_file

    def load_model(self):
        return None

    def run_inference(self, batch, model, inference_args=None):
        with open(self._calls_file, "a") as f:
            f.write(json.dumps(len(batch)) + "\n")
        return [Scores([0.1, 0.2, 0.7], "1") for _ in batch]


def test_a_lone_tweet_is_one_call_and_a_burst_is_cut_to_the_budget(meter, tmp_path):
    target = LatencyBudget(1000)  # 10 ms a tweet: calls of at most 20
    limit = target.batch_limit(64)
    assert limit == int(BATCH_SHARE * 1000 / 10) == 20
    calls = tmp_path / "calls"
    handler = LengthBatchedHandler(_Recording(str(calls)), budget=target)
    lone = list(handler.run_inference([b"hello"], None))
    assert len(lone) == 1 and json.loads(calls.read_text()) == 1
    calls.unlink()
    texts = [f"tweet number {i} {'word ' * (i % 30)}".encode() for i in range(64)]
    scored = list(handler.run_inference(texts, None))
    sizes = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sizes == [20, 20, 20, 4] and len(scored) == 64
    assert [n for n, _ in meter.recorded[-4:]] == sizes  # each call measured


def test_the_job_step_scores_a_burst_in_calls_that_fit(meter, tiny_model_dir, tmp_path):
    """RunSentiment on the tiny SavedModel: 150 tweets in one bundle come out
    as 150 results, and no model call took more than the budget allows."""
    target = LatencyBudget(500)  # 10 ms a tweet: calls of at most 10
    calls = tmp_path / "calls"
    tweets = [Tweet(tweet_id=str(i), text=f"tweet {i} " + "so good " * (i % 20),
                    created_at="2026-12-07T00:00:00.000Z", author_id=None, lang="en",
                    raw="{}", source_id=f"s:{i}", event_time="2026-12-07T00:00:00.000Z")
              for i in range(150)]

    class Counting(beam.ml.inference.base.ModelHandler):
        def __init__(self):
            super().__init__()
            self._inner = local_handler(str(tiny_model_dir))

        def load_model(self):
            return self._inner.load_model()

        def run_inference(self, batch, model, inference_args=None):
            with open(calls, "a") as f:
                f.write(f"{len(batch)}\n")
            return self._inner.run_inference(batch, model, inference_args)

    with BeamTestPipeline() as p:
        results, dead = (p | beam.Create(tweets, reshuffle=False)
                         | RunSentiment(Counting(), max_batch_size=64, budget=target))
        assert_that(results | beam.Map(lambda r: r.tweet_id),
                    equal_to([t.tweet_id for t in tweets]), label="all scored")
        assert_that(dead, equal_to([]), label="none dead")
    sizes = [int(line) for line in calls.read_text().split()]
    assert sum(sizes) == 150
    assert max(sizes) <= target.batch_limit(64) == 10


def test_a_pull_takes_no_more_than_the_budget_and_never_holds_a_lone_tweet(meter,
                                                                           pubsub_names):
    """The DirectRunner's puller on the real emulator: one waiting message
    comes back from the first pull; a burst of 300 comes back in pulls of
    at most the bundle limit, every message once."""
    from google.cloud import pubsub_v1

    from runners.direct_runner import _HoldingPuller

    topic, subscription = pubsub_names["topic"], pubsub_names["subscription"]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    target = LatencyBudget(400)  # 10 ms a tweet: bundles of at most 40
    limit = target.bundle_limit(1000)
    assert limit == int(BUNDLE_SHARE * 400 / 10) < 100
    puller = _HoldingPuller(subscriber, 1000, 60, target)

    publisher.publish(topic, b"lone").result()
    first = puller.pull(subscription).received_messages
    assert [m.message.data for m in first] == [b"lone"]
    subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in first])

    for future in [publisher.publish(topic, f"m{i}".encode()) for i in range(300)]:
        future.result()
    seen, sizes = [], []
    for _ in range(200):
        got = puller.pull(subscription).received_messages
        if got:
            sizes.append(len(got))
            seen.extend(m.message.data for m in got)
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in got])
        elif len(seen) >= 300:
            break
    assert sorted(seen) == sorted(f"m{i}".encode() for i in range(300))
    assert max(sizes) <= limit and len(sizes) >= 300 // limit
