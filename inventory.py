"""
Which hosts run what. This is the file you edit for your servers.

Each entry of ``HOSTS`` is the name pyinfra connects to (over SSH), the groups (roles) the host
plays, and its data: at least ``private_address``, the address the *other* hosts reach it on.
Every bind and connect address of the stack is derived from these: one host or ten is the
same code. A host may play several roles, e.g. an all-in-one server::

    HOSTS = {
        "app.example.com": (
            ["redis", "rabbitmq", "postgres", "web", "workers", "beat", "monitoring"],
            {"private_address": "10.0.0.10", "ssh_user": "deploy", "_sudo": True},
        ),
    }

or a split one::

    HOSTS = {
        "db.example.com": (["redis", "rabbitmq", "postgres"], {"private_address": "10.0.0.5"}),
        "app.example.com": (["web", "workers", "beat"], {"private_address": "10.0.0.6"}),
        "mon.example.com": (["monitoring"], {"private_address": "10.0.0.7"}),
    }

Groups: redis, rabbitmq, postgres (one host each), web, workers, beat (exactly one host),
monitoring. Settings shared by all hosts go in ``group_data/all.py``.

Set ``STACK_HOSTS_FILE`` to a JSON file (``{"name": [[groups...], {data...}], ...}``) to use its
hosts instead of ``HOSTS``: that is how the sandbox (``make demo``) and the tests point this
same file at containers.
"""

import json
import os

from settings import GROUPS as _GROUPS
from settings import SettingsError as _SettingsError

HOSTS: dict = {
    # "app.example.com": (["redis", "rabbitmq", "postgres", "web", "workers", "beat"],
    #                     {"private_address": "10.0.0.10", "ssh_user": "deploy", "_sudo": True}),
}


def _hosts() -> dict:
    path = os.environ.get("STACK_HOSTS_FILE")
    if not path:
        return HOSTS
    with open(path) as file:
        return json.load(file)


def _group(name: str, hosts: dict) -> list:
    return [(host, dict(data)) for host, (groups, data) in hosts.items() if name in groups]


def _check(hosts: dict) -> None:
    for host, (groups, _data) in hosts.items():
        if not groups:
            raise _SettingsError(f"inventory: host {host} is in no group; give it at least one of {list(_GROUPS)}")
        unknown = sorted(set(groups) - set(_GROUPS))
        if unknown:
            raise _SettingsError(
                f"inventory: host {host} is in unknown group(s) {unknown}; the groups are {list(_GROUPS)}"
            )


_check(_hosts())

redis = _group("redis", _hosts())
rabbitmq = _group("rabbitmq", _hosts())
postgres = _group("postgres", _hosts())
web = _group("web", _hosts())
workers = _group("workers", _hosts())
beat = _group("beat", _hosts())
monitoring = _group("monitoring", _hosts())
