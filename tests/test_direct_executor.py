"""The DirectRunner's executor on more than one thread (pipeline/direct_executor.py)."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import apache_beam as beam
import pytest
from apache_beam.runners.direct import executor
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.testing.util import assert_that, equal_to

from pipeline import direct_executor

_RUNNING = {"now": 0, "most": 0}
_LOCK = threading.Lock()


def _slow_times_ten(x: int) -> int:
    """Sleeps (GIL released) and counts how many calls overlap."""
    with _LOCK:
        _RUNNING["now"] += 1
        _RUNNING["most"] = max(_RUNNING["most"], _RUNNING["now"])
    time.sleep(0.05)
    with _LOCK:
        _RUNNING["now"] -= 1
    return x * 10


def _run_four_bundles(threads: int) -> int:
    """Four root bundles into one slow step; returns the most concurrent calls."""
    assert direct_executor.install(threads)
    _RUNNING.update(now=0, most=0)
    with beam.Pipeline(runner=BundleBasedDirectRunner()) as p:
        parts = [p | f"Part{k}" >> beam.Create(list(range(4 * k, 4 * k + 4))) for k in range(4)]
        out = parts | beam.Flatten() | beam.Map(_slow_times_ten)
        assert_that(out, equal_to([10 * i for i in range(16)]))
    return _RUNNING["most"]


@pytest.fixture
def restore_threads():
    before = executor._ExecutorServiceParallelExecutor.NUM_WORKERS
    yield
    executor._ExecutorServiceParallelExecutor.NUM_WORKERS = before


def test_bundles_run_side_by_side_with_two_threads_and_not_with_one(restore_threads):
    assert _run_four_bundles(2) == 2
    assert _run_four_bundles(1) == 1


def test_threads_below_one_name_the_flag():
    with pytest.raises(ValueError, match="--direct_threads"):
        direct_executor.install(0)


def _monitor(updates: list, running: frozenset = frozenset()):
    """A monitor task over a stand-in executor: ``updates`` queued, the
    transform executors ``running``, every watermark done, no timers."""
    assert direct_executor.install(2)
    all_updates = SimpleNamespace(_queue=queue.Queue())
    for update in updates:
        all_updates._queue.put(update)
    offered = []
    stub = SimpleNamespace(
        all_updates=all_updates,
        transform_executor_services=SimpleNamespace(executors=running),
        evaluation_context=SimpleNamespace(
            _watermark_manager=SimpleNamespace(extract_all_timers=lambda: ([], False)),
            is_done=lambda: False),
        visible_updates=SimpleNamespace(offer=offered.append),
        executor_service=SimpleNamespace(shutdown=lambda: None))
    return executor._ExecutorServiceParallelExecutor._MonitorTask(stub), offered


def test_a_finished_bundle_whose_update_is_still_queued_is_not_a_stall():
    # The race two threads expose: the bundle has deregistered, its update
    # waits in the queue; Beam's monitor would report a stall here.
    task, offered = _monitor(updates=["committed bundle"])
    assert task._should_shutdown() is False
    assert offered == []


def test_a_real_stall_is_still_reported():
    task, offered = _monitor(updates=[])
    assert task._should_shutdown() is True
    assert len(offered) == 1 and "stall" in str(offered[0].exception)


def test_idle_threads_notice_the_end_of_a_run_quickly():
    assert direct_executor.install(2)
    assert executor._ExecutorService._ExecutorServiceWorker.TIMEOUT == (
        direct_executor.IDLE_POLL_SECONDS)
    assert direct_executor.IDLE_POLL_SECONDS < 1
