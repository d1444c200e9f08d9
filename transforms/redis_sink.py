"""``WriteToRedis`` and ``WriteDeadLetters``: idempotent Redis sinks.

Each result is written by one Lua script, atomically: ``SET NX`` on the
tweet's id (with a TTL) decides whether it is new; only then is it added to
the stream, published on the channel and counted in its window's hash. A
runner retry or a Pub/Sub redelivery therefore never doubles a result.
Scripts are pipelined per bundle (one round trip per flush).

Connection errors are retried by redis-py itself (its ``Retry``, with
exponential backoff, ``RedisConfig.retries`` times); what still fails is sent
on with a reason (results become dead letters; dead letters that cannot be
written are logged and counted, there is nowhere else to put them). Each
element written, or found already written, has its Pub/Sub ack id emitted on
the ``acks`` output: that input has reached its end.
"""

import hashlib
import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from bertstream.config import LATENCY_BUCKET_PREFIX, LATENCY_BUCKETS, RedisConfig, shared_client
from transforms.records import DeadLetter, Result, seconds_from_iso

_LOG = logging.getLogger(__name__)

# KEYS: dedupe key, stream, window hash, stats hash.
# ARGV: dedupe TTL s, stream MAXLEN, result JSON, channel, label, window TTL s, tweet id,
# late (1/0), model version, publish -> result latency: its bucket field ("" for
# none: file input has no publish time) and milliseconds.
# The stats hash keeps all-time totals (results, by label and model version,
# the latency histogram, duplicates met at the sink): the job's summary and the
# dashboard's /metrics read them, since runner metrics can be incomplete (the
# Python DirectRunner drops counter updates made downstream of timer output).
_WRITE_RESULT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'tweet_id', ARGV[7], 'result', ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[3])
  redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  redis.call('HINCRBY', KEYS[4], 'results', 1)
  redis.call('HINCRBY', KEYS[4], 'results:' .. ARGV[5] .. ':' .. ARGV[9], 1)
  if ARGV[8] == '1' then
    redis.call('HINCRBY', KEYS[4], 'late', 1)
  end
  if ARGV[10] ~= '' then
    redis.call('HINCRBY', KEYS[4], ARGV[10], 1)
    redis.call('HINCRBY', KEYS[4], 'latency_count', 1)
    redis.call('HINCRBY', KEYS[4], 'latency_sum_ms', ARGV[11])
  end
  return 1
end
redis.call('HINCRBY', KEYS[4], 'already_written', 1)
return 0
"""

# KEYS: dedupe key, dead-letter stream, stats hash.
# ARGV: TTL s, MAXLEN, stage, then field/value pairs.
_WRITE_DEAD_LETTER = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('HINCRBY', KEYS[3], 'dead_letters', 1)
  redis.call('HINCRBY', KEYS[3], 'dead_letters:' .. ARGV[3], 1)
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
end
return false
"""


ACKS = "acks"


def _windowed(output, timestamp, w):
    """An output (tagged or not) at its input's timestamp and window."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [w]))
    return WindowedValue(output, timestamp, [w])


class BufferedRedisFn(beam.DoFn):
    """Buffers a bundle's elements and runs one Lua script per element in
    pipelined flushes (one round trip per flush, not per element). Outputs
    keep their element's timestamp and window. The sinks below and
    ``DedupeByTweetId``'s Redis layout are its subclasses."""

    FLUSH_EVERY = 500
    namespace = "WriteToRedis"
    # The sinks: an element written (or already there) has reached its end,
    # so its ack id goes to the ``acks`` output.
    emits_acks = True

    def __init__(self, config: RedisConfig):
        self._config = config
        self._client = None
        # Computed once here: on the DirectRunner setup runs at every bundle.
        self._sha = hashlib.sha1(self.script.encode()).hexdigest()
        self._latency = Metrics.distribution(self.namespace, "flush_latency_ms")
        self._connection_failures = Metrics.counter(self.namespace, "connection_failures")

    def setup(self):
        self._client = shared_client(self._config)

    def start_bundle(self):
        self._buffer: list[tuple[object, object, object]] = []

    def process(self, element, timestamp=beam.DoFn.TimestampParam, w=beam.DoFn.WindowParam):
        self._buffer.append((element, timestamp, w))
        if len(self._buffer) >= self.FLUSH_EVERY:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        if not self._buffer:
            return []
        buffered, self._buffer = self._buffer, []
        started = time.monotonic()
        import redis

        try:
            replies = self._run_script([self.script_call(e) for e, _, _ in buffered])
        except (redis.ConnectionError, redis.TimeoutError) as err:
            self._connection_failures.inc(len(buffered))
            reason = f"redis unavailable after {self._config.retries} retries: {err}"
            _LOG.warning("%s: %s (%d elements)", self.namespace, reason, len(buffered))
            return [_windowed(out, ts, w) for element, ts, w in buffered
                    for out in self.on_failure(element, reason)]
        self._latency.update(int((time.monotonic() - started) * 1000))
        out = []
        for (element, ts, w), reply in zip(buffered, replies):
            out.extend(_windowed(o, ts, w) for o in self.on_reply(element, reply))
            if self.emits_acks and element.ack_id:
                out.append(_windowed(beam.pvalue.TaggedOutput(ACKS, element.ack_id), ts, w))
        return out

    def _run_script(self, calls: list[tuple[list[str], list]]) -> list:
        """The script's reply to each (KEYS, ARGV), in one pipelined round trip.

        By its SHA1 (``EVALSHA``), loading it only when Redis answers NOSCRIPT
        (first use, a restarted server): redis-py's ``Script`` in a pipeline asks
        ``SCRIPT EXISTS`` first, a second round trip per flush. Only the calls
        that met NOSCRIPT run again; those that ran keep their replies (a claim
        made must not be made twice)."""
        import redis

        replies = self._evalsha(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if missing:
            self._client.script_load(self.script)
            for i, reply in zip(missing, self._evalsha([calls[i] for i in missing])):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies

    def _evalsha(self, calls: list[tuple[list[str], list]]) -> list:
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    # Subclasses: the script, its KEYS/ARGV per element, and what to emit.
    script = ""

    def script_call(self, element) -> tuple[list[str], list]:
        raise NotImplementedError

    def on_reply(self, element, reply):
        return []

    def on_failure(self, element, reason: str):
        return []


def latency_bucket(result: Result) -> tuple[str, int]:
    """(bucket field, milliseconds) of a result's publish -> result latency, or
    ("", 0) when it has no publish time (a file) or a time that does not parse."""
    try:
        seconds = seconds_from_iso(result.processed_at) - seconds_from_iso(result.published_at)
    except (ValueError, TypeError):
        return "", 0
    seconds = max(0.0, seconds)
    bound = next((b for b in LATENCY_BUCKETS if seconds <= b), None)
    return f"{LATENCY_BUCKET_PREFIX}{'+Inf' if bound is None else bound}", int(seconds * 1000)


class _WriteResultsFn(BufferedRedisFn):
    script = _WRITE_RESULT

    def __init__(self, config: RedisConfig):
        super().__init__(config)
        self._written = Metrics.counter(self.namespace, "written")
        self._already = Metrics.counter(self.namespace, "already_written")
        self._dead = Metrics.counter(self.namespace, "dead_lettered")

    def script_call(self, result: Result):
        c = self._config
        bucket, latency_ms = latency_bucket(result)
        return ([c.dedupe_prefix + result.tweet_id, c.stream, c.window_prefix + result.window_start,
                 c.stats_key],
                [c.dedupe_ttl_seconds, c.stream_maxlen, result.to_json(), c.channel, result.label,
                 c.window_ttl_seconds, result.tweet_id, 1 if result.late else 0,
                 result.model_version, bucket, latency_ms])

    def on_reply(self, result, reply):
        (self._written if reply == 1 else self._already).inc()
        return []

    def on_failure(self, result: Result, reason: str):
        self._dead.inc()
        # The result itself is the most useful thing to replay: it holds the
        # text and id, and re-scoring it is cheap.
        return [DeadLetter.of("redis", reason, result.to_json(), f"result:{result.tweet_id}",
                              result.tweet_id, result.ack_id)]


class _WriteDeadLettersFn(BufferedRedisFn):
    script = _WRITE_DEAD_LETTER
    namespace = "WriteDeadLetters"

    def __init__(self, config: RedisConfig):
        super().__init__(config)
        self._written = Metrics.counter(self.namespace, "written")
        self._already = Metrics.counter(self.namespace, "already_written")
        self._lost = Metrics.counter(self.namespace, "unwritable")

    def script_call(self, dead: DeadLetter):
        c = self._config
        fields = []
        for name, value in dead._asdict().items():
            fields += [name, "" if value is None else value]
        return ([dead_letter_key(c, dead), c.dead_letter_stream, c.stats_key],
                [c.dedupe_ttl_seconds, c.stream_maxlen, dead.stage, *fields])

    def on_reply(self, dead, reply):
        (self._written if reply else self._already).inc()
        return []

    def on_failure(self, dead: DeadLetter, reason: str):
        self._lost.inc()
        _LOG.error("could not write dead letter (stage %s, source %s): %s; reason was: %s",
                   dead.stage, dead.source_id, reason, dead.reason)
        return []


def dead_letter_key(config: RedisConfig, dead: DeadLetter) -> str:
    """The once-key of a dead letter: one per input and stage, even when a
    runner retries a bundle or Pub/Sub redelivers the message.

    It hashes the source id, which names the input within its source's scope
    (the subscription and the message's id and publish time, or the file's
    content hash and line: ``transforms.pubsub.envelope``,
    ``pipeline.read_lines``), with the input's own bytes: message ids repeat
    after an emulator restart and across topics, and a path is reused with
    new content, so neither alone may decide that an input was seen before.
    """
    digest = hashlib.sha256(dead.source_id.encode() + b"\0" + dead.raw_bytes()).hexdigest()
    return f"{config.dedupe_prefix}dl:{dead.stage}:{digest[:32]}"


class WriteToRedis(beam.PTransform):
    """Writes each ``Result`` once: stream + channel + per-window count.

    Returns:
      A tuple of outputs: ``dead_letters`` (results that could not be
      written) and ``acks`` (ack ids of the results written).
    """

    def __init__(self, config: RedisConfig):
        super().__init__()
        self._config = config

    def expand(self, results):
        return results | beam.ParDo(_WriteResultsFn(self._config)).with_output_types(
            DeadLetter).with_outputs(ACKS, main="dead_letters")


class WriteDeadLetters(beam.PTransform):
    """Appends each ``DeadLetter`` to the dead-letter stream (once per input and stage).

    Returns:
      The ack ids of the dead letters written.
    """

    def __init__(self, config: RedisConfig):
        super().__init__()
        self._config = config

    def expand(self, dead_letters):
        return (dead_letters | beam.ParDo(_WriteDeadLettersFn(self._config)).with_outputs(
            ACKS, main="unused"))[ACKS]


class _CountFn(beam.DoFn):
    def __init__(self, config: RedisConfig, field: str):
        self._config = config
        self._field = field
        self._client = None

    def setup(self):
        self._client = shared_client(self._config)

    def start_bundle(self):
        self._count = 0

    def process(self, element):
        self._count += 1

    def finish_bundle(self):
        if self._count:
            import redis

            try:
                self._client.hincrby(self._config.stats_key, self._field, self._count)
            except (redis.ConnectionError, redis.TimeoutError) as err:
                _LOG.warning("could not count %d %s in Redis: %s", self._count, self._field, err)


class CountInRedis(beam.PTransform):
    """Adds the number of elements to ``field`` of the totals hash, once per
    bundle: what the job's summary reports, exactly on every runner (Beam's
    legacy DirectRunner loses metric updates of later streaming bundles)."""

    def __init__(self, config: RedisConfig, field: str):
        super().__init__()
        self._config = config
        self._field = field

    def expand(self, pcoll):
        return pcoll | beam.ParDo(_CountFn(self._config, self._field))
