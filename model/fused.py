"""The serving graph of the classifier: keras-hub's BERT, written out in fused ops.

keras-hub builds the encoder from Keras layers, and the graph those layers
trace does not match the patterns TensorFlow's oneDNN rewriter fuses: Dense
and EinsumDense add their bias with ``AddV2`` rather than ``BiasAdd``, so
every projection runs as MatMul, then a bias pass, then an activation pass
over the whole ``[tokens, width]`` tensor. On 2 cores those passes cost a
third of the encoder's time. This module computes the same function from the
same weights with ops the rewriter turns into single oneDNN primitives
(``_FusedMatMul`` with BiasAdd and GELU), and skips work nothing reads: the
last layer's rows other than ``[CLS]`` (the classifier reads only the pooled
``[CLS]`` vector). The weights are graph constants, so oneDNN lays each one
out for its kernels once, not on every call. ``tests/test_model.py`` checks
the result against keras-hub's; ``benchmarks/throughput.py`` reports which
graph and precision it measured (figures: docs/model.md).

With ``precision="bfloat16"`` the matrix products run in bfloat16 (Intel AMX
or AVX-512 BF16 on CPUs that have them) while embeddings, residual sums,
layer norms and softmax stay in float32; labels agree with float32 on
nearly every input (the model card records the measured agreement). On a CPU
without native bfloat16 such a graph still runs, only slower:
``native_bfloat16()`` picks the default for the machine that builds it.
"""

from __future__ import annotations

import math
from pathlib import Path

import tensorflow as tf

PRECISIONS = ("float32", "bfloat16")
# Keras' additive mask for float32 softmax inputs (keras.layers.Softmax).
_MASKED = -1e9
# The layer norms' epsilon in the served graph, in place of the encoder's own
# (1e-12 for BERT): oneDNN's fused layer norm, the kernel the graph's norm
# pattern becomes (``FusedBertClassifier._norm``), runs with 1e-3 whatever the
# graph says (measured with TensorFlow 2.21), so the graph states what the
# kernel does. Against a BERT's hidden-state variance it moves the outputs
# less than bfloat16's rounding; the labels agree with the Keras graph's on
# the share the model card records.
LAYER_NORM_EPSILON = 1e-3
# BERT's embeddings are small (their sum's variance is near 1e-3 itself), so
# the first layer norm's input is scaled up, exactly (a power of two), to
# keep that epsilon from mattering there: see ``FusedBertClassifier``.
EMBEDDING_SCALE = 2.0 ** 10


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def default_precision() -> str:
    return "bfloat16" if native_bfloat16() else "float32"


def warn_if_emulated(version_dir: str, log) -> None:
    """Logs ``emulation_warning`` for the model in ``version_dir`` (any path
    TensorFlow reads: local or gs://); a missing or unreadable card is quiet."""
    import json

    try:
        with tf.io.gfile.GFile(str(version_dir).rstrip("/") + "/model_card.json") as f:
            warning = emulation_warning(json.loads(f.read()))
    except (tf.errors.OpError, ValueError):
        return
    if warning:
        log.warning("%s: %s", version_dir, warning)


def emulation_warning(card: dict) -> str | None:
    """What to log when a model's bfloat16 graph is about to run on a CPU
    that would emulate bfloat16 (slower than float32, not wrong)."""
    if (card.get("serving") or {}).get("precision") == "bfloat16" and not native_bfloat16():
        return ("this model's serving graph multiplies in bfloat16, and this CPU has neither "
                "AMX-BF16 nor AVX512-BF16, so it runs emulated and slower than float32; "
                "rebuild it with `python -m model build --precision float32`")
    return None


def _gelu_is_approximate(activation) -> bool:
    import keras

    probe = tf.constant([-2.0, -0.5, 0.3, 1.7])
    ours = tf.nn.gelu(probe, approximate=True)
    return bool(tf.reduce_all(tf.abs(keras.ops.convert_to_tensor(activation(probe)) - ours)
                              < 1e-6))


# keras-hub's TransformerEncoder keeps its sublayers in private attributes; the
# fused graph reads their weights from there (no public accessor exists).
_ENCODER_PRIVATE = ("_self_attention_layer", "_self_attention_layer_norm",
                    "_feedforward_layer_norm", "_feedforward_intermediate_dense",
                    "_feedforward_output_dense")
_ATTENTION_PRIVATE = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")


def check_keras_hub_private_api(layer) -> None:
    """Raises RuntimeError, naming keras-hub's version, when a transformer layer
    lacks a private sublayer the fused graph reads (checked for each layer as
    the graph is built, before any weight is read)."""
    import keras_hub

    missing = [name for name in _ENCODER_PRIVATE if not hasattr(layer, name)]
    attention = getattr(layer, "_self_attention_layer", None)
    if attention is not None:
        missing += [f"_self_attention_layer.{name}" for name in _ATTENTION_PRIVATE
                    if not hasattr(attention, name)]
    if missing:
        raise RuntimeError(f"keras-hub {keras_hub.__version__}: {type(layer).__name__} has no "
                           f"{', '.join(missing)}; model/fused.py reads the weights there. "
                           "Install the keras-hub that constraints.txt pins.")


class FusedBertClassifier(tf.Module):
    """A keras-hub ``BertTextClassifier``'s forward pass for inference.

    Called like the Keras model, ``classifier(features, training=False)``,
    with ``token_ids``, ``padding_mask`` and ``segment_ids`` of shape
    ``[batch, length]``, each row's real tokens first (``[CLS]`` at 0, as
    keras-hub's preprocessor and ``model.export`` lay them out); returns
    logits ``[batch, classes]`` in float32.
    """

    def __init__(self, classifier, precision: str = "float32"):
        super().__init__(name="fused_bert_classifier")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        backbone = classifier.backbone
        self.precision = precision
        self.heads = backbone.num_heads
        self.hidden = backbone.hidden_dim
        self.head_dim = self.hidden // self.heads
        dtype = tf.bfloat16 if precision == "bfloat16" else tf.float32
        self._dtype = dtype

        def const(value, cast=False):
            # Weights are numpy arrays that each trace embeds as Const nodes,
            # not tf.Variables: oneDNN reorders a constant weight into its
            # blocked layout once and caches it, where a variable's weight is
            # reordered on every call (the env var TF_ONEDNN_ASSUME_FROZEN_WEIGHTS
            # does the same for variables, process-wide, training included).
            array = tf.convert_to_tensor(value)
            return (tf.cast(array, dtype) if cast else array).numpy()

        # The vocabulary table (the largest tensor, only gathered from) stays a
        # variable: TF's SavedModel writer stores a traced function's constants
        # once per trace it keeps, and it keeps two.
        # The three embedding tables are stored times EMBEDDING_SCALE: the
        # layer norm that reads their sum is scale-invariant but for its
        # epsilon, so the kernel's 1e-3 acts as 1e-3 / EMBEDDING_SCALE^2.
        self.token_embedding = tf.Variable(
            backbone.token_embedding.embeddings * EMBEDDING_SCALE, trainable=False)
        self.position_embedding = const(
            backbone.position_embedding.position_embeddings * EMBEDDING_SCALE)
        self.segment_embedding = const(backbone.segment_embedding.embeddings * EMBEDDING_SCALE)
        norm = backbone.embeddings_layer_norm
        self.embedding_norm = (const(norm.gamma), const(norm.beta), float(norm.epsilon))
        self.layers = []
        self.score_scale = 1.0 / math.sqrt(self.head_dim)
        last = len(backbone.transformer_layers) - 1
        for index, layer in enumerate(backbone.transformer_layers):
            check_keras_hub_private_api(layer)
            if layer.normalize_first:
                raise ValueError("only post-norm BERT layers are supported")
            if not _gelu_is_approximate(layer.activation):
                raise ValueError(f"unsupported activation {layer.activation}")
            att = layer._self_attention_layer
            h = self.hidden
            q_k = tf.reshape(att._query_dense.kernel, [h, h])
            q_b = tf.reshape(att._query_dense.bias, [h])
            kv_k = tf.concat([tf.reshape(att._key_dense.kernel, [h, h]),
                              tf.reshape(att._value_dense.kernel, [h, h])], axis=1)
            kv_b = tf.concat([tf.reshape(att._key_dense.bias, [h]),
                              tf.reshape(att._value_dense.bias, [h])], axis=0)
            n1, n2 = layer._self_attention_layer_norm, layer._feedforward_layer_norm
            ff1, ff2 = layer._feedforward_intermediate_dense, layer._feedforward_output_dense
            weights = {
                "out": (const(tf.reshape(att._output_dense.kernel, [h, h]), True),
                        const(att._output_dense.bias, True)),
                "norm1": (const(n1.gamma), const(n1.beta), float(n1.epsilon)),
                "ff1": (const(ff1.kernel, True), const(ff1.bias, True)),
                "ff2": (const(ff2.kernel, True), const(ff2.bias, True)),
                "norm2": (const(n2.gamma), const(n2.beta), float(n2.epsilon)),
            }
            if index == last:  # queries for [CLS] only, keys and values for all
                weights["q"] = (const(q_k, True), const(q_b, True))
                weights["kv"] = (const(kv_k, True), const(kv_b, True))
            else:  # one product for queries, keys and values
                weights["qkv"] = (const(tf.concat([q_k, kv_k], axis=1), True),
                                  const(tf.concat([q_b, kv_b], axis=0), True))
            self.layers.append(weights)
        self.pooler = (const(backbone.pooled_dense.kernel), const(backbone.pooled_dense.bias))
        self.head = (const(classifier.output_dense.kernel), const(classifier.output_dense.bias))
        # One traced function for both serving signatures.
        ids = tf.TensorSpec([None, None], tf.int32)
        self._forward = tf.function(self._logits, input_signature=[
            ids, tf.TensorSpec([None, None], tf.bool), ids])

    def _dense(self, x, weights, gelu=False, cast=True):
        kernel, bias = weights
        # MatMul -> BiasAdd [-> Gelu]: the pattern oneDNN's rewriter fuses.
        y = tf.nn.bias_add(tf.matmul(tf.cast(x, self._dtype) if cast else x, tf.constant(kernel)),
                           tf.constant(bias))
        return tf.nn.gelu(y, approximate=True) if gelu else y

    @staticmethod
    def _norm(x, weights):
        """Layer norm over the last axis of ``[rows, width]``, written as the op
        pattern TensorFlow's remapper turns into oneDNN's one-kernel layer norm
        (``_MklLayerNorm``: mean, squared difference, mean, rsqrt, one scale
        and one shift; the axis as a non-negative constant). That kernel is
        3x faster here than a FusedBatchNorm over a ``[1, rows, width, 1]``
        view and 2x faster than the six passes of moments-and-scale
        (docs/model.md), and it
        ignores the graph's epsilon, using 1e-3 (``LAYER_NORM_EPSILON``), so
        the graph says 1e-3 too and every runtime, fused or not, computes
        the same function (``tests/test_model.py`` checks both)."""
        gamma, beta, _ = weights
        mean = tf.reduce_mean(x, axis=[1], keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=[1], keepdims=True)
        scale = tf.math.rsqrt(variance + LAYER_NORM_EPSILON) * tf.constant(gamma)
        return x * scale + (tf.constant(beta) - scale * mean)

    def _split_heads(self, x, batch, length, parts):
        """``[batch*length, parts*hidden]`` -> ``[parts, batch, heads, length, head_dim]``."""
        x = tf.reshape(x, [batch, length, parts, self.heads, self.head_dim])
        return tf.transpose(x, [2, 0, 3, 1, 4])

    def _attend(self, q, k, v, mask_bias):
        """Softmax attention in the products' type: the scores come out of a
        bfloat16 product already, and oneDNN's softmax sums in float32.
        BatchMatMul, then the 1/sqrt(head_dim) scale, then the mask is the
        pattern oneDNN runs as one primitive (``_MklFusedBatchMatMulV2``)."""
        scores = tf.matmul(q, k, transpose_b=True) * tf.constant(self.score_scale, self._dtype) \
            + mask_bias
        return tf.matmul(tf.nn.softmax(scores, axis=-1), v)

    def _layer(self, x, p, pack, mask_bias, cls_only):
        """One post-norm encoder layer on the packed rows ``x``, ``[tokens, hidden]``
        (real tokens only). With ``cls_only`` it returns only the ``[CLS]``
        rows, ``[batch, hidden]``.

        Every projection, layer norm and residual runs on the real tokens;
        only attention, which needs each tweet's tokens side by side, works
        on the ``[batch, length]`` grid: its inputs are gathered onto the grid
        (a padding slot takes a copy of a real row, which the mask then
        ignores) and its output gathered back off it."""
        batch, length, real, grid, cls_rows = pack
        if cls_only:
            kv = self._split_heads(tf.gather(self._dense(x, p["kv"]), grid), batch, length, 2)
            residual = tf.gather(x, cls_rows)
            q, k, v = self._split_heads(self._dense(residual, p["q"]), batch, 1, 1)[0], kv[0], kv[1]
        else:
            residual = x
            q, k, v = tf.unstack(self._split_heads(
                tf.gather(self._dense(x, p["qkv"]), grid), batch, length, 3))
        context = self._attend(q, k, v, mask_bias)
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [-1, self.hidden])
        if not cls_only:
            context = tf.gather(context, real)
        x = self._norm(residual + tf.cast(self._dense(context, p["out"]), tf.float32), p["norm1"])
        h = self._dense(x, p["ff1"], gelu=True)
        return self._norm(x + tf.cast(self._dense(h, p["ff2"]), tf.float32), p["norm2"])

    def __call__(self, features, training=False):
        return self._forward(tf.cast(features["token_ids"], tf.int32),
                             tf.cast(features["padding_mask"], tf.bool),
                             tf.cast(features["segment_ids"], tf.int32))

    def _logits(self, token_ids, padding_mask, segment_ids):
        batch, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        # Packing: a batch padded to its longest tweet is mostly padding (61 %
        # of the rows for tweets in arrival order, batches of 32), and every
        # per-token op would pay for it. ``real``: each real token's slot on
        # the [batch, length] grid; ``grid``: each slot's packed row (a
        # padding slot: the row before it, a real one of the same tweet).
        flat_mask = tf.reshape(padding_mask, [-1])
        real = tf.cast(tf.where(flat_mask)[:, 0], tf.int32)
        grid = tf.maximum(tf.cumsum(tf.cast(flat_mask, tf.int32)) - 1, 0)
        cls_rows = tf.reshape(grid, [batch, length])[:, 0]
        pack = (batch, length, real, grid, cls_rows)
        x = (tf.gather(self.token_embedding, tf.gather(tf.reshape(token_ids, [-1]), real))
             + tf.gather(tf.constant(self.position_embedding), real % length)
             + tf.gather(tf.constant(self.segment_embedding),
                         tf.gather(tf.reshape(segment_ids, [-1]), real)))
        x = self._norm(x, self.embedding_norm)
        mask = tf.cast(padding_mask, tf.float32)
        mask_bias = tf.cast(((1.0 - mask) * _MASKED)[:, tf.newaxis, tf.newaxis, :], self._dtype)
        last = len(self.layers) - 1
        for i, p in enumerate(self.layers):
            x = self._layer(x, p, pack, mask_bias, cls_only=i == last)
        pooled = tf.tanh(self._dense(x, self.pooler, cast=False))
        return self._dense(pooled, self.head, cast=False)
