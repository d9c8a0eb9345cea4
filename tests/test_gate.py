"""
The health gate without a host: what ``<app>-check`` is told to check on a host of each role
(tasks/gate.py), how the deploy reads its verdict, and ``stack_check``'s web check against a
local HTTP server (passes on a 2xx only, keeps trying until its timeout, names the unit).
The bench proves the gate end to end: test_own_app.py, test_app_tier.py.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import settings
from tasks import app, gate, registry

_spec = importlib.util.spec_from_file_location(
    "stack_check", settings.PROJECT_DIR / "files" / "check" / "stack_check.py"
)
assert _spec and _spec.loader
stack_check = importlib.util.module_from_spec(_spec)
sys.modules["stack_check"] = stack_check  # its dataclass looks its module up
_spec.loader.exec_module(stack_check)

ALL_IN_ONE = ("web", "workers", "beat", "monitoring")


def checks_of(groups: tuple[str, ...], present: tuple[str, ...] = ALL_IN_ONE, **config) -> list[str]:
    _, node = registry.example(groups, present, ("Debian", 13), **config)
    return gate.check_arguments(node, app.gate_subject(node))


def web_checks(arguments: list[str]) -> list[list[str]]:
    return [arguments[i + 1 : i + 4] for i, argument in enumerate(arguments) if argument == "--web"]


def test_a_web_host_checks_its_health_and_metrics_paths_through_loopback_and_its_units():
    arguments = checks_of(
        ("web",), app_name="acme", web_port=8080, app_health_path="/ready?deep=1", app_metrics_path="/prom"
    )
    assert web_checks(arguments) == [
        ["http://127.0.0.1:8080/ready?deep=1", "acme-gunicorn.service", "app_health_path"],
        ["http://127.0.0.1:8080/prom", "acme-gunicorn.service", "app_metrics_path"],
    ]
    assert "--worker" not in arguments
    units = [arguments[i + 1] for i, argument in enumerate(arguments) if argument == "--unit"]
    assert units == ["acme-gunicorn.socket", "acme-gunicorn.service"]


def test_the_metrics_path_is_checked_only_when_set_and_scraped():
    without_metrics = checks_of(("web",), app_metrics_path="")
    unmonitored = checks_of(("web",), present=("web", "workers", "beat"))
    for arguments in (without_metrics, unmonitored):
        assert [check[2] for check in web_checks(arguments)] == ["app_health_path"]


def test_a_worker_host_pings_its_worker_by_the_units_node_name_and_checks_its_queues():
    arguments = checks_of(("workers",), celery_queues="mail,celery", app_health_timeout_seconds=7)
    assert arguments[:2] == ["--timeout", "7"]
    assert arguments[arguments.index("--worker") + 1 :][:3] == ["worker@%H", "stackapp-worker.service", "mail,celery"]
    assert "--web" not in arguments


def test_the_check_tool_passes_its_arguments_quoted():
    arguments = checks_of(("web",), app_health_path="/a?b='c'&d")
    rendered = " ".join(shlex.quote(argument) for argument in arguments)
    assert shlex.split(rendered) == arguments


@pytest.mark.parametrize(
    ("output", "passed"),
    [
        (["healthy: 2 units active", "stack-check-exit=0"], True),
        (["x.service is failed, not active", "stack-check-exit=1"], False),
        (["stack-check-exit=124"], False),  # killed at its deadline
        ([], False),
    ],
)
def test_the_deploy_reads_the_verdict_from_the_exit_status_only(output: list[str], passed: bool):
    verdict = gate.Health().process(output)
    assert verdict.passed is passed
    assert "stack-check-exit" not in verdict.report


class Answers(BaseHTTPRequestHandler):
    """/ok answers 200; /broken 500; /late 503 for the server's first second, then 200."""

    started = time.monotonic()

    def do_GET(self) -> None:
        late = self.path == "/late" and time.monotonic() - self.started < 1
        status = {"/ok": 200, "/broken": 500}.get(self.path, 503 if late else 200)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Answers.started = time.monotonic()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def run_check(capsys, *argv: str) -> tuple[int, list[str]]:
    status = stack_check.main(list(argv))
    return status, capsys.readouterr().out.splitlines()


def test_a_2xx_passes(server, capsys):
    status, said = run_check(
        capsys, "--timeout", "1", "--web", f"{server}/ok", "app-gunicorn.service", "app_health_path"
    )
    assert status == 0 and said[0].startswith("healthy"), said


def test_an_error_answer_fails_naming_the_answer_and_the_unit(server, capsys):
    started = time.monotonic()
    status, said = run_check(
        capsys, "--timeout", "1.5", "--web", f"{server}/broken", "app-gunicorn.service", "app_health_path"
    )
    assert status == 1
    assert said == [
        f"{server}/broken (app_health_path) answered 500 Internal Server Error",
        "UNIT=app-gunicorn.service",
    ]
    assert time.monotonic() - started >= 1.5  # tried until its timeout


def test_a_web_that_comes_up_within_the_timeout_passes(server, capsys):
    status, said = run_check(
        capsys, "--timeout", "10", "--web", f"{server}/late", "app-gunicorn.service", "app_health_path"
    )
    assert status == 0, said


def test_nothing_listening_fails(capsys):
    status, said = run_check(
        capsys, "--timeout", "0", "--web", "http://127.0.0.1:9/", "app-gunicorn.service", "app_health_path"
    )
    assert status == 1 and "did not answer" in said[0] and said[1] == "UNIT=app-gunicorn.service"
