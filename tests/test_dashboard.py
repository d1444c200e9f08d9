"""The dashboard (ops/dashboard.py): its summary against a real
redis-server, its page in headless Chromium, hostile tweet text, and a Redis
restart under it.

Results reach Redis the way the job writes them: through the real pipeline
(the tiny model) or the sink's own Lua write path (``_WriteResultsFn`` called
directly, as a DoFn test would).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from bertstream.config import RedisConfig
from ops.dashboard import Dashboard, Feed
from runners.local_servers import LocalRedis, free_port
from transforms.records import DeadLetter, Result, now_iso
from transforms.redis_sink import _WriteDeadLettersFn, _WriteResultsFn

ROOT = Path(__file__).resolve().parent.parent
# Where the browser test saves its screenshot: the test's own directory, so
# `make test` leaves the checkout as it was; `make screenshot` sets it to
# docs/dashboard.png, the picture the README shows.
SCREENSHOT_ENV = "BERTSTREAM_SCREENSHOT"
pytestmark = [pytest.mark.integration]

HOSTILE = ('<script>window.__pwned = 1; alert("xss")</script>'
           '<img src=x onerror="window.__pwned = 2; alert(2)"></td></tr><b>bold?</b> & &amp;')
TEXTS = ["Loving the new coffee place on 5th, best latte in town",
         "My flight got cancelled again. Three hours on hold. Never again.",
         "Council meeting moved to Thursday 7pm, agenda attached",
         "The weather in Lisbon is perfect today",
         "ok so the update broke my wifi, anyone else?",
         "Just finished a 10k run, legs are jelly but I feel great",
         "Worst customer service I have ever had",
         "New bus timetable starts on Monday"]


# --- writing the way the job writes ------------------------------------------------------


def result(tweet_id: str, label: str = "positive", window: str = "2026-11-20T10:00:00.000Z",
           **fields) -> Result:
    """A Result with sensible values; fields the record gains later get their defaults
    (or "" when they have none), so this keeps working as the record grows."""
    now = now_iso()
    values = dict(tweet_id=tweet_id, text=f"tweet {tweet_id}", label=label, score=0.8,
                  probabilities=[0.1, 0.1, 0.8], model_version="1", event_time=window,
                  window_start=window, window_end=window[:17] + "02.000Z", processed_at=now,
                  late=False)
    values.update(fields)
    values.update({f: "" for f in Result._fields
                   if f not in values and f not in Result._field_defaults})
    return Result(**values)


def _write(fn, items) -> None:
    fn.setup()
    try:
        fn.start_bundle()
        for item in items:
            list(fn.process(item))
        list(fn.finish_bundle())
    finally:
        fn.teardown()


def write_results(url: str, results: list[Result]) -> None:
    _write(_WriteResultsFn(RedisConfig(url=url)), results)


def write_dead_letters(url: str, dead: list[DeadLetter]) -> None:
    _write(_WriteDeadLettersFn(RedisConfig(url=url)), dead)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def wait_until(check, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def socket_in_use():
    """A port that something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def dashboard(redis_url):
    with Dashboard(RedisConfig(url=redis_url), port=0) as d:
        yield d


# --- no server ---------------------------------------------------------------------------


def test_latency_is_publish_to_result_when_results_carry_published_at():
    feed = Feed(RedisConfig())

    def add(**body):
        base = {"tweet_id": "1", "label": "neutral", "model_version": "1",
                "event_time": "2026-11-20T10:00:00.000Z",
                "processed_at": "2026-11-20T10:00:10.000Z"}
        feed._add_result({b"result": json.dumps({**base, **body}).encode()})

    add(published_at="")  # file input: no publish time
    latency = feed.summary()["latency_seconds"]
    assert latency["kind"] == "event->result" and latency["p50"] == 10.0
    add(published_at="2026-11-20T10:00:08.500Z")
    latency = feed.summary()["latency_seconds"]
    assert latency["kind"] == "publish->result" and latency["p50"] == 1.5
    feed._add_result({b"result": b"not json"})
    assert feed.summary()["unreadable"] == 1


@pytest.mark.timeout(60)
def test_cli_help_and_one_line_errors_that_name_the_flag():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ops.dashboard", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)

    helped = cli("--help")
    assert helped.returncode == 0
    for flag in ("--redis_url", "--host", "--port", "--redis_stream", "--redis_channel",
                 "--redis_deadletter_stream", "--redis_window_prefix", "--redis_stats_key"):
        assert flag in helped.stdout
    assert "127.0.0.1" in helped.stdout
    for args, flag in ((["--redis_url", "http://127.0.0.1:6379"], "--redis_url"),
                       (["--port", "70000"], "--port")):
        failed = cli(*args)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.strip().count("\n") == 0 and flag in failed.stderr, failed.stderr
    with socket_in_use() as port:
        failed = cli("--port", str(port), "--redis_url", "redis://127.0.0.1:1/0")
        assert failed.returncode == 2
        assert failed.stderr.strip().count("\n") == 0 and "--port" in failed.stderr


# --- the summary against a real redis-server ---------------------------------------------


@pytest.mark.timeout(60)
def test_summary_counts_windows_late_data_versions_and_dead_letters(redis_url, dashboard):
    w0, w1 = "2026-11-20T10:00:00.000Z", "2026-11-20T10:00:02.000Z"
    write_results(redis_url, [
        result("1", "negative", w0), result("2", "positive", w0), result("3", "positive", w0),
        result("4", "neutral", w1), result("5", "positive", w1, late=True),
        result("6", "negative", w0, late=True, model_version="2"),
        result("1", "negative", w0),  # a redelivery: the sink writes nothing
    ])
    write_dead_letters(redis_url, [DeadLetter.of("parse", "invalid JSON", b'{"id": ', "f:1"),
                                   DeadLetter.of("parse", "not UTF-8", b"\xff\xfe", "f:2")])

    # The totals come from the sink's stats hash and the rows from reading the streams: a
    # summary can be published between the two (the sink's pipeline is not a transaction),
    # so wait until both agree.
    def caught_up(s: dict) -> dict | None:
        done = (s["results"] == 6 and s["dead_letters"] == 2 and s["results_read"] == 6
                and len(s["latest_dead_letters"]) == 2)
        return s if done else None

    s = wait_until(lambda: caught_up(get_json(dashboard.url + "/api/summary")), 10,
                   "six results and two dead letters, counted and read")
    assert s["redis"]["ok"] is True
    assert s["labels"] == {"negative": 2, "neutral": 1, "positive": 3}
    assert s["duplicates_at_sink"] == 1
    assert s["late"] == 2
    windows = {w["start"]: w for w in s["windows"]}
    assert list(windows) == [w0, w1]  # oldest first, by event time
    assert {k: windows[w0][k] for k in ("negative", "neutral", "positive", "total", "late")} == {
        "negative": 2, "neutral": 0, "positive": 2, "total": 4, "late": 1}
    assert windows[w1]["late"] == 1 and windows[w1]["total"] == 2
    assert windows[w0]["source"] == "redis"  # the sink's hash, not a recount
    assert {v["version"]: v["results"] for v in s["model_versions"]} == {"1": 5, "2": 1}
    assert [r["tweet_id"] for r in s["latest_results"]][:2] == ["6", "5"]  # newest first
    assert [d["reason"] for d in s["latest_dead_letters"]] == ["not UTF-8", "invalid JSON"]
    assert s["latest_dead_letters"][0]["raw"] == "(binary input, base64)"
    assert s["dead_letters_by_stage"] == {"parse": 2}
    assert s["latency_seconds"]["kind"] == "event->result"

    # The same summary, live: a new result arrives as a server-sent event.
    with urllib.request.urlopen(dashboard.url + "/api/events", timeout=10) as events:
        assert events.headers["Content-Type"].startswith("text/event-stream")
        assert "script-src 'self'" in events.headers["Content-Security-Policy"]
        first = _next_summary(events)
        assert first["results"] == 6
        started = time.monotonic()
        write_results(redis_url, [result("7", "neutral", w1)])
        while (summary := _next_summary(events))["results"] != 7:
            pass
        assert time.monotonic() - started < 2
        assert summary["latest_results"][0]["tweet_id"] == "7"


def _next_summary(events) -> dict:
    while True:
        line = events.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            return json.loads(line[6:])


@pytest.mark.timeout(30)
def test_static_files_security_headers_and_unknown_paths(dashboard):
    with urllib.request.urlopen(dashboard.url + "/", timeout=10) as page:
        html = page.read().decode()
        csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "require-trusted-types-for 'script'" in csp
    # Nothing from elsewhere: every script, style and icon is one of ours.
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(ref.startswith("/") for ref in refs), refs
    with urllib.request.urlopen(dashboard.url + "/static/app.js", timeout=10) as js:
        source = js.read().decode()
        assert js.headers["Content-Type"].startswith("text/javascript")
    assert not re.search(r"\.(?:inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", source)
    for path in ("/static/../dashboard.py", "/static/nope.js", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(dashboard.url + path, timeout=10)
        assert missing.value.code == 404
    assert get_json(dashboard.url + "/healthz")["ok"] is True


# --- the page in headless Chromium -------------------------------------------------------


def open_page(driver, url: str) -> None:
    """Loads the page with an empty console log (the last test's page is gone)."""
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(url)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def text_of(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _start_dashboard_cli(redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ops.dashboard", "--redis_url", redis_url,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return get_json(url + "/healthz")["redis"]
        except OSError:
            return False
    wait_until(up, 30, "the dashboard to serve and read Redis", every=0.1)
    return proc, url


def _jsonl(path: Path, tweets: list[dict], extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(t) for t in tweets] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _tweet(i: int, start: float) -> dict:
    stamp = time.gmtime(start + i * 1.5)
    return {"id": str(1870000000000000000 + i), "text": TEXTS[i % len(TEXTS)] + f" #{i}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", stamp),
            "author_id": str(2000 + i), "lang": "en"}


def _run_pipeline(input_file: Path, redis_url: str, model_dir: Path) -> None:
    from pipeline.pipeline import run

    result, _ = run(["--runner=DirectRunner", "--input_file", str(input_file),
                     "--redis_url", redis_url, "--model_dir", str(model_dir)])
    assert result.state == "DONE", result.state


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_page_shows_a_pipeline_run_and_a_new_result_live(redis_url, tiny_model_dir, browser,
                                                         tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.time() - 3600
    tweets = [_tweet(i, start) for i in range(48)]
    _run_pipeline(_jsonl(tmp_path / "run.jsonl", tweets, ['{"id": "1", "text": ', "[1, 2]"]),
                  redis_url, tiny_model_dir)
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("sentiment:results") == len(tweets)
    labels = {"negative": 0, "neutral": 0, "positive": 0}
    window_keys = sorted(client.scan_iter("sentiment:window:*"))
    for key in window_keys:
        for label, n in client.hgetall(key).items():
            labels[label.decode()] += int(n)

    proc, url = _start_dashboard_cli(redis_url)
    try:
        open_page(browser, url)
        WebDriverWait(browser, 10).until(lambda d: text_of(d, "t-results") == str(len(tweets)))
        for label, n in labels.items():
            assert text_of(browser, f"t-{label}") == str(n), label
        assert text_of(browser, "t-dead") == "2"
        assert text_of(browser, "conn") == "live"
        bars = browser.find_elements(By.CSS_SELECTOR, "#chart g.window")
        assert len(bars) == len(window_keys)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == 25
        assert len(browser.find_elements(By.CSS_SELECTOR, "#dead tbody tr")) == 2
        assert "event → result" in text_of(browser, "t-latency-kind")  # file input
        assert text_of(browser, "t-models") != "–"

        # One more tweet through the pipeline; time it from its PUBLISH (the
        # sink's Lua script adds to the stream in the same step).
        new = _tweet(len(tweets), start)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe("sentiment")
        failure: list[BaseException] = []

        def second_run():
            try:
                _run_pipeline(_jsonl(tmp_path / "one.jsonl", [new]), redis_url, tiny_model_dir)
            except BaseException as err:  # reported below, in the test's thread
                failure.append(err)
        runner = threading.Thread(target=second_run, daemon=True)
        runner.start()
        message = wait_until(lambda: pubsub.get_message(timeout=0.05) or failure, 240,
                             "the new result to be published", every=0)
        published = time.monotonic()
        assert not failure, failure
        assert json.loads(message["data"])["tweet_id"] == new["id"]
        row = f'#results tbody tr[data-tweet-id="{new["id"]}"]'
        WebDriverWait(browser, 2, poll_frequency=0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, row))
        shown_after = time.monotonic() - published
        assert shown_after < 2, shown_after
        WebDriverWait(browser, 2).until(lambda d: text_of(d, "t-results") == str(len(tweets) + 1))
        runner.join(120)
        assert not failure, failure
        assert console_errors(browser) == []
        time.sleep(0.5)  # the highlight of the new row fades
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000  # a page, not a blank
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.timeout(90)
def test_hostile_text_is_shown_literally_and_never_runs(redis_url, dashboard, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write_results(redis_url, [result("666", "negative", text=HOSTILE, model_version=HOSTILE)])
    write_dead_letters(redis_url, [DeadLetter.of("parse", HOSTILE, HOSTILE.encode(), "f:9")])
    open_page(browser, dashboard.url)
    row = '#results tbody tr[data-tweet-id="666"]'
    # Results and dead letters are separate streams: wait for both rows.
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, row) and
                                     d.find_elements(By.CSS_SELECTOR, "#dead tbody tr"))
    cell = browser.find_element(By.CSS_SELECTOR, row + " td.text")
    assert cell.get_attribute("textContent") == HOSTILE
    assert "<script>" in cell.text and "</b>" in cell.text  # shown as characters
    assert browser.find_element(By.CSS_SELECTOR, row + " td.model").get_attribute(
        "textContent") == HOSTILE
    dead = browser.find_element(By.CSS_SELECTOR, "#dead tbody tr")
    assert [td.get_attribute("textContent") for td in dead.find_elements(By.TAG_NAME, "td")][2:] \
        == [HOSTILE, HOSTILE]
    for table in ("#results", "#dead", "#t-models"):
        assert not browser.find_elements(By.CSS_SELECTOR, f"{table} script, {table} img, "
                                                          f"{table} b"), table
    time.sleep(0.5)  # an onerror handler would have run by now
    assert browser.execute_script("return window.__pwned") is None
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check
    # Markup that ran, or that the CSP blocked, would both leave a console error.
    assert console_errors(browser) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dashboard_keeps_serving_through_a_redis_restart(tmp_path, browser):
    data = tmp_path / "redis"
    data.mkdir()
    server = LocalRedis(data_dir=str(data)).start()
    url = server.url
    dashboard = Dashboard(RedisConfig(url=url), port=0).start()
    try:
        write_results(url, [result("1"), result("2", "negative")])
        wait_until(lambda: (lambda s: s["results"] == s["results_read"] == 2)(
                       get_json(dashboard.url + "/api/summary")), 10,
                   "the first results")
        open_page(browser, dashboard.url)
        wait_until(lambda: text_of(browser, "t-results") == "2", 10, "the page's first results")

        server.stop()
        down = wait_until(lambda: (lambda s: s if not s["redis"]["ok"] else None)(
            get_json(dashboard.url + "/api/summary")), 15, "the outage to show")
        assert down["results"] == 2, "the last data stays on the page"
        assert get_json(dashboard.url + "/healthz") == {"ok": True, "redis": False}
        wait_until(lambda: "Redis unavailable" in text_of(browser, "banner"), 10,
                   "the page's Redis-unavailable banner")
        assert text_of(browser, "t-results") == "2"

        time.sleep(1.5)  # a few failed reconnects, with backoff
        server = LocalRedis(port=server.port, data_dir=str(data)).start()
        write_results(url, [result("3", "neutral")])
        up = wait_until(lambda: (lambda s: s if s["redis"]["ok"] and s["results"] == s["results_read"] == 3 else None)(
            get_json(dashboard.url + "/api/summary")), 20, "recovery after the restart")
        assert up["labels"] == {"negative": 1, "neutral": 1, "positive": 1}  # AOF replayed
        wait_until(lambda: text_of(browser, "t-results") == "3", 10, "the page to recover")
        assert not browser.find_element("id", "banner").is_displayed()
    finally:
        dashboard.stop()
        server.stop()
