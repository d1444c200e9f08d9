"""Operator tools beside the job: the subscriber, the live dashboard and the
dead-letter replay (``python -m ops.subscribe``, ``ops.dashboard``,
``ops.replay_deadletter``)."""
