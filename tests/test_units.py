"""
The unit files we own render to lines systemd reads as meant, with every optional part on and
off (no host needed). Jinja's trim_blocks eats the newline after a block tag: a conditional at
the end of ``ExecStart=`` once glued the next comment to the command line, and the worker
crash-looped on ``--loglevel 'INFO#'``.
"""

from __future__ import annotations

import re

import pytest

from tasks import render
from tasks.app import UNITS

#: Every variable the unit templates read, with a sample value; the optional ones both ways.
CONTEXT = dict(
    app="acme",
    home="/opt/acme",
    venv="/opt/acme/current/venv",
    workdir="/opt/acme/current/src",
    address="192.0.2.10",
    port=8000,
    asgi_app="acme.web:api",
    concurrency=3,
    queues="acme,celery",
    loglevel="INFO",
    stop_timeout=330,
    flower_port=5555,
    worker_node="worker@%H",
)
WRITABLE = ["/srv/acme/uploads", "/var/cache/acme"]
LINE = re.compile(r"^(|#.*|\[[A-Za-z]+\]|[A-Za-z]+=[^#]*)$")


@pytest.mark.parametrize("writable_paths", [[], WRITABLE], ids=["nothing writable", "writable paths"])
@pytest.mark.parametrize("time_limit", [0, 600], ids=["no time limit", "a time limit"])
@pytest.mark.parametrize("unit", UNITS, ids=[unit.suffix for unit in UNITS])
def test_every_line_of_a_unit_is_blank_a_comment_a_section_or_one_directive(unit, time_limit, writable_paths):
    text = render(unit.template, **CONTEXT, time_limit=time_limit, writable_paths=writable_paths).getvalue()
    assert [line for line in text.splitlines() if not LINE.match(line)] == []


@pytest.mark.parametrize("unit", [unit for unit in UNITS if unit.suffix.endswith(".service")], ids=lambda u: u.suffix)
def test_the_applications_services_may_write_the_writable_paths_and_flower_none(unit):
    text = render(unit.template, **CONTEXT, time_limit=0, writable_paths=WRITABLE).getvalue()
    granted = [line.partition("=")[2] for line in text.splitlines() if line.startswith("ReadWritePaths=")]
    assert granted == ([] if unit.suffix == "flower.service" else WRITABLE)


def test_the_worker_has_a_time_limit_only_when_one_is_set():
    def exec_start(time_limit: int) -> list[str]:
        text = render("app/worker.service.j2", **CONTEXT, time_limit=time_limit, writable_paths=[]).getvalue()
        return next(line for line in text.splitlines() if line.startswith("ExecStart=")).split()

    assert "--time-limit" not in exec_start(0)
    command = exec_start(600)
    assert command[command.index("--time-limit") + 1] == "600"
    assert command[-2:] == ["--loglevel", "INFO"]


@pytest.mark.parametrize("unit, role", [("worker", "worker"), ("beat", "beat")])
def test_celery_units_name_their_role_so_they_publish_patiently(unit, role):
    """stack_celery.py gives a process without a role the API's fail-fast publishing: beat
    without its role would drop a periodic run after 2 s of broker outage."""
    text = render(f"app/{unit}.service.j2", **CONTEXT, time_limit=0, writable_paths=[]).getvalue()
    assert f"STACK_CELERY_ROLE={role}" in text.split()
