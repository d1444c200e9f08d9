"""Sentiment inference: length-aware batches into Beam's ``RunInference``.

``RunSentiment`` keys each tweet's text by its ``Tweet`` record
(``KeyedModelHandler``), lets ``RunInference`` batch with Beam's stateful
``BatchElements`` (``length_fn`` + ``bucket_boundaries`` so a batch holds
tweets of similar token length, ``max_batch_duration_secs`` so batches form
in streaming, where plain ``BatchElements`` yields batches of one), and turns
each prediction into a ``Result`` or a ``DeadLetter``.

The model handler is any Beam handler that takes UTF-8 text bytes and
returns TF Serving ``PredictionLog``s or ``PredictResponse``-like outputs:
tfx-bsl's in-process SavedModel handler (``local_handler``) or the TF
Serving gRPC handler in ``transforms.tfserving``.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from transforms.records import LABELS, DeadLetter, Result, Tweet, iso_from_seconds, now_iso

_LOG = logging.getLogger(__name__)
STAGE = "inference"
# Token-length bucket boundaries. Each bucket is its own batch, so more
# buckets pad less but split a live stream into smaller batches: with 15
# two-token-wide buckets a backlog padded only 3% (batches of 31), but at 108
# tweets/s live the DirectRunner's bundles of ~110 tweets made batches of ~9,
# the model spent twice as long per tweet and p99 latency went past 3 s.
# These 8 pad 9% on the sample (batches of 42) and make live batches about
# twice as large (benchmarks/latency.py: p99 1.8 s at the same load).
DEFAULT_BUCKETS = (12, 16, 20, 24, 32, 48, 64, 96)
# How long a partial batch waits for more tweets. The DirectRunner fires
# timers between bundles, so 0.1 s means "the rest of this bundle": at 108
# tweets/s p50 latency fell from 1.6 s (0.5 s wait) to 1.15 s with the same
# model time. On a runner with small bundles, a longer wait fills batches.
DEFAULT_MAX_BATCH_WAIT_SECONDS = 0.1
_PIECES = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_URL = re.compile(r"https?://\S+")
_HANDLE = re.compile(r"@\w+")


def estimate_tokens(text: bytes | str) -> int:
    """A cheap stand-in for the model's WordPiece length, plus [CLS] and [SEP].

    It applies the serving graph's normalization (links -> "http", handles ->
    "@user"), counts words and punctuation marks, and one more piece per six
    letters of a long ASCII word (WordPiece splits rare long words). On the
    shipped sample it correlates at 0.95 with the real count. Only used to
    bucket tweets of similar length, so it need not be exact.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _HANDLE.sub("@user", _URL.sub("http", text))
    return sum(1 + (len(w) - 1) // 6 if w.isascii() and w.isalnum() else 1
               for w in _PIECES.findall(text)) + 2


VOCAB_FILE = "assets.extra/vocab.txt"  # beside the SavedModel, written by model build


_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _read_tokenizer(vocab_path: str):
    from apache_beam.io.filesystems import FileSystems
    from tokenizers import BertWordPieceTokenizer

    with FileSystems.open(vocab_path) as f:
        words = f.read().decode("utf-8").splitlines()
    # keras-hub's BertTokenizer(lowercase=True) lowercases without
    # stripping accents.
    return BertWordPieceTokenizer({w: i for i, w in enumerate(words)}, lowercase=True,
                                  strip_accents=False)


class TokenCounter:
    """The model's WordPiece length of a tweet, [CLS] and [SEP] included,
    capped at ``max_length``: what the serving graph pads a row to.

    Batches pad to their longest row, so bucketing by the exact length is
    what keeps padding low: with ``estimate_tokens`` the benchmark's batches
    were 84% real tokens, with this 97%. It runs Hugging Face's Rust
    WordPiece (``tokenizers``, already installed with keras-hub) over the
    model's vocabulary with the serving graph's normalization, about 30 us a
    tweet; it matches the graph's count on 98.6% of the sample tweets (the
    rest differ by zero-width joiners and such, by at most 3). Without a
    vocabulary it falls back to ``estimate_tokens``.
    """

    def __init__(self, vocab_path: str | None = None, max_length: int = 128):
        self.vocab_path = vocab_path
        self.max_length = max_length
        self._tokenizer = None

    @classmethod
    def for_model(cls, model_dir: str | None, max_length: int = 128) -> TokenCounter:
        """The counter for the newest version under ``model_dir``; the
        estimate when that model has no vocabulary file (or is not here, as
        with a remote TF Serving whose model this machine lacks)."""
        if model_dir:
            from apache_beam.io.filesystems import FileSystems

            try:
                from model.serving import resolve

                version_dir = str(resolve(model_dir))
            except FileNotFoundError:
                version_dir = model_dir
            vocab = FileSystems.join(version_dir, VOCAB_FILE)
            if FileSystems.exists(vocab):
                card = FileSystems.join(version_dir, "model_card.json")
                if FileSystems.exists(card):
                    with FileSystems.open(card) as f:
                        max_length = int(json.loads(f.read()).get("max_sequence_length",
                                                                  max_length))
                return cls(vocab, max_length)
        _LOG.info("no %s under --model_dir %s: batching by estimated token length",
                  VOCAB_FILE, model_dir)
        return cls(None, max_length)

    def __getstate__(self):
        return {"vocab_path": self.vocab_path, "max_length": self.max_length,
                "_tokenizer": None}

    def _load(self):
        # Per process, not per instance: the DirectRunner unpickles a fresh
        # copy of the batching DoFns for every bundle, and reading the
        # vocabulary into a tokenizer takes tens of milliseconds.
        with _TOKENIZERS_LOCK:
            tokenizer = _TOKENIZERS.get(self.vocab_path)
            if tokenizer is None:
                tokenizer = _TOKENIZERS[self.vocab_path] = _read_tokenizer(self.vocab_path)
        self._tokenizer = tokenizer
        return tokenizer

    def __call__(self, text: bytes | str) -> int:
        if self.vocab_path is None:
            return min(estimate_tokens(text), self.max_length)
        self._tokenizer or self._load()
        return _counted(self.vocab_path, self.max_length, text)


@functools.lru_cache(maxsize=16384)
def _counted(vocab_path: str, max_length: int, text: bytes | str) -> int:
    """Per process and keyed by the text: each tweet is counted by the
    bucketing step and again by the handler (for the batch metrics), each
    with its own unpickled TokenCounter, and a WordPiece encode costs about
    30 us. The caller has loaded the tokenizer."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _HANDLE.sub("@user", _URL.sub("http", text))
    return min(len(_TOKENIZERS[vocab_path].encode(text).ids), max_length)


class _KeyedLength:
    """``length_fn`` for ``(Tweet, text bytes)`` elements."""

    def __init__(self, count: TokenCounter):
        self.count = count

    def __call__(self, element: tuple[Tweet, bytes]) -> int:
        return self.count(element[1])


class BatchStats:
    """In-process tally of the batches this worker process really ran.

    Beam metrics carry the same numbers (``RunSentiment/batch_size``...), but
    the Python DirectRunner loses counter updates made downstream of timer
    output, and here every batch comes from a timer or a stateful flush. The
    summary of a DirectRunner run and the benchmarks read this instead.
    """

    batches = 0
    elements = 0
    largest = 0
    real_tokens = 0
    padded_tokens = 0
    sizes: list[int] = []
    _lock = threading.Lock()  # the DirectRunner runs bundles on several threads

    @classmethod
    def record(cls, lengths: list[int]) -> None:
        with cls._lock:
            cls.batches += 1
            cls.elements += len(lengths)
            cls.largest = max(cls.largest, len(lengths))
            cls.real_tokens += sum(lengths)
            cls.padded_tokens += max(lengths, default=0) * len(lengths)
            if len(cls.sizes) < 100_000:
                cls.sizes.append(len(lengths))

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls.batches = cls.elements = cls.largest = cls.real_tokens = cls.padded_tokens = 0
            cls.sizes = []


def _stable_batch_keys() -> None:
    """One batching key per process, as Beam documents it.

    Beam's stateful ``BatchElements`` keys every element by a "per-process
    UUID" (``WithLengthBucketKey``/``WithSharedKey``), which its ``setup``
    takes from a ``Shared`` handle. ``Shared`` keeps alive only the object
    acquired last in the process, and the DoFn keeps the key string, not the
    object: once the DoFn is dropped (the DirectRunner does that after every
    bundle) and anything else is acquired, the next bundle gets a new UUID.
    Measured at 108 tweets/s: 58 keys in 58 bundles, so no batch ever grew
    across bundles (most batches held fewer than 4 tweets, each flushed by
    its timer alone). Handing out one object for the process's lifetime
    gives the documented behaviour (checked in ``tests/test_streaming.py`` and,
    across real bundles, ``tests/test_direct_pubsub.py``).
    """
    from apache_beam.transforms import util

    if getattr(util.load_shared_key, "_bertstream_stable", False):
        return
    key = util.SharedKey()

    def load_shared_key():
        return key

    load_shared_key._bertstream_stable = True
    util.load_shared_key = load_shared_key


# Workers import this module to unpickle the handler, before any setup runs.
_stable_batch_keys()


class Scores(NamedTuple):
    """What a handler returns per text: probabilities in LABELS order."""

    probabilities: Sequence[float]
    model_version: str


class InferenceFailure(NamedTuple):
    """Returned in place of ``Scores`` for a text its model call failed on."""

    reason: str


class BatchFailure(Exception):
    """Raised by a handler when a batch failed for a reason no element caused
    (the model server stayed unreachable through its retries): every element
    fails with it, and none is retried alone."""


class LengthBatchedHandler(ModelHandler):
    """Wraps a text -> ``Scores`` handler with the batching parameters and
    the per-element fallback.

    When a whole batch fails, each element is retried alone, so one bad
    element becomes one ``InferenceFailure`` instead of taking its batch
    with it. What fails outside ``run_inference`` (loading the model, say)
    still reaches ``RunInference.with_exception_handling``.
    """

    def __init__(self, inner: ModelHandler, max_batch_size: int,
                 max_batch_wait_seconds: float,
                 bucket_boundaries: Sequence[int] = DEFAULT_BUCKETS,
                 token_counter: TokenCounter | None = None):
        super().__init__()
        self._inner = inner
        self._count = token_counter or TokenCounter()
        self._batching = {
            # min == max: flush on size, on max_batch_duration_secs, or at the
            # end of the window, never on the adaptive estimator's guess.
            "min_batch_size": max_batch_size,
            "max_batch_size": max_batch_size,
            "max_batch_duration_secs": max_batch_wait_seconds,
            "length_fn": _KeyedLength(self._count),
            "bucket_boundaries": list(bucket_boundaries),
        }
        self._batch_sizes = Metrics.distribution("RunSentiment", "batch_size")
        self._real_tokens = Metrics.counter("RunSentiment", "estimated_real_tokens")
        self._padded_tokens = Metrics.counter("RunSentiment", "estimated_padded_tokens")
        self._failed = Metrics.counter("RunSentiment", "element_failures")

    def load_model(self):
        return self._inner.load_model()

    def run_inference(self, batch: Sequence[bytes], model: Any,
                      inference_args: Mapping[str, Any] | None = None) -> Iterable[Any]:
        lengths = [self._count(t) for t in batch]
        BatchStats.record(lengths)
        self._batch_sizes.update(len(batch))
        self._real_tokens.inc(sum(lengths))
        self._padded_tokens.inc(max(lengths, default=0) * len(batch))
        try:
            return list(self._inner.run_inference(batch, model, inference_args))
        except BatchFailure as err:
            self._failed.inc(len(batch))
            return [InferenceFailure(f"{type(err).__name__}: {err}")] * len(batch)
        except Exception as err:  # noqa: BLE001 - any model error: isolate the element
            if len(batch) == 1:
                self._failed.inc()
                return [InferenceFailure(f"{type(err).__name__}: {err}")]
            _LOG.warning("batch of %d failed (%s); retrying its elements one by one",
                         len(batch), err)
            return [r for text in batch
                    for r in self.run_inference([text], model, inference_args)]

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return self._batching

    def get_metrics_namespace(self) -> str:
        return "RunSentiment"

    def share_model_across_processes(self) -> bool:
        return self._inner.share_model_across_processes()

    def model_copies(self) -> int:
        return self._inner.model_copies()


def _tensor_values(proto) -> np.ndarray:
    """A TensorProto's values without importing TensorFlow here."""
    dtypes = {1: np.float32, 9: np.int64}
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtypes[proto.dtype])
    return np.array(list(proto.float_val) or list(proto.int64_val))


class _TF2Session:
    """What tfx-bsl's in-process handler calls, backed by ``tf.saved_model.load``.

    tfx-bsl loads models with the TF1 loader (``tf.compat.v1.saved_model``),
    which cannot restore the variables of a SavedModel exported from Keras 3
    objects ("Could not find variable ..."). Through its ``load_override_fn``
    it accepts any object with a ``Session.run``-like method, so this one
    maps its feeds and fetches onto the TF2 signature; tfx-bsl keeps doing the
    signature checks and the PredictionLog post-processing.
    """

    def __init__(self, path: str, signature: str):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  the tokenizer's ops

        from model.fused import warn_if_emulated

        self._tf = tf
        warn_if_emulated(path, _LOG)
        self._loaded = tf.saved_model.load(path)
        self._fn = self._loaded.signatures[signature]
        (self._arg,) = self._fn.structured_input_signature[1].keys()
        self._warm_up()

    def _warm_up(self) -> None:
        """One call at load time, as TF Serving does with its warm-up
        requests: the first call of a loaded signature costs about 0.6 s more
        than the next (measured on MiniLM), which the first tweets of a
        stream would otherwise wait for. Later shapes cost nothing extra."""
        text = b"warm up"
        if self._arg == "examples":  # serving_tf_example: serialized tf.Examples
            text = self._tf.train.Example(features=self._tf.train.Features(feature={
                "text": self._tf.train.Feature(
                    bytes_list=self._tf.train.BytesList(value=[text]))})).SerializeToString()
        try:
            self._fn(**{self._arg: self._tf.constant([text], dtype=self._tf.string)})
        except Exception as err:  # noqa: BLE001 - only an optimization; real calls report errors
            _LOG.info("model warm-up call failed (%s); the first batch will pay for it", err)

    def run(self, fetches: Mapping[str, str], feed_dict: Mapping[str, Any]):
        (values,) = feed_dict.values()
        out = self._fn(**{self._arg: self._tf.constant(values, dtype=self._tf.string)})
        return {alias: out[alias].numpy() for alias in fetches}


_LOADED: dict[tuple[str, str], Any] = {}
_LOADED_LOCK = threading.Lock()


class _LocalScoresHandler(ModelHandler):
    """tfx-bsl's in-process handler, with its PredictionLogs read into ``Scores``."""

    def __init__(self, version_dir: str, signature: str):
        super().__init__()
        from tfx_bsl.beam import run_inference as tfx_run_inference
        from tfx_bsl.public.proto import model_spec_pb2

        spec = model_spec_pb2.InferenceSpecType(saved_model_spec=model_spec_pb2.SavedModelSpec(
            model_path=version_dir, signature_name=[signature]))
        self._tfx = tfx_run_inference.create_model_handler(
            spec, lambda path, tags: _TF2Session(path, signature), None)
        self._version_dir, self._signature = version_dir, signature
        base = version_dir.rstrip("/").rsplit("/", 1)[-1]
        self._version = base if base.isdigit() else "0"

    def load_model(self):
        # Beam's Shared handle keeps only the most recently acquired object of
        # the process alive, and the DirectRunner drops its DoFn after every
        # bundle: with BatchElements' own Shared key in the same job, the model
        # was garbage-collected between bundles and loaded again (2 s each;
        # 30% of a streaming run's CPU). One strong reference per model and
        # signature per process keeps it.
        key = (self._version_dir, self._signature)
        with _LOADED_LOCK:
            if key not in _LOADED:
                _LOADED[key] = self._tfx.load_model()
                _freeze_heap()
            return _LOADED[key]

    def run_inference(self, batch, model, inference_args=None):
        batch = list(batch)
        run = getattr(self._tfx, "_run_inference", None)
        if run is not None and all(isinstance(e, bytes) for e in batch):
            # tfx-bsl's run_inference = _run_inference (its signature checks
            # and fetches, our session) + _post_process, which builds a
            # PredictionLog per tweet with a TensorProto per output (0.1 ms a
            # tweet) that would only be parsed straight back here: 15% of a
            # bfloat16 model's time. Its outputs are read directly instead.
            outputs = run(batch, batch, model)
            probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
            if probabilities.shape[:1] != (len(batch),):
                raise ValueError(f"the model returned {probabilities.shape[0]} rows of "
                                 f"probabilities for a batch of {len(batch)}")
            return [Scores(row.tolist(), self._version) for row in probabilities]
        logs = self._tfx.run_inference(batch, model, inference_args)
        return [Scores(_tensor_values(log.predict_log.response.outputs["probabilities"])
                       .tolist(), self._version) for log in logs]

    def share_model_across_processes(self) -> bool:
        return False


def _freeze_heap() -> None:
    """Moves every object alive now out of the garbage collector's reach.

    Loading TensorFlow and a SavedModel leaves about 480,000 tracked Python
    objects that live as long as the process. Each full collection walks them
    all: one took 0.31-0.40 s in the middle of a 2,000-tweet file run (about
    a tenth of it) and stops every thread of the job while it runs. Frozen,
    they are skipped (``gc.freeze``, Python's own answer for long-lived
    heaps). Reference counting still frees them; only a reference cycle
    among them would never be collected.
    """
    gc.collect()
    gc.freeze()


def local_handler(model_dir: str, signature: str = "serving_default") -> ModelHandler:
    """tfx-bsl's handler for the newest version under ``model_dir``."""
    from model.serving import resolve

    return _LocalScoresHandler(str(resolve(model_dir)), signature)


class _ToResultFn(beam.DoFn):
    def __init__(self):
        self._results = Metrics.counter("RunSentiment", "results")
        self._dead = Metrics.counter("RunSentiment", "dead_lettered")

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                w=beam.DoFn.WindowParam):
        tweet, scores = element
        if isinstance(scores, InferenceFailure):
            self._dead.inc()
            yield beam.pvalue.TaggedOutput("dead_letter", DeadLetter.of(
                STAGE, scores.reason, tweet.raw, tweet.source_id, tweet.tweet_id))
            return
        probs = [float(p) for p in scores.probabilities]
        best = int(np.argmax(probs))
        start = getattr(w, "start", None)
        end = getattr(w, "end", None)
        self._results.inc()
        yield Result(
            tweet_id=tweet.tweet_id, text=tweet.text, label=LABELS[best], score=probs[best],
            probabilities=probs, model_version=str(scores.model_version),
            event_time=iso_from_seconds(float(timestamp)),
            window_start=iso_from_seconds(float(start)) if start is not None else "",
            window_end=iso_from_seconds(float(end)) if end is not None else "",
            processed_at=now_iso(), late=tweet.late, source_id=tweet.source_id)


def _failed_batch_to_dead_letters(failure):
    batch, error = failure
    counter = Metrics.counter("RunSentiment", "failed_batch_elements")
    for tweet, _ in batch:
        counter.inc()
        yield DeadLetter.of(STAGE, f"{type(error).__name__}: {error}", tweet.raw,
                            tweet.source_id, tweet.tweet_id)


class RunSentiment(beam.PTransform):
    """``Tweet`` -> ``Result`` through ``RunInference``.

    Returns:
      A tuple ``(results, dead_letters)``.
    """

    def __init__(self, handler: ModelHandler, max_batch_size: int = 64,
                 max_batch_wait_seconds: float = DEFAULT_MAX_BATCH_WAIT_SECONDS,
                 bucket_boundaries: Sequence[int] = DEFAULT_BUCKETS,
                 token_counter: TokenCounter | None = None):
        super().__init__()
        self._handler = KeyedModelHandler(LengthBatchedHandler(
            handler, max_batch_size, max_batch_wait_seconds, bucket_boundaries,
            token_counter))

    def expand(self, tweets):
        keyed = tweets | "KeyByTweet" >> beam.Map(
            lambda t: (t, t.text.encode("utf-8"))).with_output_types(tuple[Tweet, bytes])
        predictions, failed = keyed | "RunInference" >> RunInference(
            self._handler).with_exception_handling()
        scored = predictions | "ToResult" >> beam.ParDo(_ToResultFn()).with_outputs(
            "dead_letter", main="results")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            _failed_batch_to_dead_letters)
        dead = ((scored.dead_letter, failed_batches)
                | "InferenceDeadLetters" >> beam.Flatten())
        return scored.results, dead
