"""``python -m ops.subscribe``: watch results arrive.

Prints one line per result (label, score, latency, text) and one summary line
per window. The latency is from the Pub/Sub publish to the result
(``processed_at - published_at``), marked ``pub``; a result of file input has
no publish time, so its latency is from the tweet's own time (``created_at``,
which for the dated sample is days ago), marked ``event``. ``--from-start`` first replays the results
stream, then follows the live channel; results seen in both are printed once.
A subscriber that Redis cut off (its pub/sub output buffer limit) can start
again with ``--from-start`` and miss nothing the stream still holds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import time
from collections import Counter
from typing import TextIO

from bertstream.config import RedisConfig, connect, redacted
from transforms.records import seconds_from_iso

_DEFAULT = RedisConfig()


LEGEND = ("# label, score, latency, text; latency 'pub' = Pub/Sub publish -> result, "
          "'event' = the tweet's created_at -> result (file input has no publish time)")


def latency_of(body: dict) -> tuple[float, str]:
    """Seconds to the result and what they are measured from: ``pub`` (the
    Pub/Sub publish time) where the result has one, else ``event`` (the
    tweet's event time). NaN when the result lacks the times."""
    try:
        done = seconds_from_iso(body["processed_at"])
    except (KeyError, TypeError, ValueError):
        done = time.time()
    start, kind = ((body.get("published_at"), "pub") if body.get("published_at")
                   else (body.get("event_time"), "event"))
    try:
        return done - seconds_from_iso(start), kind
    except (TypeError, ValueError, AttributeError):
        return float("nan"), kind


class Printer:
    """Formats results and keeps the per-window tallies."""

    def __init__(self, out: TextIO, quiet: bool = False, as_json: bool = False):
        self.out = out
        self.quiet = quiet
        self.as_json = as_json
        self.seen: set[str] = set()
        self.window: str | None = None
        self.tally: Counter[str] = Counter()
        self.latencies: list[float] = []

    def result(self, payload: bytes | str) -> dict | None:
        try:
            body = json.loads(payload)
            tweet_id = str(body["tweet_id"])
        except (ValueError, KeyError, TypeError):
            return None
        if tweet_id in self.seen:
            return None
        self.seen.add(tweet_id)
        window = body.get("window_start", "")
        if self.window is not None and window != self.window:
            self.flush_window()
        self.window = window
        self.tally[body.get("label", "?")] += 1
        latency, kind = latency_of(body)
        self.latencies.append(latency)
        if self.as_json:
            print(json.dumps(body, ensure_ascii=False), file=self.out, flush=True)
        elif not self.quiet:
            text = " ".join(str(body.get("text", "")).split())
            print(f"{body.get('label', '?'):<8} {float(body.get('score', 0)):.2f} "
                  f"{latency:8.2f}s {kind:<5}  {text[:120]}", file=self.out, flush=True)
        return body

    def flush_window(self) -> None:
        if self.window is None or not self.tally:
            return
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.tally.items()))
        # With --json, stdout holds only result lines (for other programs).
        print(f"-- window {self.window}: {sum(self.tally.values())} results ({parts})",
              file=sys.stderr if self.as_json else self.out, flush=True)
        self.tally.clear()


def replay_stream(client, stream: str, printer: Printer, batch: int = 1000,
                  limit: int = 0) -> int:
    """Prints what the stream holds, oldest first (at most ``limit`` results when
    it is not 0); returns how many."""
    count, start = 0, "-"
    while True:
        entries = client.xrange(stream, min=start, max="+", count=batch)
        if not entries:
            return count
        for entry_id, fields in entries:
            if limit and len(printer.seen) >= limit:
                return count
            if printer.result(fields.get(b"result", b"")) is not None:
                count += 1
            start = "(" + entry_id.decode()
        if len(entries) < batch:
            return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.subscribe",
                                description="Print sentiment results as they arrive.")
    p.add_argument("--redis_url", default=_DEFAULT.url,
                   help="redis:// or rediss:// (REDIS_PASSWORD is used when the URL has none)")
    p.add_argument("--redis_channel", default=_DEFAULT.channel)
    p.add_argument("--redis_stream", default=_DEFAULT.stream)
    p.add_argument("--from-start", action="store_true",
                   help="replay the results stream first, then follow live")
    p.add_argument("--max-results", type=int, default=0,
                   help="exit after this many results (0: run until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=0,
                   help="exit after this many seconds without a result (0: never)")
    p.add_argument("--quiet", action="store_true", help="only window summaries")
    p.add_argument("--json", action="store_true", help="print each result as its JSON line")
    args = p.parse_args(argv)

    import redis

    client = connect(_DEFAULT._replace(url=args.redis_url))
    printer = Printer(sys.stdout, args.quiet, args.json)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        # Subscribe before reading the stream, so nothing falls in between.
        pubsub.subscribe(args.redis_channel)
        if not (args.json or args.quiet):
            print(LEGEND, file=sys.stderr, flush=True)
        if args.from_start:
            replay_stream(client, args.redis_stream, printer, limit=args.max_results)
        print(f"# following {args.redis_channel} on {redacted(args.redis_url)} "
              f"({dt.datetime.now().strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
        last = time.monotonic()
        while not stop["now"]:
            if args.max_results and len(printer.seen) >= args.max_results:
                break
            message = pubsub.get_message(timeout=1.0)
            if message is None:
                if args.timeout and time.monotonic() - last > args.timeout:
                    break
                continue
            last = time.monotonic()
            printer.result(message["data"])
    except KeyboardInterrupt:
        pass
    except redis.ConnectionError as err:
        print(f"connection lost ({err}); run again with --from-start to catch up",
              file=sys.stderr)
        printer.flush_window()
        return 1
    finally:
        client.close()
    printer.flush_window()
    return 0


if __name__ == "__main__":
    sys.exit(main())
