"""The graph, top to bottom: read -> parse -> dedupe -> infer -> window -> Redis -> ack.

``run(argv)`` is what ``python -m pipeline`` calls; tests pass a
``TestPipeline`` to build the very same graph. What differs per runner is
decided once, in ``runners/profiles.py`` (see docs/architecture.md).
"""

import hashlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.transforms import window

from pipeline.options import SAMPLE_TWEETS, BertstreamOptions
from runners import profiles
from runners.direct_runner import ACK_ID_ATTRIBUTE
from transforms.dedupe import DedupeByTweetId
from transforms.inference import RunSentiment, TokenCounter, local_handler
from transforms.parse import ParseTweets
from transforms.pubsub import (
    AcknowledgeMessages,
    PullFromPubSub,
    envelope,
    subscription_for_topic,
)
from transforms.records import Envelope
from transforms.redis_sink import CountInRedis, WriteDeadLetters, WriteToRedis
from transforms.windowing import WindowByEventTime

_LOG = logging.getLogger(__name__)


def read_lines(path: str) -> Iterator[Envelope]:
    """An ``Envelope`` for every non-blank line, undecoded (bad bytes must
    reach ParseTweets, which dead-letters them with a reason).

    Source ids are ``PATH@<content sha256, 16 hex>:LINE``: a path is reused
    with new content whenever a file is edited, so the content names the
    input, and an unchanged file read again has the same ids (its dead letters
    are not written twice)."""
    digest = hashlib.sha256()
    with beam.io.filesystems.FileSystems.open(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    scope = f"{path}@{digest.hexdigest()[:16]}"
    with beam.io.filesystems.FileSystems.open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield Envelope(f"{scope}:{number}", line)


def envelope_of(message, scope: str = "") -> Envelope:
    """A Beam ``PubsubMessage`` (native or cross-language read) as an ``Envelope``
    read from ``scope`` (the subscription or topic); on the adjusted
    DirectRunner its ack id travels in an attribute."""
    attributes = dict(message.attributes or {})
    ack_id = attributes.pop(ACK_ID_ATTRIBUTE, "")
    published = getattr(message, "publish_time", None)
    return envelope(message.message_id, message.data, attributes, ack_id,
                    published.timestamp() if published else None, scope)


class ReadTweets(beam.PTransform):
    """``Envelope``s from Pub/Sub or a JSONL file.

    Pub/Sub messages carry their event time in the ``event_ts`` attribute;
    how they are read depends on the runner (``runners/profiles.py``).
    """

    def __init__(self, options: BertstreamOptions, profile: profiles.RunnerProfile,
                 subscription: Optional[str] = None):
        super().__init__()
        self._o = options
        self._profile = profile
        self._subscription = subscription or options.input_subscription

    def expand(self, p):
        o = self._o
        if not o.is_pubsub:
            return (p | "InputFile" >> beam.Create([o.input_file or str(SAMPLE_TWEETS)])
                    | "ReadLines" >> beam.FlatMap(read_lines).with_output_types(Envelope))
        if self._profile.pubsub_read == profiles.PULL:
            return p | "PullPubSub" >> PullFromPubSub(
                self._subscription, lease_seconds=o.pubsub_lease_seconds,
                emulator_host=o.pubsub_emulator_host, budget=o.latency_budget())
        if self._profile.pubsub_read == profiles.XLANG:
            from apache_beam.io.external.gcp.pubsub import ReadFromPubSub as XlangRead

            read = XlangRead(topic=o.input_topic, subscription=o.input_subscription,
                             with_attributes=True, timestamp_attribute="event_ts",
                             id_label="tweet_id", expansion_service=self._expansion_service())
        else:  # Beam's own read, as the runner implements it
            topic = None if self._subscription else o.input_topic
            read = beam.io.ReadFromPubSub(
                topic=topic, subscription=self._subscription, with_attributes=True,
                timestamp_attribute="event_ts", id_label=self._profile.id_label)
        scope = self._subscription or o.input_topic
        return (p | "ReadPubSub" >> read
                | "MessageBytes" >> beam.Map(envelope_of, scope).with_output_types(Envelope))

    # Beam's own key for the GCP expansion service in --beam_services.
    GCP_EXPANSION_TARGET = ":sdks:java:io:google-cloud-platform:expansion-service:shadowJar"

    def _expansion_service(self):
        """The Java expansion service for the cross-language read: the
        ``--beam_services`` entry for Beam's GCP expansion service (``HOST:PORT``
        of a running one, as ``python -m launcher flink`` passes, or a jar),
        else Beam's default, which downloads the released jar."""
        from apache_beam.options.pipeline_options import CrossLanguageOptions
        from apache_beam.transforms.external import (
            BeamJarExpansionService,
            JavaJarExpansionService,
        )

        target = self.GCP_EXPANSION_TARGET
        given = (self._o.view_as(CrossLanguageOptions).beam_services or {}).get(target)
        if given and given.endswith(".jar"):
            return JavaJarExpansionService(given)
        return given or BeamJarExpansionService(target)


def model_handler(o: BertstreamOptions):
    if o.inference == "tfserving":
        from transforms.tfserving import tfserving_handler

        return tfserving_handler(o.tfserving_config())
    return local_handler(o.model_dir, o.model_signature, o.model_reload_seconds, o.rollout())


class Outputs(NamedTuple):
    results: beam.PCollection
    dead_letters: beam.PCollection


def build(p: beam.Pipeline, o: BertstreamOptions, handler=None) -> Outputs:
    """Adds the whole job to ``p``. ``handler`` overrides the model handler (tests)."""
    profile = profile_of(o)
    profile.install(o)
    subscription = o.input_subscription
    if o.input_topic and profile.acknowledges_in_graph:
        subscription = subscription_for_topic(o.input_topic)
    raw = p | "ReadTweets" >> ReadTweets(o, profile, subscription)
    # How many inputs came in (per bundle; a retried bundle counts twice): with the
    # ends the sink counts, it tells when nothing is in flight (--stop_after_idle_seconds).
    raw | "CountInputs" >> CountInRedis(o.redis_config(), "inputs")
    parsed = raw | "ParseTweets" >> ParseTweets(timestamp_from_created_at=not o.is_pubsub)
    deduped = parsed.tweets | "DedupeByTweetId" >> DedupeByTweetId(
        o.dedupe_ttl_seconds,
        redis_config=o.redis_config() if profile.dedupe == profiles.IN_REDIS else None,
        claim_seconds=o.pubsub_lease_seconds // 2)
    by_event_time = WindowByEventTime(o.window_seconds, o.allowed_lateness_seconds,
                                      profile.late_shards)
    score = RunSentiment(handler or model_handler(o), o.max_batch_size,
                         TokenCounter.for_model(o.model_dir), o.latency_budget())
    # Batches form in processing time, across windows, whatever the event-time
    # density (RunSentiment batches in the global window); each result carries
    # the window of its event time, marked before or after inference as the
    # runner profile says.
    if profile.windows_before_inference:
        windowed = deduped.tweets | "WindowByEventTime" >> by_event_time
        results, inference_dead = windowed | "RunSentiment" >> score
    else:
        scored, inference_dead = deduped.tweets | "RunSentiment" >> score
        results = scored | "WindowByEventTime" >> by_event_time
    written = results | "WriteToRedis" >> WriteToRedis(o.redis_config())
    # Dead letters come from differently windowed stages; the sink ignores windows.
    dead = ([pc | f"{name}Global" >> beam.WindowInto(window.GlobalWindows())
             for name, pc in (("ParseDeadLetters", parsed.dead_letter),
                              ("InferenceDeadLetters", inference_dead),
                              ("SinkDeadLetters", written.dead_letters))]
            | "AllDeadLetters" >> beam.Flatten())
    dead_written = dead | "WriteDeadLetters" >> WriteDeadLetters(o.redis_config())
    deduped.skipped | "CountDuplicates" >> CountInRedis(o.redis_config(), "duplicates_skipped")
    if o.is_pubsub and profile.acknowledges_in_graph:
        # Every input's end (written, dead-lettered, skipped as a copy) is
        # acknowledged only now: a job killed before loses nothing.
        ([pc | f"{name}Global" >> beam.WindowInto(window.GlobalWindows())
          for name, pc in (("ResultAcks", written.acks), ("DeadLetterAcks", dead_written),
                           ("SkippedAcks", deduped.skipped),
                           ("AlreadyWrittenAcks", deduped.already_written))]
         | "AllEnds" >> beam.Flatten()
         | "AcknowledgeMessages" >> AcknowledgeMessages(subscription, o.pubsub_emulator_host))
    return Outputs(results, dead)


def make_options(argv: Optional[list[str]]) -> BertstreamOptions:
    """Parses and checks the flags, with the runner profile's own flags added."""
    argv = list(argv or [])
    first = BertstreamOptions(argv).view_as(BertstreamOptions)
    first.validate_flags()
    o = BertstreamOptions(argv + profile_of(first).flags(argv)).view_as(BertstreamOptions)
    o.apply_implied()
    if "dataflow" in profiles.runner_name(o).lower() and not o.view_as(GoogleCloudOptions).project:
        raise ValueError("--project is required on Dataflow")
    return o


def profile_of(o: BertstreamOptions) -> profiles.RunnerProfile:
    parallelism = o.get_all_options(retain_unknown_options=True).get("parallelism") or 1
    return profiles.profile_for(o, o.is_pubsub, int(parallelism), o.pubsub_read,
                               o.direct_optimizations)


def run(argv: Optional[list[str]] = None, test_pipeline: Optional[beam.Pipeline] = None,
        handler=None, options: Optional[BertstreamOptions] = None):
    """Builds and runs the job; returns ``(PipelineResult, seconds)``.

    With a Pub/Sub source the job runs until it is cancelled: Ctrl-C (SIGINT)
    or SIGTERM (what Kubernetes sends) cancel it cleanly and return.
    """
    o = options or make_options(argv)
    p = test_pipeline or beam.Pipeline(options=o)
    build(p, o, handler)
    started = time.monotonic()
    result = p.run()
    if test_pipeline is None:
        wait_or_cancel(result)
    return result, time.monotonic() - started


def wait_or_cancel(result, idle=None, cancel_timeout_s: float = 60.0) -> None:
    """Waits for the job to end; on SIGINT or SIGTERM, or once ``idle()`` (a
    check made every second) says the input has run dry, cancels it and waits
    for the runner to say it ended.

    Beam's portable runners stop their job server on SIGINT before the
    program hears of it, so the job could not be cancelled any more; these
    handlers, installed once the job runs, replace that.
    """
    from apache_beam.runners.runner import PipelineState

    finished = threading.Event()
    failure: list[BaseException] = []

    def wait():
        try:
            result.wait_until_finish()
        except Exception as err:  # noqa: BLE001 - re-raised in the main thread
            failure.append(err)
        finally:
            finished.set()

    stop = threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    threading.Thread(target=wait, name="bertstream-wait", daemon=True).start()
    checked = time.monotonic()
    try:
        while not finished.wait(0.2):
            if idle is not None and time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if idle():
                    _LOG.info("no new input for %.0f s: stopping", idle.seconds)
                    stop.set()
            if stop.is_set():
                _LOG.info("stopping: cancelling the job")
                try:
                    result.cancel()
                except (NotImplementedError, RuntimeError, ValueError) as err:
                    _LOG.warning("cancel: %s", err)
                # Beam's DirectRunner says CANCELLED but never returns from
                # wait_until_finish: watch the state too.
                deadline = time.monotonic() + cancel_timeout_s
                while not finished.wait(0.2) and not PipelineState.is_terminal(result.state):
                    if time.monotonic() > deadline:
                        _LOG.warning("the job did not end within %.0f s of cancelling",
                                     cancel_timeout_s)
                        break
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failure and not (stop.is_set() and result.state == PipelineState.CANCELLED):
        raise failure[0]
