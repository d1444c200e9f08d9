"""``GET /metrics``: what the job wrote to Redis, in Prometheus' text format.

Every counter is a total the sink keeps in Redis (its totals hash), so a scrape
after the dashboard restarts continues the series where it was. The dashboard's
reader refreshes them about once a second; a scrape renders what it last read,
and never waits on Redis: with Redis down it answers ``bertstream_redis_up 0``
and ``bertstream_metrics_stale 1`` beside the last values it had.

``EXPORTED`` names every metric family (as a query names it); the Grafana
dashboard in ``k8s/monitoring/`` uses nothing else (``tests/test_metrics.py``).
"""

from __future__ import annotations

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from bertstream.config import LATENCY_BUCKET_PREFIX, LATENCY_BUCKETS
from transforms.contract import LABELS

# The classic text format, which every Prometheus (2.x and 3.x) reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
ENDS = ("results", "already_written", "duplicates_skipped", "dead_letters")

EXPORTED = {
    "bertstream_redis_up": "1 when the dashboard's last read of Redis succeeded",
    "bertstream_metrics_stale": "1 when the values below are the last ones read before Redis "
                                "became unreachable",
    "bertstream_results_total": "results written, by label and model version",
    "bertstream_dead_letters_total": "dead letters written, by the stage that rejected the input",
    "bertstream_duplicates_skipped_total": "copies of a tweet skipped by the job",
    "bertstream_already_written_total": "tweets whose result Redis already held",
    "bertstream_late_total": "results whose window had closed when they arrived",
    "bertstream_inputs_total": "inputs the job read (counted per bundle)",
    "bertstream_in_flight": "inputs read but not yet ended in Redis: the backlog inside the job",
    "bertstream_publish_to_result_seconds": "Pub/Sub publish to result written",
    "bertstream_model_state": "1 for each model version's state (serving, shadow, promoted, "
                              "rejected)",
    "bertstream_shadow_scored_total": "tweets a version in shadow scored beside the serving one",
    "bertstream_shadow_agreed_total": "of those, tweets it gave the serving version's label",
    "bertstream_shadow_errors_total": "tweets a version in shadow failed to score",
    "bertstream_shadow_labels_total": "labels a version in shadow gave, by label",
    "bertstream_shadow_confidence_mean": "mean top probability of a version in shadow",
    "bertstream_shadow_latency_seconds_mean": "mean time a version in shadow took per batch",
}

# What the Grafana dashboard reads from elsewhere, and who exports it there.
# Flink's Prometheus reporter (k8s/base/flink.yaml) names a metric ``flink_`` +
# its group's scope + its name; Beam's counters of the job are operator
# metrics (``<namespace>_<name>``). Beam distributions reach that reporter as
# a gauge of a non-number, which it exports as 0: hence the job's counters of
# batches, batched tweets and inference milliseconds beside its batch-size
# distribution. tests/test_flink_cluster.py checks every name here against what
# a real Flink cluster lists for the running job.
FLINK = {
    "flink_jobmanager_job_lastCheckpointDuration": "the last checkpoint's duration, ms",
    "flink_jobmanager_job_numberOfCompletedCheckpoints": "checkpoints completed",
    "flink_jobmanager_job_numberOfFailedCheckpoints": "checkpoints failed",
    "flink_jobmanager_job_numRestarts": "restarts of the job (a TaskManager lost, a failure)",
    "flink_taskmanager_job_task_backPressuredTimeMsPerSecond": "back-pressure, ms per second",
    "flink_taskmanager_job_task_busyTimeMsPerSecond": "busy time, ms per second",
    "flink_taskmanager_job_task_operator_currentOutputWatermark": "an operator's watermark",
    "flink_taskmanager_job_task_operator_ReadTweets_pulled": "messages pulled from Pub/Sub",
    "flink_taskmanager_job_task_operator_ParseTweets_parsed": "tweets parsed",
    "flink_taskmanager_job_task_operator_DedupeByTweetId_unique": "tweets past the dedupe",
    "flink_taskmanager_job_task_operator_RunSentiment_results": "tweets scored",
    "flink_taskmanager_job_task_operator_WriteToRedis_written": "results written to Redis",
    "flink_taskmanager_job_task_operator_RunSentiment_batches": "model calls",
    "flink_taskmanager_job_task_operator_RunSentiment_batched_tweets": "tweets in model calls",
    "flink_taskmanager_job_task_operator_RunSentiment_inference_ms": "time in model calls, ms",
    "flink_taskmanager_job_task_operator_RunSentiment_real_tokens": "tokens of the tweets",
    "flink_taskmanager_job_task_operator_RunSentiment_padded_tokens": "tokens with padding",
}
# The subscription's backlog is Pub/Sub's own figure, in Cloud Monitoring; the
# Prometheus community's stackdriver_exporter brings it into Prometheus
# (docs/operations.md, "Prometheus and Grafana").
PUBSUB = {
    "stackdriver_pubsub_subscription_pubsub_googleapis_com_subscription_num_undelivered_messages":
        "messages in the subscription not yet acknowledged (stackdriver_exporter)",
    "stackdriver_pubsub_subscription_pubsub_googleapis_com_subscription_oldest_unacked_message_age":
        "age of the oldest unacknowledged message, s (stackdriver_exporter)",
}


def _number(value, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class _Snapshot:
    """A collector over the totals and model states last read from Redis."""

    def __init__(self, stats: dict, models: dict, up: bool, read: bool):
        self.stats, self.models, self.up, self.read = stats, models, up, read

    def collect(self):
        s = self.stats
        yield GaugeMetricFamily("bertstream_redis_up", EXPORTED["bertstream_redis_up"],
                                value=1.0 if self.up else 0.0)
        yield GaugeMetricFamily("bertstream_metrics_stale", EXPORTED["bertstream_metrics_stale"],
                                value=0.0 if self.up and self.read else 1.0)
        results = CounterMetricFamily("bertstream_results",
                                      EXPORTED["bertstream_results_total"],
                                      labels=["label", "model_version"])
        for field, value in sorted(s.items()):
            parts = field.split(":")
            if parts[0] == "results" and len(parts) == 3 and parts[1] in LABELS:
                results.add_metric([parts[1], parts[2]], value)
        yield results
        dead = CounterMetricFamily("bertstream_dead_letters",
                                   EXPORTED["bertstream_dead_letters_total"], labels=["stage"])
        for field, value in sorted(s.items()):
            if field.startswith("dead_letters:"):
                dead.add_metric([field.split(":", 1)[1]], value)
        yield dead
        for name, field in (("bertstream_duplicates_skipped", "duplicates_skipped"),
                            ("bertstream_already_written", "already_written"),
                            ("bertstream_late", "late"), ("bertstream_inputs", "inputs")):
            yield CounterMetricFamily(name, EXPORTED[f"{name}_total"], value=s.get(field, 0))
        ended = sum(s.get(k, 0) for k in ENDS)
        yield GaugeMetricFamily("bertstream_in_flight", EXPORTED["bertstream_in_flight"],
                                value=max(0, s.get("inputs", 0) - ended))
        cumulative, buckets = 0, []
        for bound in LATENCY_BUCKETS:
            cumulative += s.get(f"{LATENCY_BUCKET_PREFIX}{bound}", 0)
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", cumulative + s.get(f"{LATENCY_BUCKET_PREFIX}+Inf", 0)))
        yield HistogramMetricFamily("bertstream_publish_to_result_seconds",
                                    EXPORTED["bertstream_publish_to_result_seconds"],
                                    buckets=buckets,
                                    sum_value=s.get("latency_sum_ms", 0) / 1000.0)
        yield from self._models()

    def _models(self):
        state = GaugeMetricFamily("bertstream_model_state", EXPORTED["bertstream_model_state"],
                                  labels=["version", "state"])
        scored = CounterMetricFamily("bertstream_shadow_scored",
                                     EXPORTED["bertstream_shadow_scored_total"],
                                     labels=["version"])
        agreed = CounterMetricFamily("bertstream_shadow_agreed",
                                     EXPORTED["bertstream_shadow_agreed_total"],
                                     labels=["version"])
        errors = CounterMetricFamily("bertstream_shadow_errors",
                                     EXPORTED["bertstream_shadow_errors_total"],
                                     labels=["version"])
        labels = CounterMetricFamily("bertstream_shadow_labels",
                                     EXPORTED["bertstream_shadow_labels_total"],
                                     labels=["version", "label"])
        confidence = GaugeMetricFamily("bertstream_shadow_confidence_mean",
                                       EXPORTED["bertstream_shadow_confidence_mean"],
                                       labels=["version"])
        latency = GaugeMetricFamily("bertstream_shadow_latency_seconds_mean",
                                    EXPORTED["bertstream_shadow_latency_seconds_mean"],
                                    labels=["version"])
        for version, m in sorted(self.models.items()):
            state.add_metric([version, str(m.get("state", ""))], 1.0)
            n = _number(m.get("scored"))
            scored.add_metric([version], n)
            agreed.add_metric([version], _number(m.get("agreed")))
            errors.add_metric([version], _number(m.get("errors")))
            for label in LABELS:
                labels.add_metric([version, label], _number(m.get(f"label:{label}")))
            if n:
                confidence.add_metric([version], _number(m.get("confidence_milli")) / 1000 / n)
            batches = _number(m.get("batches"))
            if batches:
                latency.add_metric([version], _number(m.get("latency_ms")) / 1000 / batches)
        yield from (state, scored, agreed, errors, labels, confidence, latency)


def render(stats: dict, models: dict, up: bool, read: bool) -> bytes:
    """The text a scrape gets: ``stats`` the sink's totals hash, ``models`` the
    model versions' hashes by version, ``up`` whether the last read of Redis
    succeeded, ``read`` whether one ever did."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(dict(stats), dict(models), up, read))
    return generate_latest(registry)
