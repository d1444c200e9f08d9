"""Hostile input: ParseTweets never raises and every input lands in exactly
one output (2,000 examples a property here; 10,000 in the full run)."""

from __future__ import annotations

import pytest

from tests.reliability.harness import is_full
from tests.reliability.hostile import hostile_input

pytestmark = [pytest.mark.reliability]


@pytest.mark.timeout(1800 if is_full() else 240)
def test_parse_tweets_survives_hostile_input():
    counts = hostile_input(10_000 if is_full() else 2_000)
    assert counts["lost"] == 0 and counts["doubled"] == 0, counts
    assert counts["sent"] >= 2 * counts["examples_per_property"] * 0.9, counts
    assert counts["results"] > 0 and counts["dead_letters"] > 0, counts
