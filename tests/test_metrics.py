"""The dashboard's ``GET /metrics`` (ops/metrics.py) and the Grafana dashboard
(k8s/monitoring/grafana-dashboard.json).

After a real streaming run (the emulator, duplicates and bad messages among
the tweets) the scrape parses as Prometheus text and its totals equal what
Redis holds; with Redis gone it still answers at once, ``up`` 0 and the last
values marked stale; a restarted dashboard continues the counters. Every query
of the Grafana dashboard names a metric the project exports (or, for the
Pub/Sub backlog, the one stackdriver_exporter does); the Flink names are
checked against a real cluster in tests/test_flink_cluster.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bertstream.config import RedisConfig
from ops.dashboard import Dashboard
from ops.metrics import EXPORTED, FLINK, PUBSUB
from runners.local_servers import LocalRedis
from tests.streams import ROOT, publish, sample_messages

GRAFANA = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"


def scrape(url: str, timeout: float = 5) -> dict[str, list]:
    """Family name -> its samples, from a real scrape parsed by prometheus_client."""
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    found = [s.value for samples in families.values() for s in samples
             if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample_name} {labels}: {found}"
    return found[0]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_metrics_after_a_real_run_equal_what_redis_holds(pubsub_names, redis_url,
                                                         tiny_model_dir):
    good = sample_messages(90, offset=11 * 10**6)
    now = good[0][1]["event_ts"]
    bad = [(b"{not json", {"tweet_id": "bad-1", "event_ts": now}),
           (json.dumps({"id": "79", "created_at": now}).encode(),
            {"tweet_id": "79", "event_ts": now})]
    publish(pubsub_names["topic"], good + bad + good[:5])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--input_subscription", pubsub_names["subscription"],
         "--redis_url", redis_url, "--model_dir", str(tiny_model_dir),
         "--stop_after_idle_seconds", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    client = redis.Redis.from_url(redis_url)
    stats = {k.decode(): int(v) for k, v in client.hgetall("sentiment:stats").items()}
    results = [json.loads(f[b"result"]) for _, f in client.xrange("sentiment:results")]
    by_label_version = Counter((r["label"], r["model_version"]) for r in results)
    with Dashboard(RedisConfig(url=redis_url), port=0) as dashboard:
        families = wait_until(lambda: (lambda f: f if value(f, "bertstream_metrics_stale") == 0
                                       else None)(scrape(dashboard.url)), 10, "a first read")
    assert value(families, "bertstream_redis_up") == 1
    assert len(results) == len(good) == stats["results"]
    total = 0
    for (label, version), n in by_label_version.items():
        assert value(families, "bertstream_results_total", label=label, model_version=version) == n
        total += n
    assert sum(s.value for s in families["bertstream_results"]
               if s.name == "bertstream_results_total") == total
    dead = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("dead_letters:")}
    assert dead == {"parse": len(bad)} and client.xlen("sentiment:deadletter") == len(bad)
    assert value(families, "bertstream_dead_letters_total", stage="parse") == len(bad)
    skipped = stats.get("duplicates_skipped", 0) + stats.get("already_written", 0)
    assert skipped == 5
    assert (value(families, "bertstream_duplicates_skipped_total")
            + value(families, "bertstream_already_written_total")) == skipped
    assert value(families, "bertstream_inputs_total") == stats["inputs"] == len(good + bad) + 5
    assert value(families, "bertstream_in_flight") == 0
    assert value(families, "bertstream_late_total") == stats.get("late", 0)
    # Every result came through Pub/Sub, so each has a publish -> result latency.
    assert value(families, "bertstream_publish_to_result_seconds_count") == len(results)
    assert value(families, "bertstream_publish_to_result_seconds_bucket", le="+Inf") == len(
        results)
    latencies = [time_of(r["processed_at"]) - time_of(r["published_at"]) for r in results]
    assert value(families, "bertstream_publish_to_result_seconds_sum") == pytest.approx(
        sum(latencies), abs=0.001 * len(results))
    for bound in ("0.5", "5.0", "60.0"):
        assert value(families, "bertstream_publish_to_result_seconds_bucket", le=bound) == sum(
            1 for x in latencies if x <= float(bound))
    (version,) = {v for _, v in by_label_version}
    assert value(families, "bertstream_model_state", version=version, state="serving") == 1


def time_of(iso: str) -> float:
    from transforms.contract import seconds_from_iso

    # The sink keeps whole milliseconds, as the histogram's sum does.
    return int(seconds_from_iso(iso) * 1000) / 1000


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_with_redis_gone_metrics_answer_at_once_and_a_restart_continues_them(tmp_path):
    from tests.test_dashboard import result, write_results

    data = tmp_path / "redis"
    data.mkdir()
    server = LocalRedis(data_dir=str(data)).start()
    try:
        write_results(server.url, [result("1"), result("2", "negative"), result("3")])
        with Dashboard(RedisConfig(url=server.url), port=0) as dashboard:
            before = wait_until(
                lambda: (lambda f: f if sum(s.value for s in f["bertstream_results"]
                                            if s.name.endswith("_total")) == 3 else None)(
                    scrape(dashboard.url)), 10, "the three results")
            server.stop()
            started = time.monotonic()
            down = wait_until(lambda: (lambda f: f if value(f, "bertstream_redis_up") == 0
                                       else None)(scrape(dashboard.url)), 15, "up 0")
            assert time.monotonic() - started < 15
            for _ in range(5):  # every scrape of an outage answers at once
                t0 = time.monotonic()
                down = scrape(dashboard.url, timeout=2)
                assert time.monotonic() - t0 < 1
            assert value(down, "bertstream_metrics_stale") == 1
            assert value(down, "bertstream_results_total", label="positive",
                         model_version="1") == 2
            server = LocalRedis(port=server.port, data_dir=str(data)).start()
            write_results(server.url, [result("4", "neutral")])
            wait_until(lambda: value(scrape(dashboard.url), "bertstream_redis_up") == 1, 20,
                       "up 1 again")
        assert value(before, "bertstream_metrics_stale") == 0
        # A new dashboard process starts from Redis' totals: the counters go on.
        with Dashboard(RedisConfig(url=server.url), port=0) as again:
            after = wait_until(lambda: (lambda f: f if value(f, "bertstream_metrics_stale") == 0
                                        else None)(scrape(again.url)), 10, "a first read")
        assert value(after, "bertstream_results_total", label="positive", model_version="1") == 2
        assert value(after, "bertstream_results_total", label="neutral", model_version="1") == 1
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_a_dashboard_that_never_reached_redis_still_answers():
    from runners.local_servers import free_port

    with Dashboard(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", retries=0),
                   port=0) as dashboard:
        families = scrape(dashboard.url)
    assert value(families, "bertstream_redis_up") == 0
    assert value(families, "bertstream_metrics_stale") == 1


# --- the Grafana dashboard --------------------------------------------------------------


def _exposed(name: str) -> set[str]:
    """The sample names a family of ``EXPORTED`` is scraped as."""
    if name.endswith("_total"):
        return {name}
    if name == "bertstream_publish_to_result_seconds":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _queries(panels: list[dict]) -> list[tuple[str, str]]:
    out = []
    for panel in panels:
        out += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
        out += _queries(panel.get("panels", []))
    return out


def test_every_grafana_query_names_a_metric_the_project_exports():
    board = json.loads(GRAFANA.read_text())
    known = set().union(*map(_exposed, EXPORTED)) | set(FLINK) | set(PUBSUB)
    queries = _queries(board["panels"])
    assert len(queries) >= 20
    used = set()
    for title, expr in queries:
        names = set(re.findall(r"\b(?:bertstream|flink|stackdriver)_[A-Za-z0-9_:]+", expr))
        assert names, f"{title}: {expr} names no metric of ours"
        unknown = names - known
        assert not unknown, f"{title}: {expr} names {unknown}, which nothing exports"
        used |= names
        # Counters are read as rates, never as raw totals (they restart with the job).
        for counter in re.findall(r"\b\w+_total\b", expr):
            if counter.startswith("bertstream_shadow"):
                continue  # shown as a level: a version's shadow figures
            assert f"rate({counter}" in expr.replace(" ", ""), f"{title}: {expr}"
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Tweets per second", "Label mix", "Publish → result latency",
                   "Dead letters by stage", "Model versions", "Backlog", "Shadow agreement",
                   "Back-pressure and busy time", "Checkpoints", "Batches"):
        assert wanted in titles
    assert {"bertstream_results_total", "bertstream_dead_letters_total",
            "bertstream_publish_to_result_seconds_bucket", "bertstream_model_state"} <= used
    assert used & set(PUBSUB) and used & set(FLINK)
    # Every panel reads the board's data source variable, so it imports anywhere.
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_exported_names_are_what_a_scrape_shows(redis_url):
    """EXPORTED, which the Grafana check trusts, is the scrape's own list."""
    with Dashboard(RedisConfig(url=redis_url), port=0) as dashboard:
        families = scrape(dashboard.url)
    # Families are named without _total (the text format's counter samples add it).
    assert {n.removesuffix("_total") for n in EXPORTED} == set(families)
