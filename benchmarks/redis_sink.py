"""How many results one Redis takes: the sink's own Lua script, pipelined as the job
sends it, from several writer processes (as a cluster's workers are).

    python benchmarks/redis_sink.py [--results 50000] [--writers 1,2,4] [--redis_url URL]

Starts a redis-server on 127.0.0.1 (unless --redis_url) and, for each writer
count, that many processes writing ``--results`` results in all through
``transforms.redis_sink._WriteResultsFn`` (one ``SET NX`` + ``XADD`` +
``PUBLISH`` + two ``HINCRBY`` per result, 500 per pipelined flush). Prints the
results/s and Redis's own CPU seconds per 1,000 results; the last stdout line
is JSON. On a multi-core host the writers and Redis get cores of their own; on
a small one they share them, and the figure is a floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _write(redis_url: str, first: int, count: int) -> None:
    import apache_beam as beam

    from bertstream.config import RedisConfig
    from transforms.records import Result
    from transforms.redis_sink import _WriteResultsFn

    fn = _WriteResultsFn(RedisConfig(url=redis_url))
    fn.setup()
    fn.start_bundle()
    w = beam.transforms.window.GlobalWindow()
    for i in range(first, first + count):
        result = Result(str(1890000000000000000 + i), "a tweet of about a hundred characters, "
                        "as the benchmark streams use them on average #test", "positive", 0.9,
                        [0.05, 0.05, 0.9], "1", "2026-12-06T10:00:00.000Z",
                        "2026-12-06T10:00:00.000Z", "2026-12-06T10:00:02.000Z",
                        "2026-12-06T10:00:01.000Z", False, "2026-12-06T10:00:00.500Z")
        list(fn.process(result, timestamp=0, w=w))
    list(fn.finish_bundle())
    fn.teardown()


def _redis_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=int, default=50_000)
    p.add_argument("--writers", default="1,2,4")
    args = p.parse_args(argv)
    from runners.local_servers import LocalRedis

    out = {"results": args.results, "cpus": os.cpu_count(), "runs": []}
    ctx = multiprocessing.get_context("spawn")
    for writers in (int(w) for w in args.writers.split(",")):
        with LocalRedis() as server:
            cpu_before = _redis_cpu(server.proc.pid)
            share = args.results // writers
            procs = [ctx.Process(target=_write, args=(server.url, i * share, share))
                     for i in range(writers)]
            started = time.monotonic()
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            seconds = time.monotonic() - started
            redis_cpu = _redis_cpu(server.proc.pid) - cpu_before
            out["runs"].append({"writers": writers, "results_per_s": round(share * writers / seconds),
                                "redis_cpu_ms_per_1000": round(redis_cpu * 1e6 / (share * writers), 1)})
        print(f"{writers} writer(s): {out['runs'][-1]}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
