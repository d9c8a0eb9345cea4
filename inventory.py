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
monitoring, front (nginx balancing over the web hosts). Settings shared by all hosts go in
``group_data/all.py``. A host may also be in groups of your own, which carry settings rather
than roles: e.g. worker hosts in a group ``mail_workers`` with ``celery_queues = "mail"`` in
``group_data/mail_workers.py``. A group whose name is close to a role's (``worker``) is refused
as a likely typo.

Set ``STACK_HOSTS_FILE`` to a JSON file (``{"name": [[groups...], {data...}], ...}``) to use its
hosts instead of ``HOSTS``: that is how the sandbox (``make demo``) and the tests point this
same file at containers.
"""

import difflib as _difflib
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
        if not set(groups) & set(_GROUPS):
            raise _SettingsError(f"inventory: host {host} is in no role group; give it at least one of {list(_GROUPS)}")
        for group in sorted(set(groups) - set(_GROUPS)):
            close = _difflib.get_close_matches(group, _GROUPS, n=1, cutoff=0.75)
            if close or not group.isidentifier():
                raise _SettingsError(
                    f"inventory: host {host} is in group {group!r}, which is not a role"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" The roles are {list(_GROUPS)}; a group of your own needs a name like mail_workers."
                )


_HOSTS = _hosts()
_check(_HOSTS)

# Every group of the inventory, roles and groups of your own, as pyinfra reads them.
for _name in sorted({group for groups, _data in _HOSTS.values() for group in groups} | set(_GROUPS)):
    globals()[_name] = _group(_name, _HOSTS)
