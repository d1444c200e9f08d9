"""The walkthroughs of README.md and docs/ run as written and print what they show
(issue 25). Each is taken from its document by ``scripts/walkthrough.py`` (a ``sh``
block after ``<!-- walkthrough: NAME -->``), run with bash from the repository root
as a user pastes it, and its output compared with the shown one: every shown line
(decimal numbers masked: timings and scores vary a little) must be printed, and
nothing may look like a fault. They use the documented ports, 8085 and 6379."""

from __future__ import annotations

import socket

import pytest

from scripts import walkthrough

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WALKTHROUGHS = walkthrough.find()
NOISE = ("WARNING", "Traceback", "ERROR", "E0000", "W0000", "I0000", "cuInit",
         "Resource module", "oneDNN supports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_the_documents_hold_walkthroughs_with_their_output():
    assert {"streaming", "flink-embedded", "flink-cluster", "prism"} <= set(WALKTHROUGHS)
    for w in WALKTHROUGHS.values():
        assert w.shown, f"{w.document}: {w.name} shows no output (scripts/walkthrough.py --write)"


def test_masking_keeps_what_must_match():
    shown = "  read                300\n  tweets/s            30.2 (9.7s)\n...\n"
    assert walkthrough.missing_lines(shown, "  read                300\n"
                                            "  tweets/s            28.0 (10.1s)") == []
    assert walkthrough.missing_lines(shown, "  read                299\n"
                                            "  tweets/s            28.0 (10.1s)") == [
        "  read                300"]
    # A run's Redis directory is under TMPDIR, whichever it is; the port in it varies.
    shown = "its data is in /tmp/bertstream-redis-0d9h_z6w. Bring it back with:\n"
    assert walkthrough.missing_lines(
        shown, "its data is in /tmp/pytest-of-ci/pytest-3/tmp/bertstream-redis-k2_x. "
               "Bring it back with:") == []
    assert walkthrough.missing_lines(shown, "its data is in /tmp/bertstream-redis-x. "
                                            "Bring it back from:") == [shown.rstrip()]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(WALKTHROUGHS))
def test_walkthrough_runs_as_written(name):
    for port in (8085, 6379):
        assert _free(port), f"127.0.0.1:{port} is taken: the walkthroughs use it as documented"
    w = WALKTHROUGHS[name]
    code, output, seconds = walkthrough.run(w)
    assert code == 0, f"{name} exited {code} after {seconds:.0f}s:\n{output[-4000:]}"
    assert walkthrough.missing_lines(w.shown, output) == [], output[-4000:]
    assert [line for line in output.splitlines() if any(n in line for n in NOISE)] == []
