"""The end-of-run summary, read back from the job's Beam metrics and the
sink's totals in Redis."""

import json
from typing import NamedTuple

from apache_beam.metrics.metric import MetricsFilter


class Summary(NamedTuple):
    read: int
    results: int
    already_written: int
    duplicates_skipped: int
    dead_lettered: int
    late: int
    seconds: float
    mean_batch_size: float
    max_batch_size: int
    padding_efficiency_estimate: float

    @property
    def tweets_per_second(self) -> float:
        return self.results / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        body = self._asdict()
        body["tweets_per_second"] = round(self.tweets_per_second, 2)
        return body


def _counter(metrics, namespace: str, name: str) -> int:
    found = metrics.query(MetricsFilter().with_namespace(namespace).with_name(name))
    return sum(int(c.committed or c.attempted or 0) for c in found["counters"])


def collect(result, seconds: float, before: dict[str, int], after: dict[str, int]) -> Summary:
    """Reads the job's Beam counters, and the sink's totals in Redis
    (``before``/``after`` the run) for what was written: those count each
    tweet once, where a runner that retries a bundle may count it again."""
    m = result.metrics()
    parsed = _counter(m, "ParseTweets", "parsed")
    parse_dead = _counter(m, "ParseTweets", "dead_lettered")

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    batches = m.query(MetricsFilter().with_namespace("RunSentiment").with_name("batch_size"))
    count = total = biggest = 0
    for d in batches["distributions"]:
        value = d.committed or d.attempted
        if value is not None and value.count:
            count += value.count
            total += value.sum
            biggest = max(biggest, value.max)
    real = _counter(m, "RunSentiment", "real_tokens")
    padded = _counter(m, "RunSentiment", "padded_tokens")
    return Summary(
        read=parsed + parse_dead,
        results=delta("results"),
        already_written=delta("already_written"),
        duplicates_skipped=_counter(m, "DedupeByTweetId", "duplicates_skipped"),
        dead_lettered=delta("dead_letters"),
        late=delta("late"),
        seconds=seconds,
        mean_batch_size=total / count if count else 0.0,
        max_batch_size=biggest,
        padding_efficiency_estimate=real / padded if padded else 0.0,
    )


def render(summary: Summary, redis_url: str, stream: str, channel: str,
           deadletter_stream: str, redis_cli: str) -> str:
    lines = [
        "",
        "bertstream summary",
        f"  read                {summary.read}",
        f"  results             {summary.results}"
        + (f" (+{summary.already_written} already in Redis)" if summary.already_written else ""),
        f"  duplicates skipped  {summary.duplicates_skipped}",
        f"  dead-lettered       {summary.dead_lettered}",
        f"  late                {summary.late}",
        f"  tweets/s            {summary.tweets_per_second:.1f} "
        f"({summary.seconds:.1f}s; mean batch {summary.mean_batch_size:.1f}, "
        f"max {summary.max_batch_size})",
        f"  results in          {redis_url}  stream {stream}, channel {channel}, "
        f"dead letters {deadletter_stream}",
        f"  look:               {redis_cli} XRANGE {stream} - + COUNT 5",
        f"  follow:             python -m pipeline.subscribe --redis_url {redis_url} --from-start",
        "  json: " + json.dumps(summary.as_dict()),
    ]
    return "\n".join(lines)
