"""``python -m ingest``: tweets into Pub/Sub, from the X filtered stream or a file.

The CLI only parses flags, reads the token, installs the signal handlers and
calls ``run_x_stream`` or ``replay``; its last line on stdout is a one-line JSON
summary. Exit status: 0 all published, 1 some publish failed or the stream
ended on its own, 2 a flag or the environment needs fixing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path

from ingest.logs import setup_logging
from ingest.publish import PublishSettings, Totals, check_topic_path

_LOG = logging.getLogger("ingest")

TOKEN_ENV = "X_BEARER_TOKEN"


def _publish_flags(parser: argparse.ArgumentParser) -> None:
    d = PublishSettings()
    g = parser.add_argument_group("Pub/Sub (PUBSUB_EMULATOR_HOST is honoured)")
    g.add_argument("--topic", help="projects/PROJECT/topics/TOPIC to publish to")
    g.add_argument("--create-topic", action="store_true", help="create the topic if it is missing")
    g.add_argument("--max-messages", type=int, default=d.max_messages,
                   help="batch: publish after this many messages (default %(default)s)")
    g.add_argument("--max-bytes", type=int, default=d.max_bytes,
                   help="batch: publish after this many bytes (default %(default)s)")
    g.add_argument("--max-latency", type=float, default=d.max_latency_s,
                   help="batch: publish after this many seconds (default %(default)s)")
    g.add_argument("--flow-max-messages", type=int, default=d.flow_max_messages,
                   help="flow control: block while this many messages are unsettled "
                        "(default %(default)s)")
    g.add_argument("--flow-max-bytes", type=int, default=d.flow_max_bytes,
                   help="flow control: block while this many bytes are unsettled "
                        "(default %(default)s)")
    g.add_argument("--publish-timeout", type=float, default=d.publish_timeout_s,
                   help="seconds per publish RPC (default %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default %(default)s; the bearer token is redacted at every level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Publish tweets to Pub/Sub in bertstream's message format (docs/architecture.md): "
                    "data = the tweet JSON, attributes tweet_id and event_ts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    x = sub.add_parser(
        "x-stream", help="the X API v2 filtered stream (tweepy) into Pub/Sub",
        description="Stream tweets matching --rule from the X API v2 filtered stream into "
                    f"Pub/Sub. The bearer token comes from ${TOKEN_ENV} or --bearer-token-file.")
    x.add_argument("--rule", action="append", default=[], metavar="RULE",
                   help="a filtered-stream rule (repeat for more); X's rule set is made equal "
                        "to these (missing added, stale deleted); none keeps X's current rules")
    x.add_argument("--bearer-token-file", type=Path, metavar="PATH",
                   help=f"file holding the bearer token (else ${TOKEN_ENV})")
    x.add_argument("--list-rules", action="store_true", help="print X's current rules and exit")
    x.add_argument("--dry-run", action="store_true",
                   help="show what reconciling the rules would change (X validates the new "
                        "ones) and exit")
    x.add_argument("--tweet-fields", default=",".join(_tweet_fields()),
                   help="comma-separated tweet.fields; the pipeline's are always added "
                        "(default %(default)s)")
    x.add_argument("--expansions", default="", help="comma-separated expansions (default none: "
                                                    "the pipeline reads only the tweet)")
    x.add_argument("--stats-interval", type=float, default=60.0, metavar="SECONDS",
                   help="log tweets/s and totals this often (default %(default)s)")
    x.add_argument("--max-retries", type=int, default=None,
                   help="give up after this many HTTP errors in a row (default: never)")
    x.add_argument("--api-base-url", metavar="URL",
                   help="send X API requests here instead of https://api.twitter.com "
                        "(a local stand-in or a recording proxy)")
    _publish_flags(x)

    r = sub.add_parser(
        "replay", help="a JSONL file of tweets into Pub/Sub at their original pace",
        description="Publish a JSONL file of X API v2 tweet objects, keeping the gaps between "
                    "their created_at times (divided by --speed). Bad lines are skipped and "
                    "reported with their line numbers.")
    r.add_argument("file", nargs="?", type=Path, metavar="FILE.jsonl",
                   help="tweets, one JSON object a line (default: the shipped sample, "
                        "pipeline/data/sample_tweets.jsonl)")
    r.add_argument("--speed", type=float, default=1.0,
                   help="times faster than real time; 0 = as fast as possible "
                        "(default %(default)s)")
    r.add_argument("--loop", action="store_true",
                   help="start over at the end, shifting created_at and ids so the pipeline "
                        "sees new tweets; stop with Ctrl-C or SIGTERM")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress on stderr: a bar redrawn in place on a terminal, a log line "
                        "every 10 s elsewhere (default: on)")
    r.add_argument("--publish-bad", action="store_true",
                   help="publish lines that are not valid tweets too, as they are (with a "
                        "tweet_id attribute where one can be read, and the event time of "
                        "the tweet before), so that the pipeline dead-letters them; they "
                        "are still reported and counted as bad")
    _publish_flags(r)
    return parser


def _tweet_fields() -> tuple[str, ...]:
    from ingest.xstream import TWEET_FIELDS
    return TWEET_FIELDS


def _settings(args: argparse.Namespace) -> PublishSettings:
    for flag in ("max_messages", "max_bytes", "flow_max_messages", "flow_max_bytes"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.max_latency < 0 or args.publish_timeout <= 0:
        raise ValueError("--max-latency must be >= 0 and --publish-timeout > 0")
    return PublishSettings(args.max_messages, args.max_bytes, args.max_latency,
                           args.flow_max_messages, args.flow_max_bytes, args.publish_timeout)


def read_token(token_file: Path | None) -> str:
    """The bearer token from --bearer-token-file, else $X_BEARER_TOKEN.

    Errors name where to put it but never echo what was found.
    """
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--bearer-token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--bearer-token-file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no X bearer token: set {TOKEN_ENV} or pass --bearer-token-file")
    return token


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM or Ctrl-C: stop reading and flush; a second Ctrl-C aborts the flush."""

    def handler(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        _LOG.warning("%s: stopping; publishing what was accepted (Ctrl-C again to abort)",
                     signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _x_stream(args: argparse.Namespace, stop: threading.Event, redact) -> Totals | None:
    import math

    from ingest.rules import fetch_rules, reconcile
    from ingest.xstream import XStream, run_x_stream

    token = read_token(args.bearer_token_file)
    redact.secrets.append(token)
    if args.list_rules or args.dry_run:
        client = XStream(token, api_base=args.api_base_url)
        if args.list_rules:
            for rule in fetch_rules(client):
                print(json.dumps({"id": rule.id, "value": rule.value, "tag": rule.tag}))
        if args.dry_run and not args.rule:
            print("no --rule given: streaming would keep X's current rules")
        elif args.dry_run:
            plan = reconcile(client, args.rule, dry_run=True)
            print(f"rules (dry run; nothing changed):\n{plan.describe()}")
        return None
    if not args.topic:
        raise ValueError("--topic is required to stream (or use --list-rules / --dry-run)")
    return run_x_stream(
        token, check_topic_path(args.topic), args.rule, settings=_settings(args),
        create_topic=args.create_topic,
        tweet_fields=[f for f in args.tweet_fields.split(",") if f.strip()],
        expansions=[e for e in args.expansions.split(",") if e.strip()],
        api_base=args.api_base_url,
        max_retries=math.inf if args.max_retries is None else args.max_retries,
        stats_interval_s=args.stats_interval, stop=stop)


def _replay(args: argparse.Namespace, stop: threading.Event) -> Totals:
    from ingest.replay import replay

    if not args.topic:
        raise ValueError("--topic is required")
    if args.speed < 0:
        raise ValueError(f"--speed must be 0 (as fast as possible) or positive, got {args.speed}")
    progress = args.progress
    return replay(args.file, check_topic_path(args.topic), speed=args.speed, loop=args.loop,
                  settings=_settings(args), create_topic=args.create_topic,
                  progress=progress, stop=stop, publish_bad=args.publish_bad)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    redact = setup_logging(args.log_level)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        if args.command == "x-stream":
            totals = _x_stream(args, stop, redact)
        else:
            totals = _replay(args, stop)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc)
        for secret in redact.secrets:
            message = message.replace(secret, "[REDACTED]")
        parser.exit(2, f"python -m ingest {args.command}: error: {message}\n")
    if totals is None:
        return 0
    print(json.dumps({"command": args.command, **totals.as_dict()}), flush=True)
    return 1 if totals.failed or totals.error else 0
