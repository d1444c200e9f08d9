"""``WindowByEventTime``: fixed event-time windows that keep late tweets.

Each record (a ``Result`` in the job, or a ``Tweet``) is placed at its
``event_time`` and gets its window's bounds written into it
(``window_start``, ``window_end``), so the sink counts it in its own window.
The job windows *after* inference: batches form in processing time, across
windows, and each element still lands in the window of its own event time. The trigger fires when the
watermark passes the end of the window and then once per late element, for
``allowed_lateness_seconds``; late tweets are emitted (never dropped
silently), flagged ``late=True`` and counted in
``WindowByEventTime/late_tweets``.

A DoFn cannot read the watermark, so lateness is observed with event-time
timers. The flag is kept in the global window, per shard of the tweet ids
(``shards``), as one small record: ``closed_through`` (every window that
ends at or before it is closed) and the ends of the windows that are still
*pending* (seen, not yet known closed), each with a timer at its end. When
a timer fires the watermark has passed that end, so ``closed_through``
moves up to it and the pending ends up to it are dropped. A tweet is late
when its window ends at or before ``closed_through``. A window whose very
first tweet arrives after its end is known to be closed only once a timer
at or after its end has fired (that of a later window, or its own after
that first bundle), so the count is a lower bound for tweets that are late
as a whole.

Why not per-window state (a flag per window, the textbook form): a
runner keeps a window's state until the window expires, ``allowed_lateness``
(a day) after its end, and Beam's DirectRunner never frees it and copies a
key's whole state at every bundle. At low event-time density (a window per
tweet) that made each bundle cost as much as the windows seen so far, all
day long. Here the state holds the pending windows alone: a handful in
steady state, whatever the uptime.

One shard keeps the flag in one place; more let a cluster runner spread
the step over its workers (each shard closes its windows on the same
watermark). A bounded input (a file) has no late data: its tweets only get
their window's bounds.
"""

import zlib

import apache_beam as beam
from apache_beam.coders import ListCoder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

from transforms.records import iso_from_seconds, seconds_from_iso

DEFAULT_ALLOWED_LATENESS_SECONDS = 24 * 3600
_NOTHING_CLOSED = MIN_TIMESTAMP.micros


class _MarkLateFn(beam.DoFn):
    """Flags late records; the input is ``(shard, record)`` in the global
    window, stamped at the record's event time."""

    # (closed_through, pending window ends), in microseconds.
    LEDGER = ReadModifyWriteStateSpec("ledger", TupleCoder([VarIntCoder(),
                                                            ListCoder(VarIntCoder())]))
    # One timer per pending window end (the timer's tag is that end).
    WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)

    def __init__(self, window_seconds: float):
        self._window_seconds = window_seconds
        self._late = Metrics.counter("WindowByEventTime", "late_tweets")

    def setup(self):
        self._windows = window.FixedWindows(self._window_seconds)

    def start_bundle(self):
        # shard -> [closed_through, set of pending ends]: the state is read
        # once per shard and bundle instead of once per tweet (on a portable
        # runner each read is a round trip to the runner); this DoFn alone
        # changes it, and the timer callback updates this too.
        self._ledgers = {}

    def _ledger(self, key, state):
        ledger = self._ledgers.get(key)
        if ledger is None:
            closed_through, pending = state.read() or (_NOTHING_CLOSED, [])
            ledger = self._ledgers[key] = [closed_through, set(pending)]
        return ledger

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                state=beam.DoFn.StateParam(LEDGER),
                window_end=beam.DoFn.TimerParam(WINDOW_END)):
        key, record = element
        w = self._windows.assign(window.WindowFn.AssignContext(timestamp))[0]
        record = record._replace(window_start=iso_from_seconds(float(w.start)),
                                 window_end=iso_from_seconds(float(w.end)))
        ledger = self._ledger(key, state)
        end = w.max_timestamp().micros
        if end <= ledger[0]:
            self._late.inc()
            yield record._replace(late=True)
            return
        if end not in ledger[1]:
            ledger[1].add(end)
            state.write((ledger[0], sorted(ledger[1])))
            window_end.set(Timestamp(micros=end), dynamic_timer_tag=str(end))
        yield record

    @on_timer(WINDOW_END)
    def close(self, key=beam.DoFn.KeyParam, tag=beam.DoFn.DynamicTimerTagParam,
              state=beam.DoFn.StateParam(LEDGER)):
        ledger = self._ledger(key, state)
        ledger[0] = max(ledger[0], int(tag))
        ledger[1] = {end for end in ledger[1] if end > ledger[0]}
        state.write((ledger[0], sorted(ledger[1])))


class _StampWindowFn(beam.DoFn):
    def process(self, tweet, w=beam.DoFn.WindowParam):
        yield tweet._replace(window_start=iso_from_seconds(float(w.start)),
                             window_end=iso_from_seconds(float(w.end)))


def _at_event_time(record):
    # Earlier steps may re-stamp elements (batching does); the record keeps
    # the event time.
    return beam.window.TimestampedValue(record, seconds_from_iso(record.event_time))


class WindowByEventTime(beam.PTransform):
    """Assigns records with an ``event_time`` (``Result``s, ``Tweet``s) to
    fixed event-time windows of ``window_seconds``.

    Args:
      window_seconds: the window length.
      allowed_lateness_seconds: how long after the end of a window its late
        tweets are still accepted (and counted).
      shards: how many keys hold the lateness record (see the module doc).
    """

    def __init__(self, window_seconds: float,
                 allowed_lateness_seconds: float = DEFAULT_ALLOWED_LATENESS_SECONDS,
                 shards: int = 1):
        super().__init__()
        self._window_seconds = window_seconds
        self._allowed_lateness = allowed_lateness_seconds
        self._shards = shards

    def _fixed_windows(self):
        return beam.WindowInto(
            window.FixedWindows(self._window_seconds),
            trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
            allowed_lateness=self._allowed_lateness)

    def expand(self, records):
        shards = self._shards
        kind = records.element_type
        if records.is_bounded:
            return (records
                    | "AtEventTime" >> beam.Map(_at_event_time).with_output_types(kind)
                    | "FixedWindows" >> self._fixed_windows()
                    | "MarkLate" >> beam.ParDo(_StampWindowFn()).with_output_types(kind))
        if not isinstance(records.windowing.windowfn, window.GlobalWindows):
            records = records | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())

        def keyed_at_event_time(record):
            return beam.window.TimestampedValue(
                (zlib.crc32(record.tweet_id.encode()) % shards, record),
                seconds_from_iso(record.event_time))

        # Lateness is marked in the global window (see the module doc), and
        # the records then go to the windows of their event time.
        return (records
                | "AtEventTime" >> beam.Map(keyed_at_event_time).with_output_types(
                    tuple[int, kind])
                | "MarkLate" >> beam.ParDo(_MarkLateFn(self._window_seconds)).with_output_types(
                    kind)
                | "FixedWindows" >> self._fixed_windows())
