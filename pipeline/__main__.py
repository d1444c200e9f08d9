"""``python -m pipeline``: parse the options, make sure Redis answers, run, summarize."""

from __future__ import annotations

import logging
import sys

from pipeline.local_redis import ensure_redis


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv

    from pipeline import summary
    from pipeline.pipeline import make_options, run
    from transforms.redis_sink import read_stats

    try:
        options = make_options(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with ensure_redis(options) as redis_info:
            config = options.redis_config()._replace(url=redis_info.url)
            before = read_stats(config)
            result, seconds = run(redis_info.argv(argv))
            totals = summary.collect(result, seconds, before, read_stats(config))
            text = summary.render(totals, redis_info.display_url,
                                  options.redis_stream, options.redis_channel,
                                  options.redis_deadletter_stream, redis_info.cli)
        print(text)
        if redis_info.note:
            print(redis_info.note)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
