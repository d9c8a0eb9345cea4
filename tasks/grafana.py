"""
Grafana on the monitoring host: from Grafana's official APT repository (its URL and signing key
are settings, so a mirror works), or from a local .deb; nothing with ``grafana = "none"``.

Debian's own files stay as packaged: our settings (private address, port, the admin password
from STACK_GRAFANA_ADMIN_PASSWORD) are environment variables in a 0640 file that a unit drop-in
adds. The Prometheus datasource (uid ``prometheus``) and the dashboards shipped in
``files/grafana/dashboards`` are provisioned from files, so every dashboard's datasource
reference resolves with no import step.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

import settings
from tasks import FILES_DIR, packaged_service, render
from tasks.service import Port, Run, Service

KEYRING = "/etc/apt/keyrings/grafana.asc"
PROVISIONING = "/etc/grafana/provisioning"
DASHBOARDS = "/etc/grafana/dashboards/stack"
SHIPPED_DASHBOARDS = FILES_DIR / "grafana" / "dashboards"
UNIT = "grafana-server"


def repository_line(config: settings.Settings) -> str:
    """The APT source of Grafana, trusted for its own signing key only."""
    return f"deb [signed-by={KEYRING}] {config.grafana_apt_repository} stable main"


def _install(config: settings.Settings) -> None:
    if config.grafana == "deb":
        package = "/var/cache/stack/grafana.deb"
        files.put(
            name="Upload the Grafana package (grafana_deb)",
            src=str(Path(config.grafana_deb).expanduser()),
            dest=package,
            create_remote_dir=True,
        )
        apt.deb(name="Install Grafana from grafana_deb", src=package)
        return
    files.directory(name="Create apt's directory of repository keys", path="/etc/apt/keyrings", mode="0755")
    key = files.download(
        name="Download the signing key of Grafana's APT repository",
        src=config.grafana_apt_key_url,
        dest=KEYRING,
        mode="0644",
    )
    source = apt.repo(name="Add Grafana's APT repository", src=repository_line(config), filename="grafana")
    apt.update(name="Refresh apt's package lists for Grafana's repository", _if=any_changed(key, source))
    apt.packages(name="Install Grafana", packages=["grafana"], no_recommends=True)


def _provision(what: str, template: str, kind: str, **context: Any) -> OperationMeta:
    """One of Grafana's provisioning files: ``<provisioning>/<kind>/stack.yaml``."""
    return files.put(
        name=f"Provision {what}",
        src=render(f"grafana/{template}.yaml.j2", **context),
        dest=f"{PROVISIONING}/{kind}/stack.yaml",
        user="root",
        group="grafana",
        mode="0640",
    )


@deploy("Grafana")
def grafana_server(run: Run) -> None:
    config, secrets, address = run.node.config, run.secrets, run.node.address
    _install(config)
    prometheus = f"{address}:{config.prometheus_port}"
    environment = files.put(
        name="Write Grafana's settings (private address, admin password)",
        src=render(
            "grafana/grafana.env.j2",
            address=address,
            port=config.grafana_port,
            admin_password=secrets.grafana_admin_password,
        ),
        dest="/etc/grafana/stack.env",
        user="root",
        group="grafana",
        mode="0640",
    )
    dropin = files.put(
        name="Make grafana-server read our settings",
        src=StringIO("# Managed by the deploy.\n[Service]\nEnvironmentFile=/etc/grafana/stack.env\n"),
        dest=f"/etc/systemd/system/{UNIT}.service.d/60-stack-environment.conf",
        mode="0644",
    )
    systemd.daemon_reload(name="Reload systemd after Grafana's drop-in changed", _if=dropin.did_change)
    changes = [
        environment,
        dropin,
        _provision("the Prometheus datasource (uid prometheus)", "datasource", "datasources", prometheus=prometheus),
        _provision("the stack's dashboards folder", "dashboards", "dashboards", path=DASHBOARDS),
        files.sync(
            name="Install the stack's dashboards",
            src=str(SHIPPED_DASHBOARDS),
            dest=DASHBOARDS,
            user="root",
            group="grafana",
            mode="0644",
            dir_mode="0755",
            delete=True,
        ),
    ]
    packaged_service(run, "Grafana", UNIT, changes)


SERVICE = Service(
    name="grafana",
    groups=("monitoring",),
    when=lambda node: node.config.grafana != "none",
    # curl fetches the repository's signing key (files.download).
    packages=lambda node: ["curl"] if node.config.grafana == "apt" else [],
    units=lambda node: [f"{UNIT}.service"],
    ports=lambda node: [Port(node.config.grafana_port, "Grafana")],
    deploy=grafana_server,
)
