"""The fault and load scenarios. Each takes a ``Ctx`` and returns its counts.

pytest (``test_faults.py``) and ``python -m tests.reliability.run`` call the
same functions; ``ctx.full`` picks the full size. Every scenario starts its
own redis-server (so counts never mix) and its own Pub/Sub topic on the
emulator that ``PUBSUB_EMULATOR_HOST`` names.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import redis

from runners.local_servers import LocalRedis, free_port
from tests.reliability.harness import (
    DEADLETTER,
    ROOT,
    Ctx,
    InProcessJob,
    JobProcess,
    RssSampler,
    client_for,
    dead_letters,
    job_argv,
    make_tweets,
    message,
    new_topic,
    publish,
    stats,
    tally,
    wait_for_quiet,
    wait_until,
    written_ids,
)


def _safe(fn, default=0):
    """``fn()``, or ``default`` while Redis is down."""
    try:
        return fn()
    except (redis.ConnectionError, redis.TimeoutError):
        return default


def _results(client) -> int:
    return _safe(lambda: stats(client).get("results", 0))


def _in_background(fn, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def _dedupe_metric(job: InProcessJob) -> int:
    """The job's in-memory dedupe count (a lower bound on the DirectRunner)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = job.result.metrics().query(
        MetricsFilter().with_namespace("DedupeByTweetId").with_name("duplicates_skipped"))
    return sum(int(c.committed or c.attempted or 0) for c in found["counters"])


# --- Redis restart mid-stream -----------------------------------------------------------

def redis_restart(ctx: Ctx) -> dict:
    """redis-server is SIGKILLed while the job writes and started again after
    a few seconds on the same port and AOF directory. With ``appendfsync
    always`` a reply means the write is on disk, so the restarted server
    remembers every tweet id it acknowledged; the sink's retries (6, about
    12 s of backoff) outlast the outage, and a flush whose reply was lost is
    simply written again (SET NX makes that a no-op)."""
    n = 800 if ctx.full else 120
    data_dir = ctx.work_dir / "redis-restart"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = LocalRedis(data_dir=str(data_dir), extra_args=["--appendfsync", "always"]).start()
    client = client_for(server.url)
    topic, subscription = new_topic()
    tweets = make_tweets(n, 1_870_000_000_000_000_000, "restart")
    ids = [t["id"] for t in tweets]
    down_seconds = 4.0
    try:
        with InProcessJob(job_argv(ctx, subscription, server.url, "--redis_retries", "6")):
            sender = _in_background(publish, topic, [message(t) for t in tweets],
                                    40 if ctx.full else 30)
            wait_until(lambda: _results(client) >= n // 4, 240, "a quarter of the results")
            before = _results(client)
            server.stop(signal.SIGKILL)
            ctx.log(f"redis_restart: redis-server killed after {before} results")
            time.sleep(down_seconds)  # the outage itself
            server.start()
            ctx.log("redis_restart: redis-server back on the same port and AOF")
            sender.join(300)
            wait_until(lambda: len(written_ids(client, ids)) + len(dead_letters(client)) >= n,
                       300, "every tweet to be a result or a dead letter")
            time.sleep(2)  # a double, if any, would land by now
            counts = tally(client, ids, expected_dead=ids)
        counts.update(down_seconds=down_seconds, results_before_kill=before,
                      dead_letter_reasons=sorted({d["reason"][:120]
                                                  for d in dead_letters(client)}))
        return counts
    finally:
        client.close()
        server.stop()


# --- pipeline crash and restart ---------------------------------------------------------

def pipeline_crash(ctx: Ctx) -> dict:
    """``python -m pipeline`` is SIGKILLed right after its first results and
    started again on the same subscription. The job acknowledges a message
    only once its result is in Redis (the graph's ``AcknowledgeMessages``
    step), so what the killed job had pulled but not written comes back when
    its lease lapses, and the sink keeps one result per tweet id."""
    n = 5000 if ctx.full else 2500
    server = LocalRedis().start()
    client = client_for(server.url)
    topic, subscription = new_topic(ack_deadline_seconds=10)
    tweets = make_tweets(n, 1_871_000_000_000_000_000, "crash")
    ids = [t["id"] for t in tweets]
    publish(topic, [message(t) for t in tweets])
    argv = job_argv(ctx, subscription, server.url, "--no_local_redis",
                    "--pubsub_lease_seconds", "15")
    jobs = []
    try:
        first = JobProcess(argv, ctx.work_dir / "crash-job1.log")
        jobs.append(first)
        # As soon as anything is written: the job pulls up to 1000 messages
        # a bundle, so most of them are then pulled and not yet written.
        wait_until(lambda: _results(client) >= 1 or not first.alive(), 300,
                   "the first job to write a result", every=0.02)
        assert first.alive(), first.output()[-3000:]
        first.kill(signal.SIGKILL)
        at_kill = _results(client)
        ctx.log(f"pipeline_crash: job SIGKILLed after {at_kill} of {n} results")
        second = JobProcess(argv, ctx.work_dir / "crash-job2.log")
        jobs.append(second)
        assert at_kill < n, "the first job finished before it was killed: nothing was tested"
        # The killed job's lease (15 s) must lapse before Pub/Sub redelivers.
        wait_until(lambda: _results(client) > at_kill or not second.alive(), 300,
                   "the restarted job to write")
        assert second.alive(), second.output()[-3000:]
        # What the killed job held comes back once its lease lapses (15 s
        # after the last extension), and the emulator may answer a pull that
        # was already waiting only at its 30 s timeout: allow 90 s of quiet.
        wait_for_quiet(lambda: _results(client), lambda: _results(client) >= n,
                       quiet=90, timeout=600)
        time.sleep(2)
        second.interrupt()
        s = stats(client)
        counts = tally(client, ids, redelivered=s.get("already_written", 0))
        counts.update(results_at_kill=at_kill, ack_deadline_seconds=10)
        return counts
    finally:
        for job in jobs:
            job.kill()
        client.close()
        server.stop()


# --- Pub/Sub duplicates and redelivery --------------------------------------------------

def pubsub_duplicates(ctx: Ctx) -> dict:
    """The same tweet published three times (some copies seconds apart, after
    the first copy's result is in Redis, where the dedupe's claim script or
    the sink's SET NX has to catch them), and messages redelivered after a
    consumer let their 10 s ack deadline expire."""
    n = 900 if ctx.full else 120
    server = LocalRedis().start()
    client = client_for(server.url)
    topic, subscription = new_topic(ack_deadline_seconds=10)
    tweets = make_tweets(n, 1_872_000_000_000_000_000, "dup")
    ids = [t["id"] for t in tweets]
    tripled = tweets[::4]
    wave1 = [message(t) for t in tweets[: n // 2]] + [message(t) for t in tripled]
    wave2 = [message(t) for t in tweets[n // 2:]] + [message(t) for t in tripled]
    try:
        publish(topic, wave1)
        # A consumer pulls some messages and dies without acknowledging them:
        # Pub/Sub delivers them again once their ack deadline has passed.
        from google.cloud import pubsub_v1

        rogue = pubsub_v1.SubscriberClient()
        pulled = rogue.pull(subscription=subscription, max_messages=40, timeout=30)
        redelivered = len(pulled.received_messages)
        rogue.close()
        argv = job_argv(ctx, subscription, server.url)
        with InProcessJob(argv) as job:
            wait_until(lambda: _results(client) >= 1, 240, "the first result")
            time.sleep(6)  # the first copies' results are written by now
            publish(topic, wave2)
            publish(topic, [message(t) for t in tripled])  # the third copy
            wait_until(lambda: len(written_ids(client, ids)) >= n, 300, "every tweet once")
            time.sleep(3)
            in_pipeline = _dedupe_metric(job)
        sent = len(wave1) + len(wave2) + len(tripled)
        at_sink = stats(client).get("already_written", 0)
        # No copy became a second result (doubled == 0, checked from the
        # stream), so every extra copy was skipped: by the job's in-memory
        # dedupe or, exactly counted, by the sink's SET NX. The job's own
        # dedupe counter is reported as read back; the DirectRunner can drop
        # counter updates (see pipeline/summary.py), so it is not a total.
        counts = tally(client, ids, sent=sent, redelivered=redelivered,
                       duplicates_skipped=sent - n)
        counts.update(skipped_at_sink=at_sink, skipped_in_pipeline_metric=in_pipeline)
        return counts
    finally:
        client.close()
        server.stop()


# --- TF Serving outage ------------------------------------------------------------------

def tfserving_outage(ctx: Ctx) -> dict:
    """The TF Serving peer goes away for longer than the retry budget (one
    retry, ~5 s) and comes back on the same port. Tweets sent during the
    outage are dead-lettered (stage inference, the gRPC status in the
    reason); ``python -m ops.replay_deadletter --delete`` re-publishes
    them to the running job, which scores them."""
    from pipeline.pipeline import make_options
    from tests.tfserving_peer import serve
    from transforms.tfserving import tfserving_handler

    n = 300 if ctx.full else 40
    server = LocalRedis().start()
    client = client_for(server.url)
    topic, subscription = new_topic()
    port = free_port()
    peer = serve(ctx.model_dir, port)
    before, during, after = (make_tweets(n, 1_873_000_000_000_000_000 + k * 10_000, tag)
                             for k, tag in enumerate(("before", "outage", "after")))
    ids = [t["id"] for t in before + during + after]
    argv = job_argv(ctx, subscription, server.url, "--inference", "tfserving",
                    "--tfserving_target", peer.target)
    try:
        handler = tfserving_handler(make_options(argv).tfserving_config(), num_retries=1, throttle_delay_secs=1)
        with InProcessJob(argv, handler):
            publish(topic, [message(t) for t in before])
            wait_until(lambda: _results(client) >= n, 240, "the results before the outage")
            peer.stop(None)
            ctx.log("tfserving_outage: peer stopped")
            publish(topic, [message(t) for t in during])
            wait_until(lambda: len(dead_letters(client)) >= n, 240,
                       "the outage's tweets in the dead letter")
            dead = dead_letters(client)
            peer = serve(ctx.model_dir, port)
            ctx.log("tfserving_outage: peer back; replaying the dead letter")
            publish(topic, [message(t) for t in after])
            # gRPC's reconnect backoff can still fail the first batches after
            # the peer is back: they are dead-lettered again, and replayed in
            # the next round (as an operator would run the replay again).
            replayed, rounds = Counter(), 0
            while rounds < 5:
                rounds += 1
                if client.xlen(DEADLETTER):
                    replayed.update(_replay(server.url, topic))
                quiet = wait_for_quiet(
                    lambda: len(written_ids(client, ids)) + client.xlen(DEADLETTER),
                    lambda: len(written_ids(client, ids)) >= 3 * n, quiet=15, timeout=240)
                if quiet:
                    break
            if len(written_ids(client, ids)) < 3 * n:
                groups = {name: len(written_ids(client, [t["id"] for t in group]))
                          for name, group in (("before", before), ("outage", during),
                                              ("after", after))}
                raise AssertionError(f"not every tweet scored after {rounds} replays; "
                                     f"results per group of {n}: {groups}, "
                                     f"replay: {dict(replayed)}")
            time.sleep(2)
            counts = tally(client, ids)
        counts.update(dead_letters=len(dead), replayed=replayed.get("published", 0),
                      deleted=replayed.get("deleted", 0), replay_rounds=rounds,
                      dead_letter_stages=sorted({d["stage"] for d in dead}),
                      dead_letter_reason=dead[0]["reason"][:200] if dead else "",
                      left_in_dead_letter=client.xlen(DEADLETTER))
        return counts
    finally:
        peer.stop(None)
        client.close()
        server.stop()


def _replay(redis_url: str, topic: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "ops.replay_deadletter", "--redis_url", redis_url,
         "--topic", topic, "--delete"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: v for k, v in summary.items() if isinstance(v, int)}


# --- sustained load ---------------------------------------------------------------------

class ChannelCounter(threading.Thread):
    """Counts the tweet ids published on the results channel (the stream is
    trimmed to MAXLEN, the channel sees every write)."""

    def __init__(self, url: str, channel: str = "sentiment"):
        super().__init__(daemon=True)
        self._client = client_for(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        self.ids: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            msg = self._pubsub.get_message(timeout=0.5)
            if msg is not None:
                self.ids[json.loads(msg["data"])["tweet_id"]] += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self._pubsub.close()
        self._client.close()


def sustained_load(ctx: Ctx) -> dict:
    """Tweets at a steady rate into the emulator (full: 20,000 over at least
    5 minutes), ``python -m pipeline`` as its own process: its peak RSS at the
    start and at the end, the results stream's length against its MAXLEN, and
    every tweet id written once."""
    n, rate = (20_000, 20_000 / 300) if ctx.full else (200, 40.0)
    maxlen, node = (2000 if ctx.full else 100), 100  # stream-node-max-entries
    server = LocalRedis().start()
    client = client_for(server.url)
    topic, subscription = new_topic()
    tweets = make_tweets(n, 1_874_000_000_000_000_000, "load", ago_seconds=5)
    ids = [t["id"] for t in tweets]
    channel = ChannelCounter(server.url)
    channel.start()
    job = JobProcess(job_argv(ctx, subscription, server.url, "--no_local_redis",
                              "--redis_stream_maxlen", str(maxlen)),
                     ctx.work_dir / "load-job.log")
    sampler = RssSampler(job.pid)
    sampler.start()
    try:
        started = time.monotonic()
        # Tweets get their event time as they are sent (a live stream).
        def paced():
            for i, t in enumerate(tweets):
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                t = {**t, "created_at": _now_iso()}
                yield message(t)

        sender = _in_background(publish, topic, paced())
        first = last = None
        longest = 0
        deadline = time.monotonic() + (n / rate) * 3 + 300
        while time.monotonic() < deadline:
            assert job.alive(), job.output()[-3000:]
            done = _results(client)
            longest = max(longest, client.xlen("sentiment:results"))
            if done and first is None:
                first = time.monotonic()
            if done >= n:
                last = time.monotonic()
                break
            time.sleep(1)
        sender.join(60)
        assert last is not None, f"only {_results(client)} of {n} results"
        time.sleep(2)
        peak_start, peak_end = sampler.peaks(first, last)
        counts = tally(client, ids)
        counts["doubled"] = max(counts["doubled"],
                                sum(k - 1 for k in channel.ids.values() if k > 1))
        counts.update(
            tweets_per_s=round(n / (last - first), 1) if last > first else 0.0,
            send_rate_per_s=round(rate, 1), seconds=round(last - started, 1),
            peak_rss_mb_start=peak_start, peak_rss_mb_end=peak_end,
            redis_stream_maxlen=maxlen, longest_stream=longest,
            stream_within_maxlen=longest <= maxlen + node,
            published_on_channel=len(channel.ids))
        return counts
    finally:
        sampler.stop()
        job.kill(signal.SIGINT)
        channel.stop()
        client.close()
        server.stop()


def _now_iso() -> str:
    from transforms.records import now_iso

    return now_iso()


# --- slow subscriber --------------------------------------------------------------------

def slow_subscriber(ctx: Ctx) -> dict:
    """A pub/sub subscriber that reads 1 KiB every 100 ms is cut off by
    Redis's output buffer limit for pub/sub (64 kB hard, 32 kB for 2 s);
    ``python -m ops.subscribe --from-start --json`` then recovers every
    result from the stream."""
    import socket

    from pipeline.pipeline import run

    n = 2000 if ctx.full else 400
    server = LocalRedis(extra_args=["--client-output-buffer-limit", "pubsub 64kb 32kb 2"]).start()
    client = client_for(server.url)
    tweets = make_tweets(n, 1_875_000_000_000_000_000, "slow " + "padding " * 1000)
    ids = [t["id"] for t in tweets]
    path = ctx.work_dir / "slow-subscriber.jsonl"
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tweets))

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no big kernel cushion
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"SUBSCRIBE sentiment\r\n")
    received = bytearray()
    reader_done, cut_off = threading.Event(), threading.Event()

    def read_slowly():
        # Slow until Redis has dropped the connection, then drain what the
        # kernel still buffers, to the end of the stream (EOF).
        while True:
            try:
                chunk = sock.recv(1024 if not cut_off.is_set() else 1 << 20)
            except OSError:
                break
            if not chunk:
                reader_done.set()
                break
            received.extend(chunk)
            if not cut_off.is_set():
                time.sleep(0.1)

    wait_until(lambda: client.pubsub_numsub("sentiment")[0][1] == 1, 30, "the slow subscriber")
    reader = _in_background(read_slowly)
    try:
        run(["--runner=DirectRunner", "--input_file", str(path), "--redis_url", server.url,
             "--model_dir", str(ctx.model_dir)])
        wait_until(lambda: client.pubsub_numsub("sentiment")[0][1] == 0, 60,
                   "Redis to disconnect the slow subscriber")
        cut_off.set()
        reader.join(60)
        got_live = received.count(b"\r\nmessage\r\n")
        sub = subprocess.run(
            [sys.executable, "-m", "ops.subscribe", "--redis_url", server.url,
             "--from-start", "--json", "--max-results", str(n), "--timeout", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr[-2000:]
        recovered = Counter(json.loads(line)["tweet_id"]
                            for line in sub.stdout.splitlines() if line.strip())
        counts = tally(client, ids)
        counts.update(received_live_before_cutoff=got_live,
                      disconnected=reader_done.is_set(),
                      recovered_from_stream=len(set(recovered) & set(ids)),
                      recovered_doubled=sum(k - 1 for k in recovered.values() if k > 1))
        counts["lost"] = max(counts["lost"], n - counts["recovered_from_stream"])
        return counts
    finally:
        sock.close()
        reader.join(5)
        client.close()
        server.stop()
