"""What a version in shadow costs the stream: the same job drained and offered
live load with no new version, with one in shadow scoring every tweet, and
with one scoring a quarter of them (``--shadow_share``).

    python benchmarks/shadow.py [--n 3000] [--rate 50] [--seconds 20] [--model_dir DIR]

Each mode runs ``python -m pipeline --runner=DirectRunner`` on the emulator, as
a user does, with version 1 the model under ``--model_dir``:

1. probe: one tweet; ``startup_s`` = launch -> its result;
2. the shadow: version 2 (the same model: it agrees, so it stays in shadow
   for the whole run, ``--shadow_tweets`` being out of reach) is dropped in
   and the job waits until it has scored a first batch in shadow; the
   no-shadow mode skips this;
3. backlog: ``--n`` tweets of varied length published at once; ``drain_tps``
   = n / (publish start -> the last result), every result counted in Redis;
4. live: ``--rate`` tweets/s for ``--seconds``; publish -> subscriber p50/p99.

The last stdout line is one JSON object, each mode against the no-shadow one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common, drain, throughput  # noqa: E402

_LOG = logging.getLogger("shadow")
MODES = {"no-shadow": None, "shadow-all": 1.0, "shadow-quarter": 0.25}


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_mode(name: str, share: float | None, version_dir: Path, tweets: list[dict], args,
             redis_url: str, emulator: str, logs: Path) -> dict:
    import redis
    from google.cloud import pubsub_v1

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    with tempfile.TemporaryDirectory(prefix="bertstream-shadow-") as scratch:
        base = Path(scratch)
        (base / "1").symlink_to(version_dir)
        topic, subscription = drain._subscription(name, [dict(tweets[0], id="1")])
        command = [sys.executable, "-m", "pipeline", "--runner=DirectRunner",
                   f"--input_subscription={subscription}", f"--redis_url={redis_url}",
                   f"--model_dir={base}", "--model_reload_seconds=1",
                   "--shadow_tweets=1000000000", f"--shadow_share={share or 1.0}"]
        row: dict = {"shadow_share": share}
        with drain._job(command, logs / f"{name}.log") as (proc, launched):
            _wait(lambda: client.xlen("sentiment:results") >= 1, 600, f"{name}: the probe")
            row["startup_s"] = round(drain._result_times(client)[0] - launched, 2)
            publisher = pubsub_v1.PublisherClient()
            warm = [dict(t, id=str(2 + i)) for i, t in enumerate(tweets[:40])]
            if share:
                (base / "2").symlink_to(version_dir)
                _wait(lambda: client.hget("sentiment:model:2", "state") == b"shadow", 120,
                      f"{name}: version 2 in shadow")
                throughput._publish(publisher, topic, warm)
                _wait(lambda: int(client.hget("sentiment:model:2", "scored") or 0) > 0, 120,
                      f"{name}: version 2's first shadow batch")
            else:
                throughput._publish(publisher, topic, warm)
            _wait(lambda: client.xlen("sentiment:results") >= 1 + len(warm), 120,
                  f"{name}: the warm-up tweets")
            before = client.xlen("sentiment:results")
            backlog = [dict(t, id=str(1000 + i)) for i, t in enumerate(tweets)]
            started = time.time()
            throughput._publish(publisher, topic, backlog)
            _wait(lambda: client.xlen("sentiment:results") >= before + len(backlog), 900,
                  f"{name}: the backlog")
            last = drain._result_times(client)[1]
            row["drain_s"] = round(last - started, 2)
            row["drain_tps"] = round(len(backlog) / max(last - started, 1e-3), 1)
            if share:
                shadow = {k.decode(): v.decode()
                          for k, v in client.hgetall("sentiment:model:2").items()}
                row["shadow_scored"] = int(shadow.get("scored", 0))
                row["shadow_state"] = shadow.get("state")
                row["served_by"] = sorted({json.loads(f[b"result"])["model_version"] for _, f
                                           in client.xrange("sentiment:results")})
            _LOG.info("%s: backlog %s", name, row)
            row.update(drain._live(args.rate, args.seconds, topic, redis_url, emulator))
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: the job exited ({proc.returncode}); see {logs}")
    _LOG.info("%s: %s", name, row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", default=str(ROOT / "models" / "bert_sentiment"))
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--rate", type=float, default=50, help="live load, tweets/s")
    p.add_argument("--seconds", type=float, default=20, help="live load duration")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args(argv)
    common.log_progress()

    from model.serving import resolve
    from runners.local_servers import LocalPubSubEmulator, LocalRedis, run_logs

    version_dir = Path(resolve(common.model_dir_of(args.model_dir))).resolve()
    tweets = common.make_tweets(args.n, 4, texts=common.varied_texts())
    report = {"n": args.n, "model": str(version_dir), "live_rate": args.rate,
              "load_average_at_start": os.getloadavg()[0], "modes": {}}
    logs = run_logs("bench-shadow")
    _LOG.info("job logs in %s", logs)
    with LocalRedis() as server, LocalPubSubEmulator() as emulator, contextlib.ExitStack():
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        for name in args.modes.split(","):
            report["modes"][name] = run_mode(name, MODES[name], version_dir, tweets, args,
                                             server.url, emulator.host, logs)
    base = report["modes"].get("no-shadow", {}).get("drain_tps")
    if base:
        for row in report["modes"].values():
            row["drain_vs_no_shadow"] = round(row["drain_tps"] / base, 2)
    report["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
