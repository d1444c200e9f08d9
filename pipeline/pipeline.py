"""The graph, top to bottom: read -> parse -> dedupe -> window -> infer -> Redis.

``run(argv)`` is what ``python -m pipeline`` calls; tests pass a
``TestPipeline`` to build the very same graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions
from apache_beam.transforms import window

from pipeline import direct_executor, direct_pubsub, direct_specs
from pipeline.options import SAMPLE_TWEETS, BertstreamOptions
from transforms.dedupe import REPLAY_PREFIX, DedupeByTweetId
from transforms.inference import RunSentiment, TokenCounter, local_handler
from transforms.parse import ParseTweets
from transforms.redis_sink import WriteDeadLetters, WriteToRedis
from transforms.windowing import WindowByEventTime

_LOG = logging.getLogger(__name__)


def read_lines(path: str) -> Iterator[tuple[str, bytes]]:
    """``(FILE:LINE, bytes)`` for every non-blank line, undecoded (bad bytes
    must reach ParseTweets, which dead-letters them with a reason)."""
    with beam.io.filesystems.FileSystems.open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield f"{path}:{number}", line


def _pubsub_message(message) -> tuple[str, bytes]:
    attributes = message.attributes or {}
    source_id = f"pubsub:{message.message_id or attributes.get('tweet_id') or ''}"
    if attributes.get("replay"):  # set by pipeline.replay_deadletter
        source_id = f"{REPLAY_PREFIX}{attributes['replay']}/{source_id}"
    return source_id, message.data


class ReadTweets(beam.PTransform):
    """Raw ``(source_id, bytes)`` from Pub/Sub or a JSONL file.

    Pub/Sub messages carry their event time in the ``event_ts`` attribute;
    ``tweet_id`` is the dedupe ``id_label`` on runners that honour it
    (Dataflow). On portable runners (Flink), where Python's native source
    does not run, Beam's cross-language Java source is used.
    """

    def __init__(self, options: BertstreamOptions):
        super().__init__()
        self._o = options

    def expand(self, p):
        o = self._o
        runner = (o.view_as(StandardOptions).runner or "").lower()
        on_direct = "direct" in runner or not runner
        if on_direct:
            # The job's timers put it on the bundle-based DirectRunner, which
            # inspects every DoFn at every bundle (inspect each class once)
            # and runs every bundle on one thread (give it more).
            direct_specs.install()
            direct_executor.install(o.direct_threads)
        if not o.is_pubsub:
            return (p | "InputFile" >> beam.Create([o.input_file or str(SAMPLE_TWEETS)])
                    | "ReadLines" >> beam.FlatMap(read_lines))
        if o.pubsub_read == "xlang" or (o.pubsub_read == "auto" and _is_portable(runner)):
            from apache_beam.io.external.gcp.pubsub import ReadFromPubSub as XlangRead

            read = XlangRead(topic=o.input_topic, subscription=o.input_subscription,
                             with_attributes=True, timestamp_attribute="event_ts",
                             id_label="tweet_id", expansion_service=self._expansion_service())
        else:
            if on_direct:
                direct_pubsub.install()  # larger bundles than Beam's 10 messages
            read = beam.io.ReadFromPubSub(
                topic=o.input_topic, subscription=o.input_subscription,
                with_attributes=True, timestamp_attribute="event_ts",
                # The DirectRunner refuses id_label; DedupeByTweetId covers it there.
                id_label="tweet_id" if "dataflow" in runner else None)
        return p | "ReadPubSub" >> read | "MessageBytes" >> beam.Map(_pubsub_message)

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


def _is_portable(runner: str) -> bool:
    return any(name in runner for name in ("flink", "portable", "spark", "prism"))


def model_handler(o: BertstreamOptions):
    if o.inference == "tfserving":
        from transforms.tfserving import tfserving_handler

        return tfserving_handler(o)
    return local_handler(o.model_dir, o.model_signature)


class Outputs(NamedTuple):
    results: beam.PCollection
    dead_letters: beam.PCollection


def build(p: beam.Pipeline, o: BertstreamOptions, handler=None) -> Outputs:
    """Adds the whole job to ``p``. ``handler`` overrides the model handler (tests)."""
    raw = p | "ReadTweets" >> ReadTweets(o)
    parsed = raw | "ParseTweets" >> ParseTweets(timestamp_from_created_at=not o.is_pubsub)
    tweets = (parsed.tweets
              | "DedupeByTweetId" >> DedupeByTweetId(o.dedupe_ttl_seconds)
              | "WindowByEventTime" >> WindowByEventTime(o.window_seconds,
                                                         o.allowed_lateness_seconds))
    results, inference_dead = tweets | "RunSentiment" >> RunSentiment(
        handler or model_handler(o), o.max_batch_size, o.max_batch_wait_seconds, o.buckets(),
        TokenCounter.for_model(o.model_dir))
    sink_dead = results | "WriteToRedis" >> WriteToRedis(o.redis_config())
    # Dead letters come from differently windowed stages; the sink ignores windows.
    dead = ([pc | f"{name}Global" >> beam.WindowInto(window.GlobalWindows())
             for name, pc in (("ParseDeadLetters", parsed.dead_letter),
                              ("InferenceDeadLetters", inference_dead),
                              ("SinkDeadLetters", sink_dead))]
            | "AllDeadLetters" >> beam.Flatten())
    dead | "WriteDeadLetters" >> WriteDeadLetters(o.redis_config())
    return Outputs(results, dead)


def make_options(argv: list[str] | None) -> BertstreamOptions:
    options = BertstreamOptions(argv)
    o = options.view_as(BertstreamOptions)
    o.validate_flags()
    o.apply_implied()
    runner = (o.view_as(StandardOptions).runner or "").lower()
    if "dataflow" in runner and not o.view_as(GoogleCloudOptions).project:
        raise ValueError("--project is required on Dataflow")
    return o


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None,
        handler=None):
    """Builds and runs the job; returns ``(PipelineResult, seconds)``.

    With a Pub/Sub source the job runs until it is cancelled (Ctrl-C).
    """
    o = make_options(argv)
    p = test_pipeline or beam.Pipeline(options=o)
    build(p, o, handler)
    started = time.monotonic()
    result = p.run()
    if test_pipeline is None:
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:
            _LOG.info("interrupted: cancelling the job")
            try:
                result.cancel()
            except (NotImplementedError, RuntimeError) as err:
                _LOG.warning("cancel: %s", err)
    return result, time.monotonic() - started
