"""What both launchers share: the project's setup file, Java-side options,
and ``--dry_run`` output without secrets."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from bertstream.config import redacted

ROOT = Path(__file__).resolve().parent.parent
SETUP_FILE = ROOT / "setup.py"
# Option names only (whole words): transform ids in a pipeline are not secrets.
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|token|api_key|private_key)(_|$)",
                         re.IGNORECASE)


class JavaRuntimeOptions(PipelineOptions):
    """Options the Java part of a cross-language transform reads at run time.

    The portable runner sends options keyed by their ``dest`` and Java turns
    ``lower_underscore`` into ``camelCase``: ``pubsub_root_url`` arrives as
    ``PubsubOptions.pubsubRootUrl``, which is how Java's PubsubIO finds the
    emulator (it does not read ``PUBSUB_EMULATOR_HOST``). Beam's Python
    ``--pubsub_root_url`` has dest ``pubsubRootUrl``, which Java would read as
    ``pubsubrooturl``: hence separate flags.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--java_pubsub_root_url", dest="pubsub_root_url", default=None,
                            help="Java PubsubIO's API root, e.g. http://127.0.0.1:8085 for "
                                 "the emulator (default: from PUBSUB_EMULATOR_HOST)")
        parser.add_argument("--java_credential_factory_class", dest="credential_factory_class",
                            default=None,
                            help="Java GcpOptions.credentialFactoryClass (the emulator needs "
                                 "none: NoopCredentialFactory)")


NOOP_CREDENTIALS = "org.apache.beam.sdk.extensions.gcp.auth.NoopCredentialFactory"

def launcher_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Every other flag is the pipeline's (python -m pipeline --help) or Beam's.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the fully resolved options as JSON and exit")
    parser.add_argument("--no_setup_file", action="store_true",
                        help="do not stage the project's setup.py (the workers' image "
                             "already has the package)")
    return parser


def redact(value: Any) -> Any:
    """``value`` with passwords in URLs and secret-looking keys masked."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "", False)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redacted(value)
    return value


def describe(argv: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options the pipeline would run with (validated), redacted, for --dry_run."""
    from pipeline.pipeline import make_options

    options = make_options(argv)
    resolved = options.get_all_options(drop_default=False, retain_unknown_options=True)
    out = {"argv": argv, "options": {k: v for k, v in sorted(resolved.items())
                                     if v is not None}}
    out.update(extra or {})
    return redact(json.loads(json.dumps(out, default=str)))
