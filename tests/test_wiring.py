"""
The wiring between services, without any host: for several topologies, with the firewall on,
every connection a rendered configuration makes is let through by the rendered firewall of the
host it goes to — Prometheus' scrape targets and Alertmanager (prometheus.yml), the front's
upstreams (nginx's site), the application's broker and result store (its environment file) —
and a host in no group reaches nothing but the public entry.

The configurations are the deploy's own renderings (the same functions its operations upload),
parsed as their programs read them; only the firewall's nftables syntax is parsed by hand.
"""

from __future__ import annotations

import re
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

import settings
from bench.fakes import FakeHost, FakeInventory
from tasks import app, firewall, front, monitoring, registry
from tasks.service import Run

SECRETS = settings.Secrets(
    redis_password="r" * 8 + "0123456789abcdef",
    rabbitmq_password="q" * 8 + "0123456789abcdef",
    postgresql_password="p" * 8 + "0123456789abcdef",
    backup_cipher_pass="b" * 8 + "0123456789abcdef",
)
DATA = ["redis", "rabbitmq", "postgres"]
APP = ["web", "workers", "beat"]
TOPOLOGIES = {
    "all-in-one": {"10.0.0.5": [*DATA, *APP, "monitoring"]},
    "split": {"10.0.0.5": [*DATA, "monitoring"], "10.0.0.6": APP},
    "scale-out": {
        "10.0.0.2": ["front"],
        "10.0.0.5": DATA,
        "10.0.0.9": ["monitoring"],
        "10.0.1.1": ["web"],
        "10.0.1.2": ["web"],
        "10.0.2.1": ["workers", "beat"],
        "10.0.2.2": ["workers"],
    },
    "scale-out, Redis broker and results, monitoring beside the front": {
        "10.0.0.2": ["front", "monitoring"],
        "10.0.0.5": DATA,
        "10.0.1.1": ["web", "beat"],
        "10.0.2.1": ["workers"],
    },
}
#: A host on the same network in no group.
OUTSIDER = "10.9.9.9"


def runs(name: str) -> dict[str, Run]:
    """The run of every host of a topology, firewall on, as deploy.py builds it."""
    data = {"firewall": True, "alert_webhook_url": "http://10.0.0.1/hook", "grafana": "none"}
    if "Redis" in name:
        data.update(celery_broker="redis", celery_result_backend="redis")
    inventory = FakeInventory(FakeHost(address, groups, **data) for address, groups in TOPOLOGIES[name].items())
    wiring = registry.wiring(inventory)
    return {node.address: Run(secrets=SECRETS, node=node, wiring=wiring) for node in wiring.nodes}


def firewall_of(run: Run) -> dict[int, set[str]]:
    """Port → the source addresses the host's rendered table accepts; unfiltered ports absent."""
    allowed: dict[int, set[str]] = {}
    for line in firewall.table_file(run).getvalue().splitlines():
        accept = re.fullmatch(r"\s*tcp dport (\d+) ip6? saddr \{ (.+) \} accept", line)
        if accept:
            allowed.setdefault(int(accept[1]), set()).update(accept[2].split(", "))
        drop = re.fullmatch(r"\s*tcp dport (\d+) drop", line)
        if drop:
            allowed.setdefault(int(drop[1]), set())
    return allowed


def reaches(tables: dict[str, dict[int, set[str]]], source: str, target: str, port: int) -> bool:
    table = tables[target]
    return port not in table or source in table[port]


def target_address(target: str) -> tuple[str, int]:
    """Host and port of a scrape target: ``host:port``, or a probe's URL."""
    if "://" in target:
        url = urlsplit(target)
        return url.hostname or "", url.port or 80
    host, port = target.split(":")
    return host, int(port)


def connections(runs_by_address: dict[str, Run]) -> list[tuple[str, str, int, str]]:
    """(source, target, port, why) of every connection the rendered configurations make."""
    made = []
    for address, run in runs_by_address.items():
        if run.node.has("monitoring"):
            config = yaml.safe_load(monitoring.prometheus_file(run).getvalue())
            for job in config["scrape_configs"]:
                why = f"scrape job {job['job_name']}"
                for static in job["static_configs"]:
                    made += [(address, *target_address(target), why) for target in static["targets"]]
                for relabel in job.get("relabel_configs", []):  # a probe: Prometheus asks the blackbox exporter
                    if relabel["target_label"] == "__address__":
                        made.append((address, *relabel["replacement"].split(":"), f"{why}'s prober"))
            for manager in config["alerting"]["alertmanagers"]:
                made += [
                    (address, *target.split(":"), "Alertmanager") for target in manager["static_configs"][0]["targets"]
                ]
        if run.node.has("front"):
            for upstream in re.findall(r"^\s*server ([\d.]+:\d+)", front.upstream_file(run).getvalue(), re.M):
                made.append((address, *upstream.split(":"), "the front's upstream"))
        if run.node.has(*settings.APP_GROUPS):
            variables = app.environment_variables(run)
            names = run.node.config.app_broker_url_variables + run.node.config.app_result_backend_variables
            for name in names:
                url = urlsplit(variables[name].removeprefix("db+"))
                made.append((address, url.hostname, url.port, name))
    return [(source, target, int(port), why) for source, target, port, why in made]


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_every_connection_a_configuration_makes_is_let_through_by_the_firewall(name):
    runs_by_address = runs(name)
    tables = {address: firewall_of(run) for address, run in runs_by_address.items()}
    made = connections(runs_by_address)
    jobs = {why for *_, why in made if why.startswith("scrape job")}
    expected = ("node", "app", "health", "blackbox", "flower", "prometheus", "alertmanager")
    assert {f"scrape job {job}" for job in expected} <= jobs, jobs
    blocked = [connection for connection in made if not reaches(tables, *connection[:3])]
    assert blocked == [], f"connections the firewall drops: {blocked}"


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_a_host_in_no_group_reaches_only_the_public_entry(name):
    runs_by_address = runs(name)
    tables = {address: firewall_of(run) for address, run in runs_by_address.items()}
    has_front = any(run.node.has("front") for run in runs_by_address.values())
    public = set()
    for address, run in runs_by_address.items():
        if run.node.has("front"):
            public.add((address, run.node.config.front_port))
        if run.node.has("web") and not has_front:
            public.add((address, run.node.config.web_port))
    listening = {
        (address, port.number) for address, run in runs_by_address.items() for port in run.wiring.ports(run.node)
    }
    assert public <= listening
    reached = {(address, port) for address, port in listening if reaches(tables, OUTSIDER, address, port)}
    assert reached == public


@pytest.mark.parametrize(
    "url, location",
    [
        ("amqp://celery:p%40ss%2Fw%3Ard@10.0.0.5:5672/celery", "amqp://10.0.0.5:5672/celery"),
        ("redis://:r%22q%5C@10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://:x@[fd00::5]:6380/2", "redis://[fd00::5]:6380/2"),
    ],
    ids=["amqp", "redis", "redis on IPv6"],
)
def test_the_broker_an_environment_file_names_is_read_on_the_host_without_its_credentials(url, location, tmp_path):
    """A switch of broker is found by comparing where the environment file's broker URL points,
    read on the host with the credentials cut there (a fact's output is printed at -vvv), with
    where the new URL points: the environment file as the deploy renders it (passwords
    percent-encoded), read by the fact's own command, gives the location and nothing more."""
    path = tmp_path / "app.env"
    rendered = app.render("app/app.env.j2", variables={"STACK_CELERY_BROKER": "x", "CELERY_BROKER_URL": url})
    path.write_text(rendered.getvalue())
    fact = app.BrokerLocation()

    def read(path, names: list[str]) -> str | None:
        output = subprocess.run(fact.command(str(path), names), shell=True, capture_output=True, text=True).stdout
        return fact.process(output.splitlines())

    assert read(path, ["BROKER_URL", "CELERY_BROKER_URL"]) == app.broker_location(url) == location
    assert read(tmp_path / "absent.env", ["CELERY_BROKER_URL"]) is None
