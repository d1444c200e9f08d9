"""The pipeline's flags, in one ``PipelineOptions`` subclass."""

import argparse
import os
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from bertstream.config import RedisConfig, TFServingConfig
from runners.direct_runner import DEFAULT_MAX_MESSAGES as DIRECT_MAX_MESSAGES
from runners.direct_runner import DEFAULT_THREADS as DIRECT_THREADS
from transforms.budget import LatencyBudget
from transforms.inference import DEFAULT_MAX_BATCH_SIZE
from transforms.pubsub import DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS
from transforms.rollout import Rollout
from transforms.windowing import DEFAULT_ALLOWED_LATENESS_SECONDS

SAMPLE_TWEETS = Path(__file__).resolve().parent / "data" / "sample_tweets.jsonl"
DEFAULT_MODEL_DIR = os.environ.get("BERTSTREAM_MODEL_DIR", "models/bert_sentiment")
_REDIS = RedisConfig()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is None or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


class BertstreamOptions(PipelineOptions):
    """Everything ``python -m pipeline`` takes besides Beam's own options."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Beam builds the parser (its prog would be "__main__.py"); only --help
        # and argparse's own errors read these two.
        parser.prog = "python -m pipeline"
        parser.formatter_class = _HelpFormatter
        parser.epilog = ("Beam's own options (--runner, --streaming, --project, ...) are "
                         "taken too; without an input the job scores the bundled sample.")
        src = parser.add_argument_group("input (at most one; none = the bundled sample file)")
        src.add_argument("--input_subscription", default=None,
                         help="Pub/Sub subscription projects/P/subscriptions/S (streaming)")
        src.add_argument("--input_topic", default=None,
                         help="Pub/Sub topic projects/P/topics/T; the runner makes a "
                              "subscription (streaming)")
        src.add_argument("--input_file", default=None,
                         help="JSONL file, one X API v2 tweet object a line; event time "
                              "from created_at (batch)")
        src.add_argument("--pubsub_read", choices=("auto", "pull", "xlang", "native"),
                         default="auto",
                         help="how to read Pub/Sub: pull (a Python source on any portable "
                              "runner; the job acknowledges once written), xlang (Beam's Java "
                              "PubsubIO through an expansion service; Flink acknowledges at "
                              "checkpoints), native (Beam's Python source: Dataflow); auto "
                              "picks by runner (docs/architecture.md)")
        src.add_argument("--direct_optimizations", choices=("on", "off"), default="on",
                         help="DirectRunner with Pub/Sub only: larger pulls, acknowledgement "
                              "once written, more threads (runners/direct_runner.py); off "
                              "runs Beam's DirectRunner as it ships (it acknowledges on pull)")
        src.add_argument("--direct_pubsub_max_messages", type=int,
                         default=DIRECT_MAX_MESSAGES,
                         help="DirectRunner only: Pub/Sub messages per bundle (Beam's reader "
                              "takes 10)")
        src.add_argument("--direct_threads", type=int, default=DIRECT_THREADS,
                         help="DirectRunner only: threads that run bundles (Beam's executor "
                              "has 1), so that the model runs while other tweets are parsed "
                              "and written")
        src.add_argument("--pubsub_emulator_host",
                         default=os.environ.get("PUBSUB_EMULATOR_HOST") or None,
                         help="HOST:PORT of the Pub/Sub emulator, for the job's workers "
                              "wherever they run (default: PUBSUB_EMULATOR_HOST where the job "
                              "is submitted)")
        src.add_argument("--stop_after_idle_seconds", type=float, default=0,
                         help="streaming: stop the job, with its summary, once no new input "
                              "has ended in Redis for this long after the first (the end of a "
                              "replay); 0: run until Ctrl-C or SIGTERM")
        src.add_argument("--pubsub_lease_seconds", type=int, default=DEFAULT_LEASE_SECONDS,
                         help="where the job acknowledges messages itself (all runners but "
                              "Dataflow and --pubsub_read=xlang): how long a pulled "
                              "message is held before Pub/Sub redelivers it (10-"
                              f"{MAX_LEASE_SECONDS}); a message is acknowledged once its "
                              "result or dead letter is in Redis")

        win = parser.add_argument_group("windows and batches")
        win.add_argument("--window_seconds", type=float, default=2.0,
                         help="fixed event-time window length")
        win.add_argument("--allowed_lateness_seconds", type=float,
                         default=DEFAULT_ALLOWED_LATENESS_SECONDS,
                         help="late tweets are still scored (and counted) this long after "
                              "their window")
        win.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                         help="most tweets in one model call (batches are cut from what is "
                              "waiting, sorted by token length)")
        win.add_argument("--latency_target_ms", type=float, default=None,
                         help="publish -> result target the job holds (default: the window "
                              "+ 1 s): a pull takes no more tweets, and a model call no more, "
                              "than the model's measured cost lets it score within a share of "
                              "it (transforms/budget.py); a lone tweet is never held")
        win.add_argument("--dedupe_ttl_seconds", type=float, default=600,
                         help="how long (in event time) the pipeline remembers a tweet id in "
                              "Beam state (Dataflow, and the DirectRunner with "
                              "--direct_optimizations=off; elsewhere the ids are claimed in "
                              "Redis); Redis remembers written ids for "
                              "--redis_dedupe_ttl_seconds")

        inf = parser.add_argument_group("inference")
        inf.add_argument("--inference", choices=("local", "tfserving"), default="local",
                         help="in the worker (tfx-bsl) or on TensorFlow Serving over gRPC")
        inf.add_argument("--model_dir", default=DEFAULT_MODEL_DIR,
                         help="SavedModel base dir (newest version) or a version dir "
                              "(env BERTSTREAM_MODEL_DIR)")
        inf.add_argument("--model_reload_seconds", type=float, default=30,
                         help="how often a worker looks for a newer version under --model_dir "
                              "(TF Serving's layout, <dir>/<version>/) and, once it has loaded "
                              "and scored a check text, rolls it out as --model_rollout says; a "
                              "version that fails is logged and skipped. 0: never (also when --model_dir names a "
                              "version directory)")
        inf.add_argument("--model_rollout", choices=("shadow", "immediate"), default="shadow",
                         help="what a new version found by --model_reload_seconds does: "
                              "shadow scores live tweets beside the serving version, "
                              "unpublished, and serves only once the gates below pass; "
                              "immediate serves once it loads and scores a check text "
                              "(local inference; TF Serving applies its own version policy)")
        inf.add_argument("--shadow_share", type=float, default=1.0,
                         help="share of the tweets a version in shadow scores (the same tweets "
                              "on every worker, picked by a hash of the text)")
        inf.add_argument("--shadow_tweets", type=int, default=500,
                         help="tweets scored in shadow before the gates decide")
        inf.add_argument("--shadow_min_agreement", type=float, default=0.7,
                         help="reject a version in shadow that gave the serving version's "
                              "label to fewer than this share of the tweets")
        inf.add_argument("--shadow_max_errors", type=int, default=0,
                         help="reject a version in shadow that failed on more tweets than this")
        inf.add_argument("--model_signature", default="serving_default",
                         help="signature of the local SavedModel")
        inf.add_argument("--tfserving_target", default="bertservice:8500",
                         help="TF Serving gRPC host:port")
        inf.add_argument("--tfserving_model_name", default="bert_sentiment",
                         help="the model's name on TF Serving")
        inf.add_argument("--tfserving_model_version", type=int, default=None,
                         help="pin a version (default: the newest the server has)")
        inf.add_argument("--tfserving_signature", default="serving_default",
                         help="signature called on TF Serving")
        inf.add_argument("--tfserving_timeout_seconds", type=float, default=10.0,
                         help="deadline of one Predict call")
        inf.add_argument("--tfserving_tls", action="store_true",
                         help="use TLS to TF Serving")
        inf.add_argument("--tfserving_ca_file", default=None,
                         help="CA bundle for --tfserving_tls (default: system roots)")

        parser.add_argument("--log_level", choices=("debug", "info", "warning"), default="info",
                            help="debug also shows the libraries' start-up lines "
                                 "(TensorFlow's, Beam's)")
        out = parser.add_argument_group("Redis")
        out.add_argument("--redis_url", default=_REDIS.url,
                         help="redis:// or rediss:// URL; with a user and no password, "
                              "REDIS_PASSWORD is used")
        out.add_argument("--redis_ca_file", default=None, help="CA bundle for rediss://")
        out.add_argument("--redis_stream", default=_REDIS.stream,
                         help="stream every result is added to (XADD)")
        out.add_argument("--redis_channel", default=_REDIS.channel,
                         help="channel every result is published on")
        out.add_argument("--redis_deadletter_stream", default=_REDIS.dead_letter_stream,
                         help="stream of dead letters (input, stage, reason)")
        out.add_argument("--redis_window_prefix", default=_REDIS.window_prefix,
                         help="per-window label counts go to hashes PREFIX<window start>")
        out.add_argument("--redis_stats_key", default=_REDIS.stats_key,
                         help="hash of all-time totals (results, dead letters)")
        out.add_argument("--redis_stream_maxlen", type=int, default=_REDIS.stream_maxlen,
                         help="approximate MAXLEN of the results stream")
        out.add_argument("--redis_dedupe_ttl_seconds", type=int,
                         default=_REDIS.dedupe_ttl_seconds,
                         help="how long Redis remembers written tweet ids")
        out.add_argument("--redis_retries", type=int, default=_REDIS.retries,
                         help="retries (exponential backoff) on connection errors")
        out.add_argument("--no_local_redis", action="store_true",
                         help="never start a redis-server of our own when none answers")

    def redis_config(self) -> RedisConfig:
        return RedisConfig(
            url=self.redis_url, stream=self.redis_stream, channel=self.redis_channel,
            window_prefix=self.redis_window_prefix,
            dead_letter_stream=self.redis_deadletter_stream, stats_key=self.redis_stats_key,
            stream_maxlen=self.redis_stream_maxlen,
            dedupe_ttl_seconds=self.redis_dedupe_ttl_seconds, retries=self.redis_retries,
            ca_file=self.redis_ca_file)

    def latency_budget(self) -> LatencyBudget:
        """--latency_target_ms, or the window + 1 s."""
        target = self.latency_target_ms
        return LatencyBudget(target if target is not None else (self.window_seconds + 1) * 1000)

    def rollout(self) -> Rollout:
        return Rollout(mode=self.model_rollout, redis=self.redis_config(),
                       share=self.shadow_share, tweets=self.shadow_tweets,
                       min_agreement=self.shadow_min_agreement,
                       max_errors=self.shadow_max_errors)

    def tfserving_config(self) -> TFServingConfig:
        return TFServingConfig(
            target=self.tfserving_target, model_name=self.tfserving_model_name,
            model_version=self.tfserving_model_version, signature=self.tfserving_signature,
            timeout_seconds=self.tfserving_timeout_seconds, tls=self.tfserving_tls,
            ca_file=self.tfserving_ca_file)

    def validate_flags(self) -> None:
        """Raises ValueError naming the flag to change."""
        sources = [f for f in ("input_subscription", "input_topic", "input_file")
                   if getattr(self, f)]
        if len(sources) > 1:
            raise ValueError(f"give at most one input, not {', '.join('--' + s for s in sources)}")
        if self.input_subscription and "/subscriptions/" not in self.input_subscription:
            raise ValueError("--input_subscription must look like projects/P/subscriptions/S")
        if self.input_topic and "/topics/" not in self.input_topic:
            raise ValueError("--input_topic must look like projects/P/topics/T")
        if self.input_file and not Path(self.input_file).exists():
            raise ValueError(f"--input_file {self.input_file}: no such file")
        if self.window_seconds <= 0:
            raise ValueError("--window_seconds must be positive")
        if self.max_batch_size < 1:
            raise ValueError("--max_batch_size must be at least 1")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ValueError("--latency_target_ms must be positive (milliseconds)")
        if self.allowed_lateness_seconds < 0:
            raise ValueError("--allowed_lateness_seconds must not be negative")
        if self.stop_after_idle_seconds < 0:
            raise ValueError("--stop_after_idle_seconds must not be negative")
        if self.model_reload_seconds < 0:
            raise ValueError("--model_reload_seconds must not be negative")
        self.rollout().validate()
        if self.direct_threads < 1:
            raise ValueError("--direct_threads must be at least 1")
        if self.direct_pubsub_max_messages < 1:
            raise ValueError("--direct_pubsub_max_messages must be at least 1")
        if not 10 <= self.pubsub_lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(f"--pubsub_lease_seconds must be 10..{MAX_LEASE_SECONDS}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("--redis_url must start with redis://, rediss:// or unix://")
        if self.inference == "tfserving" and ":" not in self.tfserving_target:
            raise ValueError("--tfserving_target must be host:port")

    @property
    def is_pubsub(self) -> bool:
        return bool(self.input_subscription or self.input_topic)

    def apply_implied(self) -> None:
        """Pub/Sub implies streaming."""
        if self.is_pubsub:
            self.view_as(StandardOptions).streaming = True
