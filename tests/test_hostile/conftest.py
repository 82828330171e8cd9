"""The hostile-input suite: run with `./dev test -m hostile` (pytest.ini leaves it out of the
default run). Each test runs a batch of attempts and fails naming every attempt that ended silent
wrong or unclear; the tally over all attempts is printed at the end of the run."""
from __future__ import annotations

import json
from collections import Counter

import pytest

import hostile_tally


@pytest.fixture
def batch(request):
    """The running test's Batch; attempts record into it, and the test calls batch.check()."""
    b = hostile_tally.Batch(request.node.nodeid)
    hostile_tally.CURRENT.append(b)
    yield b
    hostile_tally.CURRENT.remove(b)


_config = []


def pytest_configure(config):
    _config.append(config)


def pytest_sessionfinish():
    out = getattr(_config[-1], "workeroutput", None)           # an xdist worker: hand the counts over
    if out is not None:
        out["hostile_tally"] = json.dumps(dict(hostile_tally.COUNTS))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    counts = json.loads(getattr(node, "workeroutput", {}).get("hostile_tally", "{}"))
    hostile_tally.COUNTS.update(counts)


def pytest_terminal_summary(terminalreporter):
    if sum(hostile_tally.COUNTS.values()):
        terminalreporter.write_sep("=", "hostile inputs")
        terminalreporter.write_line(hostile_tally.summary_line(Counter(hostile_tally.COUNTS)))
