"""The batching's token counter against the model's own in-graph tokenizer."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from model.serving import resolve
from transforms.inference import VOCAB_FILE, TokenCounter, estimate_tokens


def _sample_texts() -> list[str]:
    from benchmarks.common import sample_texts

    return sorted(set(sample_texts()))


def test_counts_match_the_models_tokenizer(tiny_model_dir):
    import keras_hub
    import tensorflow as tf

    from model.export import normalize_text

    version_dir = resolve(tiny_model_dir)
    counter = TokenCounter.for_model(str(tiny_model_dir))
    assert counter.vocab_path and counter.vocab_path.endswith(VOCAB_FILE)
    texts = _sample_texts()
    keras_tok = keras_hub.models.BertTokenizer(
        vocabulary=str(version_dir / VOCAB_FILE), lowercase=True)
    lengths = tf.function(lambda t: keras_tok(normalize_text(t)).row_lengths())
    real = np.minimum(lengths(tf.constant(texts)).numpy() + 2, counter.max_length)
    ours = np.array([counter(t.encode()) for t in texts])
    assert (ours == real).mean() >= 0.97
    assert np.abs(ours - real).max() <= 4
    # and it is far closer than the estimate it replaces
    estimated = np.array([estimate_tokens(t) for t in texts])
    assert np.abs(ours - real).mean() < np.abs(estimated - real).mean() / 3


def test_caps_at_the_models_max_length(tiny_model_dir):
    counter = TokenCounter.for_model(str(tiny_model_dir))
    assert counter.max_length == 64  # the tiny model's cap, read from its card
    assert counter("word " * 500) == counter.max_length


def test_pickles_without_the_tokenizer(tiny_model_dir):
    counter = TokenCounter.for_model(str(tiny_model_dir))
    before = counter("hello there")
    clone = pickle.loads(pickle.dumps(counter))
    assert clone._tokenizer is None and clone("hello there") == before


def test_without_a_vocabulary_it_estimates(tmp_path):
    counter = TokenCounter.for_model(str(tmp_path))
    assert counter.vocab_path is None
    assert counter("Loving the new coffee place") == estimate_tokens("Loving the new coffee place")


def test_the_local_model_is_loaded_once_per_process(tiny_model_dir):
    # The DirectRunner builds a fresh handler and DoFn per bundle; the model
    # must survive that instead of being loaded again (2 s for the real one).
    from transforms.inference import local_handler

    first = local_handler(str(tiny_model_dir)).load_model()
    again = local_handler(str(tiny_model_dir)).load_model()
    assert first is again


@pytest.mark.parametrize("signature", ["serving_default", "serving_tf_example"])
def test_the_warm_up_call_at_load_works_for_both_signatures(tiny_model_dir, signature,
                                                           monkeypatch):
    # It feeds text to one signature and a serialized tf.Example to the
    # other; a failure would only be logged, so catch the log.
    from model.serving import resolve
    from transforms import inference

    failures = []
    monkeypatch.setattr(inference._LOG, "info", lambda msg, *a: failures.append(msg % a))
    session = inference._TF2Session(str(resolve(tiny_model_dir)), signature)
    assert failures == []
    assert session._arg == ("text" if signature == "serving_default" else "examples")


def test_a_text_is_encoded_once_per_process_across_counters(tiny_model_dir, monkeypatch):
    """The bucketing step and the handler count with separate unpickled
    counters; the second count of a tweet is a cache hit, not a new encode."""
    from transforms import inference

    first = TokenCounter.for_model(str(tiny_model_dir))
    second = pickle.loads(pickle.dumps(first))
    first("warm the tokenizer up")
    tokenizer = inference._TOKENIZERS[first.vocab_path]
    encoded = []

    class Counting:
        def encode(self, text):
            encoded.append(text)
            return tokenizer.encode(text)

    monkeypatch.setitem(inference._TOKENIZERS, first.vocab_path, Counting())
    text = b"a tweet counted by the bucketing and again by the handler @someone"
    assert first(text) == second(text) == second(text.decode())
    assert len(encoded) == 2  # bytes and str are different keys; each encoded once
    assert first(text + b"!") >= first(text) and len(encoded) == 3


def test_the_handler_reads_what_tfx_bsls_prediction_logs_hold(tiny_model_dir, monkeypatch):
    """The handler skips tfx-bsl's per-tweet PredictionLog building; its
    scores must be the ones those logs carry."""
    import tensorflow as tf

    from transforms.inference import local_handler

    handler = local_handler(str(tiny_model_dir))
    slot = handler.load_model()
    loaded = slot.current()
    texts = [b"great day", b"awful service, never again", "caf\u00e9 ok \U0001F600".encode()]
    with monkeypatch.context() as patched:
        patched.setattr(loaded.tfx, "_post_process",
                        lambda *a: pytest.fail("PredictionLogs were built"))
        scores = handler.run_inference(texts, slot)
    logs = loaded.tfx.run_inference(texts, loaded.session)
    expected = [tf.make_ndarray(log.predict_log.response.outputs["probabilities"]).ravel().tolist()
                for log in logs]
    assert len(scores) == len(texts)
    np.testing.assert_allclose([s.probabilities for s in scores], expected, atol=1e-6)
    assert {s.model_version for s in scores} == {resolve(tiny_model_dir).name}


def test_loading_the_model_freezes_the_heap_it_leaves(tiny_model_dir, monkeypatch):
    # Full collections must not walk TensorFlow's long-lived objects in the
    # middle of a run (transforms/inference.py, _freeze_heap).
    import gc

    from transforms import inference
    from transforms.inference import local_handler

    monkeypatch.setattr(inference, "_SLOTS", {})
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    local_handler(str(tiny_model_dir)).load_model()
    frozen = gc.get_freeze_count()
    assert frozen > 10_000
    local_handler(str(tiny_model_dir)).load_model()  # cached: no second collection
    # A second freeze would add what the second call created; frozen objects
    # that die meanwhile (reference counting still frees them) take away.
    assert gc.get_freeze_count() <= frozen


def test_a_changed_tfx_bsl_private_api_is_refused_at_start():
    """The handler reads tfx-bsl's outputs through its private _run_inference;
    a tfx-bsl whose private method differs is refused by name at start, not
    discovered as a model error on every tweet."""
    from tfx_bsl.beam import run_inference as tfx

    from transforms.inference import check_tfx_bsl_private_api

    check_tfx_bsl_private_api(tfx._PredictModelHandler)  # the installed one passes

    class Renamed(tfx._PredictModelHandler):
        def _run_inference(self, examples, model):  # one parameter fewer
            return {}

    with pytest.raises(RuntimeError, match="_run_inference"):
        check_tfx_bsl_private_api(Renamed)

    class NoPostProcess(tfx._PredictModelHandler):
        def run_inference(self, examples, model, inference_args=None):
            return []

    with pytest.raises(RuntimeError, match="no longer calls"):
        check_tfx_bsl_private_api(NoPostProcess)
