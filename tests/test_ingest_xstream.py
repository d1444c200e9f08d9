"""x-stream against a local stand-in for the X API v2 filtered stream, into the emulator.

``FakeX`` speaks the wire format on 127.0.0.1: the rules endpoints, and a
chunked stream of newline-delimited JSON payloads with "\\r\\n" keep-alives.
Each stream connection runs the next scripted behaviour (a 429 with
x-rate-limit-reset, a connection dropped mid-chunk, a healthy stream). The real
tweepy client is routed to it with the ingester's own ``api_base`` adapter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from ingest.publish import PublishSettings
from ingest.rules import fetch_rules, reconcile
from ingest.xstream import Backoff, XStream, run_x_stream
from tests.test_ingest_replay import pull_all

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "fake-bearer-token-for-tests-only"
FAST = Backoff(network_step_s=0.05, http_start_s=0.05, rate_limit_start_s=0.05,
               stall_timeout_s=5.0)


def tweet(i: int) -> dict:
    return {"id": str(2123717988971446272 + i), "text": f"streamed tweet {i} ☀️",
            "created_at": f"2026-11-20T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
            "author_id": str(1000 + i), "lang": "en", "edit_history_tweet_ids": [str(i)]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeX

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    # the stream's building blocks, for scripts
    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_tweet(self, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.chunk(data + b"\r\n")
        self.server.sent += 1

    def keep_alive(self) -> None:
        self.chunk(b"\r\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Half a chunk, then the socket goes away: what a network cut looks like."""
        self.wfile.write(b"80\r\n{\"data\": {\"id\": \"999\", \"te")
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.seen_auth.add(self.headers.get("Authorization", ""))
        url = urlsplit(self.path)
        if url.path == "/2/tweets/search/stream/rules":
            rules = [{"id": k, "value": v} for k, v in self.server.rules.items()]
            body = {"meta": {"sent": "2026-11-20T10:00:00.000Z", "result_count": len(rules)}}
            if rules:
                body["data"] = rules
            return self._json(200, body)
        if url.path == "/2/tweets/search/stream":
            self.server.stream_requests.append((time.time(), parse_qs(url.query)))
            n = len(self.server.stream_requests) - 1
            script = self.server.scripts[min(n, len(self.server.scripts) - 1)]
            return script(self)
        return self._json(404, {"title": "Not Found"})

    def do_POST(self):  # noqa: N802
        self.server.seen_auth.add(self.headers.get("Authorization", ""))
        url = urlsplit(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        dry_run = parse_qs(url.query).get("dry_run") == ["true"]
        self.server.rule_posts.append((body, dry_run))
        if "delete" in body:
            ids = body["delete"]["ids"]
            if not dry_run:
                for rule_id in ids:
                    self.server.rules.pop(rule_id, None)
            return self._json(200, {"meta": {"summary": {"deleted": len(ids), "not_deleted": 0}}})
        added, errors = [], []
        for rule in body["add"]:
            if "INVALID" in rule["value"]:
                errors.append({"value": rule["value"], "title": "UnprocessableEntity",
                               "details": ["syntax error"]})
                continue
            rule_id = str(1900000000000000000 + len(self.server.rules) + len(added) + 10)
            added.append({"id": rule_id, "value": rule["value"]})
        if not dry_run:
            self.server.rules.update({r["id"]: r["value"] for r in added})
        body = {"meta": {"summary": {"created": len(added), "not_created": len(errors)}}}
        if added:
            body["data"] = added
        if errors:
            body["errors"] = errors
        return self._json(201, body)


class FakeX(ThreadingHTTPServer):
    """A scripted X API v2 on 127.0.0.1 (one thread per connection)."""

    daemon_threads = True

    def __init__(self, scripts: list[Callable[[_Handler], None]], rules: dict | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scripts = scripts
        self.rules: dict[str, str] = dict(rules or {})
        self.rule_posts: list = []
        self.stream_requests: list = []
        self.seen_auth: set[str] = set()
        self.sent = 0
        self.closing = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.shutdown()
        self.server_close()


def rate_limited(reset_in_s: int) -> Callable[[_Handler], None]:
    def script(h: _Handler) -> None:
        h._json(429, {"title": "Too Many Requests", "detail": "Too Many Requests", "status": 429},
                {"x-rate-limit-reset": str(int(time.time()) + reset_in_s),
                 "x-rate-limit-remaining": "0"})
    return script


def stream_then_drop(payloads: list) -> Callable[[_Handler], None]:
    def script(h: _Handler) -> None:
        h.start_stream()
        h.keep_alive()
        for p in payloads:
            h.send_tweet(p)
        h.keep_alive()
        h.drop()
    return script


def stream_and_idle(payloads: list) -> Callable[[_Handler], None]:
    def script(h: _Handler) -> None:
        h.start_stream()
        for p in payloads:
            if isinstance(p, tuple):  # one payload split over two chunks
                h.chunk(p[0])
                h.chunk(p[1])
                h.server.sent += 1
            else:
                h.send_tweet(p)
        while not h.server.closing.wait(0.2):
            h.keep_alive()
        h.end_stream()
    return script


def _run_in_thread(**kwargs) -> tuple[threading.Thread, threading.Event, list]:
    stop = threading.Event()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run_x_stream(stop=stop, **kwargs)),
                              daemon=True)
    thread.start()
    return thread, stop, result


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_every_streamed_tweet_reaches_pubsub_exactly_once(pubsub_names, caplog):
    caplog.set_level("INFO")
    first, rest = [tweet(i) for i in range(5)], [tweet(i) for i in range(5, 12)]
    big_id = 2**63 + 12345  # above 2**53: must not be rounded on the way
    numeric = b'{"data": {"id": %d, "text": "numeric id", "created_at": "2026-11-20T10:05:00Z"}}' % big_id
    split = json.dumps({"data": tweet(12)}).encode() + b"\r\n"
    payloads_2 = [
        {"data": rest[0], "includes": {"users": [{"id": "1005", "username": "someone"}]},
         "matching_rules": [{"id": "1", "tag": "weather"}]},
        *({"data": t} for t in rest[1:]),
        numeric,
        (split[:40], split[40:]),
        {"data": dict(tweet(13), text="")},  # bad: reported, not published
        {"errors": [{"title": "operational-disconnect", "detail": "just an error payload"}]},
    ]
    scripts = [rate_limited(2), stream_then_drop([{"data": t} for t in first]),
               stream_and_idle(payloads_2)]
    expected_ids = {t["id"] for t in first + rest} | {str(big_id), tweet(12)["id"]}

    with FakeX(scripts, rules={"1": "stale rule", "2": "bertstream lang:en"}) as fake:
        thread, stop, result = _run_in_thread(
            bearer_token=FAKE_TOKEN, topic=pubsub_names["topic"],
            rules=["bertstream lang:en", "#sentiment lang:en"], api_base=fake.url,
            backoff=FAST, stats_interval_s=0.5, settings=PublishSettings(max_latency_s=0.05))
        messages = pull_all(pubsub_names["subscription"], expect=len(expected_ids), timeout=60,
                            quiet_s=2.0)
        stop.set()
        thread.join(30)
        assert not thread.is_alive()

        totals = result[0]
        ids = [m.message.attributes["tweet_id"] for m in messages]
        assert sorted(ids) == sorted(expected_ids)  # each exactly once
        for m in messages:
            data = json.loads(m.message.data)
            assert data["id"] == m.message.attributes["tweet_id"]
            assert m.message.attributes["event_ts"].endswith("Z")
            assert "includes" not in data and "matching_rules" not in data
        assert (totals.received, totals.published, totals.bad, totals.failed) == (15, 14, 1, 0)

        # Rules: stale one deleted, kept one untouched (same id), missing one added.
        assert sorted(fake.rules.values()) == ["#sentiment lang:en", "bertstream lang:en"]
        assert fake.rules["2"] == "bertstream lang:en" and "1" not in fake.rules
        # The stream asked for the contract's fields.
        fields = fake.stream_requests[0][1]["tweet.fields"][0].split(",")
        assert {"created_at", "author_id", "lang", "referenced_tweets"} <= set(fields)
        # 429: the reconnect waited for x-rate-limit-reset (>= 1 s here), not the 0.05 s backoff.
        (t429, _), (t_after, _), (t_third, _) = fake.stream_requests[:3]
        assert t_after - t429 >= 0.95
        # The dropped connection was retried at once (network backoff starts at 0).
        assert t_third - t_after < 2.0
        assert fake.seen_auth == {f"Bearer {FAKE_TOKEN}"}

    log = caplog.text
    assert "tweets/s over the last" in log
    assert "stream connection lost" in log and "reconnecting in" in log
    assert FAKE_TOKEN not in log


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_rules_reconcile_is_idempotent_and_dry_run_changes_nothing():
    with FakeX([], rules={"7": "old"}) as fake:
        client = XStream(FAKE_TOKEN, api_base=fake.url)
        plan = reconcile(client, ["a lang:en", "b"], dry_run=True)
        assert plan.add == ["a lang:en", "b"] and [r.id for r in plan.delete] == ["7"]
        assert fake.rules == {"7": "old"}  # dry run: X only validated
        assert fake.rule_posts[-1][1] is True

        reconcile(client, ["a lang:en", "b"])
        assert sorted(fake.rules.values()) == ["a lang:en", "b"]
        posts = len(fake.rule_posts)
        assert not reconcile(client, ["b", "a lang:en"]).changes
        assert len(fake.rule_posts) == posts  # nothing sent the second time
        assert sorted(r.value for r in fetch_rules(client)) == ["a lang:en", "b"]

        with pytest.raises(ValueError, match="--rule"):
            reconcile(client, ["b", "INVALID((("])


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unauthorized_ends_the_stream_with_a_reason(pubsub_names):
    def unauthorized(h: _Handler) -> None:
        h._json(401, {"title": "Unauthorized", "status": 401})

    with FakeX([unauthorized], rules={"1": "x"}) as fake:
        totals = run_x_stream(FAKE_TOKEN, pubsub_names["topic"], api_base=fake.url, backoff=FAST)
    assert "HTTP 401" in totals.error and "X_BEARER_TOKEN" in totals.error
    assert FAKE_TOKEN not in totals.error
    assert len(fake.stream_requests) == 1  # no retry loop on a bad token


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ingest", "x-stream", *args]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_cli_list_rules_and_debug_logs_never_show_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(FAKE_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "X_BEARER_TOKEN"}
    with FakeX([], rules={"5": "from:someone"}) as fake:
        done = subprocess.run(
            _cli("--list-rules", "--dry-run", "--rule", "new rule", "--bearer-token-file",
                 str(token_file), "--api-base-url", fake.url, "--log-level", "DEBUG"),
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[0]) == {"id": "5", "value": "from:someone",
                                                           "tag": None}
        assert "add    'new rule'" in done.stdout and "delete 'from:someone'" in done.stdout
        assert fake.rules == {"5": "from:someone"}
        assert FAKE_TOKEN not in done.stdout + done.stderr
        assert "[REDACTED]" in done.stderr  # tweepy logged the headers, scrubbed

        missing = subprocess.run(_cli("--list-rules"), cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode == 2 and "--bearer-token-file" in missing.stderr


def burst(total: int) -> Callable[[_Handler], None]:
    def script(h: _Handler) -> None:
        h.start_stream()
        for i in range(total):
            if h.server.closing.is_set():
                return
            try:
                h.send_tweet({"data": tweet(i)})
            except OSError:  # the ingester went away
                return
            if i % 100 == 99:
                time.sleep(0.02)  # ~5,000 tweets/s at most
        while not h.server.closing.wait(0.2):
            h.keep_alive()
    return script


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_sigterm_during_a_burst_loses_nothing_accepted(pubsub_names):
    """Everything the ingester says it received is in Pub/Sub, exactly once."""
    total = 50_000
    env = dict(os.environ, X_BEARER_TOKEN=FAKE_TOKEN)
    with FakeX([burst(total)], rules={"1": "bertstream"}) as fake:
        proc = subprocess.Popen(
            _cli("--topic", pubsub_names["topic"], "--api-base-url", fake.url,
                 "--max-latency", "0.5", "--max-messages", "500"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while fake.sent < 2000 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert fake.sent >= 2000, "the burst never started"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    received = summary["received"]
    print("x-stream SIGTERM summary:", summary)
    assert 0 < received < total, "SIGTERM did not land during the burst"
    assert summary["published"] == received and summary["failed"] == 0
    messages = pull_all(pubsub_names["subscription"], expect=received, timeout=60)
    # The stream is read in order, so what was accepted is exactly the first `received` tweets.
    assert sorted(m.message.attributes["tweet_id"] for m in messages) == sorted(
        tweet(i)["id"] for i in range(received))
    assert "SIGTERM: stopping" in err and FAKE_TOKEN not in err


def test_the_private_tweepy_method_xstream_replaces_is_checked(monkeypatch):
    import tweepy

    from ingest.xstream import check_tweepy_private_api

    check_tweepy_private_api()  # the pinned tweepy: as XStream expects
    monkeypatch.setattr(tweepy.StreamingClient, "_connect",
                        lambda self, method, endpoint, params=None: None)
    with pytest.raises(RuntimeError, match=r"tweepy .*_connect.* changed.*constraints.txt"):
        check_tweepy_private_api()
