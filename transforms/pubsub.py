"""Pub/Sub in and out of the graph: ``PullFromPubSub`` and ``AcknowledgeMessages``.

``PullFromPubSub`` is an unbounded splittable DoFn that pulls a subscription
with the Pub/Sub client. It runs on any portable runner that executes
Python SDFs (Prism, the local streaming runner, does); Beam's own Python
``ReadFromPubSub`` runs only on Dataflow and the legacy DirectRunner, and
acknowledges what it pulls before the tweets are scored.

This source does not acknowledge: each ``Envelope`` carries its message's
``ack_id``, and ``AcknowledgeMessages``, the graph's last step, acknowledges
a message once its tweet has reached an end (its result or dead letter is in
Redis, or it was skipped as a duplicate). A job killed in between loses
nothing: Pub/Sub redelivers what was not acknowledged once its lease ends,
and the Redis sink writes each tweet once. Each pull extends its messages'
ack deadline to ``lease_seconds`` (at most Pub/Sub's 600), so a backlog that
takes longer than that to score is redelivered, and the copies are counted
as duplicates.

The watermark: after a pull, the oldest event time in it (never later than
now); after an empty pull, now less ``idle_slack_seconds``. Pub/Sub does not
order messages, so a tweet older than the watermark when it arrives is late,
which ``WindowByEventTime`` counts.
"""

import datetime as dt
import logging
import time
import uuid

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from bertstream.config import per_process
from transforms.budget import LatencyBudget
from transforms.dedupe import REPLAY_PREFIX
from transforms.records import Envelope, iso_from_seconds, seconds_from_iso

_LOG = logging.getLogger(__name__)

EVENT_TIME_ATTRIBUTE = "event_ts"
SOURCE_PREFIX = "pubsub:"
MAX_ACK_IDS_PER_CALL = 1000  # Pub/Sub's limit per Acknowledge / ModifyAckDeadline
DEFAULT_LEASE_SECONDS = 60
MAX_LEASE_SECONDS = 600
IDLE_PAUSE_SECONDS = 0.25
# A pull that returns fewer messages than this drained what was waiting (the
# emulator returns at most 100 per pull, Pub/Sub a few hundred).
FULL_PULL = 100
_ENDLESS = 2**62


def event_seconds(attributes, publish_seconds: float) -> float:
    """A message's event time: its ``event_ts`` attribute (RFC 3339 or epoch
    milliseconds), else its publish time. Raises ValueError when the
    attribute is there but unreadable."""
    value = attributes.get(EVENT_TIME_ATTRIBUTE) if attributes else None
    if not value:
        return publish_seconds
    if value.isdigit():
        return int(value) / 1000.0
    return seconds_from_iso(value)


def envelope(message_id: str, data: bytes, attributes, ack_id: str = "",
             published_seconds: float | None = None, scope: str = "") -> Envelope:
    """A Pub/Sub message as an ``Envelope``.

    Its source id names the message as only a redelivery of it can:
    ``pubsub:<scope>/<message id>@<publish time>``, where ``scope`` is the
    subscription (or topic) it was read from. Message ids alone repeat: an
    emulator numbers them from 1 again after a restart, and two topics can
    share ids; the publish time (kept by Pub/Sub across redeliveries) and the
    scope tell such messages apart. The dead-letter sink's once-key hashes
    this id with the message's bytes (docs/reliability.md). A replayed dead
    letter (``replay`` attribute, set by ``ops.replay_deadletter``) is
    prefixed by the entry it replays.
    """
    attributes = attributes or {}
    published = iso_from_seconds(published_seconds) if published_seconds is not None else ""
    source_id = (SOURCE_PREFIX + (f"{scope}/" if scope else "")
                 + str(message_id or attributes.get("tweet_id") or "")
                 + (f"@{published}" if published else ""))
    if attributes.get("replay"):
        source_id = f"{REPLAY_PREFIX}{attributes['replay']}/{source_id}"
    return Envelope(source_id, bytes(data), ack_id, published)


class _Endless(RestrictionProvider):
    """One restriction per subscription that never ends: each pull claims
    the next position, then the rest is deferred to the runner."""

    def initial_restriction(self, element):
        return OffsetRange(0, _ENDLESS)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return 1

    def split(self, element, restriction):
        yield restriction

    def truncate(self, element, restriction):
        return None  # on drain: stop pulling


def subscriber_client(emulator_host: str | None = None):
    """A Pub/Sub subscriber client: Google's, or the emulator's at
    ``emulator_host`` (``HOST:PORT``, plain gRPC, no credentials)."""
    from google.cloud import pubsub_v1

    if not emulator_host:
        return pubsub_v1.SubscriberClient()
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    return pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(emulator_host)))


def shared_subscriber(emulator_host: str | None = None):
    """The process's one ``subscriber_client(emulator_host)``, for the job's
    DoFns; its users do not close it. A gRPC channel serves concurrent calls.
    Beam's legacy DirectRunner sets every DoFn up and tears it down around each
    bundle: a client per instance cost each bundle of the acknowledging step a
    new channel and client, 7 % of the job's Python time under load (py-spy,
    docs/benchmarks.md)."""
    return per_process(("pubsub-subscriber", emulator_host),
                       lambda: subscriber_client(emulator_host))


class _SubscriberFn(beam.DoFn):
    """A DoFn with the process's Pub/Sub subscriber client (``shared_subscriber``).

    ``emulator_host`` travels with the job (``--pubsub_emulator_host``): the
    SDK workers of a cluster do not share the submitter's environment, so
    ``PUBSUB_EMULATOR_HOST`` there may be unset or another's."""

    _client = None
    _emulator_host: str | None = None

    def setup(self):
        self._client = shared_subscriber(self._emulator_host)


class _PullFn(_SubscriberFn):
    def __init__(self, max_messages: int, poll_seconds: float, lease_seconds: int,
                 idle_slack_seconds: float, drain_seconds: float = 0.5,
                 emulator_host: str | None = None, budget: LatencyBudget | None = None):
        self._emulator_host = emulator_host
        self._max_messages = max_messages
        self._budget = budget
        self._poll_seconds = poll_seconds
        self._lease_seconds = lease_seconds
        self._idle_slack = idle_slack_seconds
        self._drain_seconds = drain_seconds
        self._pulled = Metrics.counter("ReadTweets", "pulled")
        self._pulls = Metrics.counter("ReadTweets", "pulls")

    @beam.DoFn.unbounded_per_element()
    def process(self, subscription: str,
                tracker=beam.DoFn.RestrictionParam(_Endless()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        position = tracker.current_restriction().start
        if not tracker.try_claim(position):
            return
        # One call drains what is waiting, up to max_messages or drain_seconds:
        # a pull returns at most a few hundred messages (the emulator: 100),
        # and a portable runner resumes the deferred remainder only in its
        # next bundle (Flink: a timer, then up to its bundle time), so one
        # pull per call capped a backlog at a few hundred tweets/s there.
        started = time.monotonic()
        total = 0
        oldest = time.time() - self._idle_slack
        # What the latency target lets one bundle hold, at the model's
        # measured cost in this worker (transforms/budget.py).
        limit = (self._budget.bundle_limit(self._max_messages) if self._budget
                 else self._max_messages)
        while total < limit:
            # The first pull waits up to poll_seconds for a first message (a
            # long poll, not a spin); the next ones only for what is waiting.
            remaining = self._drain_seconds - (time.monotonic() - started)
            if total and remaining <= 0:
                break
            received = self._pull(subscription, limit - total,
                                  min(self._poll_seconds, remaining) if total
                                  else self._poll_seconds)
            if not received:
                break
            total += len(received)
            # A short pull means nothing more waits: emit now rather than wait
            # out drain_seconds (a live stream's latency).
            drained = len(received) < FULL_PULL
            now = time.time()
            self._extend(subscription, [r.ack_id for r in received])
            for item in received:
                message = item.message
                published = message.publish_time.timestamp() if message.publish_time else now
                try:
                    seconds = event_seconds(message.attributes, published)
                except ValueError:
                    # ParseTweets dead-letters the message; keep its publish time.
                    seconds = published
                oldest = min(oldest, seconds)
                yield beam.window.TimestampedValue(
                    envelope(message.message_id, message.data, message.attributes,
                             item.ack_id, published, subscription), seconds)
            if drained:
                break
        self._pulled.inc(total)
        candidate = Timestamp.of(min(oldest, time.time()))
        current = watermark.current_watermark()
        if current is None or candidate > current:
            watermark.set_watermark(candidate)
        # Pub/Sub waits for a first message up to the deadline; the emulator
        # answers an empty pull at once, so an idle source pauses here.
        tracker.defer_remainder(Duration.of(0 if total else IDLE_PAUSE_SECONDS))

    def _pull(self, subscription: str, max_messages: int, timeout: float) -> list:
        from google.api_core import exceptions

        self._pulls.inc()
        try:
            response = self._client.pull(subscription=subscription,
                                         max_messages=max_messages, timeout=timeout)
        except (exceptions.DeadlineExceeded, exceptions.ServiceUnavailable) as err:
            _LOG.debug("pull %s: %s", subscription, err)
            return []
        return list(response.received_messages)

    def _extend(self, subscription: str, ack_ids: list[str]) -> None:
        """Holds the messages for ``lease_seconds`` (the subscription's own
        deadline may be as short as 10 s)."""
        from google.api_core import exceptions

        for i in range(0, len(ack_ids), MAX_ACK_IDS_PER_CALL):
            try:
                self._client.modify_ack_deadline(
                    subscription=subscription, ack_ids=ack_ids[i:i + MAX_ACK_IDS_PER_CALL],
                    ack_deadline_seconds=self._lease_seconds)
            except exceptions.GoogleAPICallError as err:
                # The subscription's own deadline still applies; at worst a
                # message comes back and is counted as a duplicate.
                _LOG.warning("extending the lease of %d messages failed: %s",
                             len(ack_ids[i:i + MAX_ACK_IDS_PER_CALL]), err)


class PullFromPubSub(beam.PTransform):
    """``PBegin`` -> ``Envelope``s pulled from a subscription, unacknowledged.

    Args:
      subscription: ``projects/P/subscriptions/S``.
      max_messages: messages per pull.
      poll_seconds: how long an empty pull waits for a first message.
      lease_seconds: the ack deadline each pulled message gets.
      idle_slack_seconds: how far behind now the watermark stays while idle.
      drain_seconds: how long one call keeps pulling while messages wait.
      emulator_host: the Pub/Sub emulator's ``HOST:PORT``, or None for Google's.
      budget: the latency target, which may take fewer than ``max_messages``.
    """

    def __init__(self, subscription: str, max_messages: int = 1000,
                 poll_seconds: float = 1.0, lease_seconds: int = DEFAULT_LEASE_SECONDS,
                 idle_slack_seconds: float = 1.0, drain_seconds: float = 0.5,
                 emulator_host: str | None = None, budget: LatencyBudget | None = None):
        super().__init__()
        if not 10 <= lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(f"lease_seconds must be 10..{MAX_LEASE_SECONDS}")
        self._subscription = subscription
        self._fn = _PullFn(max_messages, poll_seconds, lease_seconds, idle_slack_seconds,
                           drain_seconds, emulator_host, budget)

    def expand(self, begin):
        return (begin
                | "Subscription" >> beam.Create([self._subscription])
                | "Pull" >> beam.ParDo(self._fn).with_output_types(Envelope))


def subscription_for_topic(topic: str) -> str:
    """Creates a subscription to ``topic`` for this job and returns its path.
    It expires after a day unused, as Beam's own reader's would be deleted."""
    from google.cloud import pubsub_v1
    from google.protobuf import duration_pb2

    parts = pubsub_v1.PublisherClient.parse_topic_path(topic)
    name = f"{parts['topic']}-bertstream-{uuid.uuid4().hex[:8]}"
    client = pubsub_v1.SubscriberClient()
    try:
        path = client.subscription_path(parts["project"], name)
        client.create_subscription(request={
            "name": path, "topic": topic, "ack_deadline_seconds": DEFAULT_LEASE_SECONDS,
            "expiration_policy": {"ttl": duration_pb2.Duration(
                seconds=int(dt.timedelta(days=1).total_seconds()))}})
    finally:
        client.close()
    _LOG.info("created subscription %s on %s (expires after a day unused)", path, topic)
    return path


class _AckFn(_SubscriberFn):
    def __init__(self, subscription: str, emulator_host: str | None = None):
        self._subscription = subscription
        self._emulator_host = emulator_host
        self._acked = Metrics.counter("AcknowledgeMessages", "acknowledged")
        self._failed = Metrics.counter("AcknowledgeMessages", "failed")

    def start_bundle(self):
        self._pending: list[str] = []

    def process(self, ack_id: str):
        if ack_id:
            self._pending.append(ack_id)
            if len(self._pending) >= MAX_ACK_IDS_PER_CALL:
                self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        from google.api_core import exceptions

        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._client.acknowledge(subscription=self._subscription, ack_ids=pending)
            self._acked.inc(len(pending))
        except exceptions.GoogleAPICallError as err:
            # Not lost: Pub/Sub redelivers, and the sink writes each tweet once.
            self._failed.inc(len(pending))
            _LOG.warning("acknowledging %d messages failed (they will be redelivered): %s",
                         len(pending), err)


class AcknowledgeMessages(beam.PTransform):
    """Acknowledges the Pub/Sub messages behind a PCollection of ack ids
    (empty ids, from files or self-acknowledging sources, are skipped)."""

    def __init__(self, subscription: str, emulator_host: str | None = None):
        super().__init__()
        self._subscription = subscription
        self._emulator_host = emulator_host

    def expand(self, ack_ids):
        return ack_ids | beam.ParDo(_AckFn(self._subscription, self._emulator_host))
