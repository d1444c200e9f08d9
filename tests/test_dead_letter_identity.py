"""Every bad input has its own dead letter, and a true redelivery writes none twice
(issue 25): the once-key of a dead letter names the input within its source's
scope, never by a position or a message id alone.

Collision cases, on real parts (redis-server, the Pub/Sub emulator, the tiny
SavedModel, the job on the DirectRunner): a file path reused with new content;
message ids reused after an emulator restart; two topics into one Redis.
"""

from __future__ import annotations

import json
import os
import time

import apache_beam as beam
import pytest
import redis
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from bertstream.config import RedisConfig
from pipeline.pipeline import build, make_options, read_lines, run
from runners.local_servers import LocalPubSubEmulator, free_port
from transforms.parse import ParseTweets
from transforms.pubsub import envelope
from transforms.records import DeadLetter
from transforms.redis_sink import _WriteDeadLettersFn, dead_letter_key

pytestmark = [pytest.mark.integration]

GOOD = [{"id": str(1870000000000000000 + i), "text": f"a fine tweet number {i}",
         "created_at": f"2026-11-01T10:00:0{i}.000Z"} for i in range(3)]


def _jsonl(bad: list[bytes]) -> bytes:
    lines = []
    for tweet, junk in zip(GOOD, bad):
        lines += [json.dumps(tweet).encode(), junk]
    return b"\n".join(lines) + b"\n"


def _dead(client) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in client.xrange("sentiment:deadletter")]


def _run_file(path, redis_url, model_dir) -> None:
    run(["--input_file", str(path), "--redis_url", redis_url, "--model_dir", str(model_dir)])


@pytest.mark.timeout(300)
def test_a_file_path_reused_with_new_content_keeps_every_dead_letter(
        tmp_path, redis_url, tiny_model_dir):
    path = tmp_path / "tweets.jsonl"
    client = redis.Redis.from_url(redis_url)
    path.write_bytes(_jsonl([b"{not json", b"\xff\xfe not utf-8", b'{"id": "7"}']))
    _run_file(path, redis_url, tiny_model_dir)
    assert len(_dead(client)) == 3
    # The same file again, unchanged: a true re-read writes nothing twice.
    _run_file(path, redis_url, tiny_model_dir)
    assert len(_dead(client)) == 3
    # The same path, other bad lines at the same positions: three new dead letters.
    path.write_bytes(_jsonl([b"[1, 2]", b'{"text": "no id"}', b'{"id": "8", "text": ""}']))
    _run_file(path, redis_url, tiny_model_dir)
    dead = _dead(client)
    assert len(dead) == 6
    assert len({d["source_id"] for d in dead}) == 6
    # Line numbers are readable in the source id, the content hash names the version.
    assert {d["source_id"].rsplit(":", 1)[1] for d in dead} == {"2", "4", "6"}
    assert all(d["source_id"].startswith(f"{path}@") for d in dead)
    # The same content at the same position but in an edited file is a new input.
    path.write_bytes(_jsonl([b"{not json", b"[3]", b"[4]"]))
    _run_file(path, redis_url, tiny_model_dir)
    assert len(_dead(client)) == 9
    assert int(client.hget("sentiment:stats", "dead_letters")) == 9


def test_the_file_source_id_names_the_content(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"id": "1", "text": "a"}\n\n{"id": "2"}\n')
    first = list(read_lines(str(path)))
    assert [e.source_id.rsplit(":", 1)[1] for e in first] == ["1", "3"]  # blank line skipped
    assert list(read_lines(str(path))) == first  # unchanged: the same ids
    path.write_bytes(b'{"id": "1", "text": "a"}\n\n{"id": "3"}\n')
    again = list(read_lines(str(path)))
    assert again[0].source_id != first[0].source_id  # same line, new content elsewhere


def _write_dead_letters(config: RedisConfig, dead: list[DeadLetter]) -> None:
    fn = _WriteDeadLettersFn(config)
    fn.setup()
    try:
        fn.start_bundle()
        for d in dead:
            list(fn.process(d, timestamp=0, w=beam.transforms.window.GlobalWindow()))
        list(fn.finish_bundle())
    finally:
        fn.teardown()


def _pull_all(subscription: str, n: int, ack: bool) -> list:
    """``n`` messages from the emulator, acknowledged or handed back at once."""
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    got: dict[str, object] = {}
    deadline = time.monotonic() + 30
    try:
        while len(got) < n and time.monotonic() < deadline:
            response = client.pull(subscription=subscription, max_messages=n, timeout=5)
            ids = [r.ack_id for r in response.received_messages]
            for r in response.received_messages:
                got.setdefault(r.message.message_id, r)
            if ids and ack:
                client.acknowledge(subscription=subscription, ack_ids=ids)
            elif ids:
                client.modify_ack_deadline(subscription=subscription, ack_ids=ids,
                                           ack_deadline_seconds=0)
    finally:
        client.close()
    assert len(got) == n, f"pulled {len(got)} of {n}"
    return list(got.values())


def _as_dead_letter(received, subscription: str) -> DeadLetter:
    m = received.message
    e = envelope(m.message_id, m.data, dict(m.attributes), received.ack_id,
                 m.publish_time.timestamp(), subscription)
    return DeadLetter.of("parse", "bad", e.data, e.source_id, ack_id=e.ack_id)


@pytest.mark.timeout(120)
def test_a_true_redelivery_has_the_same_identity(pubsub_names, redis_url):
    """A message Pub/Sub delivers twice (its lease ended) is the same input:
    the same source id and once-key, so its dead letter is written once."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    for data in (b"{bad 1", b"{bad 2"):
        publisher.publish(pubsub_names["topic"], data).result(timeout=30)
    sub = pubsub_names["subscription"]
    first = [_as_dead_letter(r, sub) for r in _pull_all(sub, 2, ack=False)]
    again = [_as_dead_letter(r, sub) for r in _pull_all(sub, 2, ack=True)]
    config = RedisConfig(url=redis_url)
    assert ({dead_letter_key(config, d) for d in first}
            == {dead_letter_key(config, d) for d in again})
    _write_dead_letters(config, first + again)
    assert len(_dead(redis.Redis.from_url(redis_url))) == 2


def _streaming_job(subscription: str, redis_url: str, model_dir):
    options = make_options(["--runner=DirectRunner", "--input_subscription", subscription,
                            "--redis_url", redis_url, "--model_dir", str(model_dir)])
    p = beam.Pipeline(options=options)
    build(p, options)
    return p.run()


def _drain_through_the_job(names: dict, bad: list[bytes], redis_url: str, model_dir,
                           want_dead: int) -> None:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    stamp = "2026-11-01T10:00:00.000Z"
    for data in bad:
        publisher.publish(names["topic"], data, tweet_id="0", event_ts=stamp).result(timeout=30)
    client = redis.Redis.from_url(redis_url)
    result = _streaming_job(names["subscription"], redis_url, model_dir)
    try:
        deadline = time.monotonic() + 120
        while client.xlen("sentiment:deadletter") < want_dead:
            assert time.monotonic() < deadline, (
                f"{client.xlen('sentiment:deadletter')} of {want_dead} dead letters")
            time.sleep(0.3)
        time.sleep(2)  # anything written twice would land by now
    finally:
        result.cancel()


def _topic(project: str, name: str) -> dict:
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, name)
    subscription = subscriber.subscription_path(project, f"{name}-sub")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    subscriber.close()
    return {"topic": topic, "subscription": subscription}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_message_ids_reused_after_an_emulator_restart_and_across_topics(
        redis_url, tiny_model_dir, monkeypatch):
    """The README's own flow: an emulator restarted numbers messages from 1
    again, and topics named alike come back. Each bad message still gets its
    own dead letter, in one Redis throughout."""
    port = free_port()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    client = redis.Redis.from_url(redis_url)
    with LocalPubSubEmulator(port=port):
        names = _topic("bertstream-test", "tweets")
        _drain_through_the_job(names, [b"{one", b"[2]", b'{"id": "3"}'], redis_url,
                               tiny_model_dir, 3)
    first_ids = {d["source_id"] for d in _dead(client)}
    with LocalPubSubEmulator(port=port):  # a fresh emulator: ids from 1 again
        names = _topic("bertstream-test", "tweets")
        _drain_through_the_job(names, [b"{four", b"[5]", b'{"id": "6"}'], redis_url,
                               tiny_model_dir, 6)
        other = _topic("bertstream-test", "other-tweets")
        _drain_through_the_job(other, [b"{seven", b"[8]", b'{"id": "9"}'], redis_url,
                               tiny_model_dir, 9)
    dead = _dead(client)
    assert len(dead) == 9, [d["source_id"] for d in dead]
    assert sorted(d["raw"] for d in dead) == sorted(
        ['{one', '[2]', '{"id": "3"}', '{four', '[5]', '{"id": "6"}', '{seven', '[8]',
         '{"id": "9"}'])
    assert int(client.hget("sentiment:stats", "dead_letters")) == 9
    assert first_ids <= {d["source_id"] for d in dead}
    assert all(d["source_id"].startswith("pubsub:projects/bertstream-test/subscriptions/")
               for d in dead)
    assert os.environ["PUBSUB_EMULATOR_HOST"].endswith(str(port))


def test_parse_keeps_the_source_id_for_the_dead_letter():
    e = envelope("17", b"{bad", {}, "", 1_790_000_000.5, "projects/p/subscriptions/s")
    assert e.source_id == "pubsub:projects/p/subscriptions/s/17@2026-09-21T14:13:20.500Z"
    with BeamTestPipeline() as p:
        out = p | beam.Create([e]) | ParseTweets()
        assert_that(out.dead_letter | beam.Map(lambda d: d.source_id), equal_to([e.source_id]))
