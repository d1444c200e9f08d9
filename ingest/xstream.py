"""The X API v2 filtered stream into Pub/Sub, through tweepy's StreamingClient.

``XStream`` is tweepy's ``StreamingClient`` with three changes, each for a
reason tweepy cannot be configured around:

* the reconnect loop (``_connect``) keeps tweepy's schedule and callbacks but
  reads it from a ``Backoff`` record (tweepy's are local variables), honours
  ``x-rate-limit-reset`` on HTTP 429 (tweepy waits a fixed minute, doubling),
  stops on 401/403 (a bad token does not get better by retrying) and waits on
  an Event, so SIGTERM does not sit out a five-minute backoff;
* ``on_data`` publishes the raw tweet object (ids stay exact strings) and
  accepts nothing once ``disconnect()`` returned, so a flush after it is final;
* ``api_base`` sends every request to another base URL (a local stand-in for
  tests and demos, or a recording proxy) through a requests transport adapter.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import requests
import tweepy
import urllib3
from requests.adapters import HTTPAdapter

from ingest.message import BadTweet, parse_json, to_message
from ingest.publish import PublishSettings, Totals, TweetPublisher
from ingest.rules import fetch_rules, reconcile

_LOG = logging.getLogger(__name__)

API_HOST = "https://api.twitter.com"  # what tweepy's clients call
# The fields the pipeline reads (docs/architecture.md's message contract). None of them
# needs an expansion: referenced_tweets carries type and id on the tweet itself.
TWEET_FIELDS = ("created_at", "author_id", "lang", "referenced_tweets")


@dataclass(frozen=True)
class Backoff:
    """tweepy's reconnect schedule (its ``BaseStream._connect``), which is X's advice.

    Network errors wait 0, then 0.25 s more each time up to 16 s; HTTP errors
    wait 5 s doubling to 320 s; HTTP 429 waits at least a minute, or until
    ``x-rate-limit-reset`` when that is later. ``stall_timeout_s``: X sends a
    keep-alive every 20 s, so 21 s of silence means the connection is dead.
    """

    network_step_s: float = 0.25
    network_max_s: float = 16.0
    http_start_s: float = 5.0
    http_max_s: float = 320.0
    rate_limit_start_s: float = 60.0
    stall_timeout_s: float = 21.0


class _RedirectAdapter(HTTPAdapter):
    """Rewrites ``https://api.twitter.com/...`` to ``<base>/...`` before sending."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base.rstrip("/")

    def send(self, request, *args, **kwargs):  # noqa: D102 - requests' signature
        if request.url.startswith(API_HOST):
            request.url = self.base + request.url[len(API_HOST):]
        return super().send(request, *args, **kwargs)


def check_tweepy_private_api() -> None:
    """Raises RuntimeError when tweepy's StreamingClient no longer routes
    ``filter`` and ``sample`` through ``_connect(method, endpoint, **kwargs)``,
    the private method XStream replaces (module doc). Checked once per XStream."""
    cls = tweepy.StreamingClient
    problem = None
    connect = getattr(cls, "_connect", None)
    if connect is None:
        problem = "has no _connect"
    elif tuple(inspect.signature(connect).parameters) != ("self", "method", "endpoint", "kwargs"):
        problem = f"_connect{inspect.signature(connect)} changed"
    elif not all("_connect" in getattr(cls, name).__code__.co_names
                 for name in ("filter", "sample")):
        problem = "filter/sample no longer call _connect"
    if problem:
        raise RuntimeError(f"tweepy {tweepy.__version__}: StreamingClient {problem}; XStream "
                           "replaces that private method (ingest/xstream.py). Install the "
                           "tweepy that constraints.txt pins.")


class XStream(tweepy.StreamingClient):
    """A StreamingClient that publishes every streamed tweet to Pub/Sub.

    Args:
      bearer_token: the app's bearer token (never logged).
      publisher: where tweets go; None for rule management only.
      backoff: the reconnect schedule.
      api_base: send requests here instead of X (tests, proxies).
      max_retries: HTTP errors in a row before giving up (network errors, as in
        tweepy, retry forever).
    """

    def __init__(self, bearer_token: str, publisher: TweetPublisher | None = None, *,
                 backoff: Backoff = Backoff(), api_base: str | None = None,
                 max_retries: float = math.inf):
        check_tweepy_private_api()
        # wait_on_rate_limit: the rules endpoints sleep until x-rate-limit-reset.
        super().__init__(bearer_token, wait_on_rate_limit=True, max_retries=max_retries,
                         daemon=True)
        self.publisher = publisher
        self.backoff = backoff
        if api_base:
            self.session.mount(API_HOST, _RedirectAdapter(api_base))
        self._wake = threading.Event()
        self._accept = threading.Lock()
        self.received = 0
        self.bad = 0
        self.connects = 0
        self.fatal = ""

    def __repr__(self) -> str:  # tweepy's objects would show the token
        return f"<XStream connects={self.connects} received={self.received}>"

    # -- the reconnect loop ---------------------------------------------------------------

    def _connect(self, method, endpoint, params=None, **_):
        self.session.headers["Authorization"] = f"Bearer {self.bearer_token}"
        self.session.headers["User-Agent"] = self.user_agent
        url = f"{API_HOST}/2/tweets/{endpoint}/stream"
        b = self.backoff
        self.running = True
        http_errors = 0
        network_wait = 0.0
        http_wait = b.http_start_s
        try:
            while self.running and http_errors <= self.max_retries:
                try:
                    with self.session.request(method, url, params=params, stream=True,
                                              timeout=b.stall_timeout_s, verify=self.verify,
                                              proxies=self.proxies) as resp:
                        if resp.status_code == 200:
                            http_errors, network_wait, http_wait = 0, 0.0, b.http_start_s
                            self.connects += 1
                            self.on_connect()
                            self._read(resp)
                            continue
                        self.on_request_error(resp.status_code)
                        if resp.status_code in (401, 403):
                            self.fatal = (f"X refused the stream (HTTP {resp.status_code}): check "
                                          "X_BEARER_TOKEN / --bearer-token-file and the app's "
                                          f"access level. {resp.text[:300]}")
                            _LOG.error("%s", self.fatal)
                            break
                        _LOG.error("X answered HTTP %d: %s", resp.status_code, resp.text[:300])
                        http_errors += 1
                        wait = http_wait
                        if resp.status_code in (420, 429):
                            wait = max(wait, b.rate_limit_start_s,
                                       _reset_in(resp.headers.get("x-rate-limit-reset")))
                            http_wait = wait
                        _LOG.warning("reconnecting in %.1f s (HTTP error %d in a row)", wait,
                                     http_errors)
                        self._sleep(wait)
                        http_wait = min(http_wait * 2, b.http_max_s)
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ReadTimeoutError,
                        urllib3.exceptions.ProtocolError) as exc:
                    if not self.running:
                        break
                    self.on_connection_error()
                    _LOG.warning("stream connection lost (%s); reconnecting in %.2f s",
                                 type(exc).__name__, network_wait)
                    self._sleep(network_wait)
                    network_wait = min(network_wait + b.network_step_s, b.network_max_s)
        except Exception as exc:  # tweepy's contract: report through on_exception, then end
            self.fatal = f"the stream failed: {type(exc).__name__}: {exc}"
            self.on_exception(exc)
        finally:
            self.session.close()
            self.running = False
            self.on_disconnect()

    def _read(self, resp: requests.Response) -> None:
        for line in resp.iter_lines(chunk_size=self.chunk_size):
            if not self.running:
                return
            if line:
                self.on_data(line)
            else:
                self.on_keep_alive()
        if self.running:
            self.on_closed(resp)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._wake.wait(seconds)

    def disconnect(self) -> None:
        """Stops accepting tweets; returns once no tweet is half-way into the publisher."""
        with self._accept:
            self.running = False
        self._wake.set()

    # -- callbacks ------------------------------------------------------------------------

    def on_connect(self) -> None:
        _LOG.info("stream connected (connection %d)", self.connects)

    def on_closed(self, response) -> None:
        _LOG.warning("X closed the stream; reconnecting")

    def on_data(self, raw_data: bytes) -> None:
        """One newline-delimited payload: ``{"data": tweet, "includes": ..., ...}``."""
        with self._accept:
            if not self.running:
                return  # after disconnect(): not accepted, so not owed to Pub/Sub
            try:
                payload = parse_json(raw_data)
            except BadTweet as exc:
                self.received += 1
                self._bad(f"payload {exc}")
                return
            if not isinstance(payload, dict) or "data" not in payload:
                if isinstance(payload, dict) and "errors" in payload:
                    self.on_errors(payload["errors"])
                else:
                    self.received += 1
                    self._bad("payload without data")
                return
            self.received += 1
            try:
                message = to_message(payload["data"])
                if self.publisher is not None:
                    self.publisher.publish(message)
            except BadTweet as exc:
                self._bad(str(exc))

    def _bad(self, reason: str) -> None:
        self.bad += 1
        _LOG.warning("streamed tweet skipped: %s", reason)

    def on_errors(self, errors) -> None:
        _LOG.error("X sent errors on the stream: %s", errors)


def _reset_in(header: str | None) -> float:
    """Seconds until an ``x-rate-limit-reset`` (epoch seconds) time; 0 when absent."""
    try:
        return max(0.0, float(header) - time.time()) if header else 0.0
    except ValueError:
        return 0.0


class _Meter(threading.Thread):
    """Logs a line per interval: tweets/s since the last line, and the totals."""

    def __init__(self, stream: XStream, publisher: TweetPublisher, interval_s: float,
                 stop: threading.Event):
        super().__init__(name="x-stream-meter", daemon=True)
        self.stream, self.publisher, self.interval_s, self.stop = stream, publisher, interval_s, stop

    def run(self) -> None:
        last, last_t = 0, time.monotonic()
        while not self.stop.wait(self.interval_s):
            now, received = time.monotonic(), self.stream.received
            _LOG.info("x-stream: %.2f tweets/s over the last %.0f s; totals: received %d, "
                      "published %d, failed %d, bad %d, connections %d",
                      (received - last) / (now - last_t), now - last_t, received,
                      self.publisher.published, self.publisher.failed, self.stream.bad,
                      self.stream.connects)
            last, last_t = received, now


def run_x_stream(bearer_token: str, topic: str, rules: Sequence[str] = (), *,
                 settings: PublishSettings = PublishSettings(), create_topic: bool = False,
                 tweet_fields: Sequence[str] = TWEET_FIELDS, expansions: Sequence[str] = (),
                 backoff: Backoff = Backoff(), api_base: str | None = None,
                 max_retries: float = math.inf, stats_interval_s: float = 60.0,
                 stop: threading.Event | None = None) -> Totals:
    """Streams matching tweets into ``topic`` until ``stop`` is set or the stream gives up.

    Args:
      bearer_token: the X app's bearer token.
      topic: ``projects/P/topics/T``.
      rules: rule values to reconcile first; empty keeps X's current rules.
      settings, create_topic: as for the publisher.
      tweet_fields, expansions: requested from X; the contract's fields are always added.
      backoff, api_base, max_retries: as for ``XStream``.
      stats_interval_s: how often to log the rate line.
      stop: set it (a signal handler does) to stop; every accepted tweet is
        published before this returns.

    Returns:
      The totals; ``error`` says why the stream ended on its own, if it did.
    """
    stop = stop or threading.Event()
    started = time.monotonic()
    publisher = TweetPublisher(topic, settings, create_topic=create_topic)
    stream = XStream(bearer_token, publisher, backoff=backoff, api_base=api_base,
                     max_retries=max_retries)
    totals = Totals()
    try:
        if rules:
            reconcile(stream, list(rules))
        elif not fetch_rules(stream):
            raise ValueError("X holds no stream rules for this app: pass at least one --rule")
        fields = list(dict.fromkeys([*TWEET_FIELDS, *tweet_fields]))
        thread = stream.filter(threaded=True, tweet_fields=fields,
                               expansions=list(expansions) or None)
        _Meter(stream, publisher, stats_interval_s, stop).start()
        while thread.is_alive() and not stop.wait(0.2):
            pass
        if not thread.is_alive() and not stop.is_set():
            totals.error = stream.fatal or "the stream ended (retries exhausted)"
    finally:
        stop.set()
        stream.disconnect()  # after this no tweet is accepted, so the flush is final
        publisher.close()
        totals.received = stream.received
        totals.bad = stream.bad
        totals.published = publisher.published
        totals.failed = publisher.failed
        totals.elapsed_s = time.monotonic() - started
    _LOG.info("x-stream done: %s", totals.as_dict())
    return totals
