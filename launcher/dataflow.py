"""``python -m launcher dataflow``: the job on Google Cloud Dataflow.

Streaming with Streaming Engine, the project's ``setup.py`` staged for the
workers, Pub/Sub read natively (with ``id_label``, which Dataflow honours).
``--dry_run`` prints the resolved options; ``--job_file PATH`` (with or without
``--dry_run``) writes the job description Dataflow would receive: the job
(type, name) and the portable pipeline with every step, its payloads and the
staged artifacts, built by Beam's Dataflow runner without contacting Google.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from launcher.common import (
    SETUP_FILE,
    describe,
    launcher_parser,
    redact,
)

_LOG = logging.getLogger(__name__)
# What Beam's option validator accepts as a bucket name. For a name it refuses
# (gs://BUCKET/tmp, say), Beam goes looking for a default bucket on Cloud
# Storage, dry run or not, and retries for minutes without a network.
_GCS_PATH = re.compile(r"gs://([a-z0-9][-_a-z0-9.]+[a-z0-9])(/.*)?")


def parser():
    p = launcher_parser("python -m launcher dataflow", "Run the job on Google Cloud Dataflow.")
    p.add_argument("--project", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--temp_location", required=True, help="gs://my-bucket/tmp")
    p.add_argument("--staging_location", default=None, help="gs://my-bucket/staging")
    p.add_argument("--service_account_email", default=None)
    p.add_argument("--max_num_workers", type=int, default=None)
    p.add_argument("--sdk_container_image", default=None,
                   help="custom SDK image with the dependencies baked in (then "
                        "--no_setup_file)")
    p.add_argument("--network", default=None)
    p.add_argument("--subnetwork", default=None,
                   help="regions/REGION/subnetworks/NAME or a full URL")
    p.add_argument("--job_name", default=None)
    p.add_argument("--update", action="store_true",
                   help="replace the running job of the same --job_name in place "
                        "(steps are matched by their labels)")
    p.add_argument("--job_file", default=None,
                   help="write the job description (JSON) here; with --dry_run nothing "
                        "is submitted")
    return p


def pipeline_argv(argv: list[str]) -> tuple[Any, list[str]]:
    flags, rest = parser().parse_known_args(argv)
    if not flags.temp_location.startswith("gs://"):
        raise ValueError("--temp_location must be a gs:// path")
    # Beam validates them when it builds the job (not for --dry_run alone).
    for name in ("temp_location", "staging_location"):
        value = getattr(flags, name)
        if (flags.job_file or not flags.dry_run) and value is not None \
                and not _GCS_PATH.fullmatch(value):
            raise ValueError(f"--{name} {value}: not a gs://BUCKET/PATH with a valid bucket "
                             "name (lower-case letters, digits, '-', '_' and '.')")
    if flags.max_num_workers is not None and flags.max_num_workers < 1:
        raise ValueError("--max_num_workers must be at least 1")
    out = ["--runner=DataflowRunner", f"--project={flags.project}", f"--region={flags.region}",
           f"--temp_location={flags.temp_location}", "--streaming",
           "--enable_streaming_engine"]
    for name in ("staging_location", "service_account_email", "max_num_workers",
                 "sdk_container_image", "network", "subnetwork", "job_name"):
        value = getattr(flags, name)
        if value is not None:
            out.append(f"--{name}={value}")
    if flags.update:
        out.append("--update")
    if not flags.no_setup_file and not any(a.startswith("--setup_file") for a in rest):
        out.append(f"--setup_file={SETUP_FILE}")
    if flags.dry_run:
        # Beam's Dataflow runner builds the job and returns before any API call.
        out.append("--dry_run=True")
    return flags, out + rest


def job_description(argv: list[str]) -> dict[str, Any]:
    """Builds the job as Beam's Dataflow runner would submit it (its dry-run mode:
    nothing is staged or sent) and returns it as JSON-able data."""
    import apache_beam as beam
    from google.protobuf.json_format import MessageToDict

    from pipeline.pipeline import make_options, run

    if "--dry_run=True" not in argv:
        argv = [*argv, "--dry_run=True"]
    pipeline = beam.Pipeline(options=make_options(argv))
    result, _ = run(argv, test_pipeline=pipeline)
    job = result.job
    return redact({
        "job": json.loads(job.json()),
        "pipeline": MessageToDict(job.proto_pipeline),
        "options": describe(argv)["options"],
    })


def main(argv: list[str]) -> int:
    flags, full = pipeline_argv(argv)
    if flags.job_file:
        description = job_description(full)
        Path(flags.job_file).write_text(json.dumps(description, indent=1, sort_keys=True))
        _LOG.info("wrote the Dataflow job description to %s", flags.job_file)
    if flags.dry_run:
        print(json.dumps(describe(full, {"launcher": "dataflow"}), indent=2, sort_keys=True))
        return 0
    import apache_beam as beam

    from pipeline.pipeline import make_options, run

    # Submit and return: the streaming job lives on in Dataflow.
    result, _ = run(full, test_pipeline=beam.Pipeline(options=make_options(full)))
    print(json.dumps({"job_id": result.job_id(), "state": str(result.state)}))
    return 0
