"""
Session fixtures of the bench, in Molecule's order: create → converge → idempotence → verify
→ destroy. Each topology is deployed once per session and shared by the tests that only read
it; containers are removed at the end even when a test fails, and a failing test prints
``systemctl --failed`` and the journal of the failed units of its topology.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import Cluster, ensure_base_image, host_ca_certificates  # noqa: E402

#: Topologies: host name → inventory groups. Same code, one host or several.
TOPOLOGIES = {
    "all-in-one": {"aio": ["redis", "rabbitmq", "postgres", "web", "workers", "beat"]},
    "split": {"data": ["redis", "rabbitmq", "postgres"], "app": ["web", "workers", "beat"]},
}


@pytest.fixture(scope="session")
def base_image() -> str:
    return ensure_base_image()


def bench_settings() -> dict[str, str]:
    """Settings the bench passes with --data, as a user would on the command line."""
    # Beat's heartbeat every 5 s instead of 60, so its test need not wait a minute.
    data = {"beat_heartbeat_seconds": "5"}
    certificates = host_ca_certificates()
    if certificates:
        data["extra_ca_certificates"] = ",".join(certificates)
    if os.environ.get("STACK_BENCH_APT_PROXY"):
        data["apt_proxy"] = os.environ["STACK_BENCH_APT_PROXY"]
    return data


@pytest.fixture(scope="session", params=sorted(TOPOLOGIES))
def deployed(request, base_image, tmp_path_factory) -> Cluster:
    """A topology, created and converged, then deployed a second time (the idempotence run)."""
    name = request.param
    cluster = Cluster(TOPOLOGIES[name], base_image, tmp_path_factory.mktemp(name), data=bench_settings())
    cluster.name = name
    request.node.stash_cluster = cluster
    try:
        cluster.create()
        converge = cluster.deploy()
        if converge.returncode == 0:
            cluster.deploy()
        TIMINGS.append(
            f"{name}: {len(cluster.hosts)} host(s), fresh deploy {cluster.runs[0].seconds:.1f}s"
            + (f", no-op re-run {cluster.runs[1].seconds:.1f}s" if len(cluster.runs) > 1 else "")
        )
        _CLUSTERS.append(cluster)
        yield cluster
    finally:
        _CLUSTERS.remove(cluster) if cluster in _CLUSTERS else None
        cluster.destroy()


_CLUSTERS: list[Cluster] = []
TIMINGS: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """Measured deploy times of the session, for the record."""
    if TIMINGS:
        terminalreporter.section("deploy timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed test, print what systemd says about the hosts of the clusters in use."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for cluster in _CLUSTERS:
            report.sections.append((f"systemd on {cluster.name}", cluster.diagnostics()))
