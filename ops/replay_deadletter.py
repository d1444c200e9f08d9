"""``python -m ops.replay_deadletter``: send dead-lettered tweets back in.

Once the cause of a failure is fixed (TF Serving is back, Redis has room),
the tweets that outlived their retries sit in the dead-letter stream with
their exact input. This re-publishes them to the pipeline's input topic, with
the ``tweet_id`` and ``event_ts`` attributes of the message contract, so the
running job scores them like any other tweet; the idempotent sink still
writes each tweet id at most once.

Parse-stage dead letters are skipped unless asked for (``--stage parse`` or
``all``): their bytes would fail the same way again. A ``redis``-stage dead
letter holds the finished result, not the tweet; it is turned back into a
tweet object (``id``, ``text``, ``created_at``) so that it parses.

Replayed messages carry a ``replay`` attribute (the dead letter's entry id):
the pipeline's in-memory dedupe remembers tweet ids for
``--dedupe_ttl_seconds``, and must not take a deliberate replay for a
duplicate of the attempt that failed.

``--delete`` removes an entry from the stream only after Pub/Sub confirmed
its publish; ``--dry_run`` prints what would be sent and sends nothing.
Prints one JSON summary line at the end.

Example::

    python -m ops.replay_deadletter --redis_url redis://127.0.0.1:6379/0 \\
        --topic projects/my-project/topics/tweets --stage inference --delete
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

from bertstream.config import RedisConfig, connect, redacted
from transforms.records import iso_from_seconds, seconds_from_iso

_LOG = logging.getLogger(__name__)
_DEFAULT = RedisConfig()
STAGES = ("inference", "redis", "parse")
DEFAULT_STAGES = ("inference", "redis")
# The pipeline drops tweets later than --allowed_lateness_seconds (24 h by
# default); older ones are re-stamped with the replay time (see --restamp).
MAX_AGE_SECONDS = 23 * 3600


class Replay(NamedTuple):
    """One dead letter, ready to publish."""

    entry_id: str
    stage: str
    data: bytes
    attributes: dict[str, str]


def _entries(client, stream: str, since: str, batch: int = 500) -> Iterator[tuple[str, dict]]:
    start = f"({since}" if since != "-" else "-"
    while True:
        found = client.xrange(stream, min=start, max="+", count=batch)
        for entry_id, fields in found:
            yield entry_id.decode(), {k.decode(): v for k, v in fields.items()}
        if len(found) < batch:
            return
        start = "(" + found[-1][0].decode()


def _raw(fields: dict) -> bytes:
    raw = fields.get("raw", b"")
    if fields.get("encoding", b"utf-8") == b"base64":
        return base64.b64decode(raw, validate=True)
    return raw


def to_replay(entry_id: str, fields: dict, restamp: bool, now: float) -> Replay:
    """The message to publish for one dead-letter entry.

    Raises:
      ValueError: the entry holds nothing that can be replayed.
    """
    stage = fields.get("stage", b"").decode(errors="replace")
    try:
        data = _raw(fields)
    except (binascii.Error, ValueError):
        raise ValueError("its base64 'raw' does not decode") from None
    if not data:
        raise ValueError("it has no 'raw' input")
    attributes = {"replay": entry_id}
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if stage == "redis" and "id" not in obj and "tweet_id" in obj:
            # A result that could not be written: back to a tweet object.
            obj = {"id": obj["tweet_id"], "text": obj.get("text"),
                   "created_at": obj.get("event_time")}
            data = json.dumps(obj, ensure_ascii=False).encode()
        tweet_id = obj.get("id")
        if isinstance(tweet_id, (str, int)) and not isinstance(tweet_id, bool):
            attributes["tweet_id"] = str(tweet_id)
        created_at = obj.get("created_at")
        if isinstance(created_at, str):
            try:
                seconds = seconds_from_iso(created_at)
            except ValueError:
                seconds = None
            if seconds is not None and (restamp or now - seconds > MAX_AGE_SECONDS):
                seconds = now
            if seconds is not None:
                attributes["event_ts"] = iso_from_seconds(seconds)
    if "tweet_id" not in attributes and fields.get("tweet_id"):
        attributes["tweet_id"] = fields["tweet_id"].decode(errors="replace")
    return Replay(entry_id, stage, data, attributes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ops.replay_deadletter",
        description="Re-publish dead-lettered tweets to the pipeline's input topic, once "
                    "the cause of their failure is fixed. Prints a JSON summary.",
        epilog="Parse-stage dead letters are skipped by default (they would fail again). "
               "With a user and no password in --redis_url, REDIS_PASSWORD is used.")
    p.add_argument("--redis_url", default=_DEFAULT.url, help="redis:// or rediss:// URL")
    p.add_argument("--redis_ca_file", default=None, help="CA bundle for rediss://")
    p.add_argument("--redis_deadletter_stream", default=_DEFAULT.dead_letter_stream,
                   help="the dead-letter stream (default %(default)s)")
    p.add_argument("--topic", required=True,
                   help="the pipeline's input topic, projects/P/topics/T (the emulator "
                        "when PUBSUB_EMULATOR_HOST is set)")
    p.add_argument("--stage", choices=(*STAGES, "all"), default=None,
                   help="replay only this stage's dead letters (default: inference and "
                        "redis; parse only when asked)")
    p.add_argument("--since", default="-", metavar="ID",
                   help="only entries after this stream id (e.g. the last one a previous "
                        "replay printed)")
    p.add_argument("--max", type=int, default=0, help="at most this many (0: all)")
    p.add_argument("--restamp", action="store_true",
                   help="give every replayed tweet the replay time as event_ts (tweets "
                        "older than 23 h always get it: the job drops later data)")
    p.add_argument("--dry_run", action="store_true",
                   help="print what would be published; publish and delete nothing")
    p.add_argument("--delete", action="store_true",
                   help="XDEL each entry once its publish has succeeded")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if "/topics/" not in args.topic:
        print("error: --topic must look like projects/P/topics/T", file=sys.stderr)
        return 2
    if not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        print("error: --redis_url must start with redis://, rediss:// or unix://",
              file=sys.stderr)
        return 2
    if args.dry_run and args.delete:
        print("error: --delete has no effect with --dry_run; give one of them",
              file=sys.stderr)
        return 2
    if args.max < 0:
        print("error: --max must not be negative", file=sys.stderr)
        return 2
    stages = STAGES if args.stage == "all" else (args.stage,) if args.stage else DEFAULT_STAGES

    import redis

    client = connect(_DEFAULT._replace(url=args.redis_url, ca_file=args.redis_ca_file))
    counts: Counter[str] = Counter()
    replays: list[Replay] = []
    try:
        try:
            for entry_id, fields in _entries(client, args.redis_deadletter_stream, args.since):
                stage = fields.get("stage", b"").decode(errors="replace")
                if stage not in stages:
                    counts[f"skipped_{stage or 'unknown'}"] += 1
                    continue
                try:
                    replays.append(to_replay(entry_id, fields, args.restamp, time.time()))
                except ValueError as err:
                    counts["unreplayable"] += 1
                    _LOG.warning("dead letter %s cannot be replayed: %s", entry_id, err)
                if args.max and len(replays) >= args.max:
                    break
        except redis.AuthenticationError as err:
            print(f"error: --redis_url {redacted(args.redis_url)}: authentication failed "
                  f"({err})", file=sys.stderr)
            return 2
        except redis.ConnectionError as err:
            print(f"error: --redis_url {redacted(args.redis_url)}: {err}", file=sys.stderr)
            return 2
        except redis.ResponseError as err:
            print(f"error: --redis_deadletter_stream {args.redis_deadletter_stream}: {err}",
                  file=sys.stderr)
            return 2

        if args.dry_run:
            for r in replays:
                print(json.dumps({"entry_id": r.entry_id, "stage": r.stage,
                                  "attributes": r.attributes,
                                  "bytes": len(r.data)}, ensure_ascii=False))
            counts["would_publish"] = len(replays)
        else:
            published = _publish(args.topic, replays, counts)
            if args.delete and published:
                counts["deleted"] = client.xdel(args.redis_deadletter_stream, *published)
    finally:
        client.close()
    summary = {"stages": list(stages), **dict(sorted(counts.items()))}
    if replays:
        summary["last_id"] = replays[-1].entry_id
    print(json.dumps(summary))
    return 1 if counts.get("failed") else 0


def _publish(topic: str, replays: list[Replay], counts: Counter) -> list[str]:
    """Publishes every replay; returns the entry ids whose publish succeeded."""
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    futures = [(r, publisher.publish(topic, r.data, **r.attributes)) for r in replays]
    done: list[str] = []
    for r, future in futures:
        try:
            future.result(timeout=60)
        except (gexc.GoogleAPIError, TimeoutError) as err:
            counts["failed"] += 1
            _LOG.error("publish of dead letter %s failed: %s", r.entry_id, err)
            continue
        counts["published"] += 1
        counts[f"published_{r.stage}"] += 1
        done.append(r.entry_id)
    return done


if __name__ == "__main__":
    sys.exit(main())
