"""Sentiment inference: batches of similar length into Beam's ``RunInference``.

``RunSentiment`` works in the global window (each tweet keeps its event time
in its record; the job windows the results afterwards, ``WindowByEventTime``),
so that inference batches form in processing time, across event-time
windows: a sparse or historic stream fills them as well as a dense one. ``BatchByLength`` is Beam's
``SortAndBatchElements``: each bundle's tweets sorted by their WordPiece
length and cut into batches of at most ``max_batch_size``, so a batch pads
little and holds what is waiting (one batch when a few tweets wait, many
when a backlog drains). No state or timer is involved, so nothing waits for
a batch to fill and no watermark is held; how many tweets a bundle holds is
the runner's choice (``runners/profiles.py`` sets Flink's bundle limits).
``RunInference`` then runs the pre-batched tweets through the handler and
each prediction becomes a ``Result`` or a ``DeadLetter``.

The model handler is any Beam handler that takes UTF-8 text bytes and
returns ``Scores``: tfx-bsl's in-process SavedModel handler
(``local_handler``) or the TF Serving gRPC handler in ``transforms.tfserving``.
"""

import functools
import gc
import inspect
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from transforms import budget as latency
from transforms.budget import LatencyBudget
from transforms.records import LABELS, DeadLetter, Result, Tweet, now_iso
from transforms.rollout import (
    IMMEDIATE,
    PROMOTE,
    REJECT,
    SHADOW,
    Rollout,
    ShadowLedger,
    compare,
    failed,
    judge,
)

_LOG = logging.getLogger(__name__)
STAGE = "inference"
DEFAULT_MAX_BATCH_SIZE = 64
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
    from tokenizers import BertWordPieceTokenizer

    from model.serving import read_text

    words = read_text(vocab_path).splitlines()
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
    def for_model(cls, model_dir: str | None, max_length: int = 128) -> "TokenCounter":
        """The counter for the newest version under ``model_dir``; the
        estimate when that model has no vocabulary file (or is not here, as
        with a remote TF Serving whose model this machine lacks)."""
        if model_dir:
            from model.serving import exists, join, read_card, resolve

            try:
                version_dir = resolve(model_dir)
            except FileNotFoundError:
                version_dir = model_dir
            vocab = join(version_dir, VOCAB_FILE)
            if exists(vocab):
                max_length = int(read_card(version_dir).get("max_sequence_length", max_length))
                return cls(str(vocab), max_length)
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
    """``element_size_fn`` for ``(Tweet, text bytes)`` elements."""

    def __init__(self, count: TokenCounter):
        self.count = count

    def __call__(self, element: tuple[Tweet, bytes]) -> int:
        return self.count(element[1])


class BatchByLength(beam.PTransform):
    """``(Tweet, text)`` -> lists of them, sorted by WordPiece length, at most
    ``max_batch_size`` long; one bundle's tweets at a time (see the module
    doc). A thin wrapper of Beam's ``SortAndBatchElements``: its weight limit
    is set so only the count limits a batch."""

    def __init__(self, max_batch_size: int, token_counter: TokenCounter):
        super().__init__()
        self._max = max_batch_size
        self._count = token_counter

    def expand(self, keyed):
        return keyed | beam.SortAndBatchElements(
            min_batch_size=1, max_batch_size=self._max,
            max_batch_weight=self._max * self._count.max_length + 1,
            element_size_fn=_KeyedLength(self._count))


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
    """Wraps a text -> ``Scores`` handler with batch metrics and the
    per-element fallback.

    When a whole batch fails, each element is retried alone, so one bad
    element becomes one ``InferenceFailure`` instead of taking its batch
    with it. What fails outside ``run_inference`` (loading the model, say)
    still reaches ``RunInference.with_exception_handling``.

    Each call's time per tweet goes into the process's ``CostMeter``, from
    which the latency ``budget`` sizes bundles and calls; a batch longer than
    the budget lets one call take is scored in consecutive parts (sorted by
    length already, so each part still pads little).
    """

    def __init__(self, inner: ModelHandler, token_counter: Optional[TokenCounter] = None,
                 budget: Optional[LatencyBudget] = None):
        super().__init__()
        self._inner = inner
        self._count = token_counter or TokenCounter()
        self._budget = budget
        self._batch_sizes = Metrics.distribution("RunSentiment", "batch_size")
        # Counters beside the distribution: Flink's Prometheus reporter exports a
        # Beam distribution as 0 (a gauge of a non-number), so the Grafana
        # dashboard takes mean batch size and inference time from these rates.
        self._batches = Metrics.counter("RunSentiment", "batches")
        self._batched = Metrics.counter("RunSentiment", "batched_tweets")
        self._inference_ms = Metrics.counter("RunSentiment", "inference_ms")
        self._real_tokens = Metrics.counter("RunSentiment", "real_tokens")
        self._padded_tokens = Metrics.counter("RunSentiment", "padded_tokens")
        self._failed = Metrics.counter("RunSentiment", "element_failures")

    def load_model(self):
        return self._inner.load_model()

    def run_inference(self, batch: Sequence[bytes], model: Any,
                      inference_args: Optional[Mapping[str, Any]] = None) -> Iterable[Any]:
        limit = self._budget.batch_limit(len(batch)) if self._budget else len(batch)
        if len(batch) <= limit:
            return self._call(batch, model, inference_args)
        return [r for i in range(0, len(batch), limit)
                for r in self._call(batch[i:i + limit], model, inference_args)]

    def _call(self, batch, model, inference_args) -> list[Any]:
        lengths = [self._count(t) for t in batch]
        self._batch_sizes.update(len(batch))
        self._batches.inc()
        self._batched.inc(len(batch))
        self._real_tokens.inc(sum(lengths))
        self._padded_tokens.inc(max(lengths, default=0) * len(batch))
        started = time.monotonic()
        try:
            return self._run(batch, model, inference_args)
        finally:
            elapsed_ms = (time.monotonic() - started) * 1000
            self._inference_ms.inc(int(elapsed_ms))
            latency.METER.record(len(batch), elapsed_ms)

    def _run(self, batch, model, inference_args) -> list[Any]:
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
            return [r for text in batch for r in self._run([text], model, inference_args)]

    def get_metrics_namespace(self) -> str:
        return "RunSentiment"

    def share_model_across_processes(self) -> bool:
        return self._inner.share_model_across_processes()

    def model_copies(self) -> int:
        return self._inner.model_copies()


# Eight texts of a tweet's usual length (15-35 WordPiece tokens), timed in a
# batch of 32 at load.
_WARM_UP_TEXTS = tuple(text.encode() for text in (
    "just landed in lisbon and the sun is out, best start to a holiday ever",
    "the update broke my settings again, third time this month, really annoying",
    "watching the match tonight with friends, anyone know where it is streaming?",
    "@user thanks for the quick reply, the replacement arrived this morning",
    "traffic on the bridge is terrible again, 40 minutes to move two miles",
    "new episode drops friday and honestly i cannot wait to see what happens",
    "customer service put me on hold for an hour and then hung up http",
    "not sure how i feel about the ending, it was fine i guess",
))


class _TF2Session:
    """What tfx-bsl's in-process handler calls, backed by ``tf.saved_model.load``.

    tfx-bsl loads models with the TF1 loader (``tf.compat.v1.saved_model``),
    which cannot restore the variables of a SavedModel exported from Keras 3
    objects ("Could not find variable ..."). Through its ``load_override_fn``
    it accepts any object with a ``Session.run``-like method, so this one
    maps its feeds and fetches onto the TF2 signature; tfx-bsl keeps doing the
    signature checks.
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

    def input_for(self, text: bytes) -> bytes:
        """What the signature takes for ``text``: the text, or for
        serving_tf_example a serialized tf.Example holding it."""
        if self._arg != "examples":
            return text
        tf = self._tf
        return tf.train.Example(features=tf.train.Features(feature={
            "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text]))
        })).SerializeToString()

    def _warm_up(self) -> None:
        """Calls at load time, as TF Serving does with its warm-up requests:
        the first call of a loaded signature costs 0.6-2 s more than the
        next on MiniLM (the more on a busy machine), which the first tweets of a stream would otherwise
        wait for (a first call at a new shape costs 1.3-1.4x the next, tens of
        ms: not worth a grid of shapes). Then one timed batch of tweet-length
        texts gives the latency budget a first cost per tweet
        (``transforms/budget.py``) before any tweet arrives."""
        tf = self._tf
        try:
            self._fn(**{self._arg: tf.constant([self.input_for(b"warm up")], dtype=tf.string)})
            batch = tf.constant([self.input_for(text) for text in _WARM_UP_TEXTS] * 4,
                                dtype=tf.string)
            started = time.monotonic()
            self._fn(**{self._arg: batch})
            latency.METER.record(int(batch.shape[0]), (time.monotonic() - started) * 1000)
        except Exception as err:  # noqa: BLE001 - only an optimization; real calls report errors
            _LOG.info("model warm-up call failed (%s); the first batch will pay for it", err)

    def run(self, fetches: Mapping[str, str], feed_dict: Mapping[str, Any]):
        (values,) = feed_dict.values()
        out = self._fn(**{self._arg: self._tf.constant(values, dtype=self._tf.string)})
        return {alias: out[alias].numpy() for alias in fetches}


# tfx-bsl's handlers run ``run_inference`` = ``_run_inference`` (signature
# checks, fetches through our session) + ``_post_process`` (a PredictionLog
# per tweet, with a TensorProto per output: a large share of a bfloat16
# model's time, only to be parsed straight back). The handler below calls
# ``_run_inference`` itself, a private method: ``check_tfx_bsl_private_api``
# makes sure it is the code this was written against, at start.
_EXPECTED_RUN_INFERENCE_PARAMS = ("self", "examples", "serialized_examples", "model")


def check_tfx_bsl_private_api(handler_class: type) -> None:
    """Raises RuntimeError when tfx-bsl's handler no longer has the private
    ``_run_inference(examples, serialized_examples, model)`` that
    ``run_inference`` calls before ``_post_process``."""
    import tfx_bsl

    private = getattr(handler_class, "_run_inference", None)
    public = getattr(handler_class, "run_inference", None)
    problem = None
    if private is None or public is None:
        problem = "has no _run_inference / run_inference"
    elif tuple(inspect.signature(private).parameters) != _EXPECTED_RUN_INFERENCE_PARAMS:
        problem = f"_run_inference{inspect.signature(private)} changed"
    elif not {"_run_inference", "_post_process"} <= set(public.__code__.co_names):
        problem = "run_inference no longer calls _run_inference and _post_process"
    if problem:
        raise RuntimeError(
            f"tfx-bsl {tfx_bsl.__version__}: {handler_class.__name__} {problem}; "
            "bertstream reads its outputs through that private method (see "
            "transforms/inference.py). Install the tfx-bsl that constraints.txt pins.")


class LoadedVersion(NamedTuple):
    """One loaded model version: tfx-bsl's handler for it (its signature
    checks and fetches) and the model it loaded."""

    version: str
    version_dir: str
    tfx: Any
    session: Any


def load_version(version_dir: str, signature: str) -> LoadedVersion:
    """Loads a version and scores one text with it. Raises (with the reason)
    when it is not a model this job can use: unloadable, no such signature,
    outputs that are not 3 probabilities per text."""
    from tfx_bsl.beam import run_inference as tfx_run_inference
    from tfx_bsl.public.proto import model_spec_pb2

    spec = model_spec_pb2.InferenceSpecType(saved_model_spec=model_spec_pb2.SavedModelSpec(
        model_path=version_dir, signature_name=[signature]))
    tfx = tfx_run_inference.create_model_handler(
        spec, lambda path, tags: _TF2Session(path, signature), None)
    check_tfx_bsl_private_api(type(tfx))
    session = tfx.load_model()
    probe = [session.input_for(b"a model check")]
    probabilities = np.asarray(tfx._run_inference(probe, probe, session)["probabilities"])
    if probabilities.shape != (1, len(LABELS)) or not np.isfinite(probabilities).all():
        raise ValueError(f"'probabilities' has shape {probabilities.shape}, not "
                         f"(batch, {len(LABELS)})")
    return LoadedVersion(version_of(version_dir), version_dir, tfx, session)


def version_of(version_dir: str) -> str:
    """The version results carry: the directory's number ("0" for a directory
    that is not a numbered version)."""
    base = str(version_dir).rstrip("/").rsplit("/", 1)[-1]
    return base if base.isdigit() else "0"


class ModelSlot:
    """The model version this worker process scores with, and the one in shadow.

    Given a base directory (TF Serving's layout, ``<base>/<version>/``), a
    thread of its own looks for a newer version every ``reload_seconds`` and
    loads it while the current one keeps scoring. What happens next is the
    rollout's (``transforms/rollout.py``): ``immediate`` switches once the new
    version has loaded and scored a check text; ``shadow`` (the job's default)
    has it score the live tweets beside the serving version, unpublished,
    until the gates promote or reject it. A version that fails (unloadable,
    wrong signature, wrong outputs, rejected in shadow) is logged with the
    reason and not tried again until its files change; the current version
    keeps serving.

    Why not Beam's ``RunInference(model_metadata_pcoll=WatchFilePattern(...))``:
    its side input comes from ``PeriodicImpulse``, a splittable DoFn, and on
    the runners this job runs locally (the legacy DirectRunner, Prism) a
    pipeline with it emitted nothing in 40 s; it also fails the bundle, and
    with it the job, when a new version does not load; and it has no shadow.
    This check runs in the handler, the same on every runner.
    """

    def __init__(self, model_dir: str, signature: str, reload_seconds: float,
                 rollout: Optional[Rollout] = None):
        from model.serving import resolve

        self._signature = signature
        self._rollout = rollout or Rollout(mode=IMMEDIATE)
        first = str(resolve(model_dir))
        self._base = None if first.rstrip("/") == str(model_dir).rstrip("/") else str(model_dir)
        self._reload_seconds = reload_seconds
        self._lock = threading.Lock()
        # Shadow figures are shared through Redis; without a rollout (a
        # benchmark, a test of the handler alone) nothing is recorded.
        self._ledger = ShadowLedger(self._rollout) if rollout is not None else None
        if self._ledger and self._base and self._rollout.mode == SHADOW:
            first = self._start_version(first)
        self._current = load_version(first, signature)
        self._shadow: LoadedVersion | None = None
        # Version dir -> the fingerprint it had when it failed or was
        # rejected: tried again only once its files change (it may have been
        # half copied).
        self._rejected: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {first: _fingerprint(first)}
        self._loading: threading.Thread | None = None
        self._record_failures = 0
        if self._ledger:
            self._ledger.serving(self._current.version, self._fingerprints[first])
        _freeze_heap()
        if self._base and reload_seconds > 0:
            threading.Thread(target=self._watch, daemon=True,
                             name="bertstream-model-watch").start()

    def _start_version(self, newest: str) -> str:
        """In shadow mode a (re)starting worker serves the newest version that
        Redis says served or was promoted with these same files, so a version
        copied in while the job was down is still shadowed first; with no such
        record (a first start), the newest version not rejected."""
        from model.serving import all_versions

        dirs = all_versions(self._base) or [newest]
        known = self._ledger.states([version_of(d) for d in dirs])
        candidates = []
        for version_dir in reversed(dirs):
            record = known.get(version_of(version_dir), {})
            if record.get("fingerprint") and record["fingerprint"] == _fingerprint(version_dir):
                if record.get("decision") == REJECT:
                    continue
                if record.get("state") in ("serving", "promoted"):
                    return version_dir
            candidates.append(version_dir)
        return candidates[0] if candidates else newest

    def current(self) -> LoadedVersion:
        return self._current

    def shadow(self) -> LoadedVersion | None:
        return self._shadow

    def _watch(self) -> None:
        while True:
            time.sleep(self._reload_seconds)
            try:
                self._check()
            except Exception as err:  # noqa: BLE001 - the watch must outlive a bad listing
                _LOG.warning("looking for a new model version under %s failed: %s",
                             self._base, err)

    def _check(self) -> None:
        from model.serving import resolve

        shadow = self._shadow
        if shadow is not None:
            # Another worker may have decided on the counts we share.
            decided = self._ledger.decision(shadow.version)
            if decided:
                self._apply(shadow, *decided)
            return
        with self._lock:
            if self._loading is not None:
                return
            try:
                newest = str(resolve(self._base))
            except FileNotFoundError:
                return
            if newest == self._current.version_dir:
                return
            fingerprint = _fingerprint(newest)
            if self._rejected.get(newest) == fingerprint:
                return
            if self._judged_before(newest, fingerprint):
                return
            self._loading = threading.Thread(target=self._load, args=(newest, fingerprint),
                                             daemon=True, name="bertstream-model-reload")
            self._loading.start()

    def _judged_before(self, version_dir: str, fingerprint: str) -> bool:
        """True (and remembered) when Redis holds a rejection of these very
        files: a restarted worker does not load them again to learn it."""
        if not self._ledger or self._rollout.mode != SHADOW:
            return False
        record = self._ledger.states([version_of(version_dir)])[version_of(version_dir)]
        if record["fingerprint"] != fingerprint or record["decision"] != REJECT:
            return False
        self._rejected[version_dir] = fingerprint
        _LOG.info("model version %s was rejected before with these files; not tried again "
                  "until they change", version_of(version_dir))
        return True

    def _load(self, version_dir: str, fingerprint: str) -> None:
        _LOG.info("loading model version %s", version_dir)
        try:
            loaded = load_version(version_dir, self._signature)
        except Exception as err:  # noqa: BLE001 - any failure rejects the version
            reason = f"{type(err).__name__}: {str(err)[:500]}"
            with self._lock:
                self._rejected[version_dir] = fingerprint
                self._loading = None
            _LOG.warning("model version %s rejected, %s keeps serving: %s", version_dir,
                         self._current.version_dir, reason)
            if self._ledger:
                self._ledger.unloadable(version_of(version_dir), version_dir, fingerprint,
                                        reason)
            return
        self._fingerprints[version_dir] = fingerprint
        if self._rollout.mode == IMMEDIATE:
            self._promote(loaded, "loaded and scored its check text")
            return
        decided = self._ledger.start_shadow(loaded.version, version_dir, fingerprint)
        with self._lock:
            self._shadow, self._loading = loaded, None
        if decided:  # judged already (by another worker, or before a restart)
            self._apply(loaded, decided, "decided before this worker loaded it")
            return
        _LOG.info("model version %s in shadow beside %s: it scores %s of the tweets, "
                  "unpublished, until %d are counted", loaded.version, self._current.version,
                  f"{self._rollout.share:.0%}", self._rollout.tweets)

    def score_in_shadow(self, batch: Sequence[Any], served: np.ndarray) -> None:
        """Scores ``batch`` (what the serving version just scored, as ``served``
        probability rows) with the version in shadow, if any, and counts how
        they compare; decides once the gates can. Nothing here fails the batch:
        its results are already the serving version's."""
        shadow = self._shadow
        if shadow is None:
            return
        rows = [i for i, element in enumerate(batch) if self._rollout.sampled(element)]
        if not rows:
            return
        sample = [batch[i] for i in rows]
        started = time.monotonic()
        try:
            out = shadow.tfx._run_inference(sample, sample, shadow.session)
            proposed = np.asarray(out["probabilities"], dtype=np.float32)
            if proposed.shape != (len(rows), len(LABELS)) or not np.isfinite(proposed).all():
                raise ValueError(f"'probabilities' has shape {proposed.shape} or is not finite")
            figures = compare(served[rows], proposed, time.monotonic() - started)
        except Exception as err:  # noqa: BLE001 - a shadow error is a figure, not a failure
            _LOG.info("model version %s failed a batch in shadow: %s", shadow.version, err)
            figures = failed(len(rows), time.monotonic() - started)
        try:
            totals = self._ledger.record(shadow.version, *figures)
            verdict = judge(totals, self._rollout)
            if verdict:
                self._apply(shadow, *self._ledger.decide(shadow.version, *verdict))
        except Exception as err:  # noqa: BLE001 - Redis away: the next batch counts again
            self._record_failures += 1
            if self._record_failures in (1, 10, 100) or self._record_failures % 1000 == 0:
                _LOG.warning("could not record shadow figures of model version %s in Redis "
                             "(%d times so far): %s", shadow.version, self._record_failures,
                             err)

    def _apply(self, shadow: LoadedVersion, decision: str, reason: str) -> None:
        with self._lock:
            if self._shadow is not shadow:
                return  # applied already
            self._shadow = None
            if decision == REJECT:
                self._rejected[shadow.version_dir] = self._fingerprints.get(
                    shadow.version_dir, "")
        if decision == PROMOTE:
            self._promote(shadow, reason, state="promoted")
        else:
            _LOG.warning("model version %s rejected in shadow, %s keeps serving: %s",
                         shadow.version, self._current.version, reason)
            del shadow
            _refreeze()

    def _promote(self, loaded: LoadedVersion, reason: str, state: str = "serving") -> None:
        with self._lock:
            previous, self._current = self._current, loaded
            self._loading = None
        _LOG.info("model version %s now serving (was %s): %s", loaded.version,
                  previous.version, reason)
        if self._ledger:
            try:
                self._ledger.serving(loaded.version,
                                     self._fingerprints.get(loaded.version_dir, ""),
                                     retired=previous.version, state=state)
            except Exception as err:  # noqa: BLE001 - the switch stands; the page lags
                _LOG.warning("could not record model version %s as serving in Redis: %s",
                             loaded.version, err)
        del previous
        _refreeze()


def _refreeze() -> None:
    """A version let go was frozen with the heap: thaw, let it go, freeze what stays."""
    gc.unfreeze()
    _freeze_heap()


def _fingerprint(version_dir: str) -> str:
    """"files:bytes:newest modification" of a version directory."""
    import tensorflow as tf

    files = size = newest = 0
    for root, _, names in tf.io.gfile.walk(version_dir):
        for name in names:
            try:
                stat = tf.io.gfile.stat(f"{root.rstrip('/')}/{name}")
            except tf.errors.NotFoundError:
                # Some filesystems list what they cannot stat (TensorFlow's
                # ram:// lists "assets.extra/vocab.txt" as "assets/.extra"):
                # the other files still tell a changed version apart.
                continue
            files, size = files + 1, size + stat.length
            newest = max(newest, stat.mtime_nsec)
    return f"{files}:{size}:{newest}"


_SLOTS: dict[tuple[str, str], ModelSlot] = {}
_SLOTS_LOCK = threading.Lock()


class _LocalScoresHandler(ModelHandler):
    """tfx-bsl's in-process handler, with its outputs read into ``Scores``,
    on the ``ModelSlot`` of ``model_dir``."""

    def __init__(self, model_dir: str, signature: str, reload_seconds: float,
                 rollout: Optional[Rollout]):
        super().__init__()
        from tfx_bsl.beam import run_inference as tfx_run_inference

        check_tfx_bsl_private_api(tfx_run_inference._PredictModelHandler)
        self._model_dir, self._signature = model_dir, signature
        self._reload_seconds = reload_seconds
        self._rollout = rollout

    def load_model(self) -> ModelSlot:
        # One slot per model and signature per process: Beam's Shared handle
        # would let the model go between bundles on runners that drop their
        # DoFns (seconds to load each time).
        key = (self._model_dir, self._signature, self._rollout)
        with _SLOTS_LOCK:
            if key not in _SLOTS:
                _SLOTS[key] = ModelSlot(self._model_dir, self._signature, self._reload_seconds,
                                        self._rollout)
            return _SLOTS[key]

    def run_inference(self, batch, slot: ModelSlot, inference_args=None):
        batch = list(batch)
        loaded = slot.current()
        outputs = loaded.tfx._run_inference(batch, batch, loaded.session)
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        if probabilities.shape[:1] != (len(batch),):
            raise ValueError(f"the model returned {probabilities.shape[0]} rows of "
                             f"probabilities for a batch of {len(batch)}")
        slot.score_in_shadow(batch, probabilities)
        return [Scores(row.tolist(), loaded.version) for row in probabilities]

    def share_model_across_processes(self) -> bool:
        return False


def _freeze_heap() -> None:
    """Moves every object alive now out of the garbage collector's reach.

    Loading TensorFlow and a SavedModel leaves about 480,000 tracked Python
    objects that live as long as the process. Each full collection walks them
    all, a noticeable share of a file run, and stops every thread of the job
    while it runs. Frozen,
    they are skipped (``gc.freeze``, Python's own answer for long-lived
    heaps). Reference counting still frees them; only a reference cycle
    among them would never be collected.
    """
    gc.collect()
    gc.freeze()


def local_handler(model_dir: str, signature: str = "serving_default",
                  reload_seconds: float = 0, rollout: Optional[Rollout] = None) -> ModelHandler:
    """tfx-bsl's handler for the newest version under ``model_dir``; with
    ``reload_seconds`` > 0 and a base directory, it follows new versions as
    ``rollout`` says (at once when there is none)."""
    from model.serving import resolve

    resolve(model_dir)  # fails here, naming the path, when there is no model
    if rollout is not None:
        rollout.validate()
    return _LocalScoresHandler(str(model_dir), signature, reload_seconds, rollout)


class _ToResultFn(beam.DoFn):
    def __init__(self):
        self._results = Metrics.counter("RunSentiment", "results")
        self._dead = Metrics.counter("RunSentiment", "dead_lettered")

    def process(self, element):
        tweet, scores = element
        if isinstance(scores, InferenceFailure):
            self._dead.inc()
            yield beam.pvalue.TaggedOutput("dead_letter", DeadLetter.of(
                STAGE, scores.reason, tweet.raw, tweet.source_id, tweet.tweet_id,
                tweet.ack_id))
            return
        probs = [float(p) for p in scores.probabilities]
        best = int(np.argmax(probs))
        self._results.inc()
        yield Result(
            tweet_id=tweet.tweet_id, text=tweet.text, label=LABELS[best], score=probs[best],
            probabilities=probs, model_version=str(scores.model_version),
            event_time=tweet.event_time, window_start=tweet.window_start,
            window_end=tweet.window_end, processed_at=now_iso(), late=tweet.late,
            published_at=tweet.published_at, source_id=tweet.source_id, ack_id=tweet.ack_id)


def _failed_batch_to_dead_letters(failure):
    batch, error = failure
    counter = Metrics.counter("RunSentiment", "failed_batch_elements")
    for tweet, _ in batch:
        counter.inc()
        yield DeadLetter.of(STAGE, f"{type(error).__name__}: {error}", tweet.raw,
                            tweet.source_id, tweet.tweet_id, tweet.ack_id)


class RunSentiment(beam.PTransform):
    """``Tweet`` -> ``Result`` through ``RunInference``.

    Args:
      handler: a text -> ``Scores`` model handler.
      max_batch_size: most tweets in one model call.
      token_counter: the model's WordPiece length (for sorting and metrics).
      budget: the latency target, which may cut a batch into smaller calls.

    Returns:
      A tuple ``(results, dead_letters)``.
    """

    def __init__(self, handler: ModelHandler, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 token_counter: Optional[TokenCounter] = None,
                 budget: Optional[LatencyBudget] = None):
        super().__init__()
        self._count = token_counter or TokenCounter()
        self._max_batch_size = max_batch_size
        self._handler = KeyedModelHandler(
            LengthBatchedHandler(handler, self._count, budget)).with_no_batching()

    def expand(self, tweets):
        batches = (tweets
                   | "GlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
                   | "KeyByTweet" >> beam.Map(
                       lambda t: (t, t.text.encode("utf-8"))).with_output_types(
                           tuple[Tweet, bytes])
                   | "BatchByLength" >> BatchByLength(self._max_batch_size, self._count))
        predictions, failed = batches | "RunInference" >> RunInference(
            self._handler).with_exception_handling()
        scored = predictions | "ToResult" >> beam.ParDo(_ToResultFn()).with_outputs(
            "dead_letter", main="results")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            _failed_batch_to_dead_letters)
        dead = ((scored.dead_letter, failed_batches)
                | "InferenceDeadLetters" >> beam.Flatten())
        return scored.results, dead
