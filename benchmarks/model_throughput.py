"""Single-process inference throughput of a SavedModel at batch 1, 16 and 64.

    python benchmarks/model_throughput.py [--model DIR] [--n N]

The texts are the shipped sample's tweets (realistic lengths); each batch is
padded to its own longest tweet, as in the pipeline. Prints one JSON object as
the last line: tweets/s per batch size, plus the model's test metrics and size
from its model card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import sample_texts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "bert_sentiment"))
    p.add_argument("--n", type=int, default=640, help="tweets per batch size")
    p.add_argument("--batch_sizes", default="1,16,64")
    args = p.parse_args(argv)

    from model.serving import LoadedModel, read_card

    model = LoadedModel(args.model)
    texts = sample_texts()
    texts = (texts * (args.n // len(texts) + 1))[: args.n]
    out = {"model_dir": str(model.version_dir), "n": args.n}
    for size in (int(s) for s in args.batch_sizes.split(",")):
        batches = [texts[i:i + size] for i in range(0, len(texts), size)]
        model.probabilities(batches[0])
        start = time.perf_counter()
        for batch in batches:
            model.probabilities(batch)
        out[f"tps_batch_{size}"] = round(len(texts) / (time.perf_counter() - start), 2)
        print(f"batch {size}: {out[f'tps_batch_{size}']} tweets/s", file=sys.stderr)
    card = read_card(model.version_dir)
    out["test_metrics"] = {k: card.get("test_metrics", {}).get(k)
                           for k in ("n", "accuracy", "macro_f1", "polar_accuracy")}
    out["build_seconds"] = card.get("build_seconds")
    out["size_bytes"] = card.get("size_bytes")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
