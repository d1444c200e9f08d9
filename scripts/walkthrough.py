"""Run the walkthroughs of README.md and docs/ as written, and keep their shown output true.

    python scripts/walkthrough.py list
    python scripts/walkthrough.py run NAME [--write]

A walkthrough is a ``sh`` block right after ``<!-- walkthrough: NAME -->`` in a
Markdown file; the block of what it printed follows, between
``<!-- output: NAME -->`` and ``<!-- /output -->``. ``run`` executes the block
with bash (``set -euo pipefail``) from the repository root, exactly as a user
pastes it, and compares: every line the document shows (numbers with a
decimal point masked, since timings and scores vary a little from run to run;
"..." skipped) must appear in what the run printed. ``--write`` puts this run's
output in the document instead (stdout and stderr, without the timestamped
INFO log lines; of the subscriber's result lines the first few, the rest
shown as "..."). ``tests/test_walkthroughs.py`` runs every walkthrough.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_START = re.compile(r"<!-- walkthrough: ([\w-]+) -->\n```sh\n(.*?)\n```", re.DOTALL)
# The shown output (group 3) is empty or ends with a newline; it ends at its own
# block's closing fence.
_OUTPUT = re.compile(r"(<!-- output: ([\w-]+) -->\n```text\n)((?:(?!```).*\n)*?)"
                     r"(```\n<!-- /output -->)")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")
_RESULT_LINE = re.compile(r"^(negative|neutral|positive) +(\d\.\d\d) ")
# Shown result lines are those the model is sure of: a label near a tie can
# flip between runs (bfloat16, another batch).
SURE = 0.6
_DECIMAL = re.compile(r"\d+\.\d+")
# Paths and ports a run chooses for itself. A run's own directories
# (bertstream-redis-…) are made under TMPDIR: /tmp for a user, pytest's
# temporary directory under the suite, so the parent is masked too.
_VOLATILE = [(re.compile(r"(?:/[\w.-]+)*/bertstream-[\w.-]+"), "…/bertstream-…"),
             (re.compile(r"127\.0\.0\.1:\d{4,5}"), "127.0.0.1:…"),
             (re.compile(r"port \d{4,5}"), "port …"),
             (re.compile(r"-p \d{4,5}"), "-p …"),
             (re.compile(r"\(\d\d:\d\d:\d\d\)"), "(…)"),
             # Which bad input reaches Redis first depends on the bundles.
             (re.compile(r'"first_dead_letter": "[^"]*"'), '"first_dead_letter": "…"')]
SHOWN_RESULTS = 6


@dataclass
class Walkthrough:
    name: str
    document: Path
    script: str
    shown: str | None


def find(documents=DOCUMENTS) -> dict[str, Walkthrough]:
    found: dict[str, Walkthrough] = {}
    for doc in documents:
        text = doc.read_text()
        outputs = {m.group(2): m.group(3) for m in _OUTPUT.finditer(text)}
        for m in _START.finditer(text):
            name = m.group(1)
            if name in found:
                raise ValueError(f"walkthrough {name} is in {found[name].document} and {doc}")
            found[name] = Walkthrough(name, doc, m.group(2), outputs.get(name))
    return found


def run(walkthrough: Walkthrough, timeout: float = 900) -> tuple[int, str, float]:
    """(exit code, printed output as a document shows it, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    started = time.monotonic()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough.script], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if not _LOG_LINE.match(line)]
    return done.returncode, "\n".join(lines), time.monotonic() - started


def abridged(output: str, shown: int = SHOWN_RESULTS) -> str:
    """The output with at most ``shown`` result lines of the subscriber's (and
    their window lines); the rest as one "..."."""
    out, results, skipping = [], 0, False
    for line in output.splitlines():
        if m := _RESULT_LINE.match(line):
            sure = float(m.group(2)) >= SURE
            results += sure
            skipping = results > shown or not sure
            if skipping and out[-1:] != ["..."]:
                out.append("...")
        elif line.startswith("-- window ") and skipping:
            continue
        else:
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def masked(line: str) -> str:
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    return _DECIMAL.sub("#", line).rstrip()


def missing_lines(shown: str, printed: str) -> list[str]:
    """The shown lines (masked) that the run did not print."""
    have = {masked(line) for line in printed.splitlines()}
    return [line for line in shown.splitlines()
            if line.strip() and line.strip() != "..." and masked(line) not in have]


def write(walkthrough: Walkthrough, output: str) -> None:
    text = walkthrough.document.read_text()

    def replace(m: re.Match) -> str:
        if m.group(2) != walkthrough.name:
            return m.group(0)
        return m.group(1) + abridged(output) + "\n" + m.group(4)

    new = _OUTPUT.sub(replace, text)
    if new == text and abridged(output) + "\n" != walkthrough.shown:
        raise ValueError(f"{walkthrough.document}: no output block for {walkthrough.name}")
    walkthrough.document.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--write", action="store_true", help="show this run's output in the document")
    args = p.parse_args(argv)
    walkthroughs = find()
    if args.command == "list":
        for w in walkthroughs.values():
            print(f"{w.name}\t{w.document.relative_to(ROOT)}")
        return 0
    walkthrough = walkthroughs[args.name]
    code, output, seconds = run(walkthrough)
    print(output)
    print(f"# {args.name}: exit {code} after {seconds:.0f}s", file=sys.stderr)
    if code:
        return code
    if args.write:
        write(walkthrough, output)
        return 0
    missing = missing_lines(walkthrough.shown or "", output)
    for line in missing:
        print(f"# shown but not printed: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
