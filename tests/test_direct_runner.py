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
    class Message:
        def __init__(self):
            self.attributes = {}

    class Received:
        def __init__(self, ack_id):
            self.ack_id, self.message = ack_id, Message()

    class Response:
        def __init__(self, n):
            self.received_messages = [Received(f"ack-{i}") for i in range(n)]

    class Client:
        acked, leased = [], []

        def pull(self, subscription, max_messages, timeout):
            return Response(min(max_messages, 3))

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
