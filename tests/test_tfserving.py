"""Remote inference through TF Serving's gRPC API, against the test peer.

The peer (tests/tfserving_peer.py) serves the tiny real SavedModel; the
pipeline runs its real graph on the DirectRunner and writes to a real Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.tfserving_peer import free_port, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["I love this so much", "worst service ever, never again", "meh", "ok then",
         "The train is late again. Of course it is.", "what a gorgeous morning 🌞",
         "Not sure how I feel about the new update", "@someone thanks!! https://t.co/x",
         "Rain. Again. Fourth day in a row and I'm so done with it", "lunch was fine",
         "I can't believe they cancelled the show, this is terrible news for everyone",
         "Just landed in Lisbon"]


def _newest(model_dir: Path) -> int:
    from model.serving import resolve

    return int(resolve(model_dir).name)


def _tweets_file(tmp_path: Path, texts=TEXTS) -> Path:
    path = tmp_path / "tweets.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": str(1860000000000000000 + i), "text": text,
                                "created_at": "2026-11-20T10:00:00.000Z",
                                "author_id": "42", "lang": "en"}, ensure_ascii=False) + "\n")
    return path


def _argv(tweets: Path, redis_url: str, model_dir: Path, *extra: str) -> list[str]:
    return ["--input_file", str(tweets), "--redis_url", redis_url, "--model_dir",
            str(model_dir), "--runner=DirectRunner", *extra]


def _stream(redis_url: str, key: str) -> list[dict[str, str]]:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [fields for _, fields in client.xrange(key)]
    finally:
        client.close()


def _results(redis_url: str) -> dict[str, dict]:
    found = [json.loads(f["result"]) for f in _stream(redis_url, "sentiment:results")]
    return {r["tweet_id"]: r for r in found}


def _flush(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()


@pytest.fixture(scope="module")
def peer(tiny_model_dir):
    """``python -m tests.tfserving_peer`` as a process; yields its target."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.tfserving_peer", "--model_dir", str(tiny_model_dir),
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        line = proc.stdout.readline()  # blocks until ready (or the peer died)
        assert line.strip() == f"listening on 127.0.0.1:{port}", line
        yield f"127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(120)
def test_peer_answers_as_tf_serving(peer, tiny_model_dir):
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    with grpc.insecure_channel(peer) as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)

        request = predict_pb2.PredictRequest()
        request.model_spec.name = "bert_sentiment"
        tensor = request.inputs["text"]
        tensor.dtype = 7
        tensor.tensor_shape.dim.add().size = 2
        tensor.string_val.extend([b"good", b"bad"])
        response = predict.Predict(request, timeout=30)
        assert response.model_spec.name == "bert_sentiment"
        newest = _newest(tiny_model_dir)
        assert response.model_spec.version.value == newest
        assert response.model_spec.signature_name == "serving_default"
        assert set(response.outputs) == {"probabilities", "class_id"}
        probs = response.outputs["probabilities"]
        assert probs.dtype == 1 and [d.size for d in probs.tensor_shape.dim] == [2, 3]
        assert len(probs.float_val) == 6
        class_id = response.outputs["class_id"]
        assert class_id.dtype == 9 and [d.size for d in class_id.tensor_shape.dim] == [2]

        def error(call, req):
            with pytest.raises(grpc.RpcError) as info:
                call(req, timeout=30)
            return info.value.code(), info.value.details()

        request.model_spec.name = "nope"
        assert error(predict.Predict, request) == (
            grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)")
        request.model_spec.name = "bert_sentiment"
        request.model_spec.version.value = 777
        assert error(predict.Predict, request) == (
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(bert_sentiment, 777)")
        request.model_spec.ClearField("version")
        request.model_spec.signature_name = "x"
        assert error(predict.Predict, request) == (
            grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "x" not found.')

        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "bert_sentiment"
        (version,) = models.GetModelStatus(status, timeout=30).model_version_status
        # The newest only, as TF Serving's default version policy.
        assert (version.version, version.state) == (newest, 30)  # AVAILABLE
        status.model_spec.name = "nope"
        assert error(models.GetModelStatus, status) == (
            grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")

        metadata = get_model_metadata_pb2.GetModelMetadataRequest()
        metadata.model_spec.name = "bert_sentiment"
        metadata.metadata_field.append("signature_def")
        answer = predict.GetModelMetadata(metadata, timeout=30)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        assert answer.metadata["signature_def"].Unpack(signatures)
        text = signatures.signature_def["serving_default"]
        assert list(text.inputs) == ["text"] and text.inputs["text"].dtype == 7
        assert "examples" in signatures.signature_def["serving_tf_example"].inputs


@pytest.mark.timeout(120)
def test_client_matches_the_saved_model_and_splits_big_batches(peer, tiny_model_dir):
    from model.serving import LoadedModel
    from transforms.tfserving import TFServingClient, split_by_size

    local = LoadedModel(tiny_model_dir).probabilities(TEXTS)
    with TFServingClient(peer) as client:
        probabilities, version = client.predict(TEXTS)
        assert version == str(_newest(tiny_model_dir))
        np.testing.assert_allclose(probabilities, local, atol=1e-5)
    newest = _newest(tiny_model_dir)
    with TFServingClient(f"dns:///{peer}", version=newest) as client:  # a pinned version
        assert client.check().version == newest
        assert client.predict(TEXTS[:2])[1] == str(newest)
    small = 120
    assert len(list(split_by_size([t.encode() for t in TEXTS], small))) > 3
    with TFServingClient(peer, max_request_bytes=small) as client:
        np.testing.assert_allclose(client.predict(TEXTS)[0], local, atol=1e-5)
        with pytest.raises(ValueError, match="request limit"):
            client.predict(["x" * 200])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, names", [
    (["--tfserving_model_name", "nope"], "--tfserving_model_name nope"),
    (["--tfserving_model_version", "777"], "--tfserving_model_version 777"),
    (["--tfserving_signature", "nope"], "--tfserving_signature nope"),
    (["--tfserving_signature", "serving_tf_example"], "--tfserving_signature"),
    (["--tfserving_target", "127.0.0.1:1"], "--tfserving_target 127.0.0.1:1"),
])
def test_start_up_check_names_the_flag(peer, tmp_path, redis_url, tiny_model_dir, flags,
                                       names):
    from pipeline.pipeline import run

    argv = _argv(_tweets_file(tmp_path), redis_url, tiny_model_dir, "--inference",
                 "tfserving", "--tfserving_target", peer, *flags)
    with pytest.raises(ValueError, match=names):
        run(argv)


@pytest.mark.timeout(180)
def test_cli_stops_at_start_with_the_flag_to_fix(peer, tmp_path, redis_url, tiny_model_dir,
                                                 capsys):
    from pipeline.__main__ import main

    argv = _argv(_tweets_file(tmp_path), redis_url, tiny_model_dir, "--inference",
                 "tfserving", "--tfserving_target", peer)
    assert main([*argv, "--tfserving_signature", "nope"]) == 2
    assert "error: --tfserving_signature nope" in capsys.readouterr().err
    # The same through a real `python -m pipeline` process.
    proc = subprocess.run([sys.executable, "-m", "pipeline", *argv,
                           "--tfserving_model_name", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --tfserving_model_name nope" in proc.stderr
    assert not _results(redis_url)


@pytest.mark.timeout(240)
def test_local_and_tfserving_give_the_same_results(peer, tmp_path, redis_url,
                                                   tiny_model_dir):
    from pipeline.pipeline import run

    argv = _argv(_tweets_file(tmp_path), redis_url, tiny_model_dir)
    run([*argv, "--inference", "local"])
    local = _results(redis_url)
    _flush(redis_url)
    run([*argv, "--inference", "tfserving", "--tfserving_target", peer])
    remote = _results(redis_url)

    assert len(local) == len(TEXTS) and set(remote) == set(local)
    assert not _stream(redis_url, "sentiment:deadletter")
    for tweet_id, mine in local.items():
        theirs = remote[tweet_id]
        assert theirs["label"] == mine["label"]
        assert theirs["model_version"] == mine["model_version"] == str(_newest(tiny_model_dir))
        for label in ("negative", "neutral", "positive"):
            assert abs(theirs["probabilities"][label] - mine["probabilities"][label]) <= 1e-5


@pytest.mark.timeout(180)
def test_unavailable_is_retried_until_every_tweet_has_its_result(tmp_path, redis_url,
                                                                 tiny_model_dir):
    from pipeline.pipeline import run

    flaky = serve(tiny_model_dir, free_port(), fail_first=2, fail_code="UNAVAILABLE")
    try:
        run(_argv(_tweets_file(tmp_path), redis_url, tiny_model_dir, "--inference",
                  "tfserving", "--tfserving_target", flaky.target))
        assert flaky.predict_calls >= 3
    finally:
        flaky.stop(None)
    assert len(_results(redis_url)) == len(TEXTS)
    assert not _stream(redis_url, "sentiment:deadletter")


@pytest.mark.timeout(180)
def test_server_down_for_good_sends_tweets_to_the_dead_letter(tmp_path, redis_url,
                                                              tiny_model_dir):
    from apache_beam.runners.runner import PipelineState

    from pipeline.pipeline import make_options, run
    from transforms.tfserving import tfserving_handler

    down = serve(tiny_model_dir, free_port())
    # One batch (a file is one bundle), so the test waits for one backoff only.
    argv = _argv(_tweets_file(tmp_path), redis_url, tiny_model_dir, "--inference",
                 "tfserving", "--tfserving_target", down.target)
    handler = tfserving_handler(make_options(argv).tfserving_config(), num_retries=1, throttle_delay_secs=1)
    down.stop(None)  # after the start-up check: nothing listens there any more

    started = time.monotonic()
    result, _ = run(argv, handler=handler)
    assert result.state == PipelineState.DONE
    assert time.monotonic() - started < 90
    assert not _results(redis_url)
    dead = _stream(redis_url, "sentiment:deadletter")
    assert len(dead) == len(TEXTS)
    assert {d["stage"] for d in dead} == {"inference"}
    assert all("TFServingUnavailable: UNAVAILABLE" in d["reason"] for d in dead), dead[0]
    assert sorted(json.loads(d["raw"])["text"] for d in dead) == sorted(TEXTS)


@pytest.mark.timeout(120)
def test_a_batch_that_outlives_its_retries_is_not_retried_element_by_element(
        tiny_model_dir):
    from transforms.inference import InferenceFailure, LengthBatchedHandler
    from transforms.tfserving import TFServingModelHandler

    failing = serve(tiny_model_dir, free_port(), fail_first=10**6,
                    fail_code="RESOURCE_EXHAUSTED")
    try:
        inner = TFServingModelHandler(failing.target, num_retries=1, throttle_delay_secs=1)
        handler = LengthBatchedHandler(inner)
        client = handler.load_model()
        out = handler.run_inference([t.encode() for t in TEXTS[:8]], client)
        client.close()
    finally:
        failing.stop(None)
    assert failing.predict_calls == 2  # the try and one retry, not 2 + 8 * 2
    assert len(out) == 8 and all(isinstance(r, InferenceFailure) for r in out)
    assert "RESOURCE_EXHAUSTED: injected failure" in out[0].reason


@pytest.mark.timeout(60)
def test_a_bad_element_fails_alone_without_retries(peer):
    from transforms.inference import InferenceFailure, LengthBatchedHandler, Scores
    from transforms.tfserving import TFServingModelHandler

    inner = TFServingModelHandler(peer, max_request_bytes=100)
    handler = LengthBatchedHandler(inner)
    client = handler.load_model()
    try:
        out = handler.run_inference([b"fine", b"x" * 500, b"also fine"], client)
    finally:
        client.close()
    assert [type(r) for r in out] == [Scores, InferenceFailure, Scores]
    assert "request limit" in out[1].reason


@pytest.mark.timeout(60)
def test_tls_with_a_ca_file(tmp_path, tiny_model_dir):
    from pipeline.pipeline import make_options
    from transforms.tfserving import TFServingClient, tfserving_handler

    cert, key = tmp_path / "peer.pem", tmp_path / "peer.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    secure = serve(tiny_model_dir, free_port(), tls_cert=str(cert), tls_key=str(key))
    try:
        base = ["--input_file", str(_tweets_file(tmp_path)), "--inference", "tfserving",
                "--tfserving_target", secure.target, "--tfserving_timeout_seconds", "5"]
        tfserving_handler(make_options([*base, "--tfserving_tls", "--tfserving_ca_file",
                                        str(cert)]).tfserving_config())
        with TFServingClient(secure.target, tls=True, ca_file=str(cert)) as client:
            assert client.predict(["tls works"])[0].shape == (1, 3)
        with pytest.raises(ValueError, match="with TLS: check --tfserving_tls"):
            tfserving_handler(make_options([*base, "--tfserving_tls"]).tfserving_config())  # system roots
        with pytest.raises(ValueError, match="--tfserving_target"):
            tfserving_handler(make_options(base).tfserving_config())  # plaintext to a TLS port
        with pytest.raises(ValueError, match="--tfserving_ca_file needs --tfserving_tls"):
            tfserving_handler(make_options([*base, "--tfserving_ca_file", str(cert)]).tfserving_config())
    finally:
        secure.stop(None)


@pytest.mark.timeout(120)
def test_the_model_carries_warm_up_requests_a_tf_serving_peer_answers(peer, tiny_model_dir):
    # TF Serving replays assets.extra/tf_serving_warmup_requests (PredictionLog
    # records) before it serves a version; each must be a valid request.
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc

    from model.build import WARMUP_BATCHES, WARMUP_FILE
    from model.serving import resolve

    path = resolve(tiny_model_dir) / WARMUP_FILE
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))]
    assert [len(log.predict_log.request.inputs["text"].string_val) for log in logs] == \
        list(WARMUP_BATCHES)
    with grpc.insecure_channel(peer) as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for log, size in zip(logs, WARMUP_BATCHES, strict=True):
            response = predict.Predict(log.predict_log.request, timeout=30)
            probs = response.outputs["probabilities"]
            assert [d.size for d in probs.tensor_shape.dim] == [size, 3]
