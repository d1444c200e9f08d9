"""The DirectRunner's larger Pub/Sub pulls, on the real emulator."""

from __future__ import annotations

import json
import time

import apache_beam as beam
import pytest
import redis

from pipeline import direct_pubsub
from pipeline.pipeline import build, make_options
from transforms.inference import BatchStats

pytestmark = [pytest.mark.integration]


def _publish(topic: str, n: int, text: str = "same length tweet for every one of them") -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 120)) + ".000Z"
    futures = [publisher.publish(topic, json.dumps({"id": str(10**18 + i), "text": text,
                                                    "created_at": stamp}).encode(),
                                 tweet_id=str(10**18 + i), event_ts=stamp)
               for i in range(n)]
    for future in futures:
        future.result(timeout=30)


def test_one_pull_drains_past_the_emulators_100_message_cap(pubsub_names):
    from google.cloud import pubsub_v1

    _publish(pubsub_names["topic"], 250)
    client = pubsub_v1.SubscriberClient()
    # The emulator answers at most 100 messages a pull: 250 takes several.
    puller = direct_pubsub._DrainingPuller(client, 1000, hold=False)
    response = puller.pull(subscription=pubsub_names["subscription"], max_messages=10,
                           timeout=30)
    assert len(response.received_messages) == 250
    client.acknowledge(subscription=pubsub_names["subscription"],
                       ack_ids=[m.ack_id for m in response.received_messages])


def test_pull_stops_at_the_limit(pubsub_names):
    from google.cloud import pubsub_v1

    _publish(pubsub_names["topic"], 150)
    client = pubsub_v1.SubscriberClient()
    response = direct_pubsub._DrainingPuller(client, 120, hold=False).pull(
        subscription=pubsub_names["subscription"], max_messages=10, timeout=30)
    assert len(response.received_messages) == 120


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_held_messages_stay_leased_until_done_and_come_back_if_never_done(
        pubsub_names, monkeypatch):
    from google.cloud import pubsub_v1

    from transforms import acks

    tracker = acks.AckTracker()
    monkeypatch.setattr(acks, "TRACKER", tracker)
    monkeypatch.setattr(acks, "LEASE_EVERY_SECONDS", 1.0)
    monkeypatch.setattr(acks, "LEASE_SECONDS", 10)
    client = pubsub_v1.SubscriberClient()
    subscription = client.subscription_path(pubsub_names["project"], "lease-" + pubsub_names[
        "subscription"].rsplit("-", 1)[-1])
    client.create_subscription(name=subscription, topic=pubsub_names["topic"],
                               ack_deadline_seconds=10)
    _publish(pubsub_names["topic"], 5)
    puller = direct_pubsub._DrainingPuller(client, 1000)
    pulled = puller.pull(subscription=subscription, max_messages=10, timeout=30)
    puller.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in pulled.received_messages])
    ids = [m.message.message_id for m in pulled.received_messages]
    assert len(ids) == 5 and tracker.held() == 5

    def pull_now():
        return client.pull(subscription=subscription, max_messages=100,
                           return_immediately=True, timeout=10).received_messages

    time.sleep(14)  # past the subscription's 10 s deadline: the lease holds them
    assert pull_now() == []
    tracker.done([f"pubsub:{i}" for i in ids[:3]] + ["file:x:1"])
    assert tracker.held() == 2 and tracker.acked == 3
    # The job dies: nobody extends the lease any more. Only the two that
    # never reached an end come back.
    monkeypatch.setattr(acks, "LEASE_EVERY_SECONDS", 3600.0)
    tracker._held.clear()
    deadline = time.monotonic() + 60
    back: set[str] = set()
    while time.monotonic() < deadline and len(back) < 2:
        back |= {m.message.message_id for m in pull_now()}
        time.sleep(1)
    assert back == set(ids[3:])


def _run_streaming(subscription: str, redis_url: str, model_dir, n: int, extra: list[str]):
    client = redis.Redis.from_url(redis_url)
    BatchStats.reset()
    options = make_options(["--runner=DirectRunner", "--input_subscription", subscription,
                            "--redis_url", redis_url, "--model_dir", str(model_dir),
                            "--max_batch_size", "64", "--max_batch_wait_seconds", "5",
                            *extra])
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    result = pipeline.run()
    try:
        deadline = time.monotonic() + 180
        while client.xlen("sentiment:results") < n and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        result.cancel()
    return client.xlen("sentiment:results"), BatchStats.largest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_backlog_reaches_the_model_in_full_batches(pubsub_names, redis_url, tiny_model_dir):
    # 200 tweets of one length in one (already closed) window: with Beam's
    # 10-message bundles each bundle's window timer would cut the batches at
    # about 10; one drained bundle fills them to --max_batch_size.
    _publish(pubsub_names["topic"], 200)
    results, largest = _run_streaming(pubsub_names["subscription"], redis_url,
                                      tiny_model_dir, 200, [])
    assert results == 200
    assert largest == 64


def test_the_flag_is_validated():
    with pytest.raises(ValueError, match="--direct_pubsub_max_messages"):
        make_options(["--direct_pubsub_max_messages", "0"])


def test_results_publish_no_source_id():
    from transforms.records import Result

    result = Result("1", "t", "positive", 0.9, [0.05, 0.05, 0.9], "3", "e", "s", "w", "p",
                    False, source_id="pubsub:42")
    assert "source_id" not in json.loads(result.to_json())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_batches_grow_across_bundles_and_a_quiet_stream_still_flushes(
        pubsub_names, redis_url, tiny_model_dir):
    # 30 tweets of one length in an open window, pulled 10 a bundle. Two
    # things this catches: Beam's batching key changed with every bundle (its
    # Shared UUID was garbage-collected), so three bundles made three batches
    # of 10; and Beam's pull waited up to 30 s for more messages on the
    # DirectRunner's only thread, so the batch's 5 s timer could not fire
    # until the pull gave up.
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
    client = redis.Redis.from_url(redis_url)
    BatchStats.reset()
    options = make_options(["--runner=DirectRunner", "--input_subscription",
                            pubsub_names["subscription"], "--redis_url", redis_url,
                            "--model_dir", str(tiny_model_dir), "--window_seconds", "3600",
                            "--max_batch_size", "64", "--max_batch_wait_seconds", "5",
                            "--direct_pubsub_max_messages", "10"])
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    result = pipeline.run()
    try:
        futures = [publisher.publish(pubsub_names["topic"], json.dumps(
            {"id": str(2 * 10**18 + i), "text": "same length tweet for every one of them",
             "created_at": stamp}).encode(), tweet_id=str(2 * 10**18 + i), event_ts=stamp)
            for i in range(30)]
        for future in futures:
            future.result(timeout=30)
        published = time.monotonic()
        # Start-up (model load) comes first; then 5 s of batch wait, not 30 s
        # of a pull waiting for messages that never come.
        deadline = published + 120
        while client.xlen("sentiment:results") < 30 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.xlen("sentiment:results") == 30
        assert BatchStats.largest == 30, BatchStats.sizes
        # A lone tweet after the stream went quiet: its batch flushes on its
        # timer while no message arrives.
        publisher.publish(pubsub_names["topic"], json.dumps(
            {"id": "7", "text": "one more", "created_at": stamp}).encode(),
            tweet_id="7", event_ts=stamp).result(timeout=30)
        sent = time.monotonic()
        while client.xlen("sentiment:results") < 31 and time.monotonic() - sent < 20:
            time.sleep(0.2)
        assert client.xlen("sentiment:results") == 31, "the lone tweet waited for a pull"
    finally:
        result.cancel()


def test_an_empty_pull_returns_at_once_and_pauses(pubsub_names):
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    puller = direct_pubsub._DrainingPuller(client, 1000, hold=False, idle_seconds=0.3)
    started = time.monotonic()
    response = puller.pull(subscription=pubsub_names["subscription"], max_messages=10,
                           timeout=30)
    assert list(response.received_messages) == []
    # Not the 30 s long poll Beam asks for; the pause is the idle interval.
    assert 0.3 <= time.monotonic() - started < 15
