"""
The optional host firewall (setting ``firewall``): Debian's nftables, with one table of ours,
``inet stack``, that opens each service port of this host only to the inventory groups that
connect to it, as the services declare their ports (tasks/service.py: a scraped port is also
open to the monitoring host; the web port is open to the front hosts when there are some, to
everyone otherwise), and to ``firewall_admin_sources``. Every other port, SSH included, is left
as it was: the table only drops what it knows, so it cannot lock the operator out, and it
never touches the rules of anyone else (Docker's, the distribution's ``/etc/nftables.conf``).

The table is loaded by a oneshot unit of ours at boot and replaced atomically when its file
changes (``nft -f`` applies the whole file in one transaction).
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, systemd

from tasks import render
from tasks.service import Run, Service

RULES = "/etc/nftables-stack.nft"
UNIT = "stack-firewall.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"


def _by_family(addresses: set[str]) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses or networks, sorted."""
    networks = sorted(addresses)
    return [a for a in networks if ":" not in a], [a for a in networks if ":" in a]


def table_file(run: Run) -> StringIO:
    """The nftables file of this host: each filtered port open to the addresses that may
    reach it, the host itself and the admin sources."""
    admins = set(run.node.config.firewall_admin_sources)
    rules = [
        (port, *_by_family(sources | {run.node.address} | admins))
        for port, sources in sorted(run.wiring.allowed_sources(run.node).items())
    ]
    return render("firewall.nft.j2", rules=rules)


@deploy("Firewall")
def firewall(run: Run) -> None:
    config = run.node.config
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
    table = files.put(
        name="Write the firewall's table (each service port open to the groups that use it)",
        src=table_file(run),
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


SERVICE = Service(
    name="firewall",
    # Every host: one whose setting is off has the table of an earlier run removed.
    packages=lambda node: ["nftables"] if node.config.firewall else [],
    units=lambda node: [UNIT] if node.config.firewall else [],
    deploy=firewall,
)
