"""Training step time of the default encoder's classifier, float32 against bfloat16.

    python benchmarks/train_step.py [--lengths 32,64] [--steps 20]

The measurement behind ``python -m model build --train-precision``: keras-hub's
BERT classifier from the default encoder, AdamW, batches of 32 random token ids
of each length (the build pads each batch to its longest row; tweets are mostly
24-64 WordPieces), each precision in a process of its own (the Keras dtype
policy is global), alternating precisions ``--repeats`` times because step
times on a shared 2-core machine drift by tens of percent from one minute to
the next. Prints progress on stderr and one JSON object as its last stdout
line: the median seconds per step per precision and length (and every run),
and the speed-up of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import log_progress  # noqa: E402


def one(precision: str, length: int, steps: int, batch: int) -> float:
    """Seconds per training step (after three warm-up steps), in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from model import build, data

    cfg = build.BuildConfig(out=Path("unused"), train_precision=precision)
    encoder_dir = data.fetch(data.ENCODER, cfg.cache_dir)
    classifier, _ = build._new_classifier(cfg, encoder_dir, build.TRAIN_DTYPES[precision])
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1000, 20000, (batch, length)).astype("int32"),
         "padding_mask": np.ones((batch, length), bool),
         "segment_ids": np.zeros((batch, length), "int32")}
    y = rng.integers(0, len(data.LABELS), batch).astype("int32")
    classifier.compile(optimizer=keras.optimizers.AdamW(1e-5),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       jit_compile=False)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    classifier.fit(dataset.take(3), verbose=0)
    started = time.monotonic()
    classifier.fit(dataset.take(steps), verbose=0)
    return (time.monotonic() - started) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="32,64", help="padded lengths, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating runs per precision and length (median reported)")
    p.add_argument("--one", nargs=2, metavar=("PRECISION", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps, args.batch)))
        return 0

    log_progress()
    import logging

    log = logging.getLogger("train_step")
    out: dict = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                 "seconds_per_step": {}}
    lengths = [int(n) for n in args.lengths.split(",")]
    runs: dict[tuple[int, str], list[float]] = {}
    for repeat in range(args.repeats):
        for length in lengths:
            for precision in ("float32", "bfloat16"):
                run = subprocess.run(
                    [sys.executable, __file__, "--one", precision, str(length),
                     "--steps", str(args.steps), "--batch", str(args.batch)],
                    capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    sys.stderr.write(run.stderr[-3000:])
                    return 1
                seconds = float(run.stdout.strip().splitlines()[-1])
                runs.setdefault((length, precision), []).append(round(seconds, 4))
                log.info("repeat %d/%d, length %d, %s: %.3f s/step", repeat + 1,
                         args.repeats, length, precision, seconds)
    for length in lengths:
        row = {p: statistics.median(runs[length, p]) for p in ("float32", "bfloat16")}
        row["speedup"] = round(row["float32"] / row["bfloat16"], 2)
        row["runs"] = {p: runs[length, p] for p in ("float32", "bfloat16")}
        out["seconds_per_step"][str(length)] = row
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
