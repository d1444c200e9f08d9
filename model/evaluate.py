"""Metrics for a 3-class sentiment model, and the ``evaluate`` command."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from model.data import LABELS

_LOG = logging.getLogger(__name__)
POLAR = ("negative", "positive")


def metrics(gold: Sequence[str], predicted: Sequence[str],
            labels: Sequence[str] = LABELS) -> dict:
    """accuracy, macro F1, polar accuracy and per-class precision/recall/F1.

    ``polar_accuracy`` is the accuracy over rows whose gold label is positive
    or negative; a prediction counts only when it is that same label (so
    neutral predictions on polar rows are wrong). Undefined ratios are 0.
    """
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length")
    n = len(gold)
    per_class = {}
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted) if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1}
    polar = [(g, p) for g, p in zip(gold, predicted) if g in POLAR]
    return {
        "n": n,
        "accuracy": sum(1 for g, p in zip(gold, predicted) if g == p) / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "polar_accuracy": sum(1 for g, p in polar if g == p) / len(polar) if polar else 0.0,
        "per_class": per_class,
    }


def read_labelled_jsonl(path: Path, labels: Sequence[str] = LABELS
                        ) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    """Texts, gold labels, and (line number, reason) for every line skipped.

    A bad line never aborts the read: invalid JSON, a non-object, a missing or
    non-string text, or a label outside ``labels`` (case-insensitive) is
    skipped and reported. Blank lines are ignored without being counted.
    """
    texts, gold, skipped = [], [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                skipped.append((number, f"not UTF-8 JSON: {err}"))
                continue
            if not isinstance(obj, dict):
                skipped.append((number, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            text, label = obj.get("text"), obj.get("label")
            if not isinstance(text, str) or not text.strip():
                skipped.append((number, "missing or empty 'text'"))
                continue
            if not isinstance(label, str) or label.strip().lower() not in labels:
                skipped.append((number, f"'label' must be one of {', '.join(labels)}: {label!r}"))
                continue
            texts.append(text)
            gold.append(label.strip().lower())
    return texts, gold, skipped


def evaluate_file(model: str | Path, data: Path, batch_size: int = 64) -> dict:
    from model.serving import LoadedModel

    texts, gold, skipped = read_labelled_jsonl(data)
    for number, reason in skipped:
        print(f"{data}:{number}: skipped: {reason}", file=sys.stderr)
    loaded = LoadedModel(model)
    predicted = [p.label for p in loaded.predict(texts, batch_size=batch_size)]
    result = metrics(gold, predicted, loaded.labels)
    result["skipped"] = len(skipped)
    result["model_version"] = loaded.version
    return result
