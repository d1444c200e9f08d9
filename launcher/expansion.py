"""Beam's Java expansion service for the GCP IOs, on 127.0.0.1, started by PID.

Started with ``--defaultEnvironmentType=EMBEDDED`` so the Java part of the
cross-language Pub/Sub read runs inside the Flink runner's JVM instead of a
Docker container (there is no Docker here; apache/beam#30663, #21085, #21021),
and with ``--experiments=use_deprecated_read`` so the read expands to a
primitive ``Read`` that Flink runs natively in its source operator: Flink then
acknowledges Pub/Sub messages when a checkpoint completes. (Expanded as a
splittable DoFn instead, it received messages but emitted nothing here.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

from pipeline.local_servers import _LocalServer, _wait_for_port, free_port
from pipeline.pipeline import ReadTweets

_LOG = logging.getLogger(__name__)

# The key ReadTweets (and Beam's GCP cross-language transforms) look up in --beam_services.
GCP_EXPANSION_TARGET = ReadTweets.GCP_EXPANSION_TARGET


class LocalExpansionService(_LocalServer):
    """``java -jar <expansion jar> 127.0.0.1 PORT --defaultEnvironmentType=...``.

    Args:
      jar: the expansion-service launcher jar (``launcher.jars``).
      environment_type: where the Java transforms run: EMBEDDED (in the
        runner's JVM), PROCESS or DOCKER.
      port: the port, or None for a free one.
    """

    name = "expansion-service"

    def __init__(self, jar: str | Path, environment_type: str = "EMBEDDED",
                 port: int | None = None):
        self.jar = str(jar)
        self.environment_type = environment_type
        self.port = port or free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="bertstream-expansion-")) / "service.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> LocalExpansionService:
        args = ["java", "-jar", self.jar, "127.0.0.1", str(self.port),
                f"--defaultEnvironmentType={self.environment_type}",
                "--experiments=use_deprecated_read"]
        # No GCE metadata probe from the Google auth library.
        env = dict(os.environ, NO_GCE_CHECK="true")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            _wait_for_port(self.port, self.proc, timeout, self.name)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(f"{err}; its log: {self.log_path}") from err
        _LOG.info("started expansion service pid %d on %s", self.proc.pid, self.address)
        return self

    def __enter__(self):
        return self.start()
