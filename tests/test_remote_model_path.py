"""``--model_dir`` on a non-local filesystem (``gs://`` on Dataflow and in
clusters): every model path, the vocabulary included, goes through
TensorFlow's file API. TensorFlow's in-memory ``ram://`` filesystem stands in
for Cloud Storage here: ``pathlib`` would turn ``gs://b/m`` into ``gs:/b/m``."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _copy_to(tf, local: Path, uri: str) -> None:
    for path in local.rglob("*"):
        target = f"{uri}/{path.relative_to(local).as_posix()}"
        if path.is_dir():
            tf.io.gfile.makedirs(target)
        else:
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            with tf.io.gfile.GFile(target, "wb") as f:
                f.write(path.read_bytes())


def test_paths_keep_their_scheme():
    from model.serving import is_uri, join, version_of

    assert is_uri("gs://bucket/models/x") and not is_uri("models/x")
    assert join("gs://bucket/models/x/", "1", "saved_model.pb") == \
        "gs://bucket/models/x/1/saved_model.pb"
    assert version_of("gs://bucket/models/x/7/") == "7"


@pytest.mark.timeout(300)
def test_a_model_on_a_non_local_filesystem_serves_the_pipeline(tiny_model_dir, redis_url,
                                                               tmp_path):
    import redis
    import tensorflow as tf

    from model.serving import resolve
    from pipeline.pipeline import run
    from transforms.inference import TokenCounter

    local_version = Path(resolve(tiny_model_dir))
    base = "ram://models/bert_sentiment"
    _copy_to(tf, local_version, f"{base}/{local_version.name}")

    assert resolve(base) == f"{base}/{local_version.name}"
    counter = TokenCounter.for_model(base)
    assert counter.vocab_path.startswith("ram://")  # the model's own WordPiece, not the estimate
    assert counter("a perfectly ordinary day") == TokenCounter.for_model(
        str(tiny_model_dir))("a perfectly ordinary day")

    tweets = tmp_path / "tweets.jsonl"
    tweets.write_text("".join(json.dumps({
        "id": str(100 + i), "text": f"tweet number {i}",
        "created_at": f"2026-11-20T10:00:0{i}.000Z"}) + "\n" for i in range(5)))
    result, _ = run(["--input_file", str(tweets), "--redis_url", redis_url,
                     f"--model_dir={base}"])
    client = redis.Redis.from_url(redis_url)
    bodies = [json.loads(f[b"result"]) for _, f in client.xrange("sentiment:results")]
    assert len(bodies) == 5
    assert {b["model_version"] for b in bodies} == {local_version.name}


def test_a_missing_remote_model_names_its_path():
    from model.serving import resolve

    with pytest.raises(FileNotFoundError, match="ram://nowhere/model"):
        resolve("ram://nowhere/model")
