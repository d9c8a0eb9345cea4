"""
The rolling switch without any host (tasks/rollout.py): the batches the application hosts
switch in, the web hosts a front takes out while a batch switches, and the upstream it writes
meanwhile. The order pyinfra runs them in, under load, is tests/test_scale_out.py's.
"""

from __future__ import annotations

import pytest
from test_wiring import SECRETS

from bench.fakes import FakeHost, FakeInventory
from tasks import front, registry, rollout
from tasks.service import Run

#: In an inventory order that is not the order of the names.
HOSTS = {
    "worker2": ["workers"],
    "front": ["front"],
    "data": ["redis", "rabbitmq", "postgres"],
    "web2": ["web"],
    "web1": ["web"],
    "worker1": ["workers", "beat"],
}
ADDRESSES = {name: f"10.0.0.{number}" for number, name in enumerate(HOSTS, start=2)}


def wiring(**data):
    inventory = FakeInventory(
        FakeHost(name, groups, private_address=ADDRESSES[name], **data) for name, groups in HOSTS.items()
    )
    return registry.wiring(inventory)


@pytest.mark.parametrize(
    "size, expected",
    [
        (1, [["web1"], ["web2"], ["worker1"], ["worker2"]]),
        (2, [["web1", "web2"], ["worker1", "worker2"]]),
        (3, [["web1", "web2", "worker1"], ["worker2"]]),
        (9, [["web1", "web2", "worker1", "worker2"]]),
    ],
)
def test_the_application_hosts_switch_in_batches_of_app_batch_size_sorted_by_name(size, expected):
    assert [[node.name for node in batch] for batch in rollout.batches(wiring(app_batch_size=size))] == expected


def test_without_application_hosts_there_is_one_empty_batch():
    assert rollout.batches(registry.wiring(FakeInventory([FakeHost("10.0.0.5", ["redis"])]))) == [[]]


@pytest.fixture
def replacing(monkeypatch):
    """REPLACING as the application hosts' deploys fill it, for one test."""
    table: dict[str, int] = {}
    monkeypatch.setattr(rollout, "REPLACING", table)
    return table


def test_a_batch_drains_the_web_hosts_that_replace_their_release_in_it(replacing):
    replacing.update(web1=0, web2=1, worker1=2)
    cluster = wiring()
    assert [rollout.drained(cluster, batch) for batch in range(4)] == [{"web1"}, {"web2"}, set(), set()]


def test_a_batch_that_holds_every_web_host_drains_none(replacing):
    """nginx would have no web host to send requests to: Gunicorn's socket holds them instead."""
    replacing.update(web1=0, web2=0)
    assert rollout.drained(wiring(app_batch_size=2), 0) == set()


def test_a_web_host_that_replaces_nothing_is_never_drained(replacing):
    """A first deploy or a re-run: nothing of it serves a release to drain."""
    assert rollout.drained(wiring(), 0) == set()


def test_the_drained_upstream_marks_only_those_hosts_down():
    cluster = wiring()
    run = Run(secrets=SECRETS, node=next(node for node in cluster.nodes if node.name == "front"), wiring=cluster)
    kept = front.upstream_file(run).getvalue()
    drained = front.upstream_file(run, down={"web1"}).getvalue()
    servers = [line for line in drained.splitlines() if line.startswith("server ")]
    assert sorted(servers) == sorted(
        [f"server {ADDRESSES['web1']}:8000 down;", f"server {ADDRESSES['web2']}:8000 max_fails=1 fail_timeout=10s;"]
    )
    assert sorted(line for line in kept.splitlines() if line.startswith("server ")) == sorted(
        f"server {ADDRESSES[name]}:8000 max_fails=1 fail_timeout=10s;" for name in ("web1", "web2")
    )
    assert f"include {front.UPSTREAM};" in front.site_file(run).getvalue()
