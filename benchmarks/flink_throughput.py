"""The job on an embedded Flink against the model alone (kept for the command in issue 15).

    python -m benchmarks.flink_throughput [--n 2000] [--model_dir DIR] [--parallelism P]

``benchmarks/throughput.py --runner FlinkRunner`` with a live run and a
backlog drain at 4 tweets per second of event time, no file run; other
flags pass through (``--densities``, ``--modes``, ``--job_flag``). The last
line of stdout is the JSON object ``throughput.py`` prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import throughput  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="tweets per run")
    p.add_argument("--parallelism", type=int, default=1, help="Flink parallelism")
    args, rest = p.parse_known_args(argv)
    forwarded = ["--runner", "FlinkRunner", "--n", str(args.n), "--no_file",
                 f"--job_flag=--parallelism={args.parallelism}"]
    if not any(a.startswith("--densities") for a in rest):
        forwarded += ["--densities", "4"]
    return throughput.main(forwarded + rest)


if __name__ == "__main__":
    sys.exit(main())
