"""
An interrupted deploy: pyinfra is killed (SIGKILL, as a dropped laptop or a ^C'd terminal) in
the middle of a fresh all-in-one deploy, while apt installs the packages; a re-run then reaches
the same state as the uninterrupted deploy of the shared all-in-one topology (same files with
the same modes, owners and contents, addresses aside; same units enabled and active; same
Python packages), the run after it changes nothing, and a task travels end to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from bench import PROJECT_DIR, Cluster
from bench.topologies import TOPOLOGIES, bench_settings
from clients import MANAGED_UNITS, RELEASE, check_task_end_to_end, wait_until
from tasks import registry

pytestmark = pytest.mark.bench

KILL_AFTER = "Install the packages of this host's roles"
KILL_DELAY_SECONDS = 15
#: Everything the deploy writes outside the services' data (venvs compared by `pip freeze`).
ROOTS = (
    "/etc/stackapp /opt/stackapp /etc/redis /etc/rabbitmq /etc/postgresql /etc/prometheus /etc/default "
    "/etc/systemd/system /usr/local/share/ca-certificates /etc/apt/apt.conf.d /etc/nftables-stack.nft"
)
PRUNED = ("/opt/stackapp/venvs", "/opt/stackapp/flower", "/etc/systemd/system/*.wants")
#: Files that hold secrets: their contents differ between two clusters by design.
SECRET_FILES = {
    "/etc/stackapp/app.env",
    "/etc/stackapp/flower.env",
    "/etc/redis/stack.conf",
    "/etc/default/prometheus-redis-exporter",
}


def state(cluster: Cluster) -> dict[str, object]:
    """What the deploy made of the one host of ``cluster``, with its own and the gateway's
    addresses replaced, so that two clusters compare."""
    host = next(iter(cluster.hosts.values()))
    # The releases other than the current one: those the shared cluster's earlier tests left.
    current = host.exec("readlink /opt/stackapp/current").strip().removeprefix("releases/")
    others = [f"/opt/stackapp/releases/{r}" for r in host.exec("ls /opt/stackapp/releases").split() if r != current]
    prune = " -o ".join(f"-path '{path}'" for path in [*PRUNED, *others])
    listing = host.exec(f"find {ROOTS} \\( {prune} \\) -prune -o -printf '%p %y %m %u:%g\\n' | sort")
    checksums = []
    for line in listing.splitlines():
        path, kind = line.split()[:2]
        if kind == "f" and path not in SECRET_FILES:
            digest = host.exec(
                f"sed -e 's/{host.address}/ADDRESS/g' -e 's/{cluster.gateway}/GATEWAY/g' '{path}' | sha256sum"
            )
            checksums.append(f"{path} {digest.split()[0]}")
    units = sorted(unit for units in MANAGED_UNITS.values() for unit in units)
    return {
        "files": listing.splitlines(),
        "contents": checksums,
        "units": host.exec(f"systemctl is-enabled {' '.join(units)}; systemctl is-active {' '.join(units)}").split(),
        "packages": host.exec("/opt/stackapp/current/venv/bin/pip freeze --all").split(),
    }


#: Packages of the all-in-one host's roles on the bench's release: the transaction the kill interrupts.
ROLE_PACKAGES = " ".join(registry.packages_of(tuple(TOPOLOGIES["all-in-one"]["aio"]), RELEASE))


def apt_work_pending(host) -> str:
    """What apt and dpkg had not finished when pyinfra died: a package manager still running
    on the host (the deploy's apt may outlive its SSH session), packages dpkg left unpacked or
    half-configured, or role packages not installed yet; empty when the install was complete."""
    running = host.exec("pgrep -a -x 'apt-get|apt|dpkg' || true").strip()
    audit = host.exec("dpkg --audit || true").strip()
    missing = host.exec(
        f"for p in {ROLE_PACKAGES}; do dpkg-query -W -f='${{db:Status-Status}}' $p 2>/dev/null | grep -qx installed "
        '|| echo "$p not installed"; done'
    ).strip()
    return "\n".join(part for part in (running, audit, missing) if part)


@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_killed_deploy_then_rerun_reaches_the_same_state(deployed: Cluster, base_image, tmp_path):
    cluster = Cluster(TOPOLOGIES["all-in-one"], base_image, tmp_path, data=bench_settings())
    cluster.name = "interrupted"
    try:
        cluster.create()
        # The same settings as the shared topology's, on this network (no receiver listens here).
        webhook = deployed.data["alert_webhook_url"].replace(deployed.gateway, cluster.gateway)
        cluster.data.update(firewall_admin_sources=cluster.gateway, alert_webhook_url=webhook)
        process = subprocess.Popen(
            cluster.command(),
            cwd=PROJECT_DIR,
            env=cluster.environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for line in process.stderr:
            if KILL_AFTER in line:
                break
        time.sleep(KILL_DELAY_SECONDS)
        assert process.poll() is None, "the deploy ended before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert apt_work_pending(cluster.one("postgres")), (
            "the kill landed after apt had finished: nothing was cut short"
        )

        rerun = cluster.deploy()
        assert rerun.returncode == 0, rerun.stderr[-6000:]
        again = cluster.deploy()
        assert again.returncode == 0 and again.changed == [], again.changed
        wait_until(lambda: cluster.active(MANAGED_UNITS), timeout=60)
        check_task_end_to_end(cluster)
        assert state(cluster) == state(deployed)
    finally:
        cluster.destroy()
