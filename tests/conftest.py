"""
Session fixtures of the bench, in Molecule's order: create → converge → idempotence → verify
→ destroy. Each topology is deployed once per session and shared by the tests that only read
it; destructive suites (tests/faults) converge hosts of their own with ``converge``. Containers
are removed at the end even when a test fails, and a failing test prints ``systemctl --failed``
and the journals of the failed (and systemd-restarted) units of every topology it used.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import Cluster, ensure_base_image, host_ca_certificates  # noqa: E402
from bench.receiver import AlertReceiver  # noqa: E402

#: Topologies: host name → inventory groups. Same code, one host or several.
TOPOLOGIES = {
    "all-in-one": {"aio": ["redis", "rabbitmq", "postgres", "web", "workers", "beat", "monitoring"]},
    "split": {"data": ["redis", "rabbitmq", "postgres", "monitoring"], "app": ["web", "workers", "beat"]},
}


@pytest.fixture(scope="session")
def base_image() -> str:
    return ensure_base_image()


def bench_settings(**overrides: str) -> dict[str, str]:
    """Settings the bench passes with --data, as a user would on the command line."""
    data = {
        # Beat's heartbeat every 5 s instead of 60, so its test need not wait a minute.
        "beat_heartbeat_seconds": "5",
        # Alerts within seconds rather than minutes, so the alert tests wait little.
        "prometheus_scrape_interval": "5s",
        "prometheus_evaluation_interval": "5s",
        "alert_for": "10s",
        "alertmanager_group_wait": "5s",
        "alertmanager_group_interval": "10s",
        # Grafana's package cannot be obtained on our machines (see tests/test_monitoring.py).
        "grafana": "none",
        # The host firewall on, with this machine (the network's gateway) as the admin source
        # from which the tests reach every service (set once the network exists).
        "firewall": "true",
    }
    certificates = host_ca_certificates()
    if certificates:
        data["extra_ca_certificates"] = ",".join(certificates)
    if os.environ.get("STACK_BENCH_APT_PROXY"):
        data["apt_proxy"] = os.environ["STACK_BENCH_APT_PROXY"]
    return {**data, **overrides}


@pytest.fixture(scope="session")
def converge(base_image, tmp_path_factory):
    """``converge(name, topology, idempotence=True, arguments=(), secrets=None, **settings)``:
    a context manager that creates the containers of ``topology``, deploys with ``settings``,
    extra pyinfra ``arguments`` and extra ``secrets`` in the environment (and, with
    ``idempotence``, deploys again), yields the cluster and destroys it, whatever happened."""

    @contextmanager
    def converged(
        name: str, topology: dict, idempotence: bool = True, arguments=(), secrets=None, **settings: str
    ) -> Iterator[Cluster]:
        cluster = Cluster(topology, base_image, tmp_path_factory.mktemp(name), data=bench_settings(**settings))
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


@pytest.fixture(scope="session", params=sorted(TOPOLOGIES))
def deployed(request, converge) -> Cluster:
    """A topology, created and converged, then deployed a second time (the idempotence run)."""
    with converge(request.param, TOPOLOGIES[request.param]) as cluster:
        yield cluster


TIMINGS: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """Measured deploy times of the session, and the fault suite's table, for the record."""
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
