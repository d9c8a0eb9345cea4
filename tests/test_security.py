"""
Least privilege, on both topologies: every unit we own is sandboxed and its exposure score
(``systemd-analyze security``) is no worse than the one recorded here and in README.md; every
listening socket is on loopback or the host's private address; no secret appears in any
deploy's output; every file on a host that holds a secret is one we expect, with mode 0640 and
the right owners.
"""

from __future__ import annotations

import re

import pytest

from bench import LABEL, Cluster
from clients import APP, REPORT

pytestmark = pytest.mark.bench

#: Exposure (0 = locked down, 10 = unprotected) measured on Debian 12's systemd 252; a change
#: that makes a unit worse fails here. README.md, "Security", shows the same figures.
EXPOSURE = {
    f"{APP}-gunicorn.service": 1.1,
    f"{APP}-worker.service": 1.1,
    f"{APP}-beat.service": 1.1,
    f"{APP}-flower.service": 1.1,
}


def exposure(host, unit: str) -> float:
    output = host.exec(f"systemd-analyze security --no-pager {unit}")
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def test_our_units_are_sandboxed_no_worse_than_recorded(deployed: Cluster):
    measured = {}
    for host in deployed.hosts.values():
        for unit, recorded in EXPOSURE.items():
            if host.status(f"systemctl cat {unit} >/dev/null 2>&1") != 0:
                continue
            measured[unit] = exposure(host, unit)
            assert measured[unit] <= recorded, f"{unit} on {host.name}: exposure {measured[unit]} > recorded {recorded}"
            assert host.exec(f"systemctl is-active {unit}").strip() == "active", (host.name, unit)
    assert set(measured) == set(EXPOSURE), f"units not found: {set(EXPOSURE) - set(measured)}"
    REPORT.append(
        f"systemd-analyze security ({deployed.name}): " + ", ".join(f"{u} {s}" for u, s in sorted(measured.items()))
    )


#: Listeners on every address: sshd (how pyinfra reaches the host), nginx on the front (the
#: public entry), and Erlang's port mapper
#: and distribution port on RabbitMQ's host, which rabbitmqctl finds through the host's name
#: (whatever address that resolves to), so they cannot be bound to one address; the firewall
#: closes them to every other host (test_firewall_opens_each_port_only_to_the_groups_that_use_it).
ANY_ADDRESS_PORTS = {"all": {22}, "rabbitmq": {4369, 25672}, "front": {80}}


def test_every_listening_socket_is_on_loopback_or_the_private_address(deployed: Cluster):
    for host in deployed.hosts.values():
        allowed = set().union(*(ports for group, ports in ANY_ADDRESS_PORTS.items() if group in ("all", *host.groups)))
        exposed = []
        for line in host.exec("ss -Hltnu").splitlines():
            local = line.split()[4]
            address, _, port = local.rpartition(":")
            address = address.strip("[]").split("%")[0]
            if address in ("::1", host.address) or address.startswith("127.") or int(port) in allowed:
                continue
            exposed.append(local)
        assert exposed == [], f"{host.name} listens beyond loopback and {host.address}: {exposed}"


def reachable(source, address: str, port: int) -> bool:
    """Whether a TCP connection from ``source`` (a container) to ``address:port`` opens."""
    code, _ = source.exec_run(
        ["python3", "-c", f"import socket; socket.create_connection(('{address}', {port}), timeout=2)"]
    )
    return code == 0


def test_firewall_opens_each_port_only_to_the_groups_that_use_it(deployed: Cluster):
    """From a container on the same network in no group, only the web port answers; from the
    hosts whose groups use a service, that service's port does; the tests themselves reach
    everything from this machine, the admin source."""
    outsider = deployed.client.containers.run(
        deployed.image,
        ["sleep", "infinity"],
        name=f"{deployed.id}-outsider",
        network=deployed.id,
        labels={LABEL: deployed.id},
        detach=True,
    )
    try:
        data, app, monitor = deployed.one("postgres"), deployed.one("web"), deployed.one("monitoring")
        closed = {
            (data.address, 5432),
            (data.address, 6379),
            (data.address, 5672),
            (data.address, 4369),
            (data.address, 25672),
            (data.address, 15692),
            (app.address, 9100),
            (app.address, 5555),
            (monitor.address, 9090),
            (monitor.address, 9093),
        }
        opened_to_outsider = sorted(target for target in closed if reachable(outsider, *target))
        assert opened_to_outsider == [], f"a host in no group reaches {opened_to_outsider}"
        assert reachable(outsider, app.address, 8000)  # the web port is the service itself
        for source, target in (
            (app, (data.address, 5432)),
            (app, (data.address, 5672)),
            (monitor, (app.address, 9100)),
            (monitor, (app.address, 5555)),
            (monitor, (data.address, 15692)),
        ):
            assert reachable(source.container, *target), f"{source.name} cannot reach {target}, which its group uses"
        if app.address != monitor.address:
            assert not reachable(app.container, monitor.address, 9090), "an app host reaches Prometheus"
    finally:
        outsider.remove(force=True)


def test_no_secret_appears_in_any_deploy_output(deployed: Cluster):
    """Every pyinfra run of this topology so far (fresh, re-run, and whatever the tests before
    this one ran), stdout and stderr, against every secret's value."""
    assert deployed.runs
    for number, run in enumerate(deployed.runs):
        for name, value in deployed.secrets.items():
            assert value not in run.output, f"{name}'s value is in the output of run {number}"


def expected_secret_files(cluster: Cluster, host) -> dict[str, tuple[str, str, str]]:
    """Path → (mode, user, group) of every file that must hold a secret on ``host``."""
    files = {}
    monitored = bool(cluster.by_group("monitoring"))
    if "redis" in host.groups:
        files["/etc/redis/stack.conf"] = ("640", "redis", "redis")
        if monitored:
            files["/etc/default/prometheus-redis-exporter"] = ("640", "root", "prometheus")
    if any(group in host.groups for group in ("web", "workers", "beat")):
        files[f"/etc/{APP}/app.env"] = ("640", "root", APP)
    if "beat" in host.groups and monitored:
        files[f"/etc/{APP}/flower.env"] = ("640", "root", APP)
    return files


def test_every_file_holding_a_secret_is_expected_and_0640(deployed: Cluster):
    """grep every secret's value across each host's file systems (logs and journals included):
    the files found must be exactly the expected ones, each 0640 with the right owners."""
    patterns = " ".join(f"-e {value}" for value in deployed.secrets.values())
    for host in deployed.hosts.values():
        found = host.exec(f"grep -rlsF {patterns} /etc /opt /var /srv /root /home /tmp /usr/local /run || true").split()
        expected = expected_secret_files(deployed, host)
        assert sorted(found) == sorted(expected), host.name
        for path, owners in expected.items():
            assert tuple(host.exec(f"stat -c '%a %U %G' {path}").split()) == owners, (host.name, path)
