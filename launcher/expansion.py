"""The Java servers of a local Flink run, on 127.0.0.1, started and stopped by PID.

``LocalExpansionService``: Beam's Java expansion service for the GCP IOs,
started with ``--defaultEnvironmentType=EMBEDDED`` so the Java part of the
cross-language Pub/Sub read runs inside the Flink runner's JVM instead of a
Docker container (there is no Docker here; apache/beam#30663, #21085,
#21021), and with ``--experiments=use_deprecated_read`` so the read expands
to a primitive ``Read`` that Flink runs natively in its source operator:
Flink then acknowledges Pub/Sub messages when a checkpoint completes.
(Expanded as a splittable DoFn instead, it received messages but emitted
nothing here.)

``LocalFlinkJobServer``: Beam's Flink job server with an embedded Flink
(``--flink-master=[local]``). Started here rather than by Beam's runner so
that it starts while the pipeline is being built, logs to a file, and
outlives a Ctrl-C long enough for the job to be cancelled (Beam's own
handler stops its job server on SIGINT first).

Both ``launch()`` (return at once) and then ``wait_ready()``, so the JVMs
start side by side.
"""

import logging
import os
import subprocess

from pipeline.pipeline import ReadTweets
from runners.local_servers import _LoggedServer, dying_with_parent, free_port, run_logs

_LOG = logging.getLogger(__name__)

# The key ReadTweets (and Beam's GCP cross-language transforms) look up in --beam_services.
GCP_EXPANSION_TARGET = ReadTweets.GCP_EXPANSION_TARGET


class _JavaServer(_LoggedServer):
    """A ``java -jar`` server in its own process group, logging to a file."""

    def __init__(self, jar, port=None):
        self.jar = str(jar)
        self.port = port or free_port()
        self.log_path = run_logs(self.name) / "server.log"

    ready_timeout = 120.0

    def args(self) -> list[str]:
        raise NotImplementedError

    def launch(self):
        # No GCE metadata probe from the Google auth library.
        env = dict(os.environ, NO_GCE_CHECK="true")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(dying_with_parent(["java", *self.args()]),
                                         stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self


class LocalExpansionService(_JavaServer):
    """``java -jar <expansion jar> 127.0.0.1 PORT --defaultEnvironmentType=...``.

    Args:
      jar: the expansion-service launcher jar (``launcher.jars``).
      environment_type: where the Java transforms run: EMBEDDED (in the
        runner's JVM), PROCESS or DOCKER.
      port: the port, or None for a free one.
    """

    name = "expansion-service"

    def __init__(self, jar, environment_type: str = "EMBEDDED", port=None):
        super().__init__(jar, port)
        self.environment_type = environment_type

    def args(self) -> list[str]:
        return ["-jar", self.jar, "127.0.0.1", str(self.port),
                f"--defaultEnvironmentType={self.environment_type}",
                "--experiments=use_deprecated_read"]


class LocalFlinkJobServer(_JavaServer):
    """Beam's Flink job server, bound to 127.0.0.1: with an embedded Flink
    (``[local]``), or submitting to the cluster at ``flink_master``."""

    name = "flink-job-server"

    def __init__(self, jar, flink_master: str = "[local]", port=None):
        super().__init__(jar, port)
        self.flink_master = flink_master
        self.artifact_port = free_port()

    def args(self) -> list[str]:
        return ["-jar", self.jar, f"--flink-master={self.flink_master}", "--job-host=127.0.0.1",
                f"--job-port={self.port}", f"--artifact-port={self.artifact_port}",
                "--expansion-port=0"]

    def endpoint_flags(self) -> list[str]:
        return [f"--job_endpoint={self.address}",
                f"--artifact_endpoint=127.0.0.1:{self.artifact_port}"]
