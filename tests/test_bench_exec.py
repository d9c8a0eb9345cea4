"""
The bench's ``Host.exec`` against docker's known loss of an exec's output (an empty stream for a
command that printed, moby/moby#27289): the output is read again from the file the command wrote,
never by running the command twice. No container: a fake one runs ``sh`` here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import Host


@pytest.fixture(autouse=True)
def no_files_left():
    """The fake container is this machine: remove the output files ``Host.exec`` left in /tmp."""
    before = set(Path("/tmp").glob("stack-bench-exec.*"))
    yield
    for path in set(Path("/tmp").glob("stack-bench-exec.*")) - before:
        path.unlink(missing_ok=True)


class LossyContainer:
    """Runs exec_run's argv with the local sh, and hands back an empty stream for the first
    ``lose`` calls, as docker's exec sometimes does."""

    def __init__(self, lose: int):
        self.lose = lose
        self.calls: list[list[str]] = []

    def exec_run(self, argv: list[str], user: str = "root") -> tuple[int, bytes]:
        self.calls.append(argv)
        ran = subprocess.run(argv, capture_output=True)
        return ran.returncode, b"" if len(self.calls) <= self.lose else ran.stdout + ran.stderr


@pytest.mark.parametrize("lose", [0, 1, 3])
def test_a_lost_output_is_read_again_and_the_command_runs_once(tmp_path, lose):
    counter = tmp_path / "runs"
    host = Host("h", [], LossyContainer(lose))
    said = host.exec(f"echo run >> {counter}; echo out; echo err >&2 # a comment")
    assert said == "out\nerr\n"
    assert counter.read_text() == "run\n"
    assert len(host.container.calls) == 1 + lose


def test_a_failed_command_still_fails_with_its_output():
    host = Host("h", [], LossyContainer(1))
    with pytest.raises(AssertionError, match="exited 3:\nout"):
        host.exec("echo out; exit 3")
    assert host.exec("echo out; exit 3", check=False) == "out\n"


def test_an_output_that_never_arrives_is_an_error_not_an_empty_answer():
    with pytest.raises(AssertionError, match="did not arrive"):
        Host("h", [], LossyContainer(99)).exec("echo out")
