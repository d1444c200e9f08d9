"""Hot model reload: a new version dropped beside the running one is picked up
without a restart; a broken one is refused and the current one keeps serving.

On the emulator with the streaming job (DirectRunner): version 1 scores,
version 2 is copied in, later results carry version 2 and across the switch
every tweet has exactly one result; then a broken version 3 is rejected and
version 2 keeps serving.
"""

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from model.serving import resolve

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _install(version_dir: Path, base: Path, version: int) -> None:
    """Copies a version in as a deployment should: under a temporary name,
    then renamed, so the job never sees half a model."""
    staging = base / f".{version}.incoming"
    shutil.copytree(version_dir, staging)
    staging.rename(base / str(version))


def _tweets(start: int, n: int) -> list[tuple[bytes, dict]]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    out = []
    for i in range(start, start + n):
        tweet = {"id": str(1890000000000000000 + i), "text": f"tweet {i} about the weather",
                 "created_at": now}
        out.append((json.dumps(tweet).encode(), {"tweet_id": tweet["id"], "event_ts": now}))
    return out


def _versions(client) -> dict[str, str]:
    return {json.loads(f[b"result"])["tweet_id"]: json.loads(f[b"result"])["model_version"]
            for _, f in client.xrange("sentiment:results")}


@pytest.mark.timeout(420)
def test_a_new_version_takes_over_and_a_broken_one_is_refused(
        pubsub_names, redis_url, tiny_model_dir, tmp_path, caplog):
    import apache_beam as beam
    import redis

    from pipeline.pipeline import build, make_options
    from tests.streams import publish, wait_for

    base = tmp_path / "bert_sentiment"
    base.mkdir()
    source = Path(resolve(tiny_model_dir))
    _install(source, base, 1)
    options = make_options(["--runner=DirectRunner",
                            f"--input_subscription={pubsub_names['subscription']}",
                            f"--redis_url={redis_url}", f"--model_dir={base}",
                            "--model_reload_seconds=1", "--model_rollout=immediate"])
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    client = redis.Redis.from_url(redis_url)
    caplog.set_level(logging.INFO, logger="transforms.inference")
    result = pipeline.run()
    sent = 0
    try:
        wave = _tweets(sent, 20)
        sent += len(wave)
        publish(pubsub_names["topic"], wave)
        wait_for(lambda: len(_versions(client)) >= sent, 180, "version 1's results")
        assert set(_versions(client).values()) == {"1"}

        _install(source, base, 2)
        # Tweets keep coming while the job switches.
        deadline = time.monotonic() + 120
        while "2" not in _versions(client).values():
            assert time.monotonic() < deadline, "version 2 never took over"
            wave = _tweets(sent, 5)
            sent += len(wave)
            publish(pubsub_names["topic"], wave)
            time.sleep(0.5)
        wait_for(lambda: len(_versions(client)) >= sent, 120, "every tweet of the switch")
        wave = _tweets(sent, 20)
        sent += len(wave)
        publish(pubsub_names["topic"], wave)
        wait_for(lambda: len(_versions(client)) >= sent, 120, "results after the switch")
        after = [_versions(client)[json.loads(d)["id"]] for d, _ in wave]
        assert set(after) == {"2"}

        # A broken version 3: a directory with a SavedModel TensorFlow cannot read.
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        _install(broken, base, 3)
        wait_for(lambda: any("version" in r.message and "rejected" in r.message
                             for r in caplog.records), 60, "version 3 to be rejected")
        wave = _tweets(sent, 20)
        sent += len(wave)
        publish(pubsub_names["topic"], wave)
        wait_for(lambda: len(_versions(client)) >= sent, 120, "results after the rejection")
        assert {_versions(client)[json.loads(d)["id"]] for d, _ in wave} == {"2"}
    finally:
        result.cancel()
    ids = [f[b"tweet_id"].decode() for _, f in client.xrange("sentiment:results")]
    assert len(ids) == len(set(ids)) == sent  # lost 0, doubled 0
    rejected = [r.message for r in caplog.records if "rejected" in r.message]
    assert "/3" in rejected[0] and "keeps serving" in rejected[0]


def test_a_pinned_version_directory_is_not_followed(tiny_model_dir):
    from transforms.inference import ModelSlot

    slot = ModelSlot(str(resolve(tiny_model_dir)), "serving_default", reload_seconds=1)
    assert slot._base is None  # a version directory: nothing to follow
