"""Larger Pub/Sub pulls for the Python DirectRunner.

Beam's DirectRunner reads ``ReadFromPubSub`` through
``transform_evaluator._PubSubReadEvaluator``, which pulls at most 10 messages
per bundle (hard-coded in Beam 2.77) and acknowledges them at once. Every
bundle then crosses each ParDo of the job, and the DirectRunner pays a fixed
cost per bundle and ParDo (a pickle round trip of the DoFn, signature
inspection, setup and teardown). With 10-message bundles that fixed cost, not
the model, set the pace: 65 tweets/s with a 2-layer test model. It also cut
batches short: tweets already behind the watermark (a backlog) were flushed
by their window's timer after every 10-message bundle.

``--direct_pubsub_max_messages`` (default 1000, Pub/Sub's own cap on one
pull) makes one bundle hold up to that many messages: while pulls come back
nearly full (a backlog), further pulls follow and stop when the subscription
is drained, the limit is reached, or 0.5 s have passed.

Beam's pull also waits up to 30 s for a message, and Beam's DirectRunner has
a single worker thread (``--direct_threads`` gives it more, see
``pipeline/direct_executor.py``, but a waiting pull would still hold one of
them): while it waits, no timer fires, so the last partial
batches of a burst (or a lone tweet in a trickle) sat in state until the next
message came, up to 30 s (the latency benchmark's p99 was 31 s for that
alone). Here an empty subscription is polled instead: a pull that returns at
once, then a pause of ``IDLE_POLL_SECONDS`` before the runner's loop (and its
timers) comes round again. Beam's parsing of the
messages, its event-time attribute handling and its acknowledgement stay as
they are; only the client it pulls through is wrapped. 10 restores Beam's
behaviour.

Beam's evaluator also acknowledges what it pulled before the bundle is
processed, so a killed job loses what it had pulled; with 1000-message
bundles that would be a lot. The same wrapper therefore turns its
``acknowledge`` into a hold (``--direct_pubsub_ack on_write``, the default):
``transforms/acks.py`` leases the messages and acknowledges each one when its
result or dead letter is in Redis, or its duplicate was skipped.
``--direct_pubsub_ack on_pull`` is Beam's behaviour. Dataflow and Flink do
not use this evaluator and are not affected.
"""

from __future__ import annotations

import logging
import time

from transforms import acks

_LOG = logging.getLogger(__name__)
DEFAULT_MAX_MESSAGES = 1000
DRAIN_BUDGET_SECONDS = 0.5
# A pull that returns this many messages means more are waiting (the emulator
# answers at most 100 a pull; Pub/Sub itself up to the 1000 asked for).
BACKLOG_PAGE = 50
# How long an empty pull pauses the DirectRunner worker thread it runs on: the
# most it adds to a trickle's latency, and 1 / the idle pull rate.
IDLE_POLL_SECONDS = 0.1
_installed = False


class PullStats:
    """For benchmarks: when this process's first message arrived (``time.time()``)."""

    first_message_at: float | None = None

    @classmethod
    def reset(cls) -> None:
        cls.first_message_at = None


class _DrainingPuller:
    """A SubscriberClient whose ``pull`` gathers up to ``max_messages``."""

    def __init__(self, client, max_messages: int, budget_seconds: float = DRAIN_BUDGET_SECONDS,
                 hold: bool = True, idle_seconds: float = IDLE_POLL_SECONDS):
        self._client = client
        self._max = max_messages
        self._budget = budget_seconds
        self._hold = hold
        self._idle = idle_seconds

    def pull(self, subscription, max_messages=None, timeout=None, **kwargs):
        kwargs.pop("return_immediately", None)
        # Not a long poll: it would hold a DirectRunner thread (with Beam's
        # one, every timer too; see the module docstring). Not a short RPC
        # deadline either: the emulator may hand messages to a pull the
        # client gave up on, and they would come back only after their ack
        # deadline.
        response = self._client.pull(subscription=subscription, max_messages=self._max,
                                     return_immediately=True, timeout=timeout, **kwargs)
        received = response.received_messages
        if not received:
            time.sleep(self._idle)
            return response
        started = time.monotonic()
        last = len(received)
        # Drain only a backlog: while pulls come back (nearly) full. A live
        # trickle is handed on as it comes, so draining adds no latency and
        # no stream of empty-handed pulls against the server.
        while (last >= BACKLOG_PAGE and len(received) < self._max
               and time.monotonic() - started < self._budget):
            more = self._client.pull(subscription=subscription,
                                     max_messages=self._max - len(received),
                                     return_immediately=True, timeout=timeout)
            last = len(more.received_messages)
            received.extend(more.received_messages)
        if received and PullStats.first_message_at is None:
            PullStats.first_message_at = time.time()
        if self._hold:
            acks.TRACKER.hold(self._client, subscription, received)
        return response

    def acknowledge(self, subscription, ack_ids, **kwargs):
        """Beam acknowledges right after the pull; held messages are
        acknowledged by ``transforms.acks`` once they reach Redis."""
        if not self._hold:
            self._client.acknowledge(subscription=subscription, ack_ids=ack_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def _configured(evaluation_context) -> tuple[int, bool]:
    """(messages per bundle, whether to hold acknowledgements)."""
    from pipeline.options import BertstreamOptions

    options = getattr(evaluation_context, "pipeline_options", None)
    if options is None:
        return DEFAULT_MAX_MESSAGES, True
    o = options.view_as(BertstreamOptions)
    return o.direct_pubsub_max_messages, o.direct_pubsub_ack == "on_write"


def install() -> bool:
    """Makes DirectRunners created from now on pull up to the configured
    number of messages per bundle. Idempotent; returns False (and logs) when
    this Beam version's DirectRunner no longer has the evaluator it wraps."""
    global _installed
    if _installed:
        return True
    try:
        from apache_beam.runners.direct import transform_evaluator as te

        base = te._PubSubReadEvaluator
        base._get_subscriber_client  # noqa: B018 - the hook this relies on
    except (ImportError, AttributeError) as err:
        _LOG.warning("DirectRunner Pub/Sub pulls left at Beam's default: %s", err)
        return False

    class _LargerPullEvaluator(base):
        def __init__(self, evaluation_context, *args, **kwargs):
            super().__init__(evaluation_context, *args, **kwargs)
            self._max_messages, self._hold = _configured(evaluation_context)

        # An instance method shadowing Beam's classmethod: its only caller,
        # _read_from_pubsub, calls it through self.
        def _get_subscriber_client(self, transform):
            return _DrainingPuller(base._get_subscriber_client(transform), self._max_messages,
                                   hold=self._hold)

    # TransformEvaluatorRegistry looks the evaluator up by this module-level
    # name each time a DirectRunner starts.
    te._PubSubReadEvaluator = _LargerPullEvaluator
    _installed = True
    return True
