"""
``make test``'s suite in three streams at once, each on hosts of its own, so the machine's two
cores overlap one stream's waits (a fault's outage, an alert's ``for``, a deploy's downloads)
with the others' work:

- the fault suite (``tests/faults``), then own-app and old-celery, on Debian 13;
- scale-out, then the tests of the shared all-in-one topology (``-k all-in-one``: its
  parametrized tests, interrupted's among them), on Debian 13, then the core run on Debian 12;
- every other test (the shared split topology's, bad-input's and those that need no container)
  on Debian 13.

A shared topology is deployed once per pytest session, so its tests stay in one stream: the
second and third streams partition the same files by the topology's name in the test's id
(``-k``), and neither deploys the other's. Each session prints the time its modules and
topologies took (tests/conftest.py), what the next balancing starts from.

History: in one stream, 49 min; in two (faults, scale-out and own-app, then the core run;
everything else), 31 min at first, then 60 min as the suite grew (5f5ec99: 52.6 + 7.5 and
51.2 min). In three, with the core run after the split's tests: 35.5, 31.3 and 39.8 min
(33.5 + 6.3), 40 min 9 s in all (ebb33ca); the core run moved to the shortest stream.

What the streams share is made first, once (``prepare``): the base image of each release, the
apt cache and each image's wheelhouse, which the sessions would otherwise build at the same
time. Each stream's output goes to a file and is printed whole when all have ended, one after
the other. A pytest that selects nothing in its part (exit 5, e.g. ``PYTEST_ARGS='-m "not
faults"'`` in the fault stream) says so and its stream goes on; the run fails when a command
failed otherwise, or when no pytest ran a test at all: an empty run never passes for a green one.

Usage: ``python -m bench.streams [PYTEST_ARGS...]`` from the project's root, with ``tests`` on
``PYTHONPATH`` (the Makefile does both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import DEBIAN_VARIABLE, PROJECT_DIR, caches, debian_release, docker_client, ensure_base_image

#: The release of the core run (the Makefile's CORE_DEBIAN).
CORE_DEBIAN = os.environ.get("CORE_DEBIAN", "bookworm")
#: What the first stream runs on the newest release.
FIRST_STREAM = ("tests/faults", "tests/test_own_app.py", "tests/test_old_celery.py")
#: What the second stream runs first. The files no stream names are shared by the second stream
#: and the third, by topology (below).
SCALE_OUT = "tests/test_scale_out.py"
#: The shared topology whose tests the second stream runs (tests/bench/topologies.py's SHARED);
#: the third runs the rest of the same files, the split topology's tests among them.
SECOND_STREAMS_TOPOLOGY = "all-in-one"
#: pytest's exit status when it collected no test.
NO_TESTS = 5


def _new_log() -> Path:
    descriptor, path = tempfile.mkstemp(prefix="stream-", suffix=".log")
    os.close(descriptor)
    return Path(path)


@dataclass
class Stream:
    """Commands run one after the other, their output in one file. Each is a session of its
    own, so a failed one does not stop the next: one run shows every failure."""

    name: str
    commands: list[tuple[list[str], dict[str, str]]]
    #: The exit status of each command run.
    statuses: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: The file its output goes to, made when it runs (a stream only listed, as by
    #: tests/test_streams.py, leaves no file behind).
    log: Path | None = None

    def run(self) -> None:
        started = time.monotonic()
        self.log = _new_log()
        with self.log.open("w") as output:
            for argv, environment in self.commands:
                output.write(f"$ {' '.join(argv)}\n")
                output.flush()
                status = subprocess.run(
                    argv,
                    cwd=PROJECT_DIR,
                    env={**os.environ, **environment},
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                ).returncode
                self.statuses.append(status)
                if status == NO_TESTS:
                    output.write("pytest collected no tests here (exit 5)\n")
        self.seconds = time.monotonic() - started


def prepare() -> None:
    """Build what the streams would otherwise build at once: each release's base image, the
    apt cache and each image's wheelhouse."""
    client = docker_client()
    for release in dict.fromkeys([debian_release(), CORE_DEBIAN]):
        image = ensure_base_image(release)
        caches.apt_proxy()
        caches.wheelhouse(PROJECT_DIR, image, client)


def streams(pytest_args: list[str]) -> list[Stream]:
    # No cache plugin: the sessions would write .pytest_cache at once.
    pytest = [str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider", *pytest_args]
    core = {DEBIAN_VARIABLE: CORE_DEBIAN}
    release = debian_release()
    others = [*pytest, *(f"--ignore={path}" for path in (*FIRST_STREAM, SCALE_OUT))]
    topology = SECOND_STREAMS_TOPOLOGY
    return [
        Stream(f"{', '.join(FIRST_STREAM)} ({release})", [([*pytest, *FIRST_STREAM], {})]),
        Stream(
            f"{SCALE_OUT}, every other file's {topology} tests ({release}), then the core run ({CORE_DEBIAN})",
            [
                ([*pytest, SCALE_OUT], {}),
                ([*others, "-k", topology], {}),
                ([*pytest, "-m", "core", "-k", "not split"], core),
            ],
        ),
        Stream(f"every other test ({release})", [([*others, "-k", f"not {topology}"], {})]),
    ]


def main(pytest_args: list[str]) -> int:
    prepare()
    started = time.monotonic()
    running = streams(pytest_args)
    threads = [threading.Thread(target=stream.run, name=stream.name) for stream in running]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for stream in running:
        print(f"\n===== stream: {stream.name}: exits {stream.statuses} after {stream.seconds / 60:.1f} min =====")
        if stream.log is not None:
            print(stream.log.read_text(errors="replace"), flush=True)
            stream.log.unlink()
    print(f"===== all streams ended in {(time.monotonic() - started) / 60:.1f} min =====")
    statuses = [status for stream in running for status in stream.statuses]
    failed = [status for status in statuses if status not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    if 0 not in statuses:
        print("pytest collected no tests in any stream (exit 5): nothing was verified", file=sys.stderr)
        return NO_TESTS
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
