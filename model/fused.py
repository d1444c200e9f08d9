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
    ``[batch, length]``; returns logits ``[batch, classes]`` in float32.
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
        self.token_embedding = tf.Variable(backbone.token_embedding.embeddings, trainable=False)
        self.position_embedding = const(backbone.position_embedding.position_embeddings)
        self.segment_embedding = const(backbone.segment_embedding.embeddings)
        norm = backbone.embeddings_layer_norm
        self.embedding_norm = (const(norm.gamma), const(norm.beta), float(norm.epsilon))
        self.layers = []
        scale = 1.0 / math.sqrt(self.head_dim)
        for layer in backbone.transformer_layers:
            check_keras_hub_private_api(layer)
            if layer.normalize_first:
                raise ValueError("only post-norm BERT layers are supported")
            if not _gelu_is_approximate(layer.activation):
                raise ValueError(f"unsupported activation {layer.activation}")
            att = layer._self_attention_layer
            h = self.hidden
            q_k = tf.reshape(att._query_dense.kernel, [h, h]) * scale
            q_b = tf.reshape(att._query_dense.bias, [h]) * scale
            kv_k = tf.concat([tf.reshape(att._key_dense.kernel, [h, h]),
                              tf.reshape(att._value_dense.kernel, [h, h])], axis=1)
            kv_b = tf.concat([tf.reshape(att._key_dense.bias, [h]),
                              tf.reshape(att._value_dense.bias, [h])], axis=0)
            n1, n2 = layer._self_attention_layer_norm, layer._feedforward_layer_norm
            ff1, ff2 = layer._feedforward_intermediate_dense, layer._feedforward_output_dense
            self.layers.append({
                # The 1/sqrt(head_dim) query scale is folded into W_q and b_q.
                "q": (const(q_k, True), const(q_b, True)),
                "kv": (const(kv_k, True), const(kv_b, True)),
                "out": (const(tf.reshape(att._output_dense.kernel, [h, h]), True),
                        const(att._output_dense.bias, True)),
                "norm1": (const(n1.gamma), const(n1.beta), float(n1.epsilon)),
                "ff1": (const(ff1.kernel, True), const(ff1.bias, True)),
                "ff2": (const(ff2.kernel, True), const(ff2.bias, True)),
                "norm2": (const(n2.gamma), const(n2.beta), float(n2.epsilon)),
            })
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
        """Layer norm over the last axis of ``[rows, width]``, written as a
        training-mode FusedBatchNorm over a ``[1, rows, width, 1]`` view (each
        row a channel), as tf.keras 2 wrote it: one kernel instead of the six
        passes of moments-and-scale, and faster for it (docs/model.md)."""
        gamma, beta, epsilon = weights
        rows, width = tf.shape(x)[0], tf.shape(x)[1]
        normed, _, _ = tf.compat.v1.nn.fused_batch_norm(
            tf.reshape(x, [1, rows, width, 1]), tf.ones([rows]), tf.zeros([rows]),
            epsilon=epsilon, data_format="NCHW", is_training=True)
        return tf.reshape(normed, [rows, width]) * tf.constant(gamma) + tf.constant(beta)

    def _split_heads(self, x, batch, length, parts):
        """``[batch*length, parts*hidden]`` -> ``[parts, batch, heads, length, head_dim]``."""
        x = tf.reshape(x, [batch, length, parts, self.heads, self.head_dim])
        return tf.transpose(x, [2, 0, 3, 1, 4])

    def _attend(self, q, k, v, mask_bias):
        scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) + mask_bias
        probs = tf.cast(tf.nn.softmax(scores, axis=-1), self._dtype)
        return tf.matmul(probs, v)

    def _layer(self, x, p, batch, length, mask_bias, cls_only):
        """One post-norm encoder layer on ``x`` of shape ``[batch*length, hidden]``.
        With ``cls_only`` it returns only the ``[CLS]`` rows, ``[batch, hidden]``."""
        kv = self._split_heads(self._dense(x, p["kv"]), batch, length, 2)
        if cls_only:
            residual = tf.reshape(x, [batch, length, self.hidden])[:, 0]
            q = self._split_heads(self._dense(residual, p["q"]), batch, 1, 1)[0]
            rows = batch
        else:
            residual = x
            q = self._split_heads(self._dense(x, p["q"]), batch, length, 1)[0]
            rows = batch * length
        context = self._attend(q, kv[0], kv[1], mask_bias)
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [rows, self.hidden])
        x = self._norm(residual + tf.cast(self._dense(context, p["out"]), tf.float32), p["norm1"])
        h = self._dense(x, p["ff1"], gelu=True)
        return self._norm(x + tf.cast(self._dense(h, p["ff2"]), tf.float32), p["norm2"])

    def __call__(self, features, training=False):
        return self._forward(tf.cast(features["token_ids"], tf.int32),
                             tf.cast(features["padding_mask"], tf.bool),
                             tf.cast(features["segment_ids"], tf.int32))

    def _logits(self, token_ids, padding_mask, segment_ids):
        batch, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        x = (tf.gather(self.token_embedding, token_ids)
             + tf.constant(self.position_embedding)[tf.newaxis, :length]
             + tf.gather(tf.constant(self.segment_embedding), segment_ids))
        x = self._norm(tf.reshape(x, [-1, self.hidden]), self.embedding_norm)
        mask = tf.cast(padding_mask, tf.float32)
        mask_bias = ((1.0 - mask) * _MASKED)[:, tf.newaxis, tf.newaxis, :]
        last = len(self.layers) - 1
        for i, p in enumerate(self.layers):
            x = self._layer(x, p, batch, length, mask_bias, cls_only=i == last)
        pooled = tf.tanh(self._dense(x, self.pooler, cast=False))
        return self._dense(pooled, self.head, cast=False)
