"""
Stand-ins for pyinfra's inventory and hosts, for the checks that need no container: just what
the settings validation and the service wiring read of them (name, groups, data, one fact).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import settings
from tasks import registry

#: What pyinfra's LinuxDistribution fact answers on the bench's hosts.
RELEASE = {"name": "Debian", "major": 12}


class FakeHost(SimpleNamespace):
    """A host: ``name``, ``groups`` and ``data`` (``private_address`` defaults to the name)."""

    def __init__(self, name: str, groups: list[str], **data):
        data.setdefault("private_address", name)
        super().__init__(name=name, groups=groups, data=SimpleNamespace(dict=lambda: data, get=data.get))

    def get_fact(self, fact, *args, **kwargs):
        assert fact.__name__ == "LinuxDistribution", f"the fake host answers no {fact.__name__}"
        return RELEASE


class FakeInventory(list):
    """Hosts, iterable and by group, hashed by identity as pyinfra's inventory is (the
    settings validation and the wiring are computed once per inventory object)."""

    __hash__ = object.__hash__

    def get_group(self, name: str, default=None) -> list[FakeHost]:
        return [host for host in self if name in host.groups]

    def get_host(self, name: str) -> FakeHost:
        return next(host for host in self if host.name == name)


#: Secrets that pass every check, in the environment variables the deploy reads.
GOOD_SECRETS = {
    "STACK_REDIS_PASSWORD": "r" + "0123456789abcdef",
    "STACK_RABBITMQ_PASSWORD": "q" + "0123456789abcdef",
    "STACK_POSTGRESQL_PASSWORD": "p" + "0123456789abcdef",
    "STACK_BACKUP_CIPHER_PASS": "b" + "0123456789abcdef",
}
#: Secrets a test may set, removed before each test that validates (tests/conftest.py).
SECRET_VARIABLES = [
    *GOOD_SECRETS,
    "STACK_GRAFANA_ADMIN_PASSWORD",
    "STACK_ALERT_SLACK_WEBHOOK_URL",
    "STACK_ALERT_SMTP_PASSWORD",
]


def all_in_one(**data) -> FakeInventory:
    return FakeInventory([FakeHost("10.0.0.5", ["redis", "rabbitmq", "postgres", "web", "workers", "beat"], **data)])


def validate(inventory: FakeInventory, **environment: str) -> settings.Secrets:
    """What deploy.py checks before anything runs, with ``environment`` added to the process's."""
    os.environ.update(environment)
    return settings.validate(inventory, registry.SINGLE_SERVER_GROUPS)
