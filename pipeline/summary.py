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
    """The totals the job keeps in Redis (``before``/``after`` the run): exact
    on every runner, and each input counted once where a runner that retries
    a bundle may count it twice in its metrics. Every input is one result,
    one duplicate (skipped by the job or found already in Redis) or one dead
    letter, so their sum is what was read. Batch sizes come from Beam's
    metrics; where those miss batches (Beam's legacy DirectRunner drops
    updates of later streaming bundles) they are reported as unknown (0)."""
    m = result.metrics()

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
    results, already = delta("results"), delta("already_written")
    skipped, dead = delta("duplicates_skipped"), delta("dead_letters")
    if total < results + already:  # the runner lost some batches' metrics
        count = total = biggest = real = padded = 0
    return Summary(
        read=results + already + skipped + dead,
        results=results,
        already_written=already,
        duplicates_skipped=skipped,
        dead_lettered=dead,
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
        f"({summary.seconds:.1f}s; " + (
            f"mean batch {summary.mean_batch_size:.1f}, max {summary.max_batch_size})"
            if summary.max_batch_size else "batch sizes unknown: the runner's metrics "
                                           "missed some)"),
        f"  results in          {redis_url}  stream {stream}, channel {channel}, "
        f"dead letters {deadletter_stream}",
        f"  look:               {redis_cli} XRANGE {stream} - + COUNT 5",
        f"  follow:             python -m pipeline.subscribe --redis_url {redis_url} --from-start",
        "  json: " + json.dumps(summary.as_dict()),
    ]
    return "\n".join(lines)
