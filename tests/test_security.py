"""
Least privilege, on both topologies: every unit we own is sandboxed and its exposure score
(``systemd-analyze security``) is no worse than the one recorded here and in docs/security.md; every
listening socket is on loopback or the host's private address; no secret appears in any
deploy's output; every file on a host that holds a secret is one we expect, with mode 0640 and
the right owners.
"""

from __future__ import annotations

import re

import pytest
import requests

from bench import LABEL, Cluster
from bench.topologies import WRITABLE_PATH
from clients import APP, REPORT, task_result, web_url

pytestmark = pytest.mark.bench

#: Exposure (0 = locked down, 10 = unprotected) measured on Debian 12's systemd 252; a change
#: that makes a unit worse fails here. docs/security.md shows the same figures.
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


def test_a_task_that_sets_its_priority_and_affinity_gets_an_error_from_the_sandbox_not_a_kill(deployed: Cluster):
    """The sandbox denies the calls that set a process's priority or CPU affinity (@resources),
    which thread pools and native libraries make: the call fails with EPERM and the task goes
    on. Without SystemCallErrorNumber the kernel would kill the pool process with SIGSYS at
    every delivery of the task (tried on the bench: see docs/security.md)."""
    web = deployed.one("web")
    response = requests.post(web_url(web, "/tasks"), json={"n": 10, "tune_process": True}, timeout=15)
    assert response.status_code == 202, response.text
    body = task_result(web, response.json()["id"])
    assert (body["state"], body["executions"]) == ("SUCCESS", 1), body
    assert body["result"]["tuned"] == {"nice": "EPERM", "sched_setaffinity": "EPERM"}, body


def test_the_application_writes_into_its_writable_paths_and_nowhere_else(deployed: Cluster):
    """A task writes into the directory of ``app_writable_paths`` (created owned by the app
    user), and fails with EROFS in a directory the app user owns that the setting does not
    list: the sandbox, not file permissions, is what keeps the rest of the system read-only."""
    web, worker = deployed.one("web"), deployed.one("workers")
    unlisted = f"/srv/{APP}-unlisted"
    worker.exec(f"install -d -o {APP} -g {APP} -m 0750 {unlisted}")
    try:
        directories = [WRITABLE_PATH, unlisted, f"/opt/{APP}"]
        response = requests.post(web_url(web, "/tasks"), json={"n": 10, "write_into": directories}, timeout=15)
        assert response.status_code == 202, response.text
        task = response.json()["id"]
        body = task_result(web, task)
        assert body["state"] == "SUCCESS", body
        assert body["result"]["written"] == {WRITABLE_PATH: "written", unlisted: "EROFS", f"/opt/{APP}": "EROFS"}, body
        owner = worker.exec(f"stat -c '%U:%G %a' {WRITABLE_PATH} {WRITABLE_PATH}/{task}").split("\n")
        assert owner[:2] == [f"{APP}:{APP} 750", f"{APP}:{APP} 600"], owner
    finally:
        worker.exec(f"rm -rf {unlisted} {WRITABLE_PATH}/*")


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
    return (address, port) in reachable_among(source, [(address, port)])


#: Probes every target at once from inside a container: a dropped SYN waits out its timeout,
#: so one by one would take minutes. Prints the targets that accept a connection.
PROBE = """
import socket, sys, concurrent.futures as futures
targets = [(a, int(p)) for a, p in (t.split(":") for t in sys.argv[1:])]
def opens(target):
    try:
        socket.create_connection(target, timeout=2).close()
        return True
    except OSError:
        return False
with futures.ThreadPoolExecutor(64) as pool:
    for target, ok in zip(targets, pool.map(opens, targets)):
        if ok:
            print(f"{target[0]}:{target[1]}")
"""


def reachable_among(source, targets: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """The ``(address, port)`` of ``targets`` that ``source`` (a container) can connect to."""
    code, output = source.exec_run(["python3", "-c", PROBE, *(f"{a}:{p}" for a, p in targets)])
    assert code == 0, output.decode(errors="replace")
    return {(address, int(port)) for address, port in (line.split(":") for line in output.decode().split())}


def listening_ports(host) -> set[int]:
    """TCP ports ``host`` listens on beyond loopback."""
    ports = set()
    for line in host.exec("ss -Hltn").splitlines():
        address, _, port = line.split()[3].rpartition(":")
        if not (address.startswith("127.") or address == "[::1]"):
            ports.add(int(port))
    return ports


def test_firewall_opens_each_port_only_to_the_groups_that_use_it(deployed: Cluster):
    """From a container on the same network in no group, every TCP port every host listens
    on is probed: only the web port (the service itself) and sshd (which the table leaves
    alone) answer. From the hosts whose groups use a service, that service's port does; the
    tests themselves reach everything from this machine, the admin source."""
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
        listening = {(host.address, port) for host in deployed.hosts.values() for port in listening_ports(host)}
        public = {(host.address, 22) for host in deployed.hosts.values()} | {
            (web.address, 8000) for web in deployed.by_group("web")
        }
        assert public <= listening
        assert len(listening - public) >= 10, f"too few ports to prove anything: {sorted(listening)}"
        assert reachable_among(outsider, sorted(listening)) == public
        used = [
            (app, (data.address, 5432)),
            (app, (data.address, 5672)),
            (app, (data.address, 6379)),
            (monitor, (app.address, 9100)),
            (monitor, (app.address, 5555)),
            (monitor, (app.address, 8000)),
            (monitor, (data.address, 15692)),
            (monitor, (data.address, 9121)),
            (monitor, (data.address, 9187)),
        ]
        for source, target in used:
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
    # The backup repository's passphrase, where the repository is (tasks/backup.py).
    if "backup" in host.groups or ("postgres" in host.groups and not cluster.by_group("backup")):
        files["/etc/pgbackrest/conf.d/50-stack.conf"] = ("640", "postgres", "postgres")
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
