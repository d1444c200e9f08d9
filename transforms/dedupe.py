"""``DedupeByTweetId``: the first tweet per id passes, later copies are counted.

Beam's ``DeduplicatePerKey`` does the same state-plus-expiry-timer dance but
drops duplicates without a trace; the project promises that every input is a
result, a dead letter or a *counted* duplicate, so this DoFn counts them and
hands each skipped copy's ack id on (a skipped copy is one of an input's ends).

It runs in the global window, before event-time windowing, so a copy that
arrives in a later window is still caught. The key is the tweet id; its state
expires with an *event-time* timer at the tweet's time plus ``ttl_seconds``.
A processing-time timer would say "ten minutes from now" more directly, but
on portable runners (Prism, Flink) the Python SDK makes every processing-time
timer hold the step's output watermark at the element's time until it fires:
ten minutes in which no downstream window could close. The Redis sink's
``SET NX`` is the second line of defence once this state has expired (the
summary counts what it finds there as "already in Redis").

A bounded input (a file) is deduplicated with a GroupByKey instead: the
runner groups the ids itself, with no per-id state to keep (and Beam's
batch runner prices every state write by walking the process's objects).

Two layouts of the streaming idea:

- per id (the default): the key is the tweet id; runners that keep keyed
  state and timers in indexed stores (Dataflow) scale with the stream.
- in Redis (``redis_config`` given; the runner profile's choice on the
  adjusted DirectRunner, Prism, Flink and other portable runners): no Beam
  state. Each bundle's ids are checked in
  one pipelined round trip to the Redis the results go to: an id whose
  result is already there (the sink's ``seen`` key) is a copy, and the first
  copy of a new id takes a short claim (``SET NX EX``) that later copies
  meet. On Flink's portable runner each keyed-state access is a blocking
  round trip through the Fn API: the per-id layout read and committed state
  twice per tweet, which took as long as the model took to score the tweets
  (docs/runners.md). Beam's legacy DirectRunner walks every key a stateful
  DoFn has seen on each timer tick, so a key per id slows it down with every
  tweet; a few keys holding sets of ids (the layout it had before) were
  decoded, re-encoded and rewritten whole at every bundle, a cost that grew
  with the ids remembered until at 80 % of its capacity latency rose through
  the minute (docs/benchmarks.md). The claim lasts half the Pub/Sub lease, so a
  message redelivered because its job died (only after the whole lease) is
  never mistaken for a copy; a copy that arrives after the claim ended but
  before the first copy's result is scored again and written once (the sink
  counts it as already written). Since the step keeps no state it needs no
  key and fuses with the read. When Redis cannot be reached every tweet
  passes (the sink, which must reach Redis anyway, still writes each once).
"""

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Duration

from bertstream.config import RedisConfig
from transforms.records import Tweet, seconds_from_iso
from transforms.redis_sink import BufferedRedisFn

DEFAULT_TTL_SECONDS = 600
SKIPPED = "skipped"
# Tweets whose result was already in Redis (an earlier run scored them): ended
# like a skipped copy, but counted by the claim script as the sink counts them.
ALREADY = "already_written"
# Source ids of tweets re-published from the dead letter start with this
# (``replay:<dead-letter entry id>/pubsub:<message id>``): a replay is a new
# attempt at a tweet whose first attempt failed after this step had already
# remembered its id, so it is deduplicated apart from that first attempt.
REPLAY_PREFIX = "replay:"


def dedupe_key(tweet: Tweet) -> str:
    """The tweet id, plus the replay's entry id for a replayed tweet."""
    if tweet.source_id.startswith(REPLAY_PREFIX):
        return f"{tweet.tweet_id}@{tweet.source_id.split('/', 1)[0]}"
    return tweet.tweet_id


class _FirstPerIdFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: float):
        self._ttl = Duration.of(ttl_seconds)
        self._unique = Metrics.counter("DedupeByTweetId", "unique")
        self._duplicates = Metrics.counter("DedupeByTweetId", "duplicates_skipped")

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                seen=beam.DoFn.StateParam(SEEN), expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, tweet = element
        if seen.read():
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(SKIPPED, tweet.ack_id)
            return
        seen.write(True)
        expiry.set(timestamp + self._ttl)
        self._unique.inc()
        yield tweet

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


class _FirstOfGroupFn(beam.DoFn):
    """Keeps one copy of a grouped id (the first by source), at its own time."""

    def __init__(self):
        self._unique = Metrics.counter("DedupeByTweetId", "unique")
        self._duplicates = Metrics.counter("DedupeByTweetId", "duplicates_skipped")

    def process(self, element):
        _, copies = element
        first, *rest = sorted(copies, key=lambda t: t.source_id)
        self._unique.inc()
        self._duplicates.inc(len(rest))
        for copy in rest:
            yield beam.pvalue.TaggedOutput(SKIPPED, copy.ack_id)
        # A grouped element carries its window's end as timestamp: restore
        # the tweet's own, which windowing reads.
        yield beam.window.TimestampedValue(first, seconds_from_iso(first.event_time))


# KEYS: the sink's result key for the id, the claim key, the stats hash.
# ARGV: claim TTL s. 1: the first copy (claimed now); 0: a copy (an earlier
# copy holds the claim); 2: its result is already in Redis (counted, as the
# sink counts what it finds already written).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'already_written', 1)
  return 2
end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 1 end
return 0
"""
CLAIM_PREFIX = "sentiment:claim:"


class _FirstPerIdInRedisFn(BufferedRedisFn):
    """Claims a bundle's ids in one pipelined round trip (flushing every
    ``FLUSH_EVERY`` tweets on a long bundle). Emits no acks: a tweet that
    passes has not reached its end yet."""

    script = _CLAIM
    namespace = "DedupeByTweetId"
    emits_acks = False

    def __init__(self, config: RedisConfig, claim_seconds: int):
        super().__init__(config)
        self._claim_seconds = max(1, int(claim_seconds))
        self._already = Metrics.counter(self.namespace, "already_written")
        self._unique = Metrics.counter(self.namespace, "unique")
        self._duplicates = Metrics.counter(self.namespace, "duplicates_skipped")

    def script_call(self, tweet: Tweet):
        return ([self._config.dedupe_prefix + tweet.tweet_id, CLAIM_PREFIX + dedupe_key(tweet),
                 self._config.stats_key], [self._claim_seconds])

    def on_reply(self, tweet: Tweet, reply):
        if reply == 1:
            self._unique.inc()
            return [tweet]
        if reply == 2:
            self._already.inc()
            return [beam.pvalue.TaggedOutput(ALREADY, tweet.ack_id)]
        self._duplicates.inc()
        return [beam.pvalue.TaggedOutput(SKIPPED, tweet.ack_id)]

    def on_failure(self, tweet: Tweet, reason: str):
        # Unchecked (counted as connection_failures): the sink writes each id once.
        return [tweet]


class DedupeByTweetId(beam.PTransform):
    """Keeps the first ``Tweet`` per ``tweet_id`` for ``ttl_seconds`` of event
    time; counts the rest in ``DedupeByTweetId/duplicates_skipped``.

    Args:
      ttl_seconds: how long an id is remembered (the Beam-state layouts).
      redis_config: the layout in Redis (module doc): the sink's Redis, whose
        ``seen`` keys say which ids have a result.
      claim_seconds: how long a first copy's claim lasts in Redis; at most
        half the Pub/Sub lease.

    Returns:
      A tuple of outputs: ``tweets``, ``skipped`` (the skipped copies' ack ids)
      and ``already_written`` (the ack ids of tweets whose result the Redis
      layout found already written; empty in the other layouts, where the sink
      finds them).
    """

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 redis_config: RedisConfig | None = None, claim_seconds: int = 30):
        super().__init__()
        self._ttl = ttl_seconds
        self._redis = redis_config
        self._claim_seconds = claim_seconds

    def expand(self, tweets):
        if tweets.is_bounded:
            return (tweets
                    | "KeyById" >> beam.Map(lambda t: (dedupe_key(t), t)).with_output_types(
                        tuple[str, Tweet])
                    | "GroupById" >> beam.GroupByKey()
                    | "FirstPerId" >> beam.ParDo(_FirstOfGroupFn()).with_output_types(
                        Tweet).with_outputs(SKIPPED, ALREADY, main="tweets"))
        if self._redis is not None:
            return tweets | "FirstPerIdInRedis" >> beam.ParDo(
                _FirstPerIdInRedisFn(self._redis, self._claim_seconds)).with_output_types(
                    Tweet).with_outputs(SKIPPED, ALREADY, main="tweets")
        keyed = tweets | "KeyById" >> beam.Map(
            lambda t: (dedupe_key(t), t)).with_output_types(tuple[str, Tweet])
        fn = _FirstPerIdFn(self._ttl)
        return keyed | "FirstPerId" >> beam.ParDo(fn).with_output_types(Tweet).with_outputs(
            SKIPPED, ALREADY, main="tweets")
