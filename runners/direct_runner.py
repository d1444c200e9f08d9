"""What makes Beam's legacy (bundle-based) DirectRunner fit to stream: one place.

A streaming job with Pub/Sub on ``--runner=DirectRunner`` runs on Beam's
Python ``BundleBasedDirectRunner`` (a batch job, on a file, runs on Beam's
FnApiRunner and needs none of this). As Beam ships it, that runner pulls 10
Pub/Sub messages per bundle, acknowledges them before they are processed
(a killed job loses them), waits up to 30 s in each empty pull while no timer
can fire, runs every bundle on one thread, and inspects every DoFn again for
every bundle. ``install`` changes these private parts of it, in this process:

1. **Pub/Sub pulls** (``transform_evaluator._PubSubReadEvaluator``): its
   subscriber client is wrapped so that a pull returns at once, drains a
   backlog up to ``max_messages`` per bundle (fewer when the latency target,
   ``transforms/budget.py``, says a bundle that size would be scored too
   late), extends the pulled messages'
   ack deadline to ``lease_seconds``, does *not* acknowledge, and hands each
   message's ack id on in an attribute (``ACK_ID_ATTRIBUTE``), which
   ``pipeline.envelope_of`` moves into the ``Envelope``; the messages reach
   Beam as plain values read once from the raw protobuf, not as the client's
   proto-plus wrappers (which convert on every attribute read). The graph's
   ``AcknowledgeMessages`` step acknowledges once the tweet's end is in Redis.
2. **Executor threads** (``executor._ExecutorServiceParallelExecutor``):
   bundles run on ``threads`` worker threads instead of one, so the model
   (which releases the GIL) runs while other tweets are parsed and written;
   the four things Beam's executor gets wrong with more than one thread are
   fixed: a false stall report (twice: while a finished bundle's update waits
   in the queue, and while a round that fired timers left the next Pub/Sub
   pull pending; it killed the job), a monitor that spins, 5 s more at shutdown,
   and timers read from a step's per-key states while another thread's
   bundle adds a key ("dictionary changed size during iteration", which
   failed the job: ``watermark_manager._TransformWatermarks``).
   And three for latency under load: a step's empty output bundle (no dead
   letters, no duplicates: most tagged outputs of most bundles) is not handed
   to the steps downstream, which ran a bundle of nothing each, with a DoFn
   deserialized, inspected, set up and torn down for it (Beam's watermark
   manager already ignores empty bundles, as Beam's Java DirectRunner does:
   ``schedule_consumers``). Beam adds input from its roots (the next
   Pub/Sub pull) only once every step has finished its bundle, so a tweet
   waited up to two whole cycles; here the next pull starts as soon as a
   thread is free (``_MonitorTask._add_work_if_necessary``). Bundles waiting
   at a stateful step ran newest first (``deque.pop``); here first come,
   first served (``_SerialEvaluationState``).
3. **DoFn copies and inspection**: each bundle of a step runs on a fresh copy
   of its DoFn (``pickler.roundtrip`` in ``_ParDoEvaluator.start_bundle``);
   here the DoFn is serialized once per step and each copy only
   deserialized, as Beam's own TODO there suggests. ``userstate.get_dofn_specs``
   is computed once per DoFn class, or, for DoFns whose answer depends on the
   instance (``beam.Map``'s wrapper, ``with_exception_handling``'s), once per
   step's DoFn and its copies, instead of three to five times per bundle and step.

Each patch first checks that Beam's code is the code it was written against
(a hash of its source, ``EXPECTED``) and raises ``BeamChanged`` otherwise,
naming ``--direct_optimizations=off``, which runs Beam's DirectRunner as it
ships (and acknowledges on pull). Measured figures: docs/architecture.md.
"""

import contextlib
import datetime
import hashlib
import inspect
import itertools
import logging
import threading
import time
import types
import weakref
from typing import NamedTuple, Optional

_LOG = logging.getLogger(__name__)

DEFAULT_THREADS = 2
DEFAULT_MAX_MESSAGES = 1000
ACK_ID_ATTRIBUTE = "x-bertstream-ack-id"
# A pull that returns this many messages means more are waiting (the emulator
# answers at most 100 a pull; Pub/Sub itself up to the 1000 asked for).
BACKLOG_PAGE = 50
DRAIN_BUDGET_SECONDS = 0.5
# How long an empty pull pauses the worker thread it runs on: the most it
# adds to a trickle's latency, and 1 / the idle pull rate.
IDLE_POLL_SECONDS = 0.1
PULL_DEADLINE_SECONDS = 0.5
MONITOR_WAIT_SECONDS = 0.005
IDLE_WORKER_POLL_SECONDS = 0.05

# sha256 (first 16 hex digits) of the source of each Beam function a patch
# replaces or relies on, as in apache-beam 2.77.0.
EXPECTED = {
    "runners.direct.transform_evaluator._PubSubReadEvaluator._read_from_pubsub":
        "88f18895e47e8a7f",
    "runners.direct.transform_evaluator._PubSubReadEvaluator._get_subscriber_client":
        "e6feeb415b201929",
    "runners.direct.executor._ExecutorServiceParallelExecutor._MonitorTask._should_shutdown":
        "d495932bcc1cbe61",
    "runners.direct.executor._ExecutorServiceParallelExecutor._MonitorTask.call":
        "1ee55554baa99876",
    "runners.direct.executor._ExecutorServiceParallelExecutor._MonitorTask."
    "_add_work_if_necessary": "9899e67c4b7b57e5",
    "runners.direct.executor._SerialEvaluationState._update_currently_evaluating":
        "ee2071ff91b08184",
    "runners.direct.executor._ExecutorServiceParallelExecutor.schedule_consumers":
        "5c15aecb5546afe6",
    "transforms.userstate.get_dofn_specs":
        "eeb36145d3115aa0",
    "runners.direct.transform_evaluator._ParDoEvaluator.start_bundle":
        "23c7e2f6f26f091d",
    "runners.direct.watermark_manager._TransformWatermarks.extract_transform_timers":
        "897adb07f063798e",
}


class BeamChanged(RuntimeError):
    """A patched Beam internal is not the code its patch was written against."""


def source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def check(name: str, obj) -> None:
    """Raises ``BeamChanged`` unless ``obj``'s source hashes to ``EXPECTED[name]``."""
    import apache_beam

    found = source_hash(obj)
    if found != EXPECTED[name]:
        raise BeamChanged(
            f"apache_beam {apache_beam.__version__}: {name} is not the code "
            f"runners/direct_runner.py patches (source sha256 {found}, expected "
            f"{EXPECTED[name]}); run with --direct_optimizations=off, or update the patch")


def _resolve(name: str):
    import importlib

    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("apache_beam." + ".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
            # What a patch replaced: check Beam's original, not the patch.
            obj = getattr(obj, "_bertstream_original", obj)
        return inspect.unwrap(obj)
    raise BeamChanged(f"apache_beam.{name} does not exist")


def check_all() -> None:
    """Checks every patched internal (the test suite runs this too)."""
    for name in EXPECTED:
        check(name, _resolve(name))


_installed: set[str] = set()
_lock = threading.Lock()


def install(threads: int = DEFAULT_THREADS, max_messages: int = DEFAULT_MAX_MESSAGES,
            lease_seconds: int = 60, budget=None) -> None:
    """Applies the patches to Beam's DirectRunner in this process (for
    pipelines started from now on). Raises ``BeamChanged`` before changing
    anything when Beam's code differs."""
    if threads < 1:
        raise ValueError("--direct_threads must be at least 1")
    with _lock:
        check_all()
        _patch_pubsub(max_messages, lease_seconds, budget)
        _patch_executor(threads)
        _patch_specs()


# --- 1. Pub/Sub pulls ---------------------------------------------------------------


class _PulledMessage(NamedTuple):
    """What ``_PubSubReadEvaluator._read_from_pubsub`` reads of a pulled
    message (``PubsubMessage._from_message``), as plain Python values: the
    client's proto-plus wrappers convert on every attribute read, which cost
    the job more of its Python time than parsing the tweets (a py-spy profile
    under load: docs/direct-runner.md)."""

    data: bytes
    attributes: dict
    message_id: str
    publish_time: Optional[datetime.datetime]
    ordering_key: str


class _PulledItem(NamedTuple):
    ack_id: str
    message: _PulledMessage


class _Pulled(NamedTuple):
    received_messages: list


def _received(item) -> _PulledItem:
    """A proto-plus ``ReceivedMessage`` as a ``_PulledItem``, read from its raw
    protobuf; its ack id also travels in the attributes (``ACK_ID_ATTRIBUTE``)."""
    raw = type(item).pb(item)
    message = raw.message
    attributes = dict(message.attributes)
    attributes[ACK_ID_ATTRIBUTE] = raw.ack_id
    published = None
    if message.HasField("publish_time"):
        stamp = message.publish_time
        published = datetime.datetime.fromtimestamp(
            stamp.seconds + stamp.nanos / 1e9, datetime.UTC)
    return _PulledItem(raw.ack_id, _PulledMessage(message.data, attributes, message.message_id,
                                                  published, message.ordering_key))


class _HoldingPuller:
    """A SubscriberClient whose ``pull`` gathers up to ``max_messages`` without
    waiting, and whose ``acknowledge`` does nothing (the graph acknowledges)."""

    def __init__(self, client, max_messages: int, lease_seconds: int, budget=None):
        self._client = client
        self._configured = max_messages
        self._lease = lease_seconds
        self._budget = budget  # transforms.budget.LatencyBudget

    def pull(self, subscription, max_messages=None, timeout=None, **kwargs):
        # What the latency target lets one bundle hold, at the model's cost
        # as this process measures it (transforms/budget.py).
        limit = (self._budget.bundle_limit(self._configured) if self._budget
                 else self._configured)
        # A short deadline, not Beam's 30 s long poll: a waiting pull holds a
        # DirectRunner thread, and with it every timer.
        response = self._pull(subscription, limit)
        received = response.received_messages
        if not received:
            time.sleep(IDLE_POLL_SECONDS)
            return response
        started = time.monotonic()
        last = len(received)
        # Drain only a backlog: while pulls come back (nearly) full.
        while (last >= BACKLOG_PAGE and len(received) < limit
               and time.monotonic() - started < DRAIN_BUDGET_SECONDS):
            more = self._pull(subscription, limit - len(received))
            last = len(more.received_messages)
            received.extend(more.received_messages)
        ack_ids = [r.ack_id for r in received]
        from transforms.pubsub import MAX_ACK_IDS_PER_CALL

        for i in range(0, len(ack_ids), MAX_ACK_IDS_PER_CALL):
            try:
                self._client.modify_ack_deadline(
                    subscription=subscription, ack_ids=ack_ids[i:i + MAX_ACK_IDS_PER_CALL],
                    ack_deadline_seconds=self._lease)
            except Exception as err:  # noqa: BLE001 - the subscription's deadline still holds
                _LOG.warning("extending the lease of %d messages failed: %s",
                             len(ack_ids[i:i + MAX_ACK_IDS_PER_CALL]), err)
        return _Pulled([_received(item) for item in received])

    def _pull(self, subscription: str, max_messages: int):
        from google.api_core import exceptions
        from google.pubsub_v1 import PullResponse

        try:
            return self._client.pull(subscription=subscription, max_messages=max_messages,
                                     timeout=PULL_DEADLINE_SECONDS)
        except exceptions.DeadlineExceeded:
            return PullResponse()

    def acknowledge(self, subscription, ack_ids, **kwargs):
        """Beam acknowledges right after the pull; AcknowledgeMessages does it
        once the tweets are in Redis."""

    def __getattr__(self, name):
        return getattr(self._client, name)


def _patch_pubsub(max_messages: int, lease_seconds: int, budget=None) -> None:
    from apache_beam.runners.direct import transform_evaluator as te

    base = getattr(te._PubSubReadEvaluator, "_bertstream_original", te._PubSubReadEvaluator)

    class _HoldingPullEvaluator(base):
        # An instance method shadowing Beam's classmethod: its only caller,
        # _read_from_pubsub, calls it through self.
        def _get_subscriber_client(self, transform):
            return _HoldingPuller(base._get_subscriber_client(transform), max_messages,
                                  lease_seconds, budget)

    _HoldingPullEvaluator._bertstream_original = base
    # TransformEvaluatorRegistry looks the evaluator up by this module-level
    # name each time a DirectRunner starts.
    te._PubSubReadEvaluator = _HoldingPullEvaluator
    _installed.add("pubsub")


# --- 2. Executor threads ------------------------------------------------------------


def _patch_executor(threads: int) -> None:
    from apache_beam.runners.direct import executor

    parallel = executor._ExecutorServiceParallelExecutor
    parallel.NUM_WORKERS = threads
    if "executor" in _installed:
        return
    monitor = parallel._MonitorTask
    should_shutdown, call = monitor._should_shutdown, monitor.call

    def _should_shutdown(self):
        if not self._is_executing():
            # A bundle's update is queued before its executor is deregistered,
            # so reading the queue after finding none running cannot miss it.
            if not self._executor.all_updates._queue.empty():
                return False
            # A round that fired timers leaves the roots' pending bundles (the
            # next Pub/Sub pull) for the next round; a timer bundle that ran
            # meanwhile on another thread and output nothing posts no update.
            if any(self._executor.node_to_pending_bundles.values()):
                return False
        return should_shutdown(self)

    def _call(self, state_sampler):
        service = self._executor.executor_service
        if len(service.workers) > 1 and service.queue.empty():  # no bundle waits for a thread
            updates = self._executor.all_updates._queue
            with updates.not_empty:
                if not updates._qsize():
                    updates.not_empty.wait(MONITOR_WAIT_SECONDS)
        return call(self, state_sampler)

    add_work = monitor._add_work_if_necessary
    from apache_beam.runners.direct.direct_runner import _DirectReadFromPubSub

    def _add_work_if_necessary(self, timers_fired):
        if timers_fired or not self._is_executing():
            return add_work(self, timers_fired)
        # Beam adds root input (the next Pub/Sub pull) only once every step
        # has finished its bundle: pull, parse, model, Redis, ack, then the
        # next pull. Here the next pull starts while later steps still run,
        # as long as a thread is free and that read is not already running.
        # Only the Pub/Sub read: a TestStream's events must stay in order.
        executor_ = self._executor
        running = executor_.transform_executor_services.executors
        if sum(not e.blocked for e in running) >= parallel.NUM_WORKERS:
            return None
        busy = {e._applied_ptransform for e in running}
        for node, bundles in list(executor_.node_to_pending_bundles.items()):
            if bundles and node not in busy and \
                    isinstance(node.transform, _DirectReadFromPubSub) and \
                    not executor_.evaluation_context.is_done(node):
                executor_.node_to_pending_bundles[node] = []
                for bundle in bundles:
                    executor_.schedule_consumption(node, bundle, [],
                                                   executor_.default_completion_callback)
        return None

    schedule_consumers = parallel.schedule_consumers

    def _schedule_consumers(self, committed_bundle):
        # The watermark manager never counted an empty bundle as pending
        # (watermark_manager._update_pending), so skipping it changes no
        # watermark; side inputs are filled before this, in handle_result.
        if committed_bundle.has_elements():
            schedule_consumers(self, committed_bundle)

    serial = executor._SerialEvaluationState
    update_serial = serial._update_currently_evaluating

    def _update_currently_evaluating(self, new_work, completed_work):
        # Beam takes the newest waiting bundle (deque.pop): once bundles queue
        # at a stateful step, the oldest wait longest. First come, first served.
        with self._lock:
            if new_work:
                self.serial_queue.append(new_work)
            if completed_work:
                assert self.currently_evaluating == completed_work
                self.currently_evaluating = None
            if self.serial_queue and not self.currently_evaluating:
                next_work = self.serial_queue.popleft()
                self.currently_evaluating = next_work
                executor._TransformEvaluationState.schedule(self, next_work)

    _should_shutdown.__wrapped__ = should_shutdown
    _call.__wrapped__ = call
    _add_work_if_necessary.__wrapped__ = add_work
    _update_currently_evaluating.__wrapped__ = update_serial
    _schedule_consumers.__wrapped__ = schedule_consumers
    parallel.schedule_consumers = _schedule_consumers
    monitor._should_shutdown = _should_shutdown
    monitor.call = _call
    monitor._add_work_if_necessary = _add_work_if_necessary
    serial._update_currently_evaluating = _update_currently_evaluating
    executor._ExecutorService._ExecutorServiceWorker.TIMEOUT = IDLE_WORKER_POLL_SECONDS
    _patch_timer_extraction()
    _installed.add("executor")


def _patch_timer_extraction() -> None:
    """Beam's method, iterating over a snapshot of the per-key states: a
    bundle of another thread commits new keys into the same dict (under the
    evaluation context's lock, not this one). ``list(dict.items())`` copies
    without running Python code, so the GIL makes the copy atomic."""
    from apache_beam.runners.direct import watermark_manager

    transform_watermarks = watermark_manager._TransformWatermarks
    original = transform_watermarks.extract_transform_timers
    TimerFiring = watermark_manager.TimerFiring

    def extract_transform_timers(self):
        with self._lock:
            fired_timers = []
            has_realtime_timer = False
            for encoded_key, state in list(self._keyed_states.items()):
                timers, had_realtime_timer = state.get_timers(
                    watermark=self._input_watermark, processing_time=self._clock.time())
                has_realtime_timer = has_realtime_timer or had_realtime_timer
                for window, (name, time_domain, timestamp, dynamic_timer_tag) in timers:
                    fired_timers.append(TimerFiring(encoded_key, window, name, time_domain,
                                                    timestamp,
                                                    dynamic_timer_tag=dynamic_timer_tag))
            self._fired_timers.update(fired_timers)
            return fired_timers, has_realtime_timer

    extract_transform_timers.__wrapped__ = original
    transform_watermarks.extract_transform_timers = extract_transform_timers


# --- 3. DoFn copies and inspection ----------------------------------------------------

_ELIGIBLE: dict[type, bool] = {}
# A DoFn copy's attribute: the token of the bytes it was deserialized from.
_ORIGIN = "_bertstream_origin"


def _class_key(dofn):
    """A key that fixes ``get_dofn_specs(dofn)``, or None when the instance
    could change the answer (beam.Map's wrapper inspects the wrapped
    callable; with_exception_handling's binds ``process`` per instance)."""
    cls = type(dofn)
    eligible = _ELIGIBLE.get(cls)
    if eligible is None:
        eligible = _ELIGIBLE[cls] = (
            cls.__getattribute__ is object.__getattribute__
            and not hasattr(cls, "__getattr__")
            and not any(name.startswith("_inspect_") for name in dir(cls)))
    if not eligible or any(isinstance(v, types.MethodType) for v in vars(dofn).values()):
        return None
    return cls


class _SerializedOnce:
    """Stands in for ``apache_beam.internal.pickler`` in Beam's
    transform_evaluator, whose one use of it is ``roundtrip`` of a step's DoFn
    at the start of every bundle (a fresh copy per bundle: bundles of a step
    run concurrently). The DoFn is serialized once; each copy is deserialized
    from those bytes and carries their token, which keys its inspection (a
    token is never reused, unlike an id)."""

    def __init__(self, pickler):
        self._pickler = pickler
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        # id(step's DoFn) -> (weak reference to it, its bytes, their token)
        self._serialized: dict[int, tuple[weakref.ref, bytes, int]] = {}

    def roundtrip(self, obj):
        with self._lock:
            entry = self._serialized.get(id(obj))
            if entry is None or entry[0]() is not obj:
                entry = None
        if entry is None:
            entry = (weakref.ref(obj), self._pickler.dumps(obj), next(self._tokens))
            with self._lock:
                # A new step: forget those whose DoFn is gone (an earlier pipeline's).
                self._serialized = {k: v for k, v in self._serialized.items()
                                    if v[0]() is not None}
                self._serialized[id(obj)] = entry
        copy = self._pickler.loads(entry[1])
        with contextlib.suppress(TypeError):  # no __dict__: inspected as Beam does
            vars(copy)[_ORIGIN] = entry[2]
        return copy

    def token_of(self, dofn) -> Optional[int]:
        """The token of the bytes ``dofn`` is, or was copied from; None when unknown."""
        try:
            token = vars(dofn).get(_ORIGIN)
        except TypeError:
            return None
        if token is not None:
            return token
        with self._lock:
            entry = self._serialized.get(id(dofn))
        return entry[2] if entry is not None and entry[0]() is dofn else None

    def __getattr__(self, name):
        return getattr(self._pickler, name)


_serialized_once: Optional[_SerializedOnce] = None


def _specs_key(dofn):
    key = _class_key(dofn)
    if key is not None or _serialized_once is None:
        return key
    token = _serialized_once.token_of(dofn)
    return None if token is None else ("serialized", token)


def _patch_specs() -> None:
    if "specs" in _installed:
        return
    global _serialized_once
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    _serialized_once = _SerializedOnce(transform_evaluator.pickler)
    transform_evaluator.pickler = _serialized_once
    original = userstate.get_dofn_specs
    cache: dict = {}
    lock = threading.Lock()

    def get_dofn_specs(dofn):
        key = _specs_key(dofn)
        if key is None:
            return original(dofn)
        with lock:
            found = cache.get(key)
        if found is None:
            found = original(dofn)  # raises for an invalid DoFn, every time
            with lock:
                cache[key] = found
        state_specs, timer_specs = found
        return set(state_specs), set(timer_specs)  # callers get their own sets

    get_dofn_specs.__wrapped__ = original
    userstate.get_dofn_specs = get_dofn_specs
    if getattr(transform_evaluator, "get_dofn_specs", None) is original:
        transform_evaluator.get_dofn_specs = get_dofn_specs
    _installed.add("specs")
