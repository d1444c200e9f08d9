"""``python -m launcher flink``: the job on Flink through Beam's portable runner.

Locally (``--flink_master=[local]``) this launcher starts, side by side and
on 127.0.0.1, Beam's Flink job server (an embedded Flink, from the jars
``python -m launcher fetch-jars`` cached) and a Python SDK worker pool
(``runners.worker_pool``), submits the job and, on Ctrl-C or SIGTERM,
cancels it before stopping them by PID. Against a cluster, the SDK workers
are the worker-pool sidecars (``--environment_type=EXTERNAL
--environment_config=localhost:50000``). Pub/Sub is read by the job's own
pull source (``--pubsub_read=xlang``: Beam's Java PubsubIO, through an
expansion service this launcher starts unless ``--expansion_service`` names
one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from apache_beam.options.pipeline_options import FlinkRunnerOptions
from apache_beam.runners.runner import PipelineState

from launcher import jars
from launcher.common import NOOP_CREDENTIALS, SETUP_FILE, describe, launcher_parser, redact
from launcher.expansion import GCP_EXPANSION_TARGET, LocalExpansionService
from launcher.flink_rest import FlinkRest

_LOG = logging.getLogger(__name__)
DEFAULT_CHECKPOINTING_INTERVAL_MS = 10_000
_TERMINAL = {PipelineState.DONE, PipelineState.FAILED, PipelineState.CANCELLED,
             PipelineState.DRAINED, PipelineState.UPDATED}


def parser():
    p = launcher_parser("python -m launcher flink", "Run the job on Flink (portable runner).")
    p.add_argument("--flink_master", required=True,
                   help="HOST:PORT of the Flink REST service, or [local] for an embedded Flink")
    p.add_argument("--flink_version", default=jars.DEFAULT_FLINK_VERSION,
                   choices=FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS,
                   help=f"Flink version (jars are fetched for {', '.join(jars.FLINK_VERSIONS)})")
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--checkpointing_interval_ms", type=int,
                   default=DEFAULT_CHECKPOINTING_INTERVAL_MS,
                   help="Flink checkpoints (Pub/Sub messages are acknowledged when one "
                        "completes); 0 turns them off")
    p.add_argument("--environment_type", choices=("LOOPBACK", "EXTERNAL", "DOCKER", "PROCESS"),
                   default=None,
                   help="where the Python SDK workers run (default for [local]: a worker "
                        "pool this launcher starts on 127.0.0.1; EXTERNAL otherwise)")
    p.add_argument("--environment_config", default=None,
                   help="EXTERNAL: the worker pool's HOST:PORT; DOCKER: the SDK image")
    p.add_argument("--expansion_service", default=None,
                   help="HOST:PORT of a running GCP expansion service (default: start one "
                        "on 127.0.0.1 from the cached jar)")
    p.add_argument("--java_environment_type", default="EMBEDDED",
                   choices=("EMBEDDED", "PROCESS", "DOCKER"),
                   help="where the Java part of the Pub/Sub read runs (EMBEDDED: inside the "
                        "Flink JVM; no Docker needed)")
    p.add_argument("--detach", action="store_true",
                   help="exit once the job runs on the cluster (it keeps running); without "
                        "it, Ctrl-C or SIGTERM cancels the job and waits until Flink says "
                        "CANCELED")
    return p


@dataclass
class FlinkLaunch:
    """A parsed ``launcher flink`` command line."""

    flags: object
    pipeline_flags: list[str]
    job_server_jar: str | None = None
    expansion_jar: str | None = None
    # Whether this launcher starts the SDK worker pool (local runs).
    local_workers: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, argv: list[str]) -> FlinkLaunch:
        flags, rest = parser().parse_known_args(argv)
        launch_workers = flags.environment_type is None and flags.flink_master == "[local]"
        if flags.environment_type is None:
            flags.environment_type = "EXTERNAL"
        if flags.environment_type == "EXTERNAL" and not flags.environment_config \
                and not launch_workers:
            raise ValueError("--environment_type=EXTERNAL needs --environment_config "
                                 "HOST:PORT (the SDK worker pool)")
        if flags.parallelism < 1:
            raise ValueError("--parallelism must be at least 1")
        if flags.checkpointing_interval_ms < 0:
            raise ValueError("--checkpointing_interval_ms must not be negative")
        launch = cls(flags, rest)
        launch.local_workers = launch_workers
        if not _has_flag(rest, "--job_endpoint"):
            job_server, expansion = (jars.job_server_jar(flags.flink_version),
                                     jars.expansion_service_jar(flags.flink_version))
            launch.job_server_jar, launch.expansion_jar = str(job_server), str(expansion)
        else:
            launch.expansion_jar = str(jars.expansion_service_jar(flags.flink_version))
        if not _has_flag(rest, "--job_name"):
            # Flink knows the job by this name: the launcher finds it through
            # Flink's REST API to cancel it (flink_rest.py).
            launch.pipeline_flags = [*rest, f"--job_name=bertstream-{time.strftime('%Y%m%d-%H%M%S')}"
                                     f"-{uuid.uuid4().hex[:6]}"]
        return launch

    @property
    def job_name(self) -> str:
        """``--job_name``, as given or as ``parse`` made it."""
        name = ""
        for i, arg in enumerate(self.pipeline_flags):
            if arg.startswith("--job_name="):
                name = arg.split("=", 1)[1]
            elif arg == "--job_name" and i + 1 < len(self.pipeline_flags):
                name = self.pipeline_flags[i + 1]
        return name

    @property
    def rest(self) -> FlinkRest | None:
        """Flink's REST API at ``--flink_master``, for a cluster (not ``[local]``)."""
        master = self.flags.flink_master
        return None if master.startswith("[") else FlinkRest(master)

    @property
    def reads_pubsub_xlang(self) -> bool:
        from pipeline.options import BertstreamOptions

        o = BertstreamOptions(self.pipeline_flags)
        return o.is_pubsub and o.pubsub_read == "xlang"

    def argv(self, expansion_address: str | None = None,
             workers_address: str | None = None) -> list[str]:
        """The pipeline's command line: its own flags plus the runner's."""
        f = self.flags
        out = ["--runner=FlinkRunner", f"--flink_master={f.flink_master}",
               f"--flink_version={f.flink_version}", f"--parallelism={f.parallelism}",
               f"--environment_type={f.environment_type}"]
        if self.local_workers:
            out.append(f"--environment_config={workers_address or '127.0.0.1:<port chosen at start>'}")
        if self.job_server_jar:
            # Explicit, so Beam never downloads a job server at run time.
            out.append(f"--flink_job_server_jar={self.job_server_jar}")
        if f.environment_config:
            out.append(f"--environment_config={f.environment_config}")
        if f.checkpointing_interval_ms:
            # A runner option the job server declares (Java's checkpointingInterval).
            out.append(f"--checkpointing_interval={f.checkpointing_interval_ms}")
            # Java's finishBundleBeforeCheckpointing: by default a bundle that a
            # checkpoint barrier finishes keeps its output in the checkpoint and
            # emits it with the operator's next bundle; the Pub/Sub source's
            # first stage sees one impulse and no next bundle, so a checkpoint
            # taken while the SDK worker was still starting left the job idle
            # for good (tests/test_launcher_flink.py, about one start in three
            # with 2 s checkpoints). Flushing before the barrier never strands it.
            out.append("--finish_bundle_before_checkpointing")
        if f.environment_type != "LOOPBACK" and not self.local_workers and not f.no_setup_file \
                and not _has_flag(self.pipeline_flags, "--setup_file"):
            out.append(f"--setup_file={SETUP_FILE}")
        out += self.pipeline_flags
        if self.reads_pubsub_xlang:
            out.append("--streaming")
            address = f.expansion_service or expansion_address
            if address:
                out.append("--beam_services=" + json.dumps({GCP_EXPANSION_TARGET: address}))
            emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
            if emulator and not _has_flag(self.pipeline_flags, "--java_pubsub_root_url"):
                out += [f"--java_pubsub_root_url=http://{emulator}",
                        f"--java_credential_factory_class={NOOP_CREDENTIALS}"]
        return out


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@dataclass
class RunningJob:
    result: object
    argv: list[str]
    submitted_s: float
    # The local servers this launcher started, by name (their log files).
    servers: dict = field(default_factory=dict)
    # The state the runner reported when the job was cancelled on exit.
    final_state: str | None = None
    # On a cluster: Flink's REST API and the job's name there.
    rest: FlinkRest | None = None
    job_name: str | None = None

    def flink_job(self, timeout_s: float = 30.0) -> dict | None:
        """The job as Flink's REST API shows it (``id``, ``state``), once it appears."""
        if self.rest is None:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.rest.job_named(self.job_name)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def cancel(self, timeout_s: float = 60.0) -> str:
        """Cancels the job and waits until Flink says it ended; returns the state.

        On a cluster Flink is asked directly: Beam's job server only stops
        waiting for a remote job it is told to cancel (flink_rest.py)."""
        if self.rest is not None:
            found = self.flink_job(timeout_s=5)
            if found is not None:
                state = self.rest.cancel(found["id"], timeout_s)
                with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
                    self.result.cancel()  # the job server's own record of it
                return state
        if self.result.state not in _TERMINAL:
            try:
                self.result.cancel()
            except (RuntimeError, NotImplementedError) as err:
                _LOG.warning("cancel: %s", err)
        deadline = time.monotonic() + timeout_s
        while self.result.state not in _TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.result.state


@contextlib.contextmanager
def flink_job(argv: list[str]) -> Iterator[RunningJob]:
    """Submits the job (not waiting for it) and cancels it on exit; the Java
    servers this launcher started are stopped after.

    Without ``--job_endpoint`` the launcher starts Beam's Flink job server
    itself (an embedded Flink for ``[local]``, else submitting to the
    cluster at ``--flink_master``) and, for ``[local]``, the SDK worker pool;
    the JVMs start side by side while the pipeline is built. With
    ``--job_endpoint`` (a cluster's own job server, as in Kubernetes or
    ``python -m launcher flink-cluster``) it starts nothing. Tests and the
    benchmark use this; ``main`` waits in it until Ctrl-C or SIGTERM.
    """
    import apache_beam as beam

    import launcher.common  # noqa: F401 - registers JavaRuntimeOptions
    from launcher.expansion import LocalFlinkJobServer
    from pipeline.pipeline import make_options, run
    from runners.worker_pool import LocalWorkerPool

    launch = FlinkLaunch.parse(argv)
    if launch.job_server_jar:
        jars.require(launch.flags.flink_version)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # Stopped in reverse: the job server first (the job is cancelled by
        # then), so that no runner outlives the SDK workers it talks to.
        servers = []
        expansion = job_server = workers = None
        if launch.reads_pubsub_xlang and not launch.flags.expansion_service:
            expansion = LocalExpansionService(launch.expansion_jar,
                                              launch.flags.java_environment_type)
            servers.append(expansion)
        if launch.local_workers:
            workers = LocalWorkerPool()
            servers.append(workers)
        if launch.job_server_jar:
            job_server = LocalFlinkJobServer(launch.job_server_jar, launch.flags.flink_master)
            servers.append(job_server)
        for server in servers:
            stack.callback(server.stop)
            server.launch()
        # While the JVMs start: check the flags, and import what the model
        # handler needs (TensorFlow and tfx-bsl take seconds).
        if make_options(launch.argv()).inference == "local":
            import tfx_bsl.beam.run_inference  # noqa: F401
        for server in servers:
            server.wait_ready()
        pipeline_argv = launch.argv(expansion.address if expansion else None,
                                    workers.address if workers else None)
        if job_server is not None:
            pipeline_argv += job_server.endpoint_flags()
        pipeline = beam.Pipeline(options=make_options(pipeline_argv))
        result, _ = run(pipeline_argv, test_pipeline=pipeline)
        job = RunningJob(result, pipeline_argv, time.monotonic() - started,
                         {server.name: server for server in servers}, rest=launch.rest,
                         job_name=launch.job_name)
        _LOG.info("submitted %s in %.1fs, state %s", job.job_name, job.submitted_s, result.state)
        try:
            yield job
        finally:
            if not launch.flags.detach:
                job.final_state = job.cancel()
                _LOG.info("job ended %s", job.final_state)


def main(argv: list[str]) -> int:
    launch = FlinkLaunch.parse(argv)
    if launch.flags.dry_run:
        address = launch.flags.expansion_service or (
            "127.0.0.1:<port chosen at start>" if launch.reads_pubsub_xlang else None)
        resolved = describe(launch.argv(address), {
            "launcher": "flink", "job_server_jar": launch.job_server_jar,
            "expansion_service_jar": launch.expansion_jar if launch.reads_pubsub_xlang else None,
            "java_environment_type": launch.flags.java_environment_type})
        print(json.dumps(resolved, indent=2, sort_keys=True))
        return 0
    from pipeline import summary
    from pipeline.__main__ import reading_line
    from pipeline.pipeline import make_options, wait_or_cancel

    options = make_options(launch.argv())
    config = options.redis_config()
    before = None
    if not launch.flags.detach:
        import redis

        try:
            before = summary.Snapshot.take(config._replace(retries=1))
        except redis.RedisError as err:
            _LOG.info("no summary at the end: Redis at --redis_url does not answer here (%s)",
                      err)
    started = time.monotonic()
    with flink_job(argv) as job:
        if launch.flags.detach:
            found = job.flink_job()
            print(json.dumps({"job_name": job.job_name, "state": str(job.result.state),
                              "flink_job_id": found["id"] if found else None,
                              "flink_state": found["state"] if found else None}))
            return 0
        if options.is_pubsub:
            print(reading_line(options), file=sys.stderr, flush=True)
        wait_or_cancel(job.result, summary.idle_stop(options, config) if before else None)
        if before is None:
            return 0
        # While the job server that holds the job's metrics still runs.
        totals = summary.collect(job.result, time.monotonic() - started, before, config)
    print(summary.render(totals, redact(config.url), config, f"redis-cli -u {redact(config.url)}",
                         options.input_file))
    return summary.exit_code(totals)
