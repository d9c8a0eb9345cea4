"""
Every service of the stack, in the order a host deploys them. Each is declared once, as
``SERVICE`` in its own task module (tasks/service.py says what a declaration holds); a new
service is one module and its templates, listed here. Everything that connects services is
derived from these declarations by ``Wiring``: packages, firewall rules, scrape jobs, watched
units, the one-server groups of the topology check and the tests' unit lists.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Any

from pyinfra.facts.server import LinuxDistribution

import settings
from tasks import app, backup, base, exporters, firewall, front, grafana, monitoring, postgresql, rabbitmq, redis
from tasks.service import Node, Service, Wiring

SERVICES: tuple[Service, ...] = (
    base.SERVICE,  # first: it installs every other service's packages
    firewall.SERVICE,
    redis.SERVICE,
    rabbitmq.SERVICE,
    postgresql.SERVICE,
    backup.SERVICE,  # after PostgreSQL, whose WAL it archives
    app.SERVICE,  # after the data services it connects to
    front.SERVICE,
    exporters.NODE_EXPORTER,
    exporters.REDIS_EXPORTER,
    exporters.POSTGRES_EXPORTER,
    exporters.FRONT_METRICS,
    monitoring.SERVICE,
    grafana.SERVICE,
)

#: Groups whose service has exactly one server in this deploy.
SINGLE_SERVER_GROUPS = tuple(group for service in SERVICES if service.single for group in service.groups)


def _release(host: Any) -> tuple[str, int]:
    distribution = host.get_fact(LinuxDistribution)
    return distribution["name"], distribution["major"]


@cache
def wiring(inventory: Any) -> Wiring:
    """The wiring of every host of the inventory (once per run: pyinfra reads deploy.py once
    per host)."""
    hosts = list(inventory)
    present = frozenset(group for host in hosts for group in host.groups)
    nodes = tuple(
        Node(
            name=host.name,
            groups=frozenset(host.groups),
            config=settings.for_host(host),
            address=settings.private_address(host),
            inventory_groups=present,
            release=partial(_release, host),
        )
        for host in hosts
    )
    return Wiring(SERVICES, nodes)


def example(
    groups: tuple[str, ...], present: tuple[str, ...], release: tuple[str, int], **config: Any
) -> tuple[Wiring, Node]:
    """A host in exactly ``groups`` on ``release``, in an inventory of ``present`` groups, with
    default settings overridden by ``config``, and the wiring that reads it: what the tests
    expect of a host without deploying one."""
    node = Node(
        groups[0], frozenset(groups), settings.Settings(**config), "192.0.2.1", frozenset(present), lambda: release
    )
    return Wiring(SERVICES, ()), node


def units_by_group(
    groups: tuple[str, ...] = settings.GROUPS, release: tuple[str, int] = ("Debian", 12), **config: Any
) -> dict[str, list[str]]:
    """Group → the units a host in only that group runs, in an inventory of exactly ``groups``
    on ``release``, with default settings overridden by ``config``: what the tests expect."""
    units = {}
    for group in groups:
        wiring, node = example((group,), groups, release, **config)
        units[group] = wiring.units(node)
    return units


def packages_of(groups: tuple[str, ...], release: tuple[str, int], **config: Any) -> list[str]:
    """The Debian packages a host in exactly ``groups`` (and the only host) installs on ``release``."""
    wiring, node = example(groups, groups, release, **config)
    return wiring.packages(node)
