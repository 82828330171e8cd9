"""The tally of the hostile-input suite: every attempt ends in one of five outcomes, counted per
process and summed over xdist workers by the suite's conftest.

    right            the right result (or a difference the docstrings state: "documented")
    refused clearly  an exception of a named type, or one line from a command line, naming the
                     argument or file and what was wrong
    silent wrong     a wrong result without an error, or a result where an error was due
    unclear          any other failure: a traceback, a message that names nothing, a hang
"""
from __future__ import annotations

from collections import Counter

import pytest

OUTCOMES = ("right", "documented", "refused clearly", "silent wrong", "unclear")
ALIASES = {"ok": "right", "clear error": "refused clearly", "clear": "refused clearly", "silent": "silent wrong"}
COUNTS: Counter = Counter()
FAILURES: list = []          # (test, attempt, outcome, detail) of every silent wrong or unclear attempt


class Batch:
    """The attempts of one test: each is counted, and the test fails at check() naming each
    attempt that was silent wrong or unclear."""

    def __init__(self, test: str):
        self.test, self.n, self.failures = test, 0, []

    def record(self, label: str, outcome: str, detail: str = "") -> str:
        outcome = ALIASES.get(outcome, outcome)
        assert outcome in OUTCOMES, outcome
        self.n += 1
        COUNTS[outcome] += 1
        if outcome in ("silent wrong", "unclear"):
            self.failures.append((label, outcome, (detail or "").strip()))
            FAILURES.append((self.test, label, outcome))
        return outcome

    def check(self) -> None:
        if self.failures:
            lines = [f"{outcome.upper()}: {label}" + (f"\n    {detail[-600:]}" if detail else "")
                     for label, outcome, detail in self.failures]
            pytest.fail(f"{len(self.failures)} of {self.n} attempts failed:\n" + "\n".join(lines), pytrace=False)


CURRENT: list = []           # the running test's Batch (the attack functions record into it)


def record(label: str, outcome: str, detail: str = "") -> str:
    return CURRENT[-1].record(label, outcome, detail)


def summary_line(counts: Counter) -> str:
    total = sum(counts[o] for o in OUTCOMES)
    return (f"hostile inputs: {total} attempts, {counts['right'] + counts['documented']} right "
            f"({counts['documented']} of them documented limits), {counts['refused clearly']} refused clearly, "
            f"{counts['silent wrong']} silent wrong, {counts['unclear']} unclear")
