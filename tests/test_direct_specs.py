"""The DirectRunner's DoFn inspection, memoized per class (pipeline/direct_specs.py)."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.transforms import userstate
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer

from pipeline import direct_specs


class _Stateful(beam.DoFn):
    BAG = BagStateSpec("bag", beam.coders.StrUtf8Coder())
    TIMER = TimerSpec("t", beam.TimeDomain.WATERMARK)

    def process(self, element, bag=beam.DoFn.StateParam(BAG),
                timer=beam.DoFn.TimerParam(TIMER)):
        bag.add(element[1])

    @on_timer(TIMER)
    def flush(self, bag=beam.DoFn.StateParam(BAG)):
        yield from bag.read()


class _Plain(beam.DoFn):
    def process(self, element):
        yield element


def _original():
    return getattr(userstate.get_dofn_specs, "__wrapped__", userstate.get_dofn_specs)


def test_the_cached_answer_is_the_inspected_one_and_computed_once(monkeypatch):
    assert direct_specs.install()
    calls = []
    original = _original()

    def counting(dofn):
        calls.append(type(dofn))
        return original(dofn)

    # Fresh cache around a counting inspection, as install() would build it.
    monkeypatch.setattr(direct_specs, "_installed", False)
    monkeypatch.setattr(userstate, "get_dofn_specs", counting)
    direct_specs.install()
    cached = userstate.get_dofn_specs
    for _ in range(5):
        state, timers = cached(_Stateful())
        assert state == {_Stateful.BAG} and timers == {_Stateful.TIMER}
    assert calls == [_Stateful]
    assert userstate.is_stateful_dofn(_Stateful()) and not userstate.is_stateful_dofn(_Plain())
    # Each caller gets sets of its own.
    first, second = cached(_Stateful()), cached(_Stateful())
    first[0].clear()
    assert second[0] == {_Stateful.BAG} and cached(_Stateful())[0] == {_Stateful.BAG}


def test_dofns_whose_instance_decides_are_inspected_every_time():
    # beam.Map inspects the wrapped callable; with_exception_handling binds
    # process per instance; an instance may carry bound methods of its own.
    mapped = beam.Map(lambda x: x).dofn
    assert direct_specs._class_key(mapped) is None
    from apache_beam.transforms.core import _ExceptionHandlingWrapperDoFn

    wrapper = _ExceptionHandlingWrapperDoFn(_Plain(), "bad", (Exception,), False, None, False)
    assert direct_specs._class_key(wrapper) is None
    plain = _Plain()
    plain.extra = _Stateful().process
    assert direct_specs._class_key(plain) is None
    assert direct_specs._class_key(_Plain()) is _Plain


def test_an_invalid_dofn_still_fails_every_time():
    class _Twice(beam.DoFn):
        A = BagStateSpec("same", beam.coders.StrUtf8Coder())
        B = BagStateSpec("same", beam.coders.StrUtf8Coder())

        def process(self, element, a=beam.DoFn.StateParam(A), b=beam.DoFn.StateParam(B)):
            yield element

    direct_specs.install()
    for _ in range(2):
        with pytest.raises(ValueError, match="same"):
            userstate.validate_stateful_dofn(_Twice())


@pytest.mark.parametrize("runner,installed", [("DirectRunner", True), ("FlinkRunner", False)])
def test_jobs_on_the_direct_runner_install_it_whatever_their_input(monkeypatch, tmp_path,
                                                                   runner, installed):
    import apache_beam as beam

    from pipeline import direct_specs as module
    from pipeline.pipeline import ReadTweets, make_options

    calls = []
    monkeypatch.setattr(module, "install", lambda: calls.append(runner) or True)
    tweets = tmp_path / "t.jsonl"
    tweets.write_text("")
    options = make_options([f"--runner={runner}", "--input_file", str(tweets)])
    _ = beam.Pipeline(runner="DirectRunner") | ReadTweets(options)
    assert calls == ([runner] if installed else [])
