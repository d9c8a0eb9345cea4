"""
The optional host firewall (setting ``firewall``): Debian's nftables, with one table of ours,
``inet stack``, that opens each service port of this host only to the inventory groups that use
it (and to ``firewall_admin_sources``): the web port only to the front hosts when there are
some, to everyone otherwise. Every other port, SSH included, is left as it was: the
table only drops what it knows, so it cannot lock the operator out, and it never touches the
rules of anyone else (Docker's, the distribution's ``/etc/nftables.conf``).

The table is loaded by a oneshot unit of ours at boot and replaced atomically when its file
changes (``nft -f`` applies the whole file in one transaction).
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, systemd

import settings
from tasks import address, group_hosts, render

PACKAGES = ["nftables"]
RULES = "/etc/nftables-stack.nft"
UNIT = "stack-firewall.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"
#: Erlang's port mapper and RabbitMQ's distribution port: this deploy runs no RabbitMQ cluster,
#: so only the host itself (rabbitmqctl) talks to them.
ERLANG_PORTS = (4369, 25672)


def _addresses(*groups: str) -> set[str]:
    return {settings.private_address(h) for group in groups for h in group_hosts(group)}


def allowed_sources(config: settings.Settings) -> dict[int, set[str]]:
    """Port of this host → the addresses that may reach it (besides the host itself and the
    admin sources); an empty set means only the host itself."""
    roles = set(host.groups)
    app_users = _addresses(*settings.APP_GROUPS)
    monitoring = _addresses("monitoring")
    # The data services are open to the application hosts whichever broker and backend are
    # chosen: while a deploy switches them, the application still uses the old one until its
    # units restart, and a worker's warm shutdown still talks to it.
    rules: dict[int, set[str]] = {}
    if "redis" in roles:
        rules[config.redis_port] = app_users
        rules[config.redis_exporter_port] = monitoring
    if "rabbitmq" in roles:
        rules[config.rabbitmq_port] = app_users
        rules[config.rabbitmq_prometheus_port] = monitoring
        rules.update(dict.fromkeys(ERLANG_PORTS, set()))
    if "postgres" in roles:
        rules[config.postgresql_port] = app_users
        rules[config.postgres_exporter_port] = monitoring
    rules[config.node_exporter_port] = monitoring
    if "beat" in roles:
        rules[config.flower_port] = monitoring
    if "monitoring" in roles:
        for port in (config.prometheus_port, config.alertmanager_port, config.grafana_port):
            rules[port] = set()
    if "web" in roles and group_hosts("front"):
        rules[config.web_port] = _addresses("front")  # clients come through the front
    return rules


def _by_family(addresses: set[str]) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses or networks, sorted."""
    networks = sorted(addresses)
    return [a for a in networks if ":" not in a], [a for a in networks if ":" in a]


@deploy("Firewall")
def firewall() -> None:
    config = settings.for_host(host)
    if not config.firewall:
        if host.get_fact(File, path=UNIT_FILE):
            systemd.service(
                name=f"Stop {UNIT}, which removes its table: the firewall setting is off",
                service=UNIT,
                running=False,
                enabled=False,
            )
            files.file(name=f"Remove the unit {UNIT}", path=UNIT_FILE, present=False)
            systemd.daemon_reload(name="Reload systemd after the firewall unit was removed")
        return
    rules = [
        (port, *_by_family(sources | {address()} | set(config.firewall_admin_sources)))
        for port, sources in sorted(allowed_sources(config).items())
    ]
    table = files.put(
        name="Write the firewall's table (each service port open to the groups that use it)",
        src=render("firewall.nft.j2", rules=rules),
        dest=RULES,
        mode="0644",
    )
    unit = files.put(
        name=f"Write the unit {UNIT}",
        src=render("firewall.service.j2", rules=RULES),
        dest=UNIT_FILE,
        mode="0644",
    )
    systemd.daemon_reload(name="Reload systemd after the firewall unit changed", _if=unit.did_change)
    systemd.service(name=f"Keep {UNIT} enabled and its table loaded", service=UNIT, running=True, enabled=True)
    systemd.service(
        name="Replace the firewall's table atomically with the changed one",
        service=UNIT,
        reloaded=True,
        _if=table.did_change,
    )
