"""Beam's Python SDK worker pool, bound to one address: for local portable runs.

``python -m runners.worker_pool --port P [--host 127.0.0.1]`` serves Beam's
``BeamFnExternalWorkerPoolServicer``: a portable runner (the embedded Flink,
Prism) asks it to start SDK workers (``--environment_type=EXTERNAL
--environment_config=127.0.0.1:P``), which run as threads of this process.

Beam's own ``worker_pool_main`` and its LOOPBACK environment listen on every
interface (``[::]``); this binds the address given. It also keeps the SDK
workers out of the job's launching process: when a local job server is
stopped, their streams to it end in this process's log, not as tracebacks in
the launcher's output. ``LocalWorkerPool`` starts and stops it by PID.
"""

import argparse
import importlib
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

from runners.local_servers import _LoggedServer, dying_with_parent, free_port, run_logs

_LOG = logging.getLogger(__name__)


def _runner_hung_up(error: BaseException | None) -> bool:
    """A gRPC stream the runner ended (CANCELLED): how every job's end reaches
    its SDK workers, not a failure."""
    import grpc

    return isinstance(error, grpc.RpcError) and getattr(error, "code", lambda: None)() == \
        grpc.StatusCode.CANCELLED


class _JobEndsQuietly(logging.Filter):
    """The SDK harness logs each stream the runner closes at a job's end as an
    ERROR with a traceback; here it is one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _runner_hung_up(record.exc_info[1]):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"{record.getMessage()} (the runner ended the job)", None
            record.exc_info = record.exc_text = None
        return True


def _quiet_thread_ends() -> None:
    """The same for the harness threads that die of such a stream's end."""
    default = threading.excepthook

    def hook(args):
        if _runner_hung_up(args.exc_value):
            _LOG.info("%s ended: the runner closed its stream",
                      args.thread.name if args.thread else "a thread")
            return
        default(args)

    threading.excepthook = hook


def serve(host: str, port: int, preload: tuple[str, ...] = ()) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobEndsQuietly())
    _quiet_thread_ends()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=False), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _LOG.info("SDK worker pool listening on %s:%d", host, bound)
    # Imported while the runner starts the job: a worker's first bundle would
    # otherwise wait for TensorFlow (seconds) before its first result.
    if "tensorflow" in preload:
        from bertstream.logs import quiet_tensorflow

        quiet_tensorflow()
    for module in preload:
        started = time.monotonic()
        importlib.import_module(module)
        _LOG.info("preloaded %s in %.1fs", module, time.monotonic() - started)
    server.wait_for_termination()


class LocalWorkerPool(_LoggedServer):
    """``python -m runners.worker_pool`` on 127.0.0.1, in its own process
    group, logging to a file."""

    name = "sdk-worker-pool"

    # What the job's first bundle imports (RunSentiment's model handler), imported
    # by the pool while the runner starts the job.
    JOB_MODULES = ("tensorflow", "tensorflow_text")

    def __init__(self, port: int | None = None, preload: tuple[str, ...] = JOB_MODULES):
        self.port = port or free_port()
        self.preload = tuple(preload)
        self.log_path = run_logs("workers") / "workers.log"

    def flags(self) -> list[str]:
        return ["--environment_type=EXTERNAL", f"--environment_config={self.address}"]

    def launch(self) -> "LocalWorkerPool":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                dying_with_parent(
                    [sys.executable, "-m", "runners.worker_pool", "--port", str(self.port)]
                    + ([f"--preload={','.join(self.preload)}"] if self.preload else [])),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
        return self


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runners.worker_pool",
                                description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--preload", default="",
                   help="comma-separated modules to import once listening (e.g. tensorflow)")
    args = p.parse_args(argv)
    from bertstream.logs import setup_logging

    setup_logging(os.environ.get("BERTSTREAM_LOG_LEVEL", "info"))
    serve(args.host, args.port, tuple(m for m in args.preload.split(",") if m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
