"""Replays a JSONL file of tweets into Pub/Sub at their original pace.

Inter-arrival times come from ``created_at``, divided by ``speed`` (0 = as fast
as publishing allows), so a recorded stream exercises the pipeline's windows
the way the live one did. Bad lines are skipped and reported by line number,
or, with ``publish_bad``, also published as they are (the pipeline dead-letters
them).

Example::

    from ingest.replay import replay
    totals = replay("tweets.jsonl", "projects/p/topics/tweets", speed=0)
    assert totals.failed == 0
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.message import BadTweet, TweetMessage, parse_json, raw_message, to_message
from ingest.progress import Progress
from ingest.publish import BadLine, PublishSettings, Totals, TweetPublisher
from transforms.contract import check_id, format_rfc3339, parse_rfc3339

_LOG = logging.getLogger(__name__)

# Pause between the last tweet of one --loop pass and the first of the next.
_LOOP_GAP = timedelta(seconds=1)


def default_sample() -> Path:
    """The sample shipped with the pipeline package, found without importing it
    (importing ``pipeline`` would pull in Beam just to locate a file)."""
    spec = importlib.util.find_spec("pipeline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pipeline package (which ships the sample) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "sample_tweets.jsonl"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            yield number, raw.rstrip(b"\r\n")


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _shifted(tweet: Any, passes: int, period: timedelta) -> Any:
    """The tweet as pass ``passes`` of ``--loop`` sends it: later, with a new id.

    Without a new id the pipeline's dedupe would drop every pass after the
    first. X ids are snowflakes (milliseconds << 22), so a decimal id moves by
    the same period: ids and times stay consistent and distinct across passes.
    Any other id (the contract allows "bad-1") gets the suffix ``~loop<passes>``;
    one that the suffix takes over the contract's 64 characters is then refused
    as a bad id. What cannot be shifted is left for ``to_message`` to refuse.
    """
    if not isinstance(tweet, dict):
        return tweet
    tweet = dict(tweet)
    if isinstance(tweet.get("created_at"), str):
        try:
            tweet["created_at"] = format_rfc3339(parse_rfc3339(tweet["created_at"]) +
                                                 passes * period)
        except (ValueError, OverflowError):
            pass
    try:
        tweet_id = check_id(tweet.get("id"))
    except BadTweet:
        return tweet
    if tweet_id.isascii() and tweet_id.isdigit():
        tweet["id"] = str(int(tweet_id) + passes * (int(period.total_seconds() * 1000) << 22))
    else:
        tweet["id"] = f"{tweet_id}~loop{passes}"
    return tweet


class _Pacer:
    """Sleeps until each event time, scaled by ``speed``, measured from the first one."""

    def __init__(self, speed: float, stop: threading.Event):
        self.speed = speed
        self.stop = stop
        self._origin: tuple[datetime, float] | None = None

    def wait_for(self, event_time: datetime) -> bool:
        """Returns False when stopped while waiting."""
        if self.speed <= 0:
            return not self.stop.is_set()
        if self._origin is None:
            self._origin = (event_time, time.monotonic())
        due = self._origin[1] + (event_time - self._origin[0]).total_seconds() / self.speed
        delay = due - time.monotonic()
        # Out-of-order tweets (a duplicate, a late one) go out at once.
        if delay > 0:
            return not self.stop.wait(delay)
        return not self.stop.is_set()


def replay(path: str | Path | None, topic: str, speed: float = 1.0, loop: bool = False,
           settings: PublishSettings = PublishSettings(), create_topic: bool = False,
           progress: bool = False, stop: threading.Event | None = None,
           publish_bad: bool = False) -> Totals:
    """Publishes every good line of ``path`` to ``topic``.

    Args:
      path: a JSONL file of X API v2 tweet objects; None for the shipped sample.
      topic: ``projects/P/topics/T`` (the emulator when PUBSUB_EMULATOR_HOST is set).
      speed: how many times faster than real time; 0 for as fast as possible.
      loop: start over at the end, with shifted times and ids, until ``stop``.
      settings: publisher batching and flow control.
      create_topic: create the topic when it is missing.
      progress: draw a progress bar on stderr.
      stop: set it (a signal handler does) to end early; what was read is
        still published before this returns.
      publish_bad: publish lines that are not valid tweets too, unchanged, with
        a ``tweet_id`` attribute where a valid id can be read and, as
        ``event_ts``, the event time of the tweet before (so that a dated file
        does not move the job's watermark to the present); they are still
        counted as bad.

    Returns:
      The totals, after every publish future has settled.
    """
    if speed < 0:
        raise ValueError(f"--speed must be 0 (as fast as possible) or positive, got {speed}")
    path = Path(path) if path is not None else default_sample()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path} (the FILE argument)")
    stop = stop or threading.Event()
    total_lines = _count_lines(path)
    bar = Progress(total_lines, looping=loop) if progress else None
    pacer = _Pacer(speed, stop)
    totals = Totals()
    publisher = TweetPublisher(topic, settings, create_topic=create_topic)
    started = time.monotonic()
    first: datetime | None = None
    last: datetime | None = None
    passes = 0
    read = 0
    clock: datetime | None = None  # the event time of the last tweet sent
    _LOG.info("replaying %s (%d lines) to %s at %s", path, total_lines, topic,
              "full speed" if speed == 0 else f"{speed:g}x")
    try:
        while not stop.is_set():
            period = (last - first + _LOOP_GAP) if first and last else _LOOP_GAP
            for number, raw in _lines(path):
                if not raw.strip():
                    continue
                message = _message_or_bad(raw, number, passes, period, totals, publish_bad)
                read += 1
                if message is not None:
                    if not pacer.wait_for(message.event_time):
                        read -= 1  # stopped before this one was accepted
                        break
                    if passes == 0:
                        first = min(first or message.event_time, message.event_time)
                        last = max(last or message.event_time, message.event_time)
                    clock = message.event_time
                    try:
                        publisher.publish(message)
                    except BadTweet as exc:
                        _bad(totals, number, str(exc), passes)
                elif publish_bad:
                    _publish_raw(publisher, raw, clock, totals)
                if bar:
                    bar.update(read, publisher.published)
                if stop.is_set():
                    break
            if not loop:
                break
            passes += 1
    finally:
        publisher.close()
        totals.received = read
        totals.published = publisher.published
        totals.failed = publisher.failed
        totals.elapsed_s = time.monotonic() - started
        if bar:
            bar.finish(read, publisher.published)
    _LOG.info("replay done: %s", totals.as_dict())
    return totals


def _publish_raw(publisher: TweetPublisher, raw: bytes, clock: datetime | None,
                 totals: Totals) -> None:
    """A bad line, as it is; one too large for Pub/Sub stays skipped."""
    try:
        publisher.publish(raw_message(raw, clock))
    except BadTweet as exc:
        _LOG.warning("bad line not published either: %s", exc)
        return
    totals.bad_published += 1


def _message_or_bad(raw: bytes, number: int, passes: int, period: timedelta,
                    totals: Totals, publish_bad: bool = False) -> TweetMessage | None:
    try:
        tweet = parse_json(raw)
        if passes:
            tweet = _shifted(tweet, passes, period)
        return to_message(tweet)
    except BadTweet as exc:
        _bad(totals, number, str(exc), passes, "published as it is" if publish_bad else "skipped")
        return None


def _bad(totals: Totals, number: int, reason: str, passes: int, what: str = "skipped") -> None:
    totals.bad += 1
    if passes == 0:  # later passes repeat the same lines; report them once
        totals.bad_lines.append(BadLine(number, reason))
        # Asked for (--publish-bad): news, not a warning; skipped: the user may act.
        _LOG.log(logging.INFO if what != "skipped" else logging.WARNING,
                 "line %d %s: %s", number, what, reason)
