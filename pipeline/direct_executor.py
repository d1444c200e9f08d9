"""More than one worker thread for the Python DirectRunner's executor.

The job's processing-time timers (batch waits, dedupe expiry) keep it on
Beam's bundle-based DirectRunner, whose executor runs every bundle, and its
own monitor task, on a pool of ``NUM_WORKERS = 1`` thread. So nothing
overlaps: while the model runs (TensorFlow releases the GIL), no tweet is
parsed, batched or written, and no second batch runs beside it, although one
model call leaves part of the two cores idle (two calls at once: 1.5x the
tweets/s of one at a time).

The executor was written for a pool (stateful DoFns and GroupByKeys are
already run one bundle at a time per step; the evaluation context and the
watermark manager hold locks), but with more than one thread three things
in it go wrong, and ``install`` fixes them:

- The monitor can see no bundle running while the update of one that has
  just finished is still queued for it, and declares a stall ("Monitor task
  detected a pipeline stall"). It now reads the queue after finding no
  bundle running, and goes on while anything is queued.
- The monitor re-queues itself at once after each pass, so a thread with
  no bundle to run spins on it and takes the GIL from the others (a file run
  went from 643 to 528 tweets/s). It now waits up to ``MONITOR_WAIT_SECONDS``
  for the next update when there is none and no bundle waits for a thread;
  an update wakes it at once.
- An idle thread polls the task queue every 5 s, and the end of a run waits
  for each one to notice the shutdown: 5 s added to every run. It polls
  every ``IDLE_POLL_SECONDS`` instead.

Measured on the 2,000-tweet file run (benchmarks/throughput.py, bfloat16
MiniLM, 2 cores, two runs): 1 thread 654 and 575 tweets/s, 2 threads 747 and
691; streaming at 312 tweets/s, p99 latency 2.8 s on 1 thread, 1.6 s on 2.
"""

from __future__ import annotations

import logging

_LOG = logging.getLogger(__name__)

DEFAULT_THREADS = 2
MONITOR_WAIT_SECONDS = 0.005
IDLE_POLL_SECONDS = 0.05

_patched = False


def install(threads: int = DEFAULT_THREADS) -> bool:
    """Runs DirectRunner bundles on ``threads`` worker threads in this process
    (pipelines started from now on). Returns False, and logs, when this Beam
    no longer has the executor it adjusts; the runner then keeps its one."""
    if threads < 1:
        raise ValueError("--direct_threads must be at least 1")
    try:
        from apache_beam.runners.direct import executor

        parallel = executor._ExecutorServiceParallelExecutor
        monitor = parallel._MonitorTask
        worker = executor._ExecutorService._ExecutorServiceWorker
        monitor._should_shutdown, monitor.call, worker.TIMEOUT  # noqa: B018 - present?
    except (ImportError, AttributeError) as err:
        _LOG.warning("DirectRunner executor left at one thread: %s", err)
        return False
    _patch(monitor, worker)
    parallel.NUM_WORKERS = threads
    return True


def _patch(monitor, worker) -> None:
    global _patched
    if _patched:
        return
    should_shutdown = monitor._should_shutdown
    call = monitor.call

    def _should_shutdown(self):
        # A bundle's update is queued before its executor is deregistered, so
        # reading the queue after finding none running cannot miss it.
        if not self._is_executing() and not self._executor.all_updates._queue.empty():
            return False
        return should_shutdown(self)

    def _call(self, state_sampler):
        service = self._executor.executor_service
        if len(service.workers) > 1 and service.queue.empty():  # no bundle waits for a thread
            updates = self._executor.all_updates._queue
            with updates.not_empty:
                if not updates._qsize():
                    updates.not_empty.wait(MONITOR_WAIT_SECONDS)
        return call(self, state_sampler)

    monitor._should_shutdown = _should_shutdown
    monitor.call = _call
    worker.TIMEOUT = IDLE_POLL_SECONDS
    _patched = True
