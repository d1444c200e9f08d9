"""The settings that cross processes, in one place: where Redis is and what the
job's keys are called, how to connect to it (``REDIS_PASSWORD``, TLS, retries),
where TF Serving is, and the cache directory.

The job's flags map onto these (``pipeline/options.py``); the sink, the dedupe,
the dashboard, the subscriber, the dead-letter replay, the launcher and the
tests take them from here. Beam-free and TensorFlow-free: the ingester and the
operator tools import it without either.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple, Optional

_LOG = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Downloads, builds, jars, logs: ``$BERTSTREAM_CACHE``, else ``~/.cache/bertstream``."""
    return Path(os.environ.get("BERTSTREAM_CACHE", Path.home() / ".cache" / "bertstream"))


# scheme://user:password@ anywhere in a string (an option value, an argv entry).
_URL_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^\s/?#]+@", re.IGNORECASE)


def redacted(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``, for logs,
    summaries and pages: ``redis://user:***@host:6379/0``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class RedisConfig(NamedTuple):
    """Where results go, under which keys, and how to connect. The names match
    the job's flags (``--redis_url``, ``--redis_stream``, ...)."""

    url: str = "redis://localhost:6379/0"
    stream: str = "sentiment:results"
    channel: str = "sentiment"
    window_prefix: str = "sentiment:window:"
    dead_letter_stream: str = "sentiment:deadletter"
    dedupe_prefix: str = "sentiment:seen:"
    stats_key: str = "sentiment:stats"
    # Model versions the job has met, and each one's state and shadow figures
    # (transforms/rollout.py writes them, the dashboard reads them).
    models_key: str = "sentiment:models"
    model_prefix: str = "sentiment:model:"
    stream_maxlen: int = 100_000
    dedupe_ttl_seconds: int = 7 * 24 * 3600
    window_ttl_seconds: int = 7 * 24 * 3600
    retries: int = 5
    backoff_seconds: float = 0.2
    ca_file: Optional[str] = None


def connect(config: RedisConfig):
    """A redis-py client for ``config.url`` (``redis://``, ``rediss://``, ``unix://``).

    Connection errors and timeouts are retried ``config.retries`` times with
    exponential backoff from ``config.backoff_seconds``, by redis-py itself.
    When the URL carries no password, ``REDIS_PASSWORD`` from the environment is
    used, so the secret need not appear on a command line.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    kwargs = {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 30,
              "retry": Retry(ExponentialBackoff(cap=config.backoff_seconds * 2 ** config.retries,
                                                base=config.backoff_seconds), config.retries),
              "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}
    parsed = urllib.parse.urlparse(config.url)
    if not parsed.password and os.environ.get("REDIS_PASSWORD"):
        kwargs["password"] = os.environ["REDIS_PASSWORD"]
    if parsed.scheme == "rediss" and config.ca_file:
        kwargs["ssl_ca_certs"] = config.ca_file
    return redis.Redis.from_url(config.url, **kwargs)


_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def per_process(key, make):
    """``make()``'s result, made once per ``key`` in this process (a forked
    child makes its own): for clients the job's DoFns share and do not close."""
    key = (key, os.getpid())
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


def shared_client(config: RedisConfig):
    """The process's one redis-py client for ``config`` (``connect``'s), for
    the job's DoFns; its users do not close it.

    A client is a thread-safe pool of connections. Beam's legacy DirectRunner
    sets every DoFn up and tears it down around each bundle: a client per DoFn
    instance cost each bundle of each Redis step a new connection (a TCP
    connect and redis-py's ``CLIENT SETINFO`` round trips), 4 % of the job's
    Python time under load (py-spy, docs/benchmarks.md). Runners that keep
    their DoFns share it too: one pool per worker process.
    """
    return per_process(("redis", config, os.environ.get("REDIS_PASSWORD")),
                       lambda: connect(config))


def check_connection(config: RedisConfig) -> None:
    """Fails fast, naming the flag, when Redis refuses us at start-up; while
    nothing answers, tries ``config.retries`` times more, saying so each time.

    Raises:
      ValueError: Redis answered and refused (authentication, ACL), or what
        answered is not Redis.
      redis.ConnectionError, redis.TimeoutError: nothing answered.
    """
    import redis

    attempts, delay = config.retries + 1, config.backoff_seconds
    for attempt in range(1, attempts + 1):
        client = connect(config._replace(retries=0))
        try:
            client.ping()
            return
        except redis.AuthenticationError as err:
            raise ValueError(f"--redis_url {redacted(config.url)}: authentication failed "
                             f"({err}); check the user and password (or REDIS_PASSWORD)") from None
        except redis.ResponseError as err:
            raise ValueError(f"--redis_url {redacted(config.url)}: {err}") from None
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if attempt == attempts:
                raise
            _LOG.info("waiting for Redis at %s (%s): attempt %d of %d failed, next in %.1fs",
                      redacted(config.url), err, attempt, attempts, delay)
            time.sleep(delay)
            delay *= 2
        except redis.RedisError as err:  # it answered, not as Redis does
            raise ValueError(f"--redis_url {redacted(config.url)}: {type(err).__name__}: "
                             f"{err}") from None
        finally:
            client.close()


def read_stats(config: RedisConfig) -> dict[str, int]:
    """The sink's all-time totals (results, dead letters, ...), as integers."""
    client = connect(config)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(config.stats_key).items()}
    finally:
        client.close()


# The publish -> result latency histogram the sink keeps in the totals hash:
# bucket upper bounds in seconds; each result counts in the first bucket that
# holds it (field LATENCY_BUCKET_PREFIX + bound, "+Inf" past the last), and the
# dashboard's /metrics sums them into Prometheus' cumulative buckets.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
LATENCY_BUCKET_PREFIX = "latency_bucket:"


class TFServingConfig(NamedTuple):
    """Where TF Serving is and what to call there; the names match the job's
    ``--tfserving_*`` flags."""

    target: str = "bertservice:8500"
    model_name: str = "bert_sentiment"
    model_version: Optional[int] = None
    signature: str = "serving_default"
    timeout_seconds: float = 10.0
    tls: bool = False
    ca_file: Optional[str] = None

    def validate(self) -> None:
        """Raises ValueError naming the flag to change."""
        if ":" not in self.target:
            raise ValueError("--tfserving_target must be host:port")
        if self.timeout_seconds <= 0:
            raise ValueError("--tfserving_timeout_seconds must be positive")
        if self.ca_file and not self.tls:
            raise ValueError("--tfserving_ca_file needs --tfserving_tls")
