"""
The health gate: a deploy that exits 0 means the application works on every application host.

After the application tier's units are written and (re)started, each application host runs
``<app>-check`` (templates/app/check.sh.j2 around files/check/stack_check.py): its units
active, a web host answering ``app_health_path`` (and ``app_metrics_path``, which the monitoring
host scrapes, when there is one) with a 2xx through its own socket, a worker
answering a Celery ping through the broker and consuming each of its queues, all within
``app_health_timeout_seconds``. When this run started, restarted or reloaded a unit on the host,
the checks must also hold ``SETTLE_SECONDS`` later with no unit's main process replaced, so a
service that starts and then dies (a Celery worker whose app fails at start, a Gunicorn master
that halts once its new workers fail to boot) fails the gate.

A failing gate fails the deploy on that host with the check's words: the host, what failed,
the unit and the last lines of its journal. When this run switched the host to a new release
(tasks/app_releases.py) and the host ran another one before, the gate first switches it back
to that one, restarts the units that run it and checks them again, and says how that went. A
passing gate changes nothing: the operation yields no command, so a re-run that changes nothing
still reports zero changes, and a re-run against an application that broke since still fails.

Before a switch, ``loads`` has the new release import the ASGI app and the Celery app (``<app>
-check``'s ``--load``), so a release that cannot even start never replaces the running one.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.context import state
from pyinfra.operations import files, server

from tasks import render, shipped_file
from tasks.app_releases import Layout
from tasks.service import Node

#: Seconds the checks must keep passing, with no unit restarting, after this run (re)started one.
SETTLE_SECONDS = 5
#: Beyond the settings' timeout and the settle time: the last attempt's own time, and margin.
DEADLINE_MARGIN_SECONDS = 30


@dataclass(frozen=True)
class Subject:
    """What the gate checks on a host, named as the application tier names it: the host's
    application units, its Gunicorn unit (None without the web role), its Celery worker's unit
    (None without the workers role) and that worker's Celery node name (``%H``: the host name)."""

    units: list[str]
    web_unit: str | None
    worker_unit: str | None
    worker_node: str
    #: The unit that loads the Celery app's task modules here (the worker; else beat, else Gunicorn).
    celery_unit: str | None = None


@dataclass(frozen=True)
class SwitchBack:
    """How a failing gate returns the host to the release it ran before: that release's id, the
    command that switches to it, and the units that run it (restarted after the switch)."""

    release: str
    command: str
    units: list[str]

    def script(self, app: str) -> str:
        """Switch back, restart the units, check again (letting them settle) and say so."""
        back = f"{self.command} && systemctl restart {' '.join(self.units)}"
        return (
            f"if ! {{ {back}; }}; then echo 'Switching back to the release {self.release} failed.'; "
            f"elif report=$({tool(app)} --settle {SETTLE_SECONDS} 2>&1); then "
            f"echo 'Switched back to the release {self.release}, which this host ran before: it works (its health gate passed).'; "
            f"else printf 'Switched back to the release {self.release}, which this host ran before: it fails its health gate too:\\n%s\\n' \"$report\"; fi"
        )


@dataclass(frozen=True)
class Verdict:
    """What ``<app>-check`` said: whether it passed, and its words."""

    passed: bool
    report: str


class Health(FactBase):
    """The verdict of ``<app>-check`` on this host, run now (it waits up to its timeout)."""

    def command(self, tool: str, settle: int) -> str:
        settling = f" --settle {settle}" if settle else ""
        return f"{tool}{settling} 2>&1; echo stack-check-exit=$?"

    def process(self, output: list[str]) -> Verdict:
        passed = bool(output) and output[-1] == "stack-check-exit=0"
        return Verdict(passed, "\n".join(output[:-1]))


def tool(app: str) -> str:
    return f"/usr/local/sbin/{app}-check"


def check_arguments(node: Node, subject: Subject) -> list[str]:
    """What ``stack_check`` checks on ``node``: the ``subject``'s units, the web's health path
    and, when a monitoring host scrapes it, its metrics path, through the socket's loopback
    address (each named by its setting), the worker (by its node name) and its queues."""
    config = node.config
    arguments = ["--timeout", str(config.app_health_timeout_seconds)]
    for unit in subject.units:
        arguments += ["--unit", unit]
    if subject.web_unit:
        paths = {"app_health_path": config.app_health_path}
        if node.monitored:  # only a monitoring host reads the metrics
            paths["app_metrics_path"] = config.app_metrics_path
        for setting, path in paths.items():
            if path:
                arguments += ["--web", f"http://127.0.0.1:{config.web_port}{path}", subject.web_unit, setting]
    if subject.worker_unit:
        arguments += ["--worker", subject.worker_node, subject.worker_unit, config.celery_queues]
    return arguments


def load_arguments(node: Node, subject: Subject) -> list[str]:
    """What ``stack_check --load`` imports on ``node`` before a switch: the ASGI app on a web
    host, the Celery app with its task modules wherever a unit loads them."""
    arguments = ["--load"]
    if subject.web_unit:
        arguments += ["--asgi", node.config.asgi_app, subject.web_unit]
    if subject.celery_unit:
        arguments += ["--celery", subject.celery_unit]
    return arguments


#: Seconds importing a release's ASGI and Celery apps may take before a switch.
LOAD_SECONDS = 120


def loads(node: Node, subject: Subject, release: str, python: str, workdir: str) -> None:
    """Before the host switches to ``release``: fail the deploy unless that release's ASGI app
    and Celery app import, run by its ``python`` in its ``workdir`` as the application's user
    with its environment. The running release is untouched, so an application that cannot
    start never receives a request (the gate after the switch catches what fails later)."""
    config = node.config
    app, home = config.app_name, config.app_home
    arguments = " ".join(shlex.quote(argument) for argument in load_arguments(node, subject))
    said = (
        f"{host.name}: the release {release} does not load on this host (checked before switching to it; "
        "the running release keeps serving):"
    )
    load = (
        f"cd {workdir} && set -a && . /etc/{app}/app.env && set +a && export PYTHONPATH={home}/lib STACK_CELERY_ROLE=web "
        f"&& timeout --kill-after=5 {LOAD_SECONDS} runuser -u {app} -- {python} -m stack_check {arguments}"
    )
    server.shell(
        name=f"Check that the release {release} loads before switching to it",
        commands=[
            f"report=$({load} 2>&1) || {{ printf '%s\\n' {shlex.quote(said)} \"$report\" | grep -v '^UNIT=' >&2; exit 1; }}"
        ],
    )


def install(node: Node, subject: Subject, workdir: str) -> None:
    """Install ``stack_check.py`` beside the deploy's other modules and ``<app>-check``.

    Not one of the application's ``LIBRARIES``: no unit loads it, so a change to it restarts
    nothing."""
    config = node.config
    app, home = config.app_name, config.app_home
    files.put(
        name="Install the deploy's health check (stack_check.py)",
        src=shipped_file("check/stack_check.py"),
        dest=f"{home}/lib/stack_check.py",
        user="root",
        group=app,
        mode="0644",
    )
    deadline = config.app_health_timeout_seconds + SETTLE_SECONDS + DEADLINE_MARGIN_SECONDS
    files.put(
        name=f"Install {app}-check, which checks that the application works on this host",
        src=render(
            "app/check.sh.j2",
            app=app,
            home=home,
            venv=Layout(home).current_venv,
            workdir=workdir,
            deadline=deadline,
            arguments=" ".join(shlex.quote(argument) for argument in check_arguments(node, subject)),
        ),
        dest=tool(app),
        mode="0755",
    )


@operation()
def passes(app: str, settle: Callable[[], bool], back: SwitchBack | None = None):
    """
    Fail the deploy on this host unless ``<app>-check`` passes, with ``--settle`` when
    ``settle()`` says this run (re)started a unit here; first switch ``back`` to the release
    the host ran before, if given (this run switched it to a new one).

    The check runs when the operation runs, after the units' restarts (operations are planned
    before any runs, when the check would only see the host as it was); it yields a command
    only to fail, so a gate that passes is no change.
    """
    if not state.is_executing:
        return
    verdict = host.get_fact(Health, tool=tool(app), settle=SETTLE_SECONDS if settle() else 0)
    if verdict.passed:
        return
    said = f"{host.name}: the application does not work after this deploy (the health gate):\n{verdict.report}"
    if back is not None:
        yield StringCommand(
            "{", "printf '%s\\n'", shlex.quote(said), ";", back.script(app), ";", "}", ">&2", ";", "exit", "1"
        )
        return
    yield StringCommand("printf '%s\\n'", shlex.quote(said), ">&2", "&&", "exit", "1")
