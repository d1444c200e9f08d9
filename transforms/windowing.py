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
timers. Per shard of the tweet ids (``shards``), in the global window, the
step keeps one number, ``closed_through``: every window that ends at or
before it is closed. Each window that gets a tweet while not known closed
gets a timer at its end; when it fires the watermark has passed that end,
and ``closed_through`` moves up to it. A tweet is late when its window ends
at or before ``closed_through``. A window whose very first tweet arrives
after its end is known to be closed only once a timer at or after its end
has fired (a later window's, or its own after that first bundle), so the
count is a lower bound for tweets that are late as a whole.

Why not per-window state (a flag per window, the textbook form): a
runner keeps a window's state until the window expires, ``allowed_lateness``
(a day) after its end, and Beam's DirectRunner never frees it and copies a
key's whole state at every bundle. At low event-time density (a window per
tweet) that made each bundle cost as much as the windows seen so far, all
day long. Here the state is one number per shard, and the runner holds a
timer per open window, whatever the uptime.

One shard keeps the flag in one place; more let a cluster runner spread
the step over its workers (each shard closes its windows on the same
watermark). A bounded input (a file) has no late data: its tweets only get
their window's bounds.
"""

import zlib

import apache_beam as beam
from apache_beam.coders import VarIntCoder
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

    # Every window that ends at or before this (microseconds) is closed.
    CLOSED_THROUGH = ReadModifyWriteStateSpec("closed_through", VarIntCoder())
    # A timer per open window that got a record, tagged with the window's
    # end: the runner holds the pending windows, and forgets each one as its
    # timer fires.
    WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)

    def __init__(self, window_seconds: float):
        self._windows = window.FixedWindows(window_seconds)
        self._late = Metrics.counter("WindowByEventTime", "late_tweets")

    def start_bundle(self):
        # shard -> [closed_through, window ends whose timer this bundle set]:
        # the state is read once per shard and bundle instead of once per
        # tweet (on a portable runner each read is a round trip to the
        # runner), and a timer set once per window and bundle. Only this
        # DoFn changes the state, and its timer callback updates this too.
        self._shards = {}

    def _shard(self, key, closed_through):
        shard = self._shards.get(key)
        if shard is None:
            stored = closed_through.read()
            shard = self._shards[key] = [_NOTHING_CLOSED if stored is None else stored, set()]
        return shard

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                closed_through=beam.DoFn.StateParam(CLOSED_THROUGH),
                window_end=beam.DoFn.TimerParam(WINDOW_END)):
        key, record = element
        (w,) = self._windows.assign(window.WindowFn.AssignContext(timestamp))
        last = w.max_timestamp().micros
        record = record._replace(window_start=iso_from_seconds(float(w.start)),
                                 window_end=iso_from_seconds(float(w.end)))
        shard = self._shard(key, closed_through)
        if last <= shard[0]:
            self._late.inc()
            yield record._replace(late=True)
            return
        if last not in shard[1]:
            shard[1].add(last)
            # Setting it again (another bundle) leaves it as it was.
            window_end.set(Timestamp(micros=last), dynamic_timer_tag=str(last))
        yield record

    @on_timer(WINDOW_END)
    def close(self, key=beam.DoFn.KeyParam, tag=beam.DoFn.DynamicTimerTagParam,
              closed_through=beam.DoFn.StateParam(CLOSED_THROUGH)):
        shard = self._shard(key, closed_through)
        if int(tag) > shard[0]:
            shard[0] = int(tag)
            closed_through.write(shard[0])


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
