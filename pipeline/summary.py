"""The end-of-run summary, read back from the sink's totals in Redis and the job's
Beam metrics, with what a user needs to understand it: tweets already scored in
this Redis, input that was mostly dead-lettered, and where to look. The same on
every runner (``python -m pipeline`` and ``python -m launcher flink``)."""

import json
import time
from typing import NamedTuple, Optional

from apache_beam.metrics.metric import MetricsFilter

from bertstream.config import RedisConfig, connect, read_stats


class Snapshot(NamedTuple):
    """The sink's totals and the dead-letter stream's last entry, at one moment."""

    stats: dict
    last_dead_letter: str

    @classmethod
    def take(cls, config: RedisConfig) -> "Snapshot":
        client = connect(config)
        try:
            last = client.xrevrange(config.dead_letter_stream, count=1)
        finally:
            client.close()
        return cls(read_stats(config), last[0][0].decode() if last else "0")


class Summary(NamedTuple):
    read: int
    results: int
    already_written: int
    duplicates_skipped: int
    dead_lettered: int
    late: int
    seconds: float
    # None where the runner's metrics do not cover every batch (Flink's job
    # service reports none while a job runs; the legacy DirectRunner drops some).
    mean_batch_size: Optional[float]
    max_batch_size: Optional[int]
    padding_efficiency_estimate: Optional[float]
    # The first dead letter of this run: its stage and reason.
    first_dead_letter: str = ""

    @property
    def tweets_per_second(self) -> float:
        return self.results / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> int:
        """Inputs that were tweets: scored now, before, or copies of one."""
        return self.results + self.already_written + self.duplicates_skipped

    def as_dict(self) -> dict:
        body = self._asdict()
        body["tweets_per_second"] = round(self.tweets_per_second, 2)
        return body


def _counter(metrics, namespace: str, name: str) -> int:
    found = metrics.query(MetricsFilter().with_namespace(namespace).with_name(name))
    return sum(int(c.committed or c.attempted or 0) for c in found["counters"])


def _batches(result, written: int) -> tuple:
    """(mean, max, padding efficiency) of the batches, or Nones when the
    runner's metrics do not cover every tweet written."""
    import grpc

    try:
        m = result.metrics()
        found = m.query(MetricsFilter().with_namespace("RunSentiment").with_name("batch_size"))
    except (NotImplementedError, RuntimeError, ValueError, grpc.RpcError):
        return None, None, None  # a job service that keeps none, or is gone
    count = total = biggest = 0
    for d in found["distributions"]:
        value = d.committed or d.attempted
        if value is not None and value.count:
            count += value.count
            total += value.sum
            biggest = max(biggest, value.max)
    if not count or total < written:
        return None, None, None
    real = _counter(m, "RunSentiment", "real_tokens")
    padded = _counter(m, "RunSentiment", "padded_tokens")
    return round(total / count, 1), biggest, (round(real / padded, 3) if padded else None)


def _first_dead_letter(config: RedisConfig, after: str) -> str:
    client = connect(config)
    try:
        entries = client.xrange(config.dead_letter_stream, min=f"({after}", max="+", count=1)
    finally:
        client.close()
    if not entries:
        return ""
    fields = {k.decode(): v.decode(errors="replace") for k, v in entries[0][1].items()}
    return f"{fields.get('stage', '?')}: {fields.get('reason', '?')}"


def collect(result, seconds: float, before: Snapshot, config: RedisConfig) -> Summary:
    """The totals the job keeps in Redis (``before`` and now): exact on every
    runner, each input counted once where a runner that retries a bundle may
    count it twice in its metrics. Every input is one result, one tweet
    already in Redis, one duplicate or one dead letter, so their sum is what
    was read. Batch sizes come from Beam's metrics, where it has them."""
    after = read_stats(config)

    def delta(name: str) -> int:
        return after.get(name, 0) - before.stats.get(name, 0)

    results, already = delta("results"), delta("already_written")
    skipped, dead = delta("duplicates_skipped"), delta("dead_letters")
    mean, biggest, padding = _batches(result, results + already)
    return Summary(read=results + already + skipped + dead, results=results,
                   already_written=already, duplicates_skipped=skipped, dead_lettered=dead,
                   late=delta("late"), seconds=seconds, mean_batch_size=mean,
                   max_batch_size=biggest, padding_efficiency_estimate=padding,
                   first_dead_letter=_first_dead_letter(config, before.last_dead_letter)
                   if dead else "")


def render(summary: Summary, redis_url: str, config: RedisConfig, redis_cli: str,
           input_file: Optional[str] = None) -> str:
    s = summary
    batches = (f"; mean batch {s.mean_batch_size:.1f}, max {s.max_batch_size}"
               if s.mean_batch_size is not None else "")
    lines = [
        "",
        "bertstream summary",
        f"  read                {s.read}",
        f"  results             {s.results}"
        + (f" (+{s.already_written} already in Redis)" if s.already_written else ""),
        f"  duplicates skipped  {s.duplicates_skipped}",
        f"  dead-lettered       {s.dead_lettered}",
        f"  late                {s.late}",
        f"  tweets/s            {s.tweets_per_second:.1f} ({s.seconds:.1f}s{batches})",
        f"  results in          {redis_url}  stream {config.stream}, channel {config.channel}, "
        f"dead letters {config.dead_letter_stream}",
    ]
    if s.already_written:
        lines.append(
            f"  note:               {s.already_written} tweets already had a result in this "
            "Redis (an earlier run scored them) and were not written again; to score them "
            "anew, give another database (e.g. --redis_url ending in /1) or empty this one "
            "(FLUSHDB)")
    if s.dead_lettered and (s.dead_lettered * 2 > s.read or not s.valid):
        what = (f"is {input_file} JSON Lines (one X API v2 tweet object a line)? "
                if input_file else "")
        lines.append(f"  note:               {s.dead_lettered} of {s.read} inputs were "
                     f"dead-lettered ({s.first_dead_letter}); {what}see "
                     f"{redis_cli} XRANGE {config.dead_letter_stream} - + COUNT 5")
    stream = config.stream if s.results or not s.dead_lettered else config.dead_letter_stream
    lines += [
        f"  look:               {redis_cli} XRANGE {stream} - + COUNT 5",
        f"  follow:             python -m ops.subscribe --redis_url {redis_url} --from-start",
        "  json: " + json.dumps(s.as_dict()),
    ]
    return "\n".join(lines)


class IdleStop:
    """Says when a streaming job has had nothing in flight for ``seconds`` after
    its first input: every input it read (the ``inputs`` count the graph keeps)
    has ended in Redis (a result, a duplicate, a tweet already scored or a dead
    letter), and nothing new came. The end of a replay: a demo stops with its
    whole summary instead of racing its last message, and not while a slow
    first batch is still being scored."""

    ENDS = ("results", "already_written", "duplicates_skipped", "dead_letters")

    def __init__(self, config: RedisConfig, seconds: float):
        self._config, self.seconds = config, seconds
        self._base = self._counts()
        self._last, self._changed = self._base, time.monotonic()

    def _counts(self) -> tuple[int, int]:
        stats = read_stats(self._config)
        return stats.get("inputs", 0), sum(stats.get(k, 0) for k in self.ENDS)

    def __call__(self) -> bool:
        now = self._counts()
        if now != self._last:
            self._last, self._changed = now, time.monotonic()
        inputs, ended = now[0] - self._base[0], now[1] - self._base[1]
        quiet = time.monotonic() - self._changed
        # The count of inputs is per bundle, so a retried bundle counts twice:
        # six times as long without any change ends the wait all the same.
        return inputs > 0 and (inputs <= ended and quiet >= self.seconds
                               or quiet >= 6 * self.seconds)


def idle_stop(options, config: RedisConfig) -> Optional[IdleStop]:
    """``--stop_after_idle_seconds`` for a streaming job, or None."""
    seconds = getattr(options, "stop_after_idle_seconds", 0)
    return IdleStop(config, seconds) if seconds and options.is_pubsub else None


def exit_code(summary: Summary) -> int:
    """1 when the job read input and none of it was a tweet, else 0."""
    return 1 if summary.read and not summary.valid else 0
