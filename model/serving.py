"""Finding and calling an exported model (TF Serving layout)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model.data import LABELS


def version_dirs(base: Path) -> list[Path]:
    """Numeric version subdirectories holding a SavedModel, oldest first."""
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir()
             if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists()]
    return sorted(found, key=lambda p: int(p.name))


def resolve(model: str | Path) -> Path:
    """A version directory: ``model`` itself when it holds saved_model.pb, else
    its newest numeric version (as TF Serving would pick).

    Raises:
      FileNotFoundError: naming the path when there is no model there.
    """
    path = Path(model)
    if (path / "saved_model.pb").exists():
        return path
    versions = version_dirs(path)
    if not versions:
        raise FileNotFoundError(
            f"no SavedModel at {path}: expected {path}/saved_model.pb or {path}/<version>/ "
            "(build one with `python -m model build --out DIR`)")
    return versions[-1]


def read_card(version_dir: Path) -> dict:
    card = version_dir / "model_card.json"
    return json.loads(card.read_text()) if card.exists() else {}


def labels_of(version_dir: Path) -> tuple[str, ...]:
    asset = version_dir / "assets" / "labels.txt"
    if asset.exists():
        return tuple(line.strip() for line in asset.read_text().splitlines() if line.strip())
    return LABELS


class Prediction(NamedTuple):
    label: str
    probabilities: dict[str, float]


class LoadedModel:
    """A SavedModel's text signature as a Python callable (used by evaluate,
    predict and the benchmarks; the pipeline goes through RunInference)."""

    def __init__(self, model: str | Path, signature: str = "serving_default"):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  registers the tokenizer's ops

        from model.fused import warn_if_emulated

        self.version_dir = resolve(model)
        warn_if_emulated(self.version_dir, logging.getLogger(__name__))
        self.version = int(self.version_dir.name) if self.version_dir.name.isdigit() else 0
        self.labels = labels_of(self.version_dir)
        self._loaded = tf.saved_model.load(str(self.version_dir))
        self._fn = self._loaded.signatures[signature]
        self._tf = tf

    def probabilities(self, texts: list[str]) -> np.ndarray:
        out = self._fn(text=self._tf.constant(texts, dtype=self._tf.string))
        return out["probabilities"].numpy()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]:
        result: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            probs = self.probabilities(texts[start:start + batch_size])
            for row in probs:
                result.append(Prediction(self.labels[int(np.argmax(row))],
                                         {lab: float(p) for lab, p in zip(self.labels, row)}))
        return result
