"""
``make test``'s streams (tests/bench/streams.py) run every test once: the sessions on the newest
release together select the whole suite, no test twice, and a shared topology's tests all fall
in one session, so none is deployed twice. Collection only, no container.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import DEBIAN_VARIABLE, PROJECT_DIR, streams
from bench.topologies import SHARED


def _collected(argv: list[str]) -> set[str]:
    """The test ids the pytest command ``argv`` selects."""
    listed = subprocess.run(
        [*argv, "--collect-only", "-q"], cwd=PROJECT_DIR, capture_output=True, text=True, check=False
    ).stdout
    return {line for line in listed.splitlines() if "::" in line}


def _parameters(test: str) -> str:
    """The parameters' part of a test id ("all-in-one-pkill -9 -x redis-server", "redis+redis-split")."""
    return test.rpartition("::")[2].partition("[")[2]


def test_the_streams_run_every_test_once_and_each_shared_topology_in_one_session():
    sessions = [
        _collected(argv)
        for stream in streams.streams([])
        for argv, environment in stream.commands
        if DEBIAN_VARIABLE not in environment  # the core run repeats a few on the older release
    ]
    everything = _collected([str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider"])
    assert len(everything) > 300, "the suite collected too few tests for this check to mean anything"
    assert sum(len(session) for session in sessions) == len(everything), "a test runs twice, or never"
    assert set().union(*sessions) == everything
    for topology in SHARED:
        holding = [
            index for index, session in enumerate(sessions) if any(topology in _parameters(test) for test in session)
        ]
        assert len(holding) == 1, f"{topology}'s tests run in sessions {holding}: it would be deployed in each"
