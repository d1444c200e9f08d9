"""``python -m launcher {fetch-jars,fetch-crd,flink,dataflow} [flags]``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m launcher COMMAND [flags]

  fetch-jars [--flink_version V] [--force]   cache the Beam Flink job server and the GCP
                                             expansion service (Maven Central, once)
  fetch-crd  [--force]                       cache the Flink operator's FlinkDeployment
                                             CRD (Maven Central, once; manifest tests)
  flink      [pipeline flags] --flink_master HOST:PORT|[local] [...]   run on Flink
  flink-cluster up|status|down|savepoint [...]   a local Flink cluster of separate
                                             processes (JobManager, TaskManagers, job
                                             server, SDK worker pool) on 127.0.0.1
  dataflow   [pipeline flags] --project P --region R --temp_location gs://... [...]

`python -m launcher COMMAND --help` lists each command's flags."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from bertstream.logs import log_level_from, quiet_tensorflow, setup_logging

    setup_logging(log_level_from(argv))
    if argv and argv[0] in ("flink", "dataflow"):  # they build the job, which imports it
        quiet_tensorflow()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "fetch-jars":
            import argparse

            from launcher import jars

            p = argparse.ArgumentParser(prog="python -m launcher fetch-jars")
            p.add_argument("--flink_version", default=jars.DEFAULT_FLINK_VERSION,
                           choices=jars.FLINK_VERSIONS)
            p.add_argument("--force", action="store_true", help="fetch again")
            flags = p.parse_args(rest)
            print(jars.fetch(flags.flink_version, flags.force))
            return 0
        if command == "fetch-crd":
            from launcher import jars

            print(jars.fetch_crd(force="--force" in rest))
            return 0
        if command == "flink":
            from launcher import flink

            return flink.main(rest)
        if command == "flink-cluster":
            from launcher import flink_cluster

            return flink_cluster.main(rest)
        if command == "dataflow":
            from launcher import dataflow

            return dataflow.main(rest)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
