"""
``<app>-check``: whether the application works on this host, as the deploy's health gate asks
after every run (docs/deploy.md, The health gate) and as an operator may ask any time:

- every unit of the application this host runs is active;
- a web host answers ``app_health_path`` and, when a monitoring host scrapes it and it is set,
  ``app_metrics_path`` with a 2xx through its own socket;
- a worker host's Celery worker answers a ping through the broker and consumes each of its queues.

Each check is tried again, once a second, until all pass or the timeout ends. With ``--settle``
(the deploy passes it when this run started, restarted or reloaded a unit here), the checks must
still pass that many seconds later with no unit's main process replaced: a service that comes up
and then dies, or a Gunicorn master that halts once its new workers fail to boot, fails the
gate instead of slipping through it.

With ``--load`` (the deploy passes it before it switches the host to a new release, run by that
release's Python in that release's directory) it only imports what the units would: the ASGI
app (``asgi_app``) and the Celery app with its task modules, so a release that cannot even be
imported fails before any unit runs it and the running release keeps serving.

Exit status 0 when everything passed; 1 with what failed on standard output, and a last line
``UNIT=<unit>`` naming the unit whose journal tells why (the wrapper prints that journal: this
script runs as the application's user, who may not read it).

Usage (by the wrapper, ``/usr/local/sbin/<app>-check``, which passes what this host runs):
    python -m stack_check [--timeout S] [--settle S] [--unit U ...] [--web URL UNIT SETTING]
                          [--worker NAME UNIT QUEUES]
    python -m stack_check --load [--asgi IMPORT_PATH UNIT] [--celery UNIT]
NAME is the worker's node name; %H in it is this host's name, as in the unit's --hostname.
"""

from __future__ import annotations

import argparse
import importlib
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass

#: Seconds one HTTP request or Celery broadcast may take.
ATTEMPT_SECONDS = 5


@dataclass(frozen=True)
class Failure:
    """What failed, and the unit whose journal says why."""

    unit: str
    problem: str


def unit_state(unit: str) -> tuple[str, str]:
    """(ActiveState, MainPID) of ``unit``, as systemd reports them."""
    output = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,MainPID", unit], capture_output=True, text=True, check=False
    ).stdout
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return values.get("ActiveState", "unknown"), values.get("MainPID", "0")


def inactive_unit(units: list[str]) -> Failure | None:
    for unit in units:
        state, _ = unit_state(unit)
        if state != "active":
            return Failure(unit, f"{unit} is {state}, not active")
    return None


def web_failure(url: str, unit: str, setting: str) -> Failure | None:
    """None when ``url`` (the path of ``setting``) answers a 2xx (redirects followed)."""
    try:
        with urllib.request.urlopen(url, timeout=ATTEMPT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        return Failure(unit, f"{url} ({setting}) answered {error.code} {error.reason}")
    except OSError as error:
        return Failure(unit, f"{url} ({setting}) did not answer: {error}")
    return None if 200 <= status < 300 else Failure(unit, f"{url} ({setting}) answered {status}")


def worker_failure(name: str, unit: str, queues: list[str]) -> Failure | None:
    """None when the worker ``name`` answers a ping and consumes every queue of ``queues``."""
    try:
        from stack_celery import app  # the application's Celery app, broker URL and all

        if not app.control.ping(destination=[name], timeout=ATTEMPT_SECONDS):
            return Failure(unit, f"the Celery worker {name} did not answer a ping")
        answers = app.control.inspect(destination=[name], timeout=ATTEMPT_SECONDS).active_queues() or {}
    except Exception as error:  # the app's import errors and the broker's are many; each fails the check
        return Failure(unit, f"the Celery worker {name} could not be asked: {type(error).__name__}: {error}")
    consumed = {queue["name"] for queue in answers.get(name, [])}
    missing = [queue for queue in queues if queue not in consumed]
    if missing:
        return Failure(unit, f"the Celery worker {name} does not consume {', '.join(missing)}")
    return None


def attempt(options: argparse.Namespace) -> Failure | None:
    """The first check that fails, units first (an inactive unit explains the rest)."""
    failure = inactive_unit(options.unit)
    for url, unit, setting in options.web:
        failure = failure or web_failure(url, unit, setting)
    for name, unit, queues in options.worker:
        failure = failure or worker_failure(name.replace("%H", socket.gethostname()), unit, queues.split(","))
    return failure


def replaced(before: dict[str, str]) -> Failure | None:
    """A unit whose main process is not the one it had before the settle time."""
    for unit, pid in before.items():
        now = unit_state(unit)[1]
        if now != pid:
            return Failure(unit, f"{unit} restarted while the gate watched it (main process {pid}, then {now})")
    return None


def check(options: argparse.Namespace) -> Failure | None:
    deadline = time.monotonic() + options.timeout
    while (failure := attempt(options)) is not None and time.monotonic() < deadline:
        time.sleep(1)
    if failure is None and options.settle:
        before = {unit: unit_state(unit)[1] for unit in options.unit}
        time.sleep(options.settle)
        failure = replaced(before) or attempt(options)
    return failure


#: Lines of a traceback a failed import prints (its end says what and where).
TRACEBACK_LINES = 12


def imported(what: str, unit: str, load) -> Failure | None:
    """Call ``load``; the failure, with its traceback's last lines, if it raises."""
    try:
        load()
    except BaseException:  # SystemExit too: an application may exit at import
        lines = traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:]
        return Failure(unit, f"{what}, which {unit} runs, fails to load:\n" + "\n".join(lines))
    return None


def asgi_app(path: str):
    """The object at ``module:attribute``, as Gunicorn finds the ASGI app."""
    module, _, attribute = path.partition(":")
    found = importlib.import_module(module)
    for name in (attribute or "application").split("."):
        found = getattr(found, name)
    return found


def celery_app() -> None:
    """The application's Celery app as the units load it (stack_celery), and its task modules,
    as a worker imports them at start."""
    stack_celery = importlib.import_module("stack_celery")
    stack_celery.app.loader.import_default_modules()


def load(options: argparse.Namespace) -> Failure | None:
    for path, unit in options.asgi:
        failure = imported(f"The ASGI app {path} (asgi_app)", unit, lambda path=path: asgi_app(path))
        if failure:
            return failure
    for (unit,) in options.celery:
        failure = imported("The Celery app (celery_app) and its task modules", unit, celery_app)
        if failure:
            return failure
    return None


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stack_check")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--settle", type=float, default=0)
    parser.add_argument("--unit", action="append", default=[])
    parser.add_argument("--web", nargs=3, action="append", default=[], metavar=("URL", "UNIT", "SETTING"))
    parser.add_argument("--worker", nargs=3, action="append", default=[], metavar=("NAME", "UNIT", "QUEUES"))
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--asgi", nargs=2, action="append", default=[], metavar=("IMPORT_PATH", "UNIT"))
    parser.add_argument("--celery", nargs=1, action="append", default=[], metavar="UNIT")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    options = arguments(argv)
    if options.load:
        failure = load(options)
        if failure is None:
            print(
                "loads: "
                + ", ".join([*(path for path, _ in options.asgi), *(["the Celery app"] if options.celery else [])])
            )
            return 0
        print(failure.problem)
        print(f"UNIT={failure.unit}")
        return 1
    failure = check(options)
    if failure is None:
        passed = [f"{len(options.unit)} units active"]
        passed += [f"{url} answers" for url, _, _ in options.web]
        passed += [f"the worker answers and consumes {queues}" for _, _, queues in options.worker]
        print("healthy: " + "; ".join(passed))
        return 0
    print(failure.problem)
    print(f"UNIT={failure.unit}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
