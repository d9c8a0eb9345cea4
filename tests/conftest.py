"""
Session fixtures of the bench, in Molecule's order: create → converge → idempotence → verify
→ destroy. Each topology is deployed once per session and shared by the tests that only read
it; destructive suites (tests/faults) converge hosts of their own with ``converge``. Containers
are removed at the end even when a test fails, and a failing test prints ``systemctl --failed``
and the journals of the failed (and systemd-restarted) units of every topology it used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench import Cluster, ensure_base_image
from bench.fakes import SECRET_VARIABLES
from bench.receiver import AlertReceiver
from bench.topologies import SHARED, TOPOLOGIES, bench_settings
from settings import SECRETS_FILE_VARIABLE, validate


@pytest.fixture
def no_secrets_file(monkeypatch, tmp_path):
    """No secret but those a test sets: no secrets file, none of the deploy's variables, and
    the run-once validation forgotten."""
    monkeypatch.setenv(SECRETS_FILE_VARIABLE, str(tmp_path / "absent.env"))
    for variable in SECRET_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    validate.cache_clear()


@pytest.fixture(scope="session")
def base_image() -> str:
    return ensure_base_image()


@pytest.fixture(scope="session")
def converge(base_image, tmp_path_factory):
    """``converge(name, topology, idempotence=True, arguments=(), secrets=None, pip_cache=True,
    **settings)``: a context manager that creates the containers of ``topology``, deploys with
    ``settings``, extra pyinfra ``arguments`` and extra ``secrets`` in the environment (and,
    with ``idempotence``, deploys again), yields the cluster and destroys it, whatever
    happened. ``pip_cache=False`` keeps the bench's wheelhouse out of its containers."""

    @contextmanager
    def converged(
        name: str,
        topology: dict,
        idempotence: bool = True,
        arguments=(),
        secrets=None,
        pip_cache: bool = True,
        **settings: str,
    ) -> Iterator[Cluster]:
        cluster = Cluster(topology, base_image, tmp_path_factory.mktemp(name), data=bench_settings(**settings))
        cluster.pip_cache = pip_cache
        cluster.name = name
        cluster.arguments = list(arguments)
        cluster.secrets.update(secrets or {})
        try:
            cluster.create()
            cluster.data.setdefault("firewall_admin_sources", cluster.gateway)
            if any("monitoring" in groups for groups in topology.values()):
                # Alertmanager's webhook: this process, on the cluster network's gateway.
                cluster.receiver = AlertReceiver(cluster.gateway)
                cluster.data["alert_webhook_url"] = cluster.receiver.url
            fresh = cluster.deploy()
            if fresh.returncode == 0 and idempotence:
                cluster.deploy()
            TIMINGS.append(
                f"{name}: {len(cluster.hosts)} host(s), fresh deploy {cluster.runs[0].seconds:.1f}s"
                + (f", no-op re-run {cluster.runs[1].seconds:.1f}s" if len(cluster.runs) > 1 else "")
            )
            yield cluster
        finally:
            cluster.destroy()
            if cluster.receiver:
                cluster.receiver.close()

    return converged


@pytest.fixture(scope="session", params=SHARED)
def deployed(request, converge) -> Cluster:
    """A topology, created and converged, then deployed a second time (the idempotence run)."""
    with converge(request.param, TOPOLOGIES[request.param]) as cluster:
        yield cluster


TIMINGS: list[str] = []
#: Seconds spent per module and shared topology (setup, call and teardown of its tests): how
#: bench/streams.py's streams are balanced.
SPENT: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Add a test's setup, call or teardown time to its module's (and shared topology's) sum."""
    module = report.nodeid.split("::")[0]
    shared = [name for name in SHARED if name in report.nodeid]
    key = f"{module} [{shared[0]}]" if shared else module
    SPENT[key] = SPENT.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Time per module, measured deploy times of the session, and the fault suite's table, for the record."""
    spent = sorted(((seconds, key) for key, seconds in SPENT.items() if seconds >= 6), reverse=True)
    if spent:
        terminalreporter.section("time per module and shared topology (over 0.1 min)")
        for seconds, key in spent:
            terminalreporter.write_line(f"{seconds / 60:6.1f} min  {key}")
    if TIMINGS:
        terminalreporter.section("deploy timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)
    from clients import REPORT
    from faults.harness import OUTCOMES, table

    if REPORT:
        terminalreporter.section("measured")
        for line in REPORT:
            terminalreporter.write_line(line)

    if OUTCOMES:
        terminalreporter.section("what survives what (tests/faults)")
        terminalreporter.write_line(table(OUTCOMES))
        for outcome in OUTCOMES:
            for note in outcome.notes:
                terminalreporter.write_line(f"{outcome.fault}: {note}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed test, print what systemd says about the hosts of the clusters it used."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster) and value.hosts:
                report.sections.append((f"systemd on {value.name}", value.diagnostics()))
