"""``python -m launcher flink-cluster up|status|down|savepoint``: a Flink session
cluster of separate processes on this machine, as Kubernetes runs one.

``up`` starts a supervisor (this module's ``supervise``) that owns, on 127.0.0.1:

- a JobManager (``StandaloneSessionClusterEntrypoint``) and N TaskManagers
  (``TaskManagerRunner``), JVMs of their own, from the job server's class path
  (Flink 1.19 is on it; Maven Central serves no flink-dist, so there are no
  Flink scripts). A TaskManager started directly needs its memory fully
  resolved: Flink's ``BashJavaUtils`` computes it, as ``taskmanager.sh`` does;
- the Beam Flink job server the tests run (``launcher/java``), submitting to
  this JobManager and shipping no jars with a job (the cluster has them all);
- the Python SDK worker pool the TaskManagers' jobs reach (EXTERNAL), as the
  Kubernetes sidecars are.

The supervisor restarts whatever dies (a TaskManager after ``--restart_delay_s``),
as Kubernetes restarts a pod, and stops everything on ``down``. Every child
dies with the supervisor (``PR_SET_PDEATHSIG``), so nothing is left behind.
Checkpoints and savepoints go to ``<cluster_dir>/checkpoints`` and
``/savepoints``; logs to ``<cluster_dir>/log`` (emptied by each ``up``).

A job goes to it exactly as to a remote cluster:
``python -m launcher flink --flink_master=<rest> <submit_flags> ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import jars
from launcher.flink_rest import TERMINAL, FlinkRest

_LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "cluster.json"
# Flink's `env.java.opts.all` for Java 17 (flink-dist's config): the module
# access its serializers and RPC system need.
JAVA17_OPTS = [
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.api=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.parser=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.tree=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.util=ALL-UNNAMED",
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
    *(f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in (
        "java.lang", "java.net", "java.io", "java.nio", "sun.nio.ch", "java.lang.reflect",
        "java.text", "java.time", "java.util", "java.util.concurrent",
        "java.util.concurrent.atomic", "java.util.concurrent.locks")),
]
# Timestamps in the JVMs' logs (slf4j-simple is the class path's binding).
LOG_OPTS = ["-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss,SSS"]


def default_dir() -> Path:
    return jars.cache_dir() / "flink-cluster"


@dataclasses.dataclass
class Spec:
    """What ``up`` was asked for, and the ports it chose."""

    cluster_dir: str
    taskmanagers: int
    slots: int
    rest_port: int
    rpc_port: int
    job_port: int
    artifact_port: int
    workers_port: int
    jobmanager_memory: str = "768m"
    taskmanager_memory: str = "1280m"
    restart_delay_s: float = 2.0
    conf: dict = dataclasses.field(default_factory=dict)

    @property
    def rest(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    @property
    def submit_flags(self) -> list[str]:
        """What a job needs to run here: the cluster's job server (it submits to
        this JobManager; no JVM in the submitter), where the SDK workers are,
        and nothing to stage (the workers run this checkout)."""
        return [f"--job_endpoint=127.0.0.1:{self.job_port}",
                f"--environment_config=127.0.0.1:{self.workers_port}", "--no_setup_file"]

    def path(self, *parts: str) -> Path:
        return Path(self.cluster_dir, *parts)

    def flink_conf(self) -> dict[str, str]:
        d = self.path
        conf = {
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": str(self.rpc_port),
            "jobmanager.bind-host": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": str(self.rest_port),
            "taskmanager.host": "127.0.0.1",
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.numberOfTaskSlots": str(self.slots),
            "jobmanager.memory.process.size": self.jobmanager_memory,
            "taskmanager.memory.process.size": self.taskmanager_memory,
            # Beam's portable operators keep state on the heap (hashmap) and use
            # no managed memory; the rest goes to the task heap.
            "taskmanager.memory.managed.size": "64m",
            "state.backend.type": "hashmap",
            "state.checkpoints.dir": d("checkpoints").as_uri(),
            "state.savepoints.dir": d("savepoints").as_uri(),
            "state.checkpoints.num-retained": "3",
            # Kept when a job is cancelled or its JobManager dies: what a job
            # resumes from without HA (docs/runners.md).
            "execution.checkpointing.externalized-checkpoint-retention":
                "RETAIN_ON_CANCELLATION",
            "restart-strategy.type": "exponential-delay",
            "restart-strategy.exponential-delay.initial-backoff": "1 s",
            "restart-strategy.exponential-delay.max-backoff": "10 s",
            # Find a dead TaskManager in seconds, not the default 50.
            "heartbeat.interval": "2000",
            "heartbeat.timeout": "20000",
            "cluster.evenly-spread-out-slots": "true",
            # The RPC system unpacks its jar here (no /tmp clutter).
            "io.tmp.dirs": str(d("tmp")),
            # Every class is on the system class path (the job server ships none):
            # load them once, from there.
            "classloader.resolve-order": "parent-first",
        }
        conf.update(self.conf)
        return conf


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


def _resolve_memory(lib: Path, conf_dir: Path, what: str) -> tuple[list[str], list[str]]:
    """JVM flags and ``-D`` settings for a JobManager (``JM``) or TaskManager
    (``TM``), from Flink's BashJavaUtils as Flink's scripts get them."""
    out = subprocess.run(
        ["java", "-cp", f"{lib}/*", "org.apache.flink.runtime.util.bash.BashJavaUtils",
         f"GET_{what}_RESOURCE_PARAMS", "--configDir", str(conf_dir)],
        capture_output=True, text=True, check=False)
    results = [line.split(":", 1)[1] for line in out.stdout.splitlines()
               if line.startswith("BASH_JAVA_UTILS_EXEC_RESULT:")]
    if out.returncode or len(results) < 2:
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"Flink could not resolve the {what} memory: {' '.join(tail)}")
    return results[0].split(), results[1].split()


class Supervisor:
    """Starts the cluster's processes, restarts any that dies, stops them all on
    SIGTERM. Runs as ``python -m launcher.flink_cluster supervise DIR``."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.lib = jars.lib_dir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.died_at: dict[str, float] = {}
        self.stopping = False
        self.ready = False
        self.rest = FlinkRest(spec.rest, timeout=3)

    def roles(self) -> list[str]:
        return (["jobmanager"] + [f"taskmanager-{i}" for i in range(1, self.spec.taskmanagers + 1)]
                + ["job-server", "worker-pool"])

    def command(self, role: str) -> list[str]:
        s = self.spec
        conf_dir = s.path("conf")
        if role == "jobmanager":
            return ["java", *self.jm_jvm, *JAVA17_OPTS, *LOG_OPTS, "-cp", f"{self.lib}/*",
                    "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                    "--configDir", str(conf_dir), *self.jm_dynamic]
        if role.startswith("taskmanager"):
            return ["java", *self.tm_jvm, *JAVA17_OPTS, *LOG_OPTS, "-cp", f"{self.lib}/*",
                    "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
                    "--configDir", str(conf_dir), *self.tm_dynamic]
        if role == "job-server":
            return ["java", *LOG_OPTS, "-jar", str(jars.job_server_jar()),
                    "--no-classpath-staging", f"--flink-master={s.rest}",
                    "--job-host=127.0.0.1", f"--job-port={s.job_port}",
                    f"--artifact-port={s.artifact_port}", "--expansion-port=0",
                    f"--artifacts-dir={s.path('artifacts')}"]
        return [sys.executable, "-m", "runners.worker_pool", "--host", "127.0.0.1",
                "--port", str(s.workers_port), "--preload", "tensorflow,tensorflow_text"]

    def start(self, role: str) -> None:
        from runners.local_servers import dying_with_parent

        log = self.spec.path("log", f"{role}.log")
        with open(log, "ab") as out:
            self.procs[role] = subprocess.Popen(
                dying_with_parent(self.command(role)), stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, env=dict(os.environ, NO_GCE_CHECK="true"), start_new_session=True)
        _LOG.info("started %s pid %d (log %s)", role, self.procs[role].pid, log)

    def state(self) -> dict:
        s = self.spec
        pid = {role: proc.pid for role, proc in self.procs.items()}
        return {"rest": s.rest, "cluster_dir": s.cluster_dir, "supervisor_pid": os.getpid(),
                "jobmanager_pid": pid.get("jobmanager"),
                "taskmanager_pids": [pid.get(r) for r in self.roles()
                                     if r.startswith("taskmanager")],
                "job_server_pid": pid.get("job-server"), "worker_pool_pid": pid.get("worker-pool"),
                "submit_flags": s.submit_flags, "taskmanagers": s.taskmanagers,
                "slots": s.slots, "restarts": dict(self.restarts), "ready": self.ready,
                "logs": str(s.path("log")), "checkpoints": str(s.path("checkpoints")),
                "savepoints": str(s.path("savepoints")), "spec": dataclasses.asdict(s)}

    def _is_ready(self) -> bool:
        from runners.local_servers import port_open

        try:
            registered = len(self.rest.taskmanagers())
        except OSError:
            return False
        return (registered >= self.spec.taskmanagers and port_open(self.spec.job_port)
                and port_open(self.spec.workers_port))

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        conf_dir = self.spec.path("conf")
        self.jm_jvm, self.jm_dynamic = _resolve_memory(self.lib, conf_dir, "JM")
        self.tm_jvm, self.tm_dynamic = _resolve_memory(self.lib, conf_dir, "TM")
        state_path = self.spec.path(STATE_FILE)
        try:
            for role in self.roles():
                self.start(role)
            written = None
            while not self.stopping:
                for role, proc in list(self.procs.items()):
                    if proc.poll() is None or self.stopping:
                        continue
                    died = self.died_at.setdefault(role, time.monotonic())
                    if time.monotonic() - died < self.spec.restart_delay_s:
                        continue
                    _LOG.warning("%s (pid %d) exited with %s: starting it again", role,
                                 proc.pid, proc.returncode)
                    del self.died_at[role]
                    self.restarts[role] = self.restarts.get(role, 0) + 1
                    self.start(role)
                if not self.ready and self._is_ready():
                    self.ready = True
                    _LOG.info("cluster ready: %d TaskManagers registered on %s",
                              self.spec.taskmanagers, self.spec.rest)
                state = self.state()
                if state != written:
                    _write_json(state_path, state)
                    written = state
                time.sleep(0.5)
        finally:
            self.stop_all()
            state_path.unlink(missing_ok=True)

    def stop_all(self) -> None:
        from runners.local_servers import stop_process_group

        # The job server first (no new submissions), the JobManager last.
        for role in reversed(self.roles()):
            proc = self.procs.get(role)
            if proc is not None:
                stop_process_group(proc, signal.SIGTERM, timeout=20)
                _LOG.info("stopped %s (pid %d)", role, proc.pid)


def read_state(cluster_dir: Path) -> dict | None:
    """The running cluster's state, or None when none runs in ``cluster_dir``."""
    path = cluster_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(state.get("supervisor_pid")) else None


def latest_checkpoint(cluster_dir: Path, job_id: str) -> str | None:
    """The newest complete retained checkpoint of a job (a path to resume from)."""
    found = [p for p in (cluster_dir / "checkpoints" / job_id).glob("chk-*")
             if (p / "_metadata").exists()]
    if not found:
        return None
    return str(max(found, key=lambda p: int(p.name.split("-")[1])))


def describe(cluster_dir: Path, state: dict) -> dict:
    """``up``/``status`` output: the state plus what Flink says now."""
    out = {k: v for k, v in state.items() if k != "spec"}
    rest = FlinkRest(state["rest"], timeout=5)
    try:
        out["registered_taskmanagers"] = len(rest.taskmanagers())
        out["jobs"] = [dict(job, latest_checkpoint=latest_checkpoint(cluster_dir, job["id"]))
                       for job in rest.jobs()]
    except OSError as err:
        out["registered_taskmanagers"] = 0
        out["jobs"] = []
        out["jobmanager_unreachable"] = str(err)
    # Every job's newest retained checkpoint, those of jobs the JobManager no
    # longer knows included (after it died: there is no HA here).
    out["latest_checkpoints"] = {
        job.name: found for job in sorted((cluster_dir / "checkpoints").glob("*"))
        if (found := latest_checkpoint(cluster_dir, job.name))}
    return out


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m launcher flink-cluster {command}")
    p.add_argument("--cluster_dir", type=Path, default=default_dir(),
                   help="where the cluster keeps its configuration, logs, checkpoints and "
                        "savepoints (default: %(default)s)")
    return p


def up(argv: list[str]) -> int:
    from runners.local_servers import free_port

    p = _parser("up")
    p.description = ("Start a Flink session cluster on 127.0.0.1: a JobManager, N "
                     "TaskManagers, the Beam job server and the Python SDK worker pool, in "
                     "processes of their own. Returns once every TaskManager has registered; "
                     "the last stdout line is JSON with rest, the PIDs and submit_flags.")
    p.add_argument("--taskmanagers", type=int, default=1)
    p.add_argument("--slots", type=int, default=1, help="task slots per TaskManager")
    p.add_argument("--taskmanager_memory", default="1280m",
                   help="each TaskManager's process size (Flink's default, 1728m, is more "
                        "than a small machine has for several)")
    p.add_argument("--jobmanager_memory", default="768m")
    p.add_argument("--restart_delay_s", type=float, default=2.0,
                   help="how long a dead process stays dead before it is started again")
    p.add_argument("-D", dest="conf", action="append", default=[], metavar="KEY=VALUE",
                   help="a Flink configuration entry, e.g. -D state.checkpoints.num-retained=5")
    p.add_argument("--timeout_s", type=float, default=180.0,
                   help="how long to wait for every TaskManager to register")
    args = p.parse_args(argv)
    if args.taskmanagers < 1 or args.slots < 1:
        raise ValueError("--taskmanagers and --slots must be at least 1")
    conf = {}
    for entry in args.conf:
        key, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"-D {entry}: expected KEY=VALUE")
        conf[key.strip()] = value.strip()
    jars.require()
    cluster_dir = args.cluster_dir.resolve()
    running = read_state(cluster_dir)
    if running is not None:
        if (running["taskmanagers"], running["slots"]) == (args.taskmanagers, args.slots):
            _LOG.info("a cluster already runs in %s", cluster_dir)
            print(json.dumps(describe(cluster_dir, running)))
            return 0
        raise ValueError(f"a cluster of {running['taskmanagers']} TaskManagers already runs in "
                         f"{cluster_dir}: `python -m launcher flink-cluster down` it first, or "
                         "give another --cluster_dir")
    spec = Spec(str(cluster_dir), args.taskmanagers, args.slots, *(free_port() for _ in range(5)),
                jobmanager_memory=args.jobmanager_memory,
                taskmanager_memory=args.taskmanager_memory,
                restart_delay_s=args.restart_delay_s, conf=conf)
    for sub in ("conf", "checkpoints", "savepoints", "tmp", "artifacts"):
        spec.path(sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(spec.path("log"), ignore_errors=True)
    spec.path("log").mkdir()
    (spec.path("conf") / "flink-conf.yaml").write_text(
        "".join(f"{k}: {v}\n" for k, v in spec.flink_conf().items()))
    _write_json(spec.path("spec.json"), dataclasses.asdict(spec))
    _LOG.info("starting a Flink cluster of %d TaskManager(s) x %d slot(s) in %s (logs in %s)",
              spec.taskmanagers, spec.slots, cluster_dir, spec.path("log"))
    with open(spec.path("log", "supervisor.log"), "ab") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "launcher.flink_cluster", "supervise", str(cluster_dir)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise RuntimeError(f"the cluster's supervisor exited ({supervisor.returncode}); "
                               f"see {spec.path('log')}")
        state = read_state(cluster_dir)
        if state and state.get("ready"):
            print(json.dumps(describe(cluster_dir, state)))
            return 0
        time.sleep(0.5)
    os.killpg(supervisor.pid, signal.SIGTERM)
    raise TimeoutError(f"the cluster was not ready within {args.timeout_s:.0f}s (every "
                       f"TaskManager registered); see {spec.path('log')}")


def status(argv: list[str]) -> int:
    p = _parser("status")
    p.description = "Print the running cluster's JSON (as `up` does); exit 1 if none runs."
    args = p.parse_args(argv)
    cluster_dir = args.cluster_dir.resolve()
    state = read_state(cluster_dir)
    if state is None:
        print(json.dumps({"running": False, "cluster_dir": str(cluster_dir)}))
        return 1
    print(json.dumps(dict(describe(cluster_dir, state), running=True)))
    return 0


def down(argv: list[str]) -> int:
    p = _parser("down")
    p.description = "Stop every process `up` started (jobs on the cluster end with it)."
    args = p.parse_args(argv)
    cluster_dir = args.cluster_dir.resolve()
    state = read_state(cluster_dir)
    if state is None:
        _LOG.info("no cluster runs in %s", cluster_dir)
        print(json.dumps({"stopped": [], "cluster_dir": str(cluster_dir)}))
        return 0
    pids = [state["supervisor_pid"], state["jobmanager_pid"], *state["taskmanager_pids"],
            state["job_server_pid"], state["worker_pool_pid"]]
    os.kill(state["supervisor_pid"], signal.SIGTERM)
    deadline = time.monotonic() + 90
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:  # what did not stop in time (or a supervisor that hung)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    (cluster_dir / STATE_FILE).unlink(missing_ok=True)
    print(json.dumps({"stopped": [pid for pid in pids if pid], "cluster_dir": str(cluster_dir)}))
    return 0


def savepoint(argv: list[str]) -> int:
    p = _parser("savepoint")
    p.description = ("Stop a running job with a savepoint (Flink's stop-with-savepoint) and "
                     "print its path; resume with `python -m launcher flink ... "
                     "--savepoint_path PATH`, at any --parallelism.")
    p.add_argument("--job", default=None, help="Flink job id (default: the one running job)")
    args = p.parse_args(argv)
    cluster_dir = args.cluster_dir.resolve()
    state = read_state(cluster_dir)
    if state is None:
        raise ValueError(f"no cluster runs in {cluster_dir}")
    rest = FlinkRest(state["rest"])
    job = args.job
    if job is None:
        running = [j["id"] for j in rest.jobs() if j["state"] not in TERMINAL]
        if len(running) != 1:
            raise ValueError(f"{len(running)} jobs run on the cluster: name one with --job")
        job = running[0]
    path = rest.stop_with_savepoint(job, str(cluster_dir / "savepoints"))
    print(json.dumps({"job": job, "savepoint": path, "state": rest.wait_terminal(job, 60)}))
    return 0


COMMANDS = {"up": up, "status": status, "down": down, "savepoint": savepoint}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m launcher flink-cluster {up,status,down,savepoint} [flags]",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":  # the supervisor: python -m launcher.flink_cluster supervise DIR
    from bertstream.logs import setup_logging

    setup_logging(os.environ.get("BERTSTREAM_LOG_LEVEL", "info"))
    if sys.argv[1:2] != ["supervise"] or len(sys.argv) != 3:
        sys.exit("usage: python -m launcher.flink_cluster supervise CLUSTER_DIR")
    spec_data = json.loads(Path(sys.argv[2], "spec.json").read_text())
    Supervisor(Spec(**spec_data)).run()
