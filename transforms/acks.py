"""Acknowledge a Pub/Sub message only once its tweet has reached Redis.

Beam's DirectRunner acknowledges what it pulls at once, before the bundle is
processed, so a killed job loses what it had pulled and not yet written (the
``pipeline_crash`` reliability scenario measured it). With the larger pulls
of ``pipeline/direct_pubsub.py`` that would be up to 1000 messages. Instead,
on the DirectRunner the pulled messages are *held* here: a lease thread keeps
extending their ack deadline, and each one is acknowledged when its input
reaches an end the design names (DESIGN.md: every input ends up as one
result, one counted duplicate or one dead letter):

- ``WriteToRedis`` wrote its result (or found it already written);
- ``WriteDeadLetters`` wrote its dead letter;
- ``DedupeByTweetId`` skipped it as a duplicate.

A killed job therefore loses nothing: what it held is redelivered once the
lease lapses and the sink's ``SET NX`` keeps the results single. A message
whose end never comes (a result Redis refused through all retries) is leased
for at most ``MAX_LEASE_SECONDS`` and then redelivered: a retry, not a loss.

Everything here is in-process state. On Dataflow and Flink nothing is ever
held (only the DirectRunner's reader calls ``hold``), and ``done`` is a no-op.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable

_LOG = logging.getLogger(__name__)
SOURCE_PREFIX = "pubsub:"
LEASE_EVERY_SECONDS = 3.0       # below the shortest ack deadline Pub/Sub allows (10 s)
LEASE_SECONDS = 15              # each extension sets the deadline this far ahead
MAX_LEASE_SECONDS = 600.0       # then let Pub/Sub redeliver it
_CHUNK = 1000                   # ack ids per acknowledge / modify_ack_deadline call


class _Held:
    __slots__ = ("subscription", "ack_id", "since")

    def __init__(self, subscription: str, ack_id: str, since: float):
        self.subscription = subscription
        self.ack_id = ack_id
        self.since = since


class AckTracker:
    """The held messages of one process, by Pub/Sub message id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._client = None
        self._thread: threading.Thread | None = None
        self.acked = 0

    def hold(self, client, subscription: str, received_messages) -> None:
        """Keeps ``received_messages`` (from a pull on ``subscription``)
        unacknowledged and leased until ``done``."""
        now = time.monotonic()
        with self._lock:
            self._client = client
            for received in received_messages:
                self._held[received.message.message_id] = _Held(subscription, received.ack_id,
                                                                now)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._lease_loop, daemon=True,
                                                name="bertstream-pubsub-lease")
                self._thread.start()

    def done(self, source_ids: Iterable[str]) -> None:
        """Acknowledges the messages behind ``source_ids`` (``pubsub:<id>``,
        possibly after a replay prefix); other ids are ignored."""
        if not self._held:
            return
        by_subscription: dict[str, list[str]] = {}
        with self._lock:
            for source_id in source_ids:
                at = source_id.rfind(SOURCE_PREFIX)
                if at < 0:
                    continue
                held = self._held.pop(source_id[at + len(SOURCE_PREFIX):], None)
                if held is not None:
                    by_subscription.setdefault(held.subscription, []).append(held.ack_id)
            client = self._client
        # A failed ack is covered by redelivery (the sink skips what it has).
        self.acked += _in_chunks(by_subscription, "acknowledging", client.acknowledge)

    def held(self) -> int:
        return len(self._held)

    def _lease_loop(self) -> None:
        while True:
            time.sleep(LEASE_EVERY_SECONDS)
            now = time.monotonic()
            by_subscription: dict[str, list[str]] = {}
            with self._lock:
                expired = [m for m, h in self._held.items() if now - h.since > MAX_LEASE_SECONDS]
                for message_id in expired:
                    del self._held[message_id]
                for held in self._held.values():
                    by_subscription.setdefault(held.subscription, []).append(held.ack_id)
                client = self._client
            if expired:
                _LOG.warning("%d messages reached no end in %.0f s; Pub/Sub will redeliver them",
                             len(expired), MAX_LEASE_SECONDS)
            # A failed extension is retried on the next round.
            _in_chunks(by_subscription, "extending the lease of",
                       functools.partial(client.modify_ack_deadline,
                                         ack_deadline_seconds=LEASE_SECONDS))


def _in_chunks(by_subscription: dict[str, list[str]], what: str, call) -> int:
    """``call(subscription=..., ack_ids=...)`` per subscription, ``_CHUNK``
    ids at a time; logs failures. Returns how many ids were sent."""
    sent = 0
    for subscription, ack_ids in by_subscription.items():
        for i in range(0, len(ack_ids), _CHUNK):
            chunk = ack_ids[i:i + _CHUNK]
            try:
                call(subscription=subscription, ack_ids=chunk)
                sent += len(chunk)
            except Exception as err:  # noqa: BLE001 - the callers say what covers it
                _LOG.warning("%s %d messages failed: %s", what, len(chunk), err)
    return sent


TRACKER = AckTracker()


def done(source_ids: Iterable[str]) -> None:
    """``TRACKER.done``: what the pipeline's terminal steps call."""
    TRACKER.done(source_ids)
