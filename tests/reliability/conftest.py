"""A ``Ctx`` for the scenarios, on the session's emulator and tiny model."""

from __future__ import annotations

import logging

import pytest

from tests.reliability.harness import Ctx, is_full


@pytest.fixture
def ctx(pubsub_emulator, tiny_model_dir, tmp_path) -> Ctx:
    log = logging.getLogger("reliability")
    return Ctx(model_dir=tiny_model_dir, work_dir=tmp_path, full=is_full(), log=log.info)
