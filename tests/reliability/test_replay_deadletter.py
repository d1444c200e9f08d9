"""``python -m ops.replay_deadletter`` against redis-server and the emulator."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import redis

from ops.replay_deadletter import main
from tests.reliability.harness import DEADLETTER, ROOT
from transforms.records import DeadLetter, Result

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _add(client, dead: DeadLetter) -> str:
    fields = {k: "" if v is None else v for k, v in dead._asdict().items()}
    return client.xadd(DEADLETTER, fields).decode()


def _pull(subscription: str, expected: int) -> list:
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    got = []
    for _ in range(20):
        response = subscriber.pull(subscription=subscription, max_messages=50, timeout=10)
        got += response.received_messages
        if response.received_messages:
            subscriber.acknowledge(subscription=subscription,
                                   ack_ids=[m.ack_id for m in response.received_messages])
        if len(got) >= expected:
            break
    subscriber.close()
    return [m.message for m in got]


@pytest.mark.timeout(120)
def test_replays_inference_and_redis_stages_and_deletes_after_publish(
        redis_url, pubsub_names, capsys):
    client = redis.Redis.from_url(redis_url)
    tweet = {"id": "1880000000000000001", "text": "retry me", "author_id": "7",
             "created_at": "2099-01-01T00:00:00.000Z"}
    result = Result("1880000000000000002", "a result", "positive", 0.9, [0.05, 0.05, 0.9],
                    "1", "2099-01-01T00:00:01.000Z", "w0", "w1", "now", False)
    inference = _add(client, DeadLetter.of("inference", "UNAVAILABLE", json.dumps(tweet),
                                           "pubsub:1", tweet["id"]))
    sink = _add(client, DeadLetter.of("redis", "redis unavailable", result.to_json(),
                                      "result:2", result.tweet_id))
    parse = _add(client, DeadLetter.of("parse", "not utf-8", b"\xff\xfe", "pubsub:3"))
    args = ["--redis_url", redis_url, "--topic", pubsub_names["topic"]]

    assert main([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["would_publish"] == 2
    assert client.xlen(DEADLETTER) == 3

    assert main([*args, "--delete"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["published"] == 2 and summary["deleted"] == 2
    assert summary["skipped_parse"] == 1
    assert [e[0].decode() for e in client.xrange(DEADLETTER)] == [parse]

    messages = {m.attributes["tweet_id"]: m for m in _pull(pubsub_names["subscription"], 2)}
    assert set(messages) == {tweet["id"], result.tweet_id}
    first = messages[tweet["id"]]
    assert json.loads(first.data) == tweet  # the exact input
    assert first.attributes["event_ts"] == tweet["created_at"]
    assert first.attributes["replay"] == inference
    rebuilt = json.loads(messages[result.tweet_id].data)  # a result back into a tweet
    assert rebuilt == {"id": result.tweet_id, "text": "a result",
                       "created_at": "2099-01-01T00:00:01.000Z"}
    assert messages[result.tweet_id].attributes["replay"] == sink

    # Parse-stage ones only when asked for: the base64 bytes go out as they came.
    assert main([*args, "--stage", "parse"]) == 0
    capsys.readouterr()
    (again,) = _pull(pubsub_names["subscription"], 1)
    assert again.data == base64.b64decode(base64.b64encode(b"\xff\xfe"))
    assert "tweet_id" not in again.attributes


def test_flags_are_named_in_errors():
    for args, flag in ([["--topic", "nope"], "--topic"],
                       [["--topic", "projects/p/topics/t", "--redis_url", "http://x"],
                        "--redis_url"],
                       [["--topic", "projects/p/topics/t", "--dry_run", "--delete"],
                        "--delete"],
                       [["--topic", "projects/p/topics/t", "--redis_url",
                         "redis://127.0.0.1:1/0"], "--redis_url"]):
        proc = subprocess.run([sys.executable, "-m", "ops.replay_deadletter", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert flag in proc.stderr, (args, proc.stderr)


def test_a_replay_is_deduplicated_apart_from_its_failed_attempt():
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from pipeline.pipeline import envelope_of
    from transforms.dedupe import dedupe_key
    from transforms.parse import parse_tweet

    data = b'{"id": "1880000000000000009", "text": "hello"}'
    first = PubsubMessage(data, {"tweet_id": "1880000000000000009"}, message_id="m1")
    replay = PubsubMessage(data, {"tweet_id": "1880000000000000009", "replay": "17-0"},
                           message_id="m2")
    again = PubsubMessage(data, {"tweet_id": "1880000000000000009", "replay": "17-0"},
                          message_id="m3")
    keys = []
    for m in (first, replay, again):
        message = envelope_of(m)
        keys.append(dedupe_key(parse_tweet(message.data, message.source_id)))
    assert keys[0] == "1880000000000000009"
    assert keys[1] == keys[2] != keys[0]  # a redelivered replay is still a duplicate
    assert envelope_of(replay).source_id == "replay:17-0/pubsub:m2"
