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

A DoFn cannot read the watermark, so lateness is observed with an
event-time timer per window: once the end-of-window timer has fired, every
tweet that arrives for that window is late. A window whose very first tweet
arrives after its end is only known to be late from its second tweet on
(the timer fires after that first bundle); the count is therefore a lower
bound for windows that are late as a whole.

The flag is kept per window and per shard of the tweet ids (``shards``): one
shard keeps it in one place; more let a cluster runner spread the step over
its workers (each shard closes its windows on the same watermark). A bounded
input (a file) has no late data: its tweets only get their window's bounds.
"""

import zlib

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from transforms.records import iso_from_seconds, seconds_from_iso

DEFAULT_ALLOWED_LATENESS_SECONDS = 24 * 3600


class _MarkLateFn(beam.DoFn):
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    END_OF_WINDOW = TimerSpec("end_of_window", TimeDomain.WATERMARK)

    def __init__(self):
        self._late = Metrics.counter("WindowByEventTime", "late_tweets")

    def start_bundle(self):
        # (key, window) -> closed: the state is read, and the timer set, once
        # per window and bundle instead of once per tweet (on a portable
        # runner each is a round trip to the runner). Only this DoFn's timer
        # changes the flag, and it updates this too.
        self._known = {}

    def process(self, element, w=beam.DoFn.WindowParam,
                closed=beam.DoFn.StateParam(CLOSED),
                end_of_window=beam.DoFn.TimerParam(END_OF_WINDOW)):
        key, tweet = element
        tweet = tweet._replace(window_start=iso_from_seconds(float(w.start)),
                               window_end=iso_from_seconds(float(w.end)))
        is_closed = self._known.get((key, w))
        if is_closed is None:
            is_closed = self._known[(key, w)] = bool(closed.read())
            if not is_closed:
                end_of_window.set(w.max_timestamp())
        if is_closed:
            self._late.inc()
            yield tweet._replace(late=True)
            return
        yield tweet

    @on_timer(END_OF_WINDOW)
    def close(self, key=beam.DoFn.KeyParam, w=beam.DoFn.WindowParam,
              closed=beam.DoFn.StateParam(CLOSED)):
        closed.write(True)
        self._known[(key, w)] = True


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
      shards: how many keys hold the per-window flag (see the module doc).
    """

    def __init__(self, window_seconds: float,
                 allowed_lateness_seconds: float = DEFAULT_ALLOWED_LATENESS_SECONDS,
                 shards: int = 1):
        super().__init__()
        self._window_seconds = window_seconds
        self._allowed_lateness = allowed_lateness_seconds
        self._shards = shards

    def expand(self, records):
        shards = self._shards
        kind = records.element_type
        windowed = (records
                    | "AtEventTime" >> beam.Map(_at_event_time).with_output_types(kind)
                    | "FixedWindows" >> beam.WindowInto(
            window.FixedWindows(self._window_seconds),
            trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
            allowed_lateness=self._allowed_lateness))
        if records.is_bounded:
            return windowed | "MarkLate" >> beam.ParDo(_StampWindowFn()).with_output_types(kind)
        return (windowed
                | "KeyByShard" >> beam.Map(
                    lambda t: (zlib.crc32(t.tweet_id.encode()) % shards, t)
                ).with_output_types(tuple[int, kind])
                | "MarkLate" >> beam.ParDo(_MarkLateFn()).with_output_types(kind))
