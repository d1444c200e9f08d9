"""Finding and calling an exported model (TF Serving layout)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model.data import LABELS


def is_uri(path: str | Path) -> bool:
    """A path on a non-local filesystem (``gs://``, ``s3://``, TensorFlow's
    ``ram://``...): read through TensorFlow's file API, not ``pathlib``,
    which would turn ``gs://b/m`` into ``gs:/b/m``."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str | Path, *parts: str) -> str | Path:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def exists(path: str | Path) -> bool:
    if is_uri(path):
        import tensorflow as tf

        return tf.io.gfile.exists(str(path))
    return Path(path).exists()


def read_text(path: str | Path) -> str:
    if is_uri(path):
        import tensorflow as tf

        with tf.io.gfile.GFile(str(path), "rb") as f:
            return f.read().decode("utf-8")
    return Path(path).read_text()


def version_dirs(base: Path) -> list[Path]:
    """Numeric version subdirectories holding a SavedModel, oldest first."""
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir()
             if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists()]
    return sorted(found, key=lambda p: int(p.name))


def _uri_version_dirs(base: str) -> list[str]:
    import tensorflow as tf

    if not tf.io.gfile.isdir(base):
        return []
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(base)]
    found = [n for n in names
             if n.isdigit() and tf.io.gfile.exists(f"{base.rstrip('/')}/{n}/saved_model.pb")]
    return [f"{base.rstrip('/')}/{n}" for n in sorted(found, key=int)]


def all_versions(base: str | Path) -> list[str]:
    """Every numeric version directory under ``base`` (local or a URI), oldest first."""
    if is_uri(base):
        return _uri_version_dirs(str(base))
    return [str(p) for p in version_dirs(Path(base))]


def resolve(model: str | Path) -> str | Path:
    """A version directory: ``model`` itself when it holds saved_model.pb, else
    its newest numeric version (as TF Serving would pick). A local directory
    comes back as a ``Path``, a URI (``gs://...``) as the string.

    Raises:
      FileNotFoundError: naming the path when there is no model there.
    """
    if is_uri(model):
        model = str(model)
        if exists(join(model, "saved_model.pb")):
            return model
        versions = _uri_version_dirs(model)
    else:
        path = Path(model)
        if (path / "saved_model.pb").exists():
            return path
        versions = version_dirs(path)
    if not versions:
        raise FileNotFoundError(
            f"no SavedModel at {model}: expected {model}/saved_model.pb or {model}/<version>/ "
            "(build one with `python -m model build --out DIR`)")
    return versions[-1]


def version_of(version_dir: str | Path) -> str:
    """The version directory's number (its last path component)."""
    return str(version_dir).rstrip("/").rsplit("/", 1)[-1]


def read_card(version_dir: str | Path) -> dict:
    card = join(version_dir, "model_card.json")
    return json.loads(read_text(card)) if exists(card) else {}


def labels_of(version_dir: str | Path) -> tuple[str, ...]:
    asset = join(version_dir, "assets", "labels.txt")
    if exists(asset):
        return tuple(line.strip() for line in read_text(asset).splitlines() if line.strip())
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
        version = version_of(self.version_dir)
        self.version = int(version) if version.isdigit() else 0
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
