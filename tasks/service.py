"""
How a service is declared, once, in its own task module, and what the rest of the deploy derives
from the declarations: the packages of a host, its firewall table, Prometheus' scrape jobs,
the units node_exporter watches (whose death alerts), the groups that hold exactly one server
and the tests' unit lists. A port is declared together with the groups that connect to it, so a
port that Prometheus scrapes is open to the monitoring host by construction.

The declarations read hosts through ``Node``: its groups, its resolved settings, its address and
which roles the whole inventory has. ``Wiring`` is the view over every host of the inventory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from settings import Secrets, Settings

#: Clients of a port that anyone may reach (the firewall leaves it open): the web port without a
#: front, the front's port.
ANYONE = None


@dataclass(frozen=True)
class Node:
    """What a declaration reads of one host."""

    name: str
    groups: frozenset[str]
    config: Settings
    address: str
    #: Groups that have at least one host in the whole inventory.
    inventory_groups: frozenset[str]
    #: (distribution, major version) of the host, read only where a declaration needs it.
    release: Callable[[], tuple[str, int]] = field(compare=False, repr=False)

    def has(self, *groups: str) -> bool:
        """Whether this host is in any of ``groups``."""
        return bool(self.groups.intersection(groups))

    @property
    def monitored(self) -> bool:
        """Whether the inventory has a monitoring host (and so every host its exporters)."""
        return "monitoring" in self.inventory_groups


@dataclass(frozen=True)
class Scrape:
    """A Prometheus scrape job served on a port; with ``probe``, a probe of ``path`` on that
    port instead, made by the monitoring host's blackbox exporter (an HTTP GET that must answer
    a 2xx), for a service that serves no metrics of its own."""

    job: str
    path: str | None = None
    params: dict[str, list[str]] | None = None
    probe: bool = False


@dataclass(frozen=True)
class Port:
    """A TCP port a service listens on, and who connects to it: the hosts of ``clients`` (the
    host itself and the admin sources always may), or anyone (``ANYONE``). A port with
    ``scrapes`` is also reached by the monitoring host."""

    number: int
    what: str
    clients: tuple[str, ...] | None = ()
    scrapes: tuple[Scrape, ...] = ()

    @property
    def client_groups(self) -> tuple[str, ...] | None:
        if self.clients is ANYONE:
            return ANYONE
        return (*self.clients, "monitoring") if self.scrapes else self.clients


def _nothing(node: Node) -> list:
    return []


def _always(node: Node) -> bool:
    return True


@dataclass(frozen=True)
class Service:
    """One service of the stack, as its task module declares it.

    It runs on the hosts of any of ``groups`` (every host when empty) for which ``when`` holds;
    ``packages``, ``units`` (the units it owns or watches, each of which alerts when it is not
    active) and ``ports`` are what such a host gets, and ``deploy`` configures it on the
    current host (the application's returns its part of the rolling switch, tasks/rollout.py). A ``single`` service has exactly one server: its group may hold one host."""

    name: str
    #: A ``@deploy`` function of one argument, the ``Run``.
    deploy: Callable[..., Any]
    groups: tuple[str, ...] = ()
    when: Callable[[Node], bool] = _always
    single: bool = False
    packages: Callable[[Node], list[str]] = _nothing
    units: Callable[[Node], list[str]] = _nothing
    ports: Callable[[Node], list[Port]] = _nothing

    def runs_on(self, node: Node) -> bool:
        return (not self.groups or node.has(*self.groups)) and self.when(node)


@dataclass(frozen=True)
class Wiring:
    """The declared services over every host of the inventory."""

    services: tuple[Service, ...]
    nodes: tuple[Node, ...]

    def on(self, node: Node) -> list[Service]:
        """The services ``node`` runs, in deploy order."""
        return [service for service in self.services if service.runs_on(node)]

    def packages(self, node: Node) -> list[str]:
        """Every Debian package of ``node``'s services, sorted (one apt transaction)."""
        return sorted({package for service in self.on(node) for package in service.packages(node)})

    def units(self, node: Node) -> list[str]:
        """Every unit of ``node``'s services: those node_exporter reports and alerts on."""
        return sorted({unit for service in self.on(node) for unit in service.units(node)})

    def ports(self, node: Node) -> list[Port]:
        return [port for service in self.on(node) for port in service.ports(node)]

    def hosts(self, *groups: str) -> list[Node]:
        """The hosts of any of ``groups``, in inventory order."""
        return [node for node in self.nodes if node.has(*groups)]

    def queues(self) -> list[str]:
        """The application's task queues: those any worker host consumes (celery_queues is set
        per worker group), sorted. What the broker's policy, its exporter and the alerts watch."""
        return sorted({queue for node in self.hosts("workers") for queue in node.config.celery_queues.split(",")})

    def addresses(self, groups: Iterable[str]) -> set[str]:
        """Private addresses of the hosts of ``groups``."""
        return {node.address for node in self.hosts(*groups)}

    def allowed_sources(self, node: Node) -> dict[int, set[str]]:
        """Each filtered port of ``node`` → the addresses that may reach it besides the host
        itself and the admin sources (an empty set: nobody else). Ports open to anyone are
        not in it: the firewall leaves them alone."""
        rules: dict[int, set[str]] = {}
        for port in self.ports(node):
            if port.client_groups is ANYONE:
                continue
            rules.setdefault(port.number, set()).update(self.addresses(port.client_groups))
        return rules

    def scrape_jobs(self) -> list[dict]:
        """Prometheus' scrape jobs: every port of every host that declares one, by job (a probe's
        targets are the URLs the blackbox exporter gets)."""
        jobs: dict[str, dict] = {}
        for node in self.nodes:
            for port in self.ports(node):
                for scrape in port.scrapes:
                    job = jobs.setdefault(
                        scrape.job,
                        dict(name=scrape.job, path=scrape.path, params=scrape.params, probe=scrape.probe, targets=[]),
                    )
                    address = f"{node.address}:{port.number}"
                    job["targets"].append((f"http://{address}{scrape.path}" if scrape.probe else address, node.name))
        return list(jobs.values())


@dataclass(frozen=True)
class Run:
    """What every service's deploy gets: the run's secrets, the current host and the wiring
    of the whole inventory."""

    secrets: Secrets
    node: Node
    wiring: Wiring
