"""The embedded default's Redis: use the one at ``--redis_url``, or start one.

When nothing answers at a loopback ``--redis_url``, ``python -m pipeline``
starts a redis-server of its own on a free port (AOF on, in a directory that
is kept), runs the job against it, and stops it at the end, saying how to
bring it back with the results.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import urllib.parse
from dataclasses import dataclass

from bertstream.config import check_connection, redacted
from runners.local_servers import LocalRedis

_LOG = logging.getLogger(__name__)
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


@dataclass
class RedisInfo:
    url: str
    started: LocalRedis | None = None
    note: str = ""

    @property
    def display_url(self) -> str:
        return redacted(self.url)

    @property
    def cli(self) -> str:
        return f"redis-cli -u {self.display_url}"


@contextlib.contextmanager
def ensure_redis(options):
    import redis

    config = options.redis_config()
    parsed = urllib.parse.urlparse(config.url)
    # Not for rediss://: a TLS failure (an untrusted certificate) looks like
    # a connection error, and a plaintext stand-in would take the results.
    may_start_own = (not options.no_local_redis and parsed.hostname in _LOOPBACK
                     and parsed.scheme == "redis")
    try:
        # Where the job may start its own, one try: on this machine a refused
        # connection means no server, and `make run` on a fresh machine would
        # otherwise wait through --redis_retries, logging each refusal.
        check_connection(config._replace(retries=0) if may_start_own else config)
        yield RedisInfo(config.url)
        return
    except (redis.ConnectionError, redis.TimeoutError) as err:
        if not may_start_own:
            raise ValueError(f"--redis_url {redacted(config.url)}: {err}") from None
        _LOG.info("nothing answers at %s; starting a redis-server of our own",
                  redacted(config.url))
    data_dir = tempfile.mkdtemp(prefix="bertstream-redis-")
    server = LocalRedis(data_dir=data_dir).start()
    info = RedisInfo(server.url, started=server)
    try:
        yield info
    finally:
        server.stop()
        info.note = (f"The redis-server this run started (port {server.port}) is stopped; its "
                     f"data is in {data_dir}. Bring it back with:\n"
                     f"  redis-server --port {server.port} --dir {data_dir} --appendonly yes "
                     f"--bind 127.0.0.1\n  then: redis-cli -p {server.port} XLEN "
                     f"{options.redis_stream}")
