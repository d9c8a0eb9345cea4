"""
``make test``'s suite in two streams at once, each on hosts of its own, so the machine's two
cores overlap one stream's waits (a fault's outage, a deploy's downloads) with the other's work:

- the fault suite (``tests/faults``) and the tests of the topologies no other test uses
  (scale-out, own-app) on Debian 13, then the core run on Debian 12;
- every other test on Debian 13 (the shared topologies' tests among them).

Measured on 2 cores with the fault suite alone in the first stream: 19.6 and 33.8 min; hence the
two modules moved over, about 6 min of the second stream. With the health gate's tests the
streams took 33.9 and 47.0 min (3e55e17); own-app (about 9 min with its monitoring host)
moved over too. At 80ec6fa, 46.7 and 42.5 min; the fault suite's alert-timing test then added
about 5 min to the first, so old-celery (about 4 min) went back to the second.

What both streams share is made first, once (``prepare``): the base image of each release, the
apt cache and each image's wheelhouse, which two sessions would otherwise build at the same
time. Each stream's output goes to a file and is printed whole when both have ended, one after
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
#: What the first stream runs on the newest release; the second runs everything else.
FIRST_STREAM = ("tests/faults", "tests/test_scale_out.py", "tests/test_own_app.py")
#: pytest's exit status when it collected no test.
NO_TESTS = 5


def _new_log() -> Path:
    descriptor, path = tempfile.mkstemp(prefix="stream-", suffix=".log")
    os.close(descriptor)
    return Path(path)


@dataclass
class Stream:
    """Commands run one after the other until one fails, their output in one file."""

    name: str
    commands: list[tuple[list[str], dict[str, str]]]
    #: The exit status of each command run.
    statuses: list[int] = field(default_factory=list)
    seconds: float = 0.0
    log: Path = field(default_factory=_new_log)

    def run(self) -> None:
        started = time.monotonic()
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
                elif status != 0:
                    break
        self.seconds = time.monotonic() - started


def prepare() -> None:
    """Build what both streams would otherwise build at once: each release's base image, the
    apt cache and each image's wheelhouse."""
    client = docker_client()
    for release in dict.fromkeys([debian_release(), CORE_DEBIAN]):
        image = ensure_base_image(release)
        caches.apt_proxy()
        caches.wheelhouse(PROJECT_DIR, image, client)


def streams(pytest_args: list[str]) -> list[Stream]:
    # No cache plugin: two sessions would write .pytest_cache at once.
    pytest = [str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider", *pytest_args]
    core = {DEBIAN_VARIABLE: CORE_DEBIAN}
    release = debian_release()
    return [
        Stream(
            f"{', '.join(FIRST_STREAM)} ({release}), then the core run ({CORE_DEBIAN})",
            [([*pytest, *FIRST_STREAM], {}), ([*pytest, "-m", "core", "-k", "not split"], core)],
        ),
        Stream(f"every other test ({release})", [([*pytest, *(f"--ignore={path}" for path in FIRST_STREAM)], {})]),
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
        print(stream.log.read_text(errors="replace"), flush=True)
        stream.log.unlink()
    print(f"===== both streams ended in {(time.monotonic() - started) / 60:.1f} min =====")
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
