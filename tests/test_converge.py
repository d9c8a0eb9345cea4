"""
Converge and idempotence of the whole deploy, on every topology: the fresh deploy succeeds, the
second run changes nothing (naming any operation that did), and bad input stops a run before
any operation runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import Cluster
from bench.topologies import bench_ca

pytestmark = pytest.mark.bench


@pytest.mark.core
def test_converge_succeeds(deployed: Cluster):
    run = deployed.runs[0]
    assert run.returncode == 0, f"fresh deploy failed:\n{run.stderr[-6000:]}"


@pytest.mark.core
def test_second_run_changes_nothing(deployed: Cluster):
    assert len(deployed.runs) >= 2, "the idempotence run did not happen (the fresh deploy failed)"
    rerun = deployed.runs[1]
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    assert rerun.changed == [], "operations that changed on the re-run:\n" + "\n".join(rerun.changed)
    assert rerun.results["totals"]["no_change"] > 0


def test_missing_secret_stops_the_deploy_before_anything_runs(deployed: Cluster):
    run = deployed.deploy(env=deployed.environment(STACK_RABBITMQ_PASSWORD=""))
    assert run.returncode != 0
    assert "STACK_RABBITMQ_PASSWORD is missing or empty" in run.stderr
    assert "nothing was changed" in run.stderr
    assert "Starting operation" not in run.stderr


def test_files_holding_secrets_are_0640_and_not_world_readable(deployed: Cluster):
    """Every file the deploy writes a secret into: mode 0640, owned by root or the service,
    readable by the group of the service that needs it and by nobody else."""
    expected = {
        "redis": [
            ("/etc/redis/stack.conf", "redis", "redis"),
            ("/etc/default/prometheus-redis-exporter", "root", "prometheus"),
        ],
        "workers": [("/etc/stackapp/app.env", "root", "stackapp")],
        # Alertmanager's configuration holds the SMTP password and Slack webhook when they are set.
        "monitoring": [
            ("/etc/prometheus/alertmanager.yml", "root", "prometheus"),
            ("/etc/prometheus/stack-staged/alertmanager.yml", "root", "prometheus"),
        ],
    }
    for group, paths in expected.items():
        for host in deployed.by_group(group):
            node = host.node
            for path, user, owner_group in paths:
                file = node.file(path)
                assert (file.mode, file.user, file.group) == (0o640, user, owner_group), (host.name, path)


def test_extra_ca_certificates_are_in_every_hosts_trust_store(deployed: Cluster):
    """Every CA of extra_ca_certificates (this machine's extra ones and the bench's own) is
    installed on every host and in the system bundle that apt, curl, Python and pip read."""
    certificates = deployed.data["extra_ca_certificates"].split(",")
    assert str(bench_ca()) in certificates
    for host in deployed.hosts.values():
        bundle = host.exec("cat /etc/ssl/certs/ca-certificates.crt")
        installed = host.exec("ls /usr/local/share/ca-certificates/").split()
        assert len([name for name in installed if name.startswith("stack-")]) == len(certificates), installed
        for path in certificates:
            body = Path(path).read_text().strip().splitlines()
            assert "\n".join(body[1:-1])[:200] in bundle.replace("\r", ""), (host.name, path)
