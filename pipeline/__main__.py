"""``python -m pipeline``: parse the options, check what the job reads, make
sure Redis answers, run, summarize."""

from __future__ import annotations

import sys
import time

from runners.local_redis import ensure_redis

STOP_HINT = "Ctrl-C or SIGTERM stops the job and prints the summary"


def reading_line(options) -> str:
    """What a streaming job prints once it runs: where it reads, how to stop it."""
    if options.input_subscription:
        source = options.input_subscription
    else:
        source = f"{options.input_topic} (through a subscription of its own)"
    return f"reading {source}: waiting for tweets ({STOP_HINT})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from bertstream.logs import log_level_from, quiet_tensorflow, setup_logging

    setup_logging(log_level_from(argv))
    quiet_tensorflow()

    import apache_beam as beam

    from pipeline import checks, summary
    from pipeline.pipeline import make_options, profile_of, run, wait_or_cancel

    try:
        options = make_options(argv)
        checks.check_inputs(options)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with ensure_redis(options) as redis_info:
            config = options.redis_config()._replace(url=redis_info.url)
            before = summary.Snapshot.take(config)
            with profile_of(options).local_workers(argv) as worker_flags:
                job_options = make_options(argv + worker_flags)
                job_options.redis_url = redis_info.url  # ours, where we started one
                started = time.monotonic()
                # Started here rather than by run() alone, to say when it reads.
                result, _ = run(options=job_options,
                                test_pipeline=beam.Pipeline(options=job_options))
                if job_options.is_pubsub:
                    print(reading_line(job_options), file=sys.stderr, flush=True)
                wait_or_cancel(result, summary.idle_stop(job_options, config))
                seconds = time.monotonic() - started
            totals = summary.collect(result, seconds, before, config)
            text = summary.render(totals, redis_info.display_url, config, redis_info.cli,
                                  options.input_file)
        print(text)
        if redis_info.note:
            print(redis_info.note)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return summary.exit_code(totals)


if __name__ == "__main__":
    sys.exit(main())
