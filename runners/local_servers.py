"""Throw-away local servers: a redis-server and the Pub/Sub emulator.

The embedded default of ``python -m pipeline`` starts a redis-server when none
answers, and the tests and benchmarks start both. Every server binds to
127.0.0.1 on a free port, writes into its own directory and is stopped by its
PID (its whole process group for the emulator, which is a shell wrapper around
a JVM).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertstream.config import cache_dir

_LOG = logging.getLogger(__name__)

EMULATOR_HINT = (
    "the Pub/Sub emulator is part of the Debian package google-cloud-cli-pubsub-emulator "
    "(or `gcloud components install pubsub-emulator`)"
)


KEEP_RUN_LOGS = 30


def run_logs(name: str) -> Path:
    """A new directory for one run's server logs, under the cache's ``logs/``
    (one place, pruned to the newest KEEP_RUN_LOGS), instead of a temporary
    directory per run left behind in /tmp."""
    root = cache_dir() / "logs"
    root.mkdir(parents=True, exist_ok=True)
    runs = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime)
    for old in runs[:max(0, len(runs) - KEEP_RUN_LOGS + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root))


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


# Run by a fresh interpreter before it becomes the child: asks Linux for
# SIGKILL when its parent dies (PR_SET_PDEATHSIG = 1), gives up if the parent
# is already gone, then execs the command (the request survives exec).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(f'{sys.argv[2]}: its parent exited before it started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def dying_with_parent(args: list[str]) -> list[str]:
    """``args`` as a command that is killed when this process dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``), so a killed launcher leaves no job
    server running a job on its own.

    Set by a small exec wrapper, not ``Popen(preexec_fn=...)``: Python code run
    between fork and exec is unsafe in a process with other threads, and with
    a gRPC client's threads (a Pub/Sub client) alive, the Flink job server's
    child aborted before exec now and then (SIGABRT, "epoll_wait error: Bad
    file descriptor" in its log)."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                       timeout: float = 15.0) -> int | None:
    """Sends ``sig`` to ``proc``'s process group (it was started with
    ``start_new_session``), waits ``timeout`` s, then SIGKILLs what is left."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return proc.poll()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(10)


class _LocalServer:
    proc: subprocess.Popen | None = None
    port: int = 0
    name = "server"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stops the server by its PID (its process group) and waits for it."""
        if self.proc is not None:
            stop_process_group(self.proc, sig, timeout)

    _own_dir = False
    data_dir = ""

    def start(self):
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        # A directory the caller gave is kept (a restart replays its AOF).
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class _LoggedServer(_LocalServer):
    """A server started in two steps (``launch``, then ``wait_ready`` for its
    port), logging to ``log_path``: the Flink job server, the expansion
    service, the SDK worker pool."""

    log_path: Path
    ready_timeout = 60.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self):
        raise NotImplementedError

    def wait_ready(self, timeout: float | None = None):
        try:
            _wait_for_port(self.port, self.proc, timeout or self.ready_timeout, self.name)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"{err}; its log: {self.log_path}") from err
        _LOG.info("started %s pid %d on %s (log %s)", self.name, self.proc.pid, self.address,
                  self.log_path)
        return self

    def start(self, timeout: float | None = None):
        return self.launch().wait_ready(timeout)


class LocalRedis(_LocalServer):
    """A redis-server on 127.0.0.1 with AOF on, in its own directory.

    Args:
      port: the port, or None for a free one.
      data_dir: where AOF files go; a temporary directory when None. Restarting
        on the same directory replays the AOF (used by the fault tests).
      extra_args: more ``redis-server`` arguments (``--requirepass``, TLS...).
    """

    name = "redis-server"

    def __init__(self, port: int | None = None, data_dir: str | None = None,
                 extra_args: list[str] | None = None, password: str | None = None):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="bertstream-redis-")
        self.extra_args = list(extra_args or [])
        self.password = password
        self.log_path = Path(self.data_dir) / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed: `sudo apt-get install -y redis-server` "
                "(or `make setup`, which does it when run as root)")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "yes", "--dir", self.data_dir,
                "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_for_port(self.port, self.proc, timeout, self.name)
        _LOG.info("started redis-server pid %d on 127.0.0.1:%d", self.proc.pid, self.port)
        return self



def find_pubsub_emulator() -> str | None:
    """Finds the emulator's launcher script, or None when it is not installed."""
    env = os.environ.get("PUBSUB_EMULATOR_BIN")
    if env and os.path.exists(env):
        return env
    for candidate in (
        "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
        "/usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    ):
        if os.path.exists(candidate):
            return candidate
    try:
        out = subprocess.run(["dpkg", "-L", "google-cloud-cli-pubsub-emulator"],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    for line in out.splitlines():
        if line.endswith("bin/cloud-pubsub-emulator"):
            return line
    return None


class LocalPubSubEmulator(_LocalServer):
    """The Cloud Pub/Sub emulator on 127.0.0.1. ``host`` is what
    ``PUBSUB_EMULATOR_HOST`` should hold."""

    name = "pubsub-emulator"

    def __init__(self, port: int | None = None, data_dir: str | None = None):
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="bertstream-pubsub-")
        self.log_path = Path(self.data_dir) / "emulator.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LocalPubSubEmulator:
        binary = find_pubsub_emulator()
        if binary is None:
            raise FileNotFoundError(f"Pub/Sub emulator not found: {EMULATOR_HINT}")
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [binary, "--host=127.0.0.1", f"--port={self.port}", f"--dir={self.data_dir}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the Pub/Sub emulator exited early; its log: {self.log_path}")
            if b"Server started" in self.log_path.read_bytes():
                _LOG.info("started Pub/Sub emulator pid %d on %s", self.proc.pid, self.host)
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the Pub/Sub emulator did not start in {timeout:.0f}s: "
                           f"{self.log_path}")

