"""Runner profiles: everything the job does differently per runner, in one place.

``make_options`` picks a profile (``profile_for``) and adds the runner flags
it needs (``flags``); ``build`` consults the same profile once, for the
choices the graph depends on (how Pub/Sub is read and acknowledged, the
layout of the stateful steps) and, on Beam's legacy DirectRunner, to install
``runners/direct_runner.py``. ``transforms/`` knows nothing about runners.

| runner | Pub/Sub read | acknowledged | dedupe |
|---|---|---|---|
| DirectRunner, file | - (Beam runs it as a batch job on its FnApiRunner) | - | GroupByKey |
| DirectRunner, Pub/Sub | Beam's ``ReadFromPubSub``, pulls adjusted by ``runners/direct_runner.py`` | by the graph, once written | claims in Redis |
| DirectRunner, ``--direct_optimizations=off`` | Beam's ``ReadFromPubSub`` as it ships | by Beam, on pull | a key per id |
| PrismRunner | ``PullFromPubSub`` (a Python SDF) | by the graph | claims in Redis |
| FlinkRunner | ``PullFromPubSub``; ``--pubsub_read=xlang``: Java ``PubsubIO`` | by the graph; xlang: by Flink at checkpoints | claims in Redis |
| DataflowRunner | Beam's ``ReadFromPubSub``, ``id_label=tweet_id`` | by Dataflow | a key per id |
| other portable runners | ``PullFromPubSub`` | by the graph | claims in Redis |
"""

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bertstream.config import cache_dir

_LOG = logging.getLogger(__name__)

PRISM_VERSION = "v2.77.0"  # the Beam release this SDK is
PRISM_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"
# How Pub/Sub is read: our SDF, Beam's Java PubsubIO, Beam's Python read as
# the runner implements it, or that read on the adjusted legacy DirectRunner.
PULL, XLANG, NATIVE, DIRECT = "pull", "xlang", "native", "direct"
# Flink closes a bundle after this many elements or milliseconds; the job's
# inference batches are cut from bundles (transforms/inference.py).
FLINK_MAX_BUNDLE_SIZE = 1000
FLINK_MAX_BUNDLE_TIME_MS = 100


class FlinkJavaOptions(PipelineOptions):
    """Options of Beam's Java Flink runner (``FlinkPipelineOptions``) that the
    Python SDK does not declare. The job server reads them from the options
    the job is submitted with (``checkpointing_interval`` arrives as Java's
    ``checkpointingInterval``); declared here so that they parse as the
    runner's own, without "Unparseable argument" warnings."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("Flink (Beam's Java runner options)")
        group.add_argument("--max_bundle_size", type=int, default=None,
                           help="Flink: elements per bundle (the job's batches are cut "
                                "from bundles)")
        group.add_argument("--max_bundle_time_mills", type=int, default=None,
                           help="Flink: milliseconds a bundle stays open at most")
        group.add_argument("--checkpointing_interval", type=int, default=None,
                           help="Flink: milliseconds between checkpoints")
        group.add_argument("--finish_bundle_before_checkpointing", action="store_true",
                           default=None, help="Flink: finish bundles before a checkpoint")
        group.add_argument("--savepoint_path", default=None,
                           help="Flink: start from this savepoint or retained checkpoint")
        group.add_argument("--allow_non_restored_state", action="store_true", default=None,
                           help="Flink: start from a savepoint that holds state no step of "
                                "this job claims")


def find_prism() -> str | None:
    """The Prism binary: ``$BERTSTREAM_PRISM``, the one set-up built, or on PATH."""
    for candidate in (os.environ.get("BERTSTREAM_PRISM"), str(cache_dir() / "bin" / "prism")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("prism")


PRISM_HINT = (f"build it once with `make prism` (go install {PRISM_MODULE}@{PRISM_VERSION}, "
              "about two minutes, from the Go module proxy), or give --prism_location")


# DedupeByTweetId's layouts.
PER_ID, IN_REDIS = "per-id", "redis"


@dataclass(frozen=True)
class RunnerProfile:
    """What one runner needs. ``name`` is the runner the job really runs on."""

    name: str
    pubsub_read: str
    # Keys that hold WindowByEventTime's per-window flag: one per worker
    # slot, so a cluster spreads the step.
    late_shards: int = 1
    # DedupeByTweetId's layout (transforms/dedupe.py): PER_ID, a key per
    # tweet id; IN_REDIS, claims in Redis (on portable runners a keyed-state
    # access is a blocking Fn API round trip; the legacy DirectRunner walks
    # every key it has seen on each timer tick and rewrites a key's state
    # whole at every bundle).
    dedupe: str = PER_ID
    # Beam's native read: the attribute Dataflow dedupes messages by.
    id_label: str | None = None
    # Window (and mark late) the tweets before inference rather than the
    # results after it. On Flink the window step's keyed exchange then also
    # parts pulling from inference (a stage each, run side by side), and
    # results are not sent between processes once more (the drain figures:
    # docs/runners.md). Where all steps share a process this buys nothing.
    windows_before_inference: bool = False

    @property
    def acknowledges_in_graph(self) -> bool:
        """Whether the graph acknowledges Pub/Sub messages (AcknowledgeMessages)."""
        return self.pubsub_read in (PULL, DIRECT)

    def install(self, o) -> None:
        """Runner-side set-up before the graph is built (once per job)."""
        if self.pubsub_read == DIRECT:
            from runners import direct_runner

            direct_runner.install(o.direct_threads, o.direct_pubsub_max_messages,
                                  o.pubsub_lease_seconds, o.latency_budget())

    @contextlib.contextmanager
    def local_workers(self, argv: list[str]):
        """Yields the flags of the SDK workers this run starts, and stops them
        after: on Prism without ``--environment_type``, a worker pool on
        127.0.0.1 in a process of its own (``runners/worker_pool.py``), as the
        local Flink launcher does.

        Beam's default there, LOOPBACK, runs the workers as threads of the
        launching process and listens on every interface. When the job is
        cancelled, the runner closes the workers' control stream and Beam's
        SDK harness shuts down the bundle still running (the pull source's,
        on an idle stream), which then fails with a traceback; in a process
        of its own that ends in the pool's log, not in the job's output.
        """
        if self.name != "PrismRunner" or _given(argv, "environment_type"):
            yield []
            return
        from runners.worker_pool import LocalWorkerPool

        workers = LocalWorkerPool()
        try:
            workers.start()
            yield workers.flags()
        finally:
            workers.stop()

    def flags(self, argv: list[str]) -> list[str]:
        """Runner flags the job needs that ``argv`` does not give."""
        wanted: dict[str, str] = {}
        if self.name == "PrismRunner" and not _given(argv, "prism_location"):
            found = find_prism()
            if found is None:
                raise ValueError("--runner=PrismRunner: Prism is not built; " + PRISM_HINT)
            wanted["prism_location"] = found
        if self.name == "FlinkRunner":
            wanted["max_bundle_size"] = str(FLINK_MAX_BUNDLE_SIZE)
            wanted["max_bundle_time_mills"] = str(FLINK_MAX_BUNDLE_TIME_MS)
        out = [f"--{flag}={value}" for flag, value in wanted.items() if not _given(argv, flag)]
        # Not --max_cache_memory_usage_mb: the SDK's state cache weighs every
        # value it keeps with objsize, walking all loaded modules' globals
        # (TensorFlow's included): on Prism, DedupeByTweetId ran three times
        # slower with a 100 MB cache than with none.
        return out


def _given(argv: list[str], flag: str) -> bool:
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv)


def runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return "DirectRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


def profile_for(options: PipelineOptions, is_pubsub: bool, parallelism: int = 1,
                pubsub_read: str = "auto", direct_optimizations: str = "on") -> RunnerProfile:
    """The profile of the runner ``options`` name, for a file or Pub/Sub job;
    ``pubsub_read`` (``--pubsub_read``) overrides its choice of Pub/Sub read."""
    runner = runner_name(options).rsplit(".", 1)[-1]
    lowered = runner.lower()
    if "dataflow" in lowered:
        profile = RunnerProfile(runner, NATIVE, late_shards=16, id_label="tweet_id")
    elif "flink" in lowered:
        profile = RunnerProfile("FlinkRunner", PULL, late_shards=max(1, 2 * parallelism),
                                dedupe=IN_REDIS, windows_before_inference=True)
    elif "prism" in lowered:
        profile = RunnerProfile("PrismRunner", PULL, dedupe=IN_REDIS)
    elif "direct" in lowered and is_pubsub and direct_optimizations == "on":
        profile = RunnerProfile("DirectRunner", DIRECT, dedupe=IN_REDIS)
    elif "direct" in lowered:
        profile = RunnerProfile("DirectRunner", NATIVE)
    else:
        profile = RunnerProfile(runner, PULL, dedupe=IN_REDIS)
    if pubsub_read != "auto":
        profile = dataclasses.replace(profile, pubsub_read=pubsub_read)
    return profile
