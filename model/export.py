"""The SavedModel's serving graph: raw text in, numbers out.

Tokenization happens inside the graph (keras-hub's BertTokenizer is built on
tensorflow-text ops), so Beam workers and TF Serving clients send plain
strings. keras-hub's own preprocessor pads every input to a fixed
``sequence_length``; here each batch is padded only to its longest tweet
(capped at ``max_length``), which is what makes short tweets cheap.

Outputs are numeric only: tfx-bsl's Predict post-processing fails on string
tensors, so the label names travel as the ``labels.txt`` asset and in the
model card instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorflow as tf

from model.data import LABELS

# Tweets are at most 280 characters; 128 WordPiece tokens covers more than
# 99.9% of them. Longer inputs are truncated (the tail is dropped).
DEFAULT_MAX_LENGTH = 128

TEXT_SIGNATURE = "serving_default"
EXAMPLE_SIGNATURE = "serving_tf_example"


def normalize_text(text: tf.Tensor) -> tf.Tensor:
    """Maps user handles and links to fixed tokens. The same op runs on the
    training data and in the serving graph, so both see identical text."""
    text = tf.strings.regex_replace(text, r"https?://\S+", "http")
    return tf.strings.regex_replace(text, r"@\w+", "@user")


class SentimentModule(tf.Module):
    """What gets exported: tokenizer + classifier + calibration.

    The calibration (``softmax(logits / temperature + bias)``) is part of the
    graph, so every client, Beam or TF Serving, gets calibrated probabilities.
    ``bias`` shifts the class priors (fitted on out-of-domain validation data,
    see ``model.build``); zeros and 1.0 leave the classifier's own output.
    """

    def __init__(self, classifier, tokenizer, max_length: int, temperature: float,
                 labels_path: str, bias=None):
        super().__init__()
        self.classifier = classifier
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cls_id = tokenizer.token_to_id(tokenizer.cls_token)
        self.sep_id = tokenizer.token_to_id(tokenizer.sep_token)
        self.pad_id = tokenizer.token_to_id(tokenizer.pad_token)
        self.temperature = tf.Variable(float(temperature), trainable=False, name="temperature")
        self.bias = tf.Variable(tf.zeros([len(LABELS)]) if bias is None else
                                tf.constant(bias, tf.float32), trainable=False, name="bias")
        self.labels = tf.saved_model.Asset(labels_path)

    def features(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        """Token ids, padding mask and segment ids, padded to the longest row."""
        ids = self.tokenizer(normalize_text(text))
        ids = tf.cast(ids[:, : self.max_length - 2], tf.int32)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        body = ids.to_tensor(default_value=self.pad_id)
        rows = tf.shape(body)[0]
        # [CLS] body [SEP], padded: built densely, since a ragged concat
        # transposes int64 row splits, which oneDNN logs an error-looking line
        # about at every first call ("oneDNN supports DT_INT64 only ...").
        token_ids = tf.concat([tf.fill([rows, 1], tf.constant(self.cls_id, tf.int32)), body,
                               tf.fill([rows, 1], tf.constant(self.pad_id, tf.int32))], axis=1)
        positions = tf.range(tf.shape(token_ids)[1])[tf.newaxis, :]
        token_ids = tf.where(positions == (lengths + 1)[:, tf.newaxis],
                             tf.constant(self.sep_id, tf.int32), token_ids)
        mask = positions < (lengths + 2)[:, tf.newaxis]
        return {"token_ids": token_ids, "padding_mask": mask,
                "segment_ids": tf.zeros_like(token_ids)}

    def logits(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        return self.classifier(features, training=False)

    def outputs(self, logits: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.nn.softmax(
            tf.cast(logits, tf.float32) / self.temperature + self.bias, axis=-1)
        return {"probabilities": probabilities,
                "class_id": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve_text(self, text):
        return self.outputs(self.logits(self.features(text)))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(self, examples):
        parsed = tf.io.parse_example(
            examples, {"text": tf.io.FixedLenFeature([], tf.string, default_value="")})
        return self.outputs(self.logits(self.features(parsed["text"])))


def export(module: SentimentModule, version_dir: Path, card: dict) -> None:
    """Writes ``version_dir`` (TF Serving layout) and ``model_card.json`` beside it."""
    tf.saved_model.save(
        module, str(version_dir),
        signatures={TEXT_SIGNATURE: module.serve_text.get_concrete_function(),
                    EXAMPLE_SIGNATURE: module.serve_examples.get_concrete_function()})
    (version_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")


def write_labels(path: Path) -> str:
    path.write_text("\n".join(LABELS) + "\n")
    return os.fspath(path)
