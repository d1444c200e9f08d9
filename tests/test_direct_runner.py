"""runners/direct_runner.py: each patch of Beam's DirectRunner checks that
Beam's code is what it was written against, and refuses loudly otherwise."""

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
