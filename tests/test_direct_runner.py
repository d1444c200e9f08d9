"""runners/direct_runner.py: each patch of Beam's DirectRunner checks that
Beam's code is what it was written against, and refuses loudly otherwise."""

import apache_beam as beam
import pytest

from runners import direct_runner


def test_the_installed_beam_is_what_the_patches_expect():
    direct_runner.check_all()


def test_a_changed_internal_is_refused_by_name(monkeypatch):
    from apache_beam.runners.direct import executor

    monitor = executor._ExecutorServiceParallelExecutor._MonitorTask

    def call(self, state_sampler):  # Beam's method, as a newer Beam might have it
        return None

    monkeypatch.setattr(monitor, "call", call)
    with pytest.raises(direct_runner.BeamChanged) as err:
        direct_runner.install()
    assert "_MonitorTask.call" in str(err.value)
    assert "--direct_optimizations=off" in str(err.value)


def test_install_is_repeatable_and_checks_beams_originals():
    direct_runner.install(threads=2)
    direct_runner.install(threads=3)  # checks the originals, not the patches
    from apache_beam.runners.direct import executor

    assert executor._ExecutorServiceParallelExecutor.NUM_WORKERS == 3
    direct_runner.install(threads=2)


def test_pulls_hand_the_ack_id_on_and_do_not_acknowledge():
    import datetime

    from apache_beam.io.gcp.pubsub import PubsubMessage
    from google.protobuf.timestamp_pb2 import Timestamp
    from google.pubsub_v1 import PullResponse

    published = Timestamp(seconds=1796600000, nanos=250_000_000)

    class Client:
        acked, leased = [], []

        def pull(self, subscription, max_messages, timeout):
            # What the real client returns: proto-plus wrappers.
            return PullResponse(received_messages=[
                {"ack_id": f"ack-{i}", "message": {
                    "data": f"tweet {i}".encode(), "attributes": {"event_ts": "2026-12-07T00:00:00Z"},
                    "message_id": str(i), "publish_time": published}}
                for i in range(min(max_messages, 3))])

        def modify_ack_deadline(self, subscription, ack_ids, ack_deadline_seconds):
            self.leased.append((tuple(ack_ids), ack_deadline_seconds))

        def acknowledge(self, subscription, ack_ids):
            self.acked.append(ack_ids)

    client = Client()
    puller = direct_runner._HoldingPuller(client, max_messages=1000, lease_seconds=45)
    response = puller.pull(subscription="projects/p/subscriptions/s", max_messages=10, timeout=30)
    ids = [r.message.attributes[direct_runner.ACK_ID_ATTRIBUTE] for r in response.received_messages]
    assert ids == ["ack-0", "ack-1", "ack-2"]
    assert client.leased == [(("ack-0", "ack-1", "ack-2"), 45)]
    puller.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=ids)
    assert client.acked == []  # the graph's AcknowledgeMessages does it, once written
    # Plain values, as Beam's read evaluator takes them (PubsubMessage._from_message).
    first = PubsubMessage._from_message(response.received_messages[0].message)
    assert first.data == b"tweet 0" and first.message_id == "0"
    assert first.attributes["event_ts"] == "2026-12-07T00:00:00Z"
    assert first.publish_time == datetime.datetime(2026, 12, 6, 23, 33, 20, 250000,
                                                   tzinfo=datetime.UTC)


def test_a_steps_dofn_is_serialized_once_and_every_bundle_gets_its_own_copy():
    import types

    from apache_beam.internal import pickler

    dumped = []

    def dumps(obj):
        dumped.append(obj)
        return pickler.dumps(obj)

    once = direct_runner._SerializedOnce(types.SimpleNamespace(dumps=dumps, loads=pickler.loads))
    step, other = beam.Map(lambda x: x + 1).dofn, beam.Map(lambda x: x - 1).dofn
    first, second = once.roundtrip(step), once.roundtrip(step)
    assert first is not second and first is not step
    assert first.process(1) == second.process(1) == [2]
    assert dumped == [step]
    assert once.token_of(first) == once.token_of(second) == once.token_of(step) is not None
    once.roundtrip(other)
    assert once.token_of(other) not in (None, once.token_of(step))
    assert once.token_of(beam.Map(str).dofn) is None  # never copied: inspected as Beam does


def test_dofn_specs_are_keyed_by_the_step_for_instance_dependent_dofns():
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    direct_runner.install(threads=2)
    copier = transform_evaluator.pickler
    assert isinstance(copier, direct_runner._SerializedOnce)

    class Stateful(beam.DoFn):
        seen = beam.DoFn.StateParam(userstate.SetStateSpec("seen", beam.coders.StrUtf8Coder()))

        def process(self, element, seen=seen):
            yield element

    plain = beam.Map(str).dofn
    copies = [copier.roundtrip(plain), copier.roundtrip(plain)]
    keys = {direct_runner._specs_key(c) for c in copies}
    assert len(keys) == 1 and None not in keys
    assert userstate.get_dofn_specs(copies[0]) == (set(), set())
    stateful = copier.roundtrip(Stateful())
    assert {s.name for s in userstate.get_dofn_specs(stateful)[0]} == {"seen"}
    assert direct_runner._specs_key(stateful) == Stateful  # by class: not instance-dependent


class _CountBundles(beam.DoFn):
    bundles: dict = {}

    def __init__(self, name):
        self._name = name

    def start_bundle(self):
        self.bundles[self._name] = self.bundles.get(self._name, 0) + 1

    def process(self, element):
        yield element


class _Split(beam.DoFn):
    def process(self, element):
        if element < 0:
            yield beam.pvalue.TaggedOutput("negative", element)
        else:
            yield element


def test_an_empty_output_bundle_runs_no_bundle_downstream():
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.testing.util import assert_that, equal_to

    direct_runner.install(threads=2)
    _CountBundles.bundles.clear()
    options = PipelineOptions(runner="DirectRunner")
    options.view_as(StandardOptions).streaming = True
    stream = (TestStream().add_elements([1, 2, 3]).advance_watermark_to(10)
              .add_elements([4, -5]).advance_watermark_to(20).add_elements([6])
              .advance_watermark_to_infinity())
    with beam.Pipeline(options=options) as p:
        split = p | stream | beam.ParDo(_Split()).with_outputs("negative", main="positive")
        positive = split.positive | "Positive" >> beam.ParDo(_CountBundles("positive"))
        negative = split.negative | "Negative" >> beam.ParDo(_CountBundles("negative"))
        assert_that(positive, equal_to([1, 2, 3, 4, 6]), label="AllPositive")
        assert_that(negative, equal_to([-5]), label="AllNegative")
    # Three bundles reached the split; one of them had a negative element.
    assert _CountBundles.bundles["negative"] == 1
    assert _CountBundles.bundles["positive"] == 3
