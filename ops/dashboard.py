"""``python -m ops.dashboard``: a live web page of the scored stream.

It reads what the sink writes (``transforms/redis_sink.py``) and nothing else:
the results stream (followed with ``XREAD``, which, unlike the channel, loses
nothing while the dashboard reconnects), the per-window hashes, the dead-letter
stream and the totals hash. A background thread keeps one summary; the page
gets it from ``/api/summary`` and, live, from the server-sent events of
``/api/events``. The page is plain files from ``dashboard_static/`` (no CDN,
no build) under a strict Content-Security-Policy, and it writes tweet text
with ``textContent`` only: tweets are user content.

When Redis goes away the page says so and keeps the last data; the reader
reconnects with exponential backoff and reloads from the streams.

Example::

    python -m ops.dashboard --redis_url redis://127.0.0.1:6379/0 --port 8080
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Beam-free (a test checks): the settings and the contract's LABELS and times, as the job has them.
from bertstream.config import RedisConfig, connect, redacted
from ops import metrics
from transforms.contract import LABELS, iso_from_seconds, seconds_from_iso

_LOG = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("dashboard_static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Nothing but this origin's own files; no inline script or style; and
# Trusted Types make any innerHTML-style sink throw, so data stays text.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "require-trusted-types-for 'script'")
_SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                     "Cross-Origin-Resource-Policy": "same-origin"}


def _connect(config: RedisConfig):
    """The dashboard's client: no retries of its own (its reader's loop backs off
    and says "Redis unavailable")."""
    return connect(config._replace(retries=0))


def _seconds(value: Any) -> float | None:
    """RFC 3339 to epoch seconds; None for "", missing or unparsable values."""
    if not isinstance(value, str):
        return None
    try:
        return seconds_from_iso(value)
    except ValueError:
        return None


def _entry_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(fields: dict, name: str, limit: int = 0) -> str:
    value = fields.get(name.encode(), b"")
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text[:limit] if limit else text


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _rollout_row(version: str, m: dict[str, str]) -> dict[str, Any]:
    """One model version for the page: its state and, in shadow, how it compares."""

    def number(name: str) -> float:
        try:
            return float(m.get(name, 0))
        except ValueError:
            return 0.0

    scored, batches = number("scored"), number("batches")
    return {"version": version, "state": m.get("state", ""), "reason": m.get("reason", ""),
            "scored": int(scored), "errors": int(number("errors")),
            "agreement": number("agreed") / scored if scored else None,
            "labels": {label: int(number(f"label:{label}")) for label in LABELS},
            "mean_confidence": number("confidence_milli") / 1000 / scored if scored else None,
            "mean_batch_seconds": number("latency_ms") / 1000 / batches if batches else None,
            "since": m.get("since", "")}


class _Window:
    __slots__ = ("end", "seen", "late", "stored")

    def __init__(self, end: str):
        self.end = end
        self.seen: Counter[str] = Counter()  # from the results read
        self.late = 0
        self.stored: dict[str, int] | None = None  # the sink's hash, when read


class Feed:
    """Follows Redis in one thread and keeps the summary the page shows.

    Args:
      keys: where the sink writes.
      history: results read back from the stream at (re)connection.
      latest: rows of latest results and dead letters kept for the page.
      windows: windows in the chart (the most recent by event time).
      sample: recent results behind tweets/s, latency and model versions.
    """

    RATE_SECONDS = 10.0
    MIN_PUBLISH_SECONDS = 0.25
    MAX_BACKOFF_SECONDS = 5.0

    def __init__(self, keys: RedisConfig, history: int = 5000, latest: int = 25, windows: int = 60,
                 sample: int = 1000):
        self.keys = keys
        self._history, self._latest_n, self._windows_n, self._sample_n = (
            history, latest, windows, sample)
        self._changed = threading.Condition()
        self._version = 0
        self._body = b"{}"
        self._redis: dict[str, Any] = {"ok": False, "error": "connecting",
                                       "since": iso_from_seconds(time.time())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Model versions by id: state and shadow figures (transforms/rollout.py).
        self._models: dict[str, dict[str, str]] = {}
        self._read_once = False
        self._reset()

    # --- state, touched by the reader thread only ---

    def _reset(self) -> None:
        self._last = {self.keys.stream: "0-0", self.keys.dead_letter_stream: "0-0"}
        self._labels: Counter[str] = Counter()
        self._read = self._late = self._unreadable = 0
        self._latest: deque[dict] = deque(maxlen=self._latest_n)
        self._dead: deque[dict] = deque(maxlen=self._latest_n)
        # (processed_at s, latency s, "publish"|"event", model version)
        self._sample: deque[tuple[float | None, float | None, str, str]] = deque(
            maxlen=self._sample_n)
        self._win: dict[str, _Window] = {}
        self._dirty: set[str] = set()
        self._stats: dict[str, int] = {}
        self._subscribers = 0

    def _add_result(self, fields: dict) -> None:
        try:
            body = json.loads(fields.get(b"result", b""))
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._unreadable += 1
            return
        label = str(body.get("label", ""))
        late = body.get("late") is True
        self._read += 1
        self._late += late
        self._labels[label] += 1
        start = str(body.get("window_start", ""))
        if start:
            w = self._win.setdefault(start, _Window(str(body.get("window_end", ""))))
            w.seen[label] += 1
            w.late += late
            self._dirty.add(start)
        processed = _seconds(body.get("processed_at"))
        published = _seconds(body.get("published_at"))
        origin, kind = (published, "publish") if published is not None else (
            _seconds(body.get("event_time")), "event")
        latency = processed - origin if processed is not None and origin is not None else None
        version = str(body.get("model_version", ""))
        self._sample.append((processed, latency, kind, version))
        try:
            score = float(body.get("score", 0.0))
        except (TypeError, ValueError):
            score = float("nan")
        self._latest.append({
            "tweet_id": str(body.get("tweet_id", "")), "text": str(body.get("text", ""))[:1000],
            "label": label, "score": score if math.isfinite(score) else None,
            "model_version": version, "event_time": str(body.get("event_time", "")),
            "processed_at": str(body.get("processed_at", "")), "late": late,
            "latency_seconds": latency, "latency_kind": kind})

    def _add_dead_letter(self, fields: dict) -> None:
        encoding = _text(fields, "encoding")
        self._dead.append({
            "failed_at": _text(fields, "failed_at"), "stage": _text(fields, "stage"),
            "reason": _text(fields, "reason", 500), "tweet_id": _text(fields, "tweet_id"),
            "raw": "(binary input, base64)" if encoding == "base64" else _text(fields, "raw", 300)})

    def _trim_windows(self) -> None:
        keep = self._windows_n * 4
        if len(self._win) > keep:
            for start in sorted(self._win)[:len(self._win) - keep]:
                del self._win[start]
                self._dirty.discard(start)

    # --- Redis I/O ---

    def _load(self, client) -> None:
        """Starts over from the tails of both streams (at start and on every reconnect)."""
        k = self.keys
        results = client.xrevrange(k.stream, count=self._history)
        dead = client.xrevrange(k.dead_letter_stream, count=self._latest_n)
        self._reset()  # only now: a failed read keeps the last data on the page
        for _, fields in reversed(results):
            self._add_result(fields)
        for _, fields in reversed(dead):
            self._add_dead_letter(fields)
        if results:
            self._last[k.stream] = results[0][0].decode()
        if dead:
            self._last[k.dead_letter_stream] = dead[0][0].decode()
        self._trim_windows()
        self._dirty = set(self._win)
        self._refresh(client)
        _LOG.info("read %d results and %d dead letters from %s", len(results), len(dead),
                  redacted(k.url))

    def _refresh(self, client) -> None:
        """Totals, the hashes of windows that changed, and the channel's listeners."""
        k = self.keys
        dirty = sorted(self._dirty)
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(k.stats_key)
        pipe.pubsub_numsub(k.channel)
        for start in dirty:
            pipe.hgetall(k.window_prefix + start)
        pipe.smembers(k.models_key)
        stats, numsub, *hashes, versions = pipe.execute()
        self._stats = {key.decode(): int(v) for key, v in stats.items() if v.lstrip(b"-").isdigit()}
        self._subscribers = int(numsub[0][1]) if numsub else 0
        for start, stored in zip(dirty, hashes):
            if start in self._win:
                self._win[start].stored = {f.decode(): int(v) for f, v in stored.items()} or None
        self._dirty.clear()
        versions = sorted(v.decode() for v in versions)
        if versions:
            pipe = client.pipeline(transaction=False)
            for version in versions:
                pipe.hgetall(k.model_prefix + version)
            self._models = {v: {f.decode(): x.decode(errors="replace") for f, x in h.items()}
                            for v, h in zip(versions, pipe.execute())}
        else:
            self._models = {}
        self._read_once = True

    def _stream_was_reset(self, client) -> bool:
        """True when the results stream now ends before what we read (FLUSHALL, a
        Redis restarted without its AOF): the next XREAD would wait for nothing."""
        last = self._last[self.keys.stream]
        if last == "0-0":
            return False
        tail = client.xrevrange(self.keys.stream, count=1)
        return not tail or _entry_id(tail[0][0]) < _entry_id(last)

    def _follow(self, client) -> bool:
        """One blocking read of both streams; True when something new came."""
        replies = client.xread(dict(self._last), count=1000, block=1000)
        for stream, entries in replies or []:
            name = stream.decode()
            for _, fields in entries:
                (self._add_result if name == self.keys.stream else self._add_dead_letter)(fields)
            self._last[name] = entries[-1][0].decode()
        if not replies and self._stream_was_reset(client):
            _LOG.warning("the results stream %s was reset: reloading", self.keys.stream)
            self._load(client)
            return True
        self._trim_windows()
        self._refresh(client)
        return bool(replies)

    def run(self) -> None:
        """The reader loop: connect, load, follow; on any Redis error back off and retry."""
        import redis

        backoff = 0.25
        while not self._stop.is_set():
            client = None
            try:
                client = _connect(self.keys)
                self._load(client)
                self._set_redis(True, None)
                backoff = 0.25
                self._publish()
                last_publish = time.monotonic()
                while not self._stop.is_set():
                    self._follow(client)
                    # At most a few summaries a second: a fast stream waits here
                    # and the next XREAD takes what came in the meantime.
                    wait = self.MIN_PUBLISH_SECONDS - (time.monotonic() - last_publish)
                    if wait > 0 and self._stop.wait(wait):
                        break
                    self._publish()
                    last_publish = time.monotonic()
            except redis.RedisError as err:
                if self._redis["ok"]:
                    _LOG.warning("Redis at %s unavailable: %s", redacted(self.keys.url), err)
                self._set_redis(False, f"{type(err).__name__}: {err}")
            except Exception as err:  # a bug must not leave the page "live" on stale data
                _LOG.exception("the dashboard's reader failed; starting over")
                self._set_redis(False, f"reader error: {type(err).__name__}: {err}")
            finally:
                if client is not None:
                    client.close()
            if self._stop.is_set():
                break
            _LOG.info("reconnecting in %.2fs", backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.MAX_BACKOFF_SECONDS)

    def _set_redis(self, ok: bool, error: str | None) -> None:
        if ok != self._redis["ok"] or error != self._redis["error"]:
            if ok:
                _LOG.info("Redis at %s: connected", redacted(self.keys.url))
            self._redis = {"ok": ok, "error": error, "since": iso_from_seconds(time.time())
                           if ok != self._redis["ok"] else self._redis["since"]}
            self._publish()

    # --- the summary ---

    def summary(self) -> dict[str, Any]:
        """What the page shows (also ``GET /api/summary``)."""
        now = time.time()
        rate_since = now - self.RATE_SECONDS
        sample = list(self._sample)
        recent = sum(1 for processed, *_ in sample if processed is not None and processed >= rate_since)
        published = [lat for _, lat, kind, _ in sample if kind == "publish" and lat is not None]
        latencies = published or [lat for _, lat, kind, _ in sample if lat is not None]
        latency = None
        if latencies:
            latency = {"kind": "publish->result" if published else "event->result",
                       "p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                       "max": max(latencies), "results": len(latencies)}
        versions: dict[str, dict[str, Any]] = {}
        for processed, _, _, version in sample:
            v = versions.setdefault(version, {"version": version, "results": 0, "last_seen": None})
            v["results"] += 1
            if processed is not None:
                v["last_seen"] = max(v["last_seen"] or 0.0, processed)
        for v in versions.values():
            v["last_seen"] = iso_from_seconds(v["last_seen"]) if v["last_seen"] else None
        windows = []
        for start in sorted(self._win)[-self._windows_n:]:
            w = self._win[start]
            counts = w.stored if w.stored is not None else dict(w.seen)
            windows.append({"start": start, "end": w.end, "late": w.late,
                            "source": "redis" if w.stored is not None else "results",
                            **{label: int(counts.get(label, 0)) for label in LABELS},
                            "total": sum(int(n) for n in counts.values())})
        stats = self._stats
        return {
            "redis": {**self._redis, "url": redacted(self.keys.url)},
            "keys": {"stream": self.keys.stream, "channel": self.keys.channel,
                     "dead_letter_stream": self.keys.dead_letter_stream,
                     "window_prefix": self.keys.window_prefix, "stats_key": self.keys.stats_key},
            "results": stats.get("results", self._read),
            "dead_letters": stats.get("dead_letters", len(self._dead)),
            "dead_letters_by_stage": {k.split(":", 1)[1]: v for k, v in sorted(stats.items())
                                      if k.startswith("dead_letters:")},
            "duplicates_at_sink": stats.get("already_written", 0),
            "labels": {label: self._labels.get(label, 0) for label in LABELS},
            "results_read": self._read,
            "unreadable": self._unreadable,
            "late": self._late,
            "tweets_per_second": round(recent / self.RATE_SECONDS, 2),
            "latency_seconds": latency,
            "model_versions": sorted(versions.values(), key=lambda v: v["last_seen"] or "",
                                     reverse=True),
            "windows": windows,
            "latest_results": list(reversed(self._latest)),
            "latest_dead_letters": list(reversed(self._dead)),
            "channel_subscribers": self._subscribers,
            "rollout": [_rollout_row(version, m) for version, m in
                        sorted(self._models.items(), key=lambda kv: kv[0], reverse=True)],
        }

    def _publish(self) -> None:
        body = json.dumps(self.summary(), ensure_ascii=False, separators=(",", ":")).encode()
        with self._changed:
            if body != self._body:
                self._body = body
                self._version += 1
                self._changed.notify_all()

    def metrics(self) -> bytes:
        """Prometheus' text for a scrape: what was last read, never a wait on Redis."""
        return metrics.render(self._stats, self._models, self._redis["ok"], self._read_once)

    def current(self) -> tuple[int, bytes]:
        with self._changed:
            return self._version, self._body

    def wait_for_change(self, seen: int, timeout: float) -> tuple[int, bytes | None]:
        """The next summary after version ``seen``, or (seen, None) after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen or self._stop.is_set(), timeout)
            if self._version == seen:
                return seen, None
            return self._version, self._body

    @property
    def redis_ok(self) -> bool:
        return bool(self._redis["ok"])

    def start(self) -> Feed:
        self._publish()
        self._thread = threading.Thread(target=self.run, name="dashboard-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "bertstream-dashboard"
    sys_version = ""
    timeout = 60  # a client that stops reading frees its thread
    HEARTBEAT_SECONDS = 15.0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urllib.parse.urlsplit(self.path).path
        feed = self.server.feed
        if path == "/":
            self._send(HTTPStatus.OK, *self.server.files["index.html"])
        elif path.startswith("/static/") and path[8:] in self.server.files:
            self._send(HTTPStatus.OK, *self.server.files[path[8:]], cache="max-age=300")
        elif path == "/metrics":
            self._send(HTTPStatus.OK, feed.metrics(), metrics.CONTENT_TYPE)
        elif path == "/api/summary":
            self._send(HTTPStatus.OK, feed.current()[1], "application/json")
        elif path == "/api/events" and self.command == "GET":
            self._events(feed)
        elif path == "/healthz":
            # Alive and serving, whatever Redis does: the page explains an outage.
            body = json.dumps({"ok": True, "redis": feed.redis_ok}).encode()
            self._send(HTTPStatus.OK, body, "application/json")
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET  # noqa: N815 - _send leaves the body out

    def _headers(self, status: HTTPStatus, content_type: str, cache: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", cache)
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              cache: str = "no-store") -> None:
        self._headers(status, content_type, cache)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _events(self, feed: Feed) -> None:
        """Server-sent events: the summary now, then on every change; a comment
        line as heartbeat, so proxies and dead clients are noticed."""
        self._headers(HTTPStatus.OK, "text/event-stream; charset=utf-8", "no-store")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        version, body = feed.current()
        try:
            self.wfile.write(b"retry: 2000\n\nevent: summary\ndata: " + body + b"\n\n")
            self.wfile.flush()
            while not feed.stopped:
                version, body = feed.wait_for_change(version, self.HEARTBEAT_SECONDS)
                self.wfile.write(b": keep-alive\n\n" if body is None
                                 else b"event: summary\ndata: " + body + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's signature
        _LOG.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    feed: Feed
    files: dict[str, tuple[bytes, str]]


class Dashboard:
    """The HTTP server and its feed, startable in a thread (as the tests do)."""

    def __init__(self, keys: RedisConfig, host: str = "127.0.0.1", port: int = 8080, **feed_args):
        self.feed = Feed(keys, **feed_args)
        self.server = _Server((host, port), _Handler)
        self.server.feed = self.feed
        self.server.files = {p.name: (p.read_bytes(), _TYPES[p.suffix])
                             for p in STATIC.iterdir() if p.suffix in _TYPES}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Dashboard:
        self.feed.start()
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard-http",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.feed.stop()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = RedisConfig()
    p = argparse.ArgumentParser(
        prog="python -m ops.dashboard",
        description="A live web page of the scored stream, read from the pipeline's Redis: "
                    "per-window counts (late data marked), the latest results and dead "
                    "letters, totals, tweets/s, latency and the model versions in use.")
    p.add_argument("--redis_url", default=d.url,
                   help="redis://, rediss:// or unix:// (REDIS_PASSWORD is used when the URL "
                        "has none); default %(default)s")
    p.add_argument("--redis_ca_file", default=None, help="CA bundle for rediss://")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0: any free)")
    keys = p.add_argument_group("Redis keys (the pipeline's flags and defaults)")
    keys.add_argument("--redis_stream", default=d.stream)
    keys.add_argument("--redis_channel", default=d.channel,
                      help="shown with its subscriber count; the page follows the stream")
    keys.add_argument("--redis_deadletter_stream", default=d.dead_letter_stream)
    keys.add_argument("--redis_window_prefix", default=d.window_prefix)
    keys.add_argument("--redis_stats_key", default=d.stats_key)
    view = p.add_argument_group("what the page keeps")
    view.add_argument("--history", type=int, default=5000,
                      help="results read back from the stream at start (default %(default)s)")
    view.add_argument("--windows", type=int, default=60,
                      help="windows in the chart (default %(default)s)")
    view.add_argument("--latest", type=int, default=25,
                      help="rows of latest results and dead letters (default %(default)s)")
    p.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag to change."""
    if not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--redis_url {redacted(args.redis_url)!r} must start with "
                         "redis://, rediss:// or unix://")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")
    for name in ("history", "windows", "latest"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if args.redis_ca_file and not os.path.isfile(args.redis_ca_file):
        raise ValueError(f"--redis_ca_file {args.redis_ca_file}: no such file")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        validate(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    keys = RedisConfig(url=args.redis_url, stream=args.redis_stream,
                       channel=args.redis_channel, dead_letter_stream=args.redis_deadletter_stream,
                       window_prefix=args.redis_window_prefix, stats_key=args.redis_stats_key,
                       ca_file=args.redis_ca_file)
    try:
        dashboard = Dashboard(keys, args.host, args.port, history=args.history,
                              windows=args.windows, latest=args.latest)
    except OSError as err:
        print(f"error: --host {args.host} --port {args.port}: cannot listen: {err.strerror}",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=dashboard.server.shutdown,
                                                              daemon=True).start())
    dashboard.feed.start()
    _LOG.info("dashboard on %s (Redis %s, stream %s)", dashboard.url, redacted(keys.url),
              keys.stream)
    try:
        dashboard.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.feed.stop()
        dashboard.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
