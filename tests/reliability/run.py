"""``python -m tests.reliability.run`` (``make reliability``): every scenario
at full size; one JSON object on the last line of stdout.

    {"scenarios": {NAME: {"sent": .., "results": .., "duplicates_skipped": ..,
                          "dead_letters": .., "redelivered": .., "lost": ..,
                          "doubled": .., ...}}, "ok": true, "seconds": ..}

``--short`` runs the sizes ``make test`` runs; ``--only NAME`` (repeatable)
picks scenarios. Exit code 1 when a scenario failed or broke its guarantee.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bertstream.config import cache_dir
from runners.local_servers import LocalPubSubEmulator
from tests.reliability import scenarios, security
from tests.reliability.harness import ENV_VAR, ROOT, Ctx
from tests.reliability.hostile import hostile_input

CACHE = cache_dir()
SCENARIOS = {
    "hostile_input": lambda ctx: hostile_input(10_000 if ctx.full else 2_000),
    "redis_restart": scenarios.redis_restart,
    "pipeline_crash": scenarios.pipeline_crash,
    "pubsub_duplicates": scenarios.pubsub_duplicates,
    "tfserving_outage": scenarios.tfserving_outage,
    "slow_subscriber": scenarios.slow_subscriber,
    "redis_acl": security.acl_user,
    "redis_tls": security.tls,
    "no_secrets": security.no_secrets_in_output,
    "sustained_load": scenarios.sustained_load,
}
# Scenarios whose loss is measured and reported, not a failure. None since
# the job acknowledges only written messages (its AcknowledgeMessages step).
LOSS_REPORTED_ONLY: set[str] = set()


def _broken(name: str, counts: dict) -> list[str]:
    problems = []
    if counts.get("doubled", 0):
        problems.append("doubled")
    if counts.get("lost", 0) and name not in LOSS_REPORTED_ONLY:
        problems.append("lost")
    if counts.get("leaks") or counts.get("secret_leaks") or counts.get("failed"):
        problems.append("secrets")
    if name == "sustained_load" and not counts.get("stream_within_maxlen", True):
        problems.append("maxlen")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.reliability.run", description=__doc__)
    p.add_argument("--short", action="store_true", help="the sizes `make test` runs")
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS), default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    full = not args.short
    os.environ[ENV_VAR] = "full" if full else "short"
    model_dir = CACHE / "test-models" / "bert_sentiment_tiny"
    subprocess.run([sys.executable, "-m", "model", "build", "--tiny", "--out", str(model_dir)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    report: dict = {"scenarios": {}, "size": "full" if full else "short"}

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    with LocalPubSubEmulator() as emulator, tempfile.TemporaryDirectory() as scratch:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        for name in args.only or SCENARIOS:
            work = Path(scratch) / name
            work.mkdir()
            ctx = Ctx(model_dir=model_dir, work_dir=work, full=full, log=log)
            log(f"{name}: start")
            t0 = time.monotonic()
            try:
                counts = SCENARIOS[name](ctx)
            except Exception as err:  # noqa: BLE001 - report it, go on with the others
                traceback.print_exc()
                counts = {"error": f"{type(err).__name__}: {err}"[:2000]}
            counts["seconds"] = round(time.monotonic() - t0, 1)
            counts["ok"] = "error" not in counts and not _broken(name, counts)
            report["scenarios"][name] = counts
            log(f"{name}: {json.dumps(counts, ensure_ascii=False)}")
    report["seconds"] = round(time.monotonic() - started, 1)
    report["ok"] = all(c["ok"] for c in report["scenarios"].values())
    print(json.dumps(report, ensure_ascii=False))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
