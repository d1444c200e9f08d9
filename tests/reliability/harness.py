"""What every reliability scenario needs: tweets, topics, jobs, waits, counts.

A scenario publishes known tweets, breaks something, and then counts what
Redis holds against what was sent. Counts come from Redis only (the sink's
dedupe keys, the results stream, the dead-letter stream and the stats hash),
which are exact on every runner, unlike the DirectRunner's metrics.

Waits are on conditions with generous timeouts, never on fixed sleeps that a
busy machine could outrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from runners.local_servers import stop_process_group
from transforms.records import iso_from_seconds

ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "BERTSTREAM_RELIABILITY"
PROJECT = "bertstream-reliability"
RESULTS, DEADLETTER, STATS = "sentiment:results", "sentiment:deadletter", "sentiment:stats"
SEEN = "sentiment:seen:"
TEXTS = ("Loving the new coffee place on 5th, best latte in town ☕️",
         "My flight got cancelled again. Three hours on hold. Never again.",
         "Council meeting moved to Thursday 7pm, agenda attached",
         "مرحبا! The weather in Dubai is perfect today 🌞",
         "ok so the update broke my wifi 🙃 anyone else?",
         "Just finished a 10k run, legs are jelly but I feel great")


def is_full() -> bool:
    """The full scenarios (``make reliability``) instead of the short ones."""
    return os.environ.get(ENV_VAR, "short").lower() == "full"


@dataclass
class Ctx:
    """Where a scenario runs: the emulator (``PUBSUB_EMULATOR_HOST`` is set),
    the tiny SavedModel, a scratch directory and the size to run at."""

    model_dir: Path
    work_dir: Path
    full: bool = False
    log: Callable[[str], None] = field(default=lambda msg: None)


# --- tweets and Pub/Sub -----------------------------------------------------------------

def make_tweets(n: int, first_id: int, tag: str = "", ago_seconds: float = 30) -> list[dict]:
    """``n`` valid tweets with ids from ``first_id`` (over 2**53, as X's)."""
    now = time.time()
    return [{"id": str(first_id + i), "text": f"{TEXTS[i % len(TEXTS)]} {tag}#{i}",
             "created_at": iso_from_seconds(now - ago_seconds + i * 0.01),
             "author_id": str(1000 + i % 97), "lang": "en"} for i in range(n)]


def message(tweet: dict) -> tuple[bytes, dict[str, str]]:
    return (json.dumps(tweet, ensure_ascii=False).encode(),
            {"tweet_id": tweet["id"], "event_ts": tweet["created_at"]})


def new_topic(ack_deadline_seconds: int = 60) -> tuple[str, str]:
    """A fresh topic and subscription on the emulator."""
    from google.cloud import pubsub_v1

    suffix = uuid.uuid4().hex[:8]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, f"tweets-{suffix}")
    subscription = subscriber.subscription_path(PROJECT, f"tweets-sub-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic,
                                   ack_deadline_seconds=ack_deadline_seconds)
    subscriber.close()
    return topic, subscription


_PUBLISHER = None


def publish(topic: str, items: Iterable[tuple[bytes, dict]], per_second: float = 0) -> int:
    """Publishes and waits for every future; ``per_second`` paces it (0: as fast as it goes)."""
    global _PUBLISHER
    from google.cloud import pubsub_v1

    if _PUBLISHER is None:
        _PUBLISHER = pubsub_v1.PublisherClient()
    started, futures = time.monotonic(), []
    for i, (data, attrs) in enumerate(items):
        if per_second:
            ahead = started + i / per_second - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        futures.append(_PUBLISHER.publish(topic, data, **attrs))
        if len(futures) >= 1000:
            for f in futures:
                f.result(timeout=60)
            futures = []
    for f in futures:
        f.result(timeout=60)
    return len(futures)


# --- jobs -------------------------------------------------------------------------------

def job_argv(ctx: Ctx, subscription: str, redis_url: str, *extra: str) -> list[str]:
    return ["--runner=DirectRunner", "--input_subscription", subscription,
            "--redis_url", redis_url, "--model_dir", str(ctx.model_dir), *extra]


class InProcessJob:
    """The streaming job on the DirectRunner in this process (as the
    integration tests run it); ``handler`` overrides the model handler."""

    def __init__(self, argv: list[str], handler=None):
        import apache_beam as beam

        from pipeline.pipeline import build, make_options

        options = make_options(argv)
        self.pipeline = beam.Pipeline(options=options)
        build(self.pipeline, options, handler)
        self.result = None

    def __enter__(self) -> InProcessJob:
        self.result = self.pipeline.run()
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self.result is not None:
            try:
                self.result.cancel()
            except (NotImplementedError, RuntimeError):
                pass
            self.result = None


class JobProcess:
    """``python -m pipeline`` as a child process (its own process group),
    for the faults that need a real process: SIGKILL, memory."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
        """Sends ``sig`` to the job's process group and waits for it."""
        stop_process_group(self.proc, sig, timeout)
        self._log.close()
        return self.proc.returncode

    def interrupt(self, timeout: float = 90) -> int:
        """Ctrl-C: the job cancels itself and prints its summary."""
        return self.kill(signal.SIGINT, timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class RssSampler(threading.Thread):
    """Samples a process's resident memory (MB) once a second."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process(pid)
        self._every = every
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                rss = self._proc.memory_info().rss
                rss += sum(c.memory_info().rss for c in self._proc.children(recursive=True))
            except psutil.Error:
                return
            self.samples.append((time.monotonic(), rss / 2**20))
            self._halt.wait(self._every)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peaks(self, since: float, until: float, share: float = 0.2) -> tuple[float, float]:
        """Peak RSS in the first and the last ``share`` of [since, until]
        (at least 3 s each, so that a short run has samples in both)."""
        span = max(share * (until - since), 3.0)
        first = [mb for t, mb in self.samples if since <= t <= since + span]
        last = [mb for t, mb in self.samples if until - span <= t <= until]
        return round(max(first, default=0), 1), round(max(last, default=0), 1)


# --- waits and counts -------------------------------------------------------------------

def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_quiet(progress: Callable[[], int], done: Callable[[], bool], quiet: float,
                   timeout: float) -> bool:
    """Waits until ``done()``, or until ``progress()`` has not moved for
    ``quiet`` seconds; returns ``done()``. For faults that may lose input,
    where "everything arrived" cannot be waited for."""
    deadline = time.monotonic() + timeout
    last, moved = progress(), time.monotonic()
    while time.monotonic() < deadline and not done():
        time.sleep(0.5)
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > quiet:
            break
    return done()


def client_for(url: str, **kwargs) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30, **kwargs)


def stats(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(STATS).items()}


def written_ids(client: redis.Redis, ids: list[str]) -> set[str]:
    """The ids among ``ids`` the sink has written (its SET NX keys)."""
    pipe = client.pipeline(transaction=False)
    for tweet_id in ids:
        pipe.exists(SEEN + tweet_id)
    return {i for i, found in zip(ids, pipe.execute()) if found}


def stream_ids(client: redis.Redis, stream: str = RESULTS) -> Counter[str]:
    found: Counter[str] = Counter()
    start = "-"
    while True:
        entries = client.xrange(stream, min=start, max="+", count=5000)
        for _, fields in entries:
            found[fields.get(b"tweet_id", b"").decode()] += 1
        if len(entries) < 5000:
            return found
        start = "(" + entries[-1][0].decode()


def dead_letters(client: redis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            for _, fields in client.xrange(DEADLETTER)]


def dead_tweet_ids(dead: list[dict[str, str]]) -> Counter[str]:
    """Tweet ids of dead letters (from the field, else the raw JSON)."""
    found: Counter[str] = Counter()
    for d in dead:
        tweet_id = d.get("tweet_id") or ""
        if not tweet_id:
            try:
                obj = json.loads(d.get("raw", ""))
                tweet_id = str(obj.get("id") or obj.get("tweet_id") or "")
            except (ValueError, AttributeError):
                tweet_id = ""
        found[tweet_id] += 1
    return found


def tally(client: redis.Redis, sent_ids: list[str], *, sent: int | None = None,
          redelivered: int = 0, duplicates_skipped: int | None = None,
          expected_dead: Iterable[str] = ()) -> dict:
    """The scenario's counts: every distinct sent tweet id must be a result,
    or (for ``expected_dead``) still a dead letter; ``doubled`` counts ids
    with more than one result in the stream."""
    unique = list(dict.fromkeys(sent_ids))
    in_stream = stream_ids(client)
    written = written_ids(client, unique)
    dead = dead_letters(client)
    still_dead = set(dead_tweet_ids(dead)) & set(expected_dead)
    s = stats(client)
    return {
        "sent": len(sent_ids) if sent is None else sent,
        "distinct_tweets": len(unique),
        "results": len(written),
        "duplicates_skipped": (s.get("already_written", 0) if duplicates_skipped is None
                               else duplicates_skipped),
        "dead_letters": len(dead),
        "redelivered": redelivered,
        "lost": len([i for i in unique if i not in written and i not in still_dead]),
        "doubled": sum(n - 1 for n in in_stream.values() if n > 1),
    }
