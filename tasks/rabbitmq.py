"""
RabbitMQ from Debian's rabbitmq-server package: the application's vhost and user with rights on
that vhost only, guest deleted, limits and listeners in a conf.d file we own, and the
rabbitmq_prometheus plugin enabled.

Poison tasks: a policy on the application's queues sets RabbitMQ's delivery limit and
dead-letters a task over it, at least once, into the vhost's ``dead-letters`` queue (quorum
queues only: RabbitMQ applies no policy to a queue type that lacks one of its keys, as the
classic queues of an old Celery showed), where an alert sees it and ``<app>-dead-letters``
lists and replays it (files/celery/stack_dead_letters.py). The application declares its own
queues; ``queue_type`` decides their type, which stack_celery.py applies.

Users, vhosts, permissions, the policy and the dead-letters exchange, queue and binding are
compared with ``rabbitmqctl export_definitions`` and changed with ``rabbitmqctl
import_definitions``: the password is checked against its stored salted hash here, on the
machine running pyinfra, and only a new hash is ever sent, never the password, so a re-run with
nothing to change runs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand, deploy
from pyinfra.operations import files, server

import settings
from tasks import packaged_service, render, silences
from tasks.service import Node, Port, Run, Scrape, Service

UNIT = "rabbitmq-server"
PLUGINS = ["rabbitmq_prometheus"]
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: Erlang's port mapper and RabbitMQ's distribution port: this deploy runs no RabbitMQ cluster,
#: so only the host itself (rabbitmqctl) talks to them.
ERLANG_PORTS = (4369, 25672)
#: The exchange and queue of the vhost that receive the tasks over the delivery limit.
DEAD_LETTERS = "dead-letters"
#: The first Celery that puts every queue on quorum queues and topic exchanges.
QUORUM_CELERY = "5.6"
#: What an application on classic queues lacks (stack_celery.py logs the same).
CLASSIC_LACKS = (
    "no delivery limit (a task whose process dies every time is redelivered for ever) and "
    "countdown/ETA tasks held unacknowledged by a worker (RabbitMQ's consumer timeout closes its "
    "channel when they wait longer)"
)
#: Name of the policy that sets the delivery limit and dead-lettering on the application's queues.
POLICY = "stack-poison-tasks"


class RabbitmqDefinitions(FactBase):
    """The running node's definitions (``export_definitions``: users, vhosts, permissions,
    queues, exchanges, bindings, policies), or None when RabbitMQ is not installed or not
    running yet."""

    def requires_command(self) -> str:
        return "rabbitmqctl"

    def command(self) -> str:
        return "systemctl is-active -q rabbitmq-server && rabbitmqctl -q export_definitions - --format json || true"

    def process(self, output: list[str]) -> dict | None:
        text = "\n".join(output).strip()
        return json.loads(text) if text.startswith("{") else None


class CeleryQuorumSupport(FactBase):
    """The version of Celery a venv's ``python`` imports and whether that Celery can put every
    queue on quorum queues (it has ``task_create_missing_queue_exchange_type``: Celery 5.6),
    or None before the venv has Celery."""

    def command(self, python: str) -> str:
        probe = (
            "import celery, celery.app.defaults as d; "
            "print(celery.__version__, 'create_missing_queue_exchange_type' in d.NAMESPACES['task'])"
        )
        return f'test -x {python} && {python} -c "{probe}" 2>/dev/null || true'

    def process(self, output: list[str]) -> tuple[str, bool] | None:
        words = " ".join(output).split()
        return (words[0], words[1] == "True") if len(words) == 2 else None


def existing_queue_types(definitions: dict | None, vhost: str, queues: list[str]) -> dict[str, str]:
    """The type of each of ``queues`` that exists in ``vhost`` on the node."""
    types = {}
    for queue in (definitions or {}).get("queues", []):
        if queue.get("vhost") == vhost and queue["name"] in queues:
            types[queue["name"]] = queue.get("type") or queue.get("arguments", {}).get("x-queue-type", "classic")
    return types


def queue_type(config: settings.Settings, existing: dict[str, str], celery: tuple[str, bool] | None) -> tuple[str, str]:
    """The queue type the application is told (``STACK_QUEUE_TYPE``: the setting), and a
    sentence for the operator when its Celery cannot run every queue as a quorum queue: then
    stack_celery.py gives it classic ones, with what that lacks. ``celery`` is None before the
    venv has one (read again once it is installed).

    RabbitMQ refuses to declare a queue that exists with another type, so queues that exist
    with a type other than the one the application would declare stop the deploy with a
    SettingsError naming the setting (the application would otherwise crash-loop)."""
    if config.celery_broker != "rabbitmq":
        return "classic", ""
    capable = celery is None or celery[1]
    # Without the deploy's settings the application declares its queues itself: classic ones.
    enforced = config.celery_enforce_durability
    declared = config.rabbitmq_queue_type if capable and enforced else "classic"
    clashing = sorted(name for name, kind in existing.items() if kind != declared)
    if clashing:
        kind = existing[clashing[0]]
        fix = f"set rabbitmq_queue_type = {kind} to keep them"
        if kind == "quorum" and not capable:
            fix = f"use Celery {QUORUM_CELERY} or later, whose workers consume quorum queues"
        elif kind == "quorum" and not enforced:
            fix = "set celery_enforce_durability = true, whose settings declare them as quorum queues"
        raise settings.SettingsError(
            f"vhost {config.rabbitmq_vhost} holds the {kind} queue(s) {', '.join(clashing)}, which the "
            f"application would declare as {declared} queues, and RabbitMQ cannot change a queue's type: {fix}"
        )
    why = ""
    if celery is not None and not capable and enforced and config.rabbitmq_queue_type == "quorum":
        why = (
            f"the application's Celery {celery[0]} cannot run every queue as a quorum queue: its queues are "
            f"classic, with {CLASSIC_LACKS}; Celery {QUORUM_CELERY} brings them"
        )
    return config.rabbitmq_queue_type if enforced else "classic", why


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's SHA-256 password hash: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def password_matches(password: str, stored: str) -> bool:
    raw = base64.b64decode(stored)
    return hmac.compare_digest(password_hash(password, raw[:4]), stored)


def dead_letter_definitions(config: settings.Settings, queues: list[str]) -> dict[str, list[dict]]:
    """The policy on the application's queues (delivery limit, dead-lettering at least once,
    which RabbitMQ allows with ``overflow: reject-publish`` only) and the dead-letters fanout
    exchange with its queue: classic, so that listing it (a read that returns every message)
    counts no delivery against any limit."""
    vhost = config.rabbitmq_vhost
    return {
        "policies": [
            {
                "vhost": vhost,
                "name": POLICY,
                "pattern": "^(" + "|".join(re.escape(queue) for queue in queues) + ")$",
                "apply-to": "queues",
                "priority": 0,
                "definition": {
                    "delivery-limit": config.rabbitmq_delivery_limit,
                    "dead-letter-exchange": DEAD_LETTERS,
                    "dead-letter-strategy": "at-least-once",
                    "overflow": "reject-publish",
                },
            }
        ],
        "exchanges": [
            {
                "name": DEAD_LETTERS,
                "vhost": vhost,
                "type": "fanout",
                "durable": True,
                "auto_delete": False,
                "arguments": {},
            }
        ],
        "queues": [
            {
                "name": DEAD_LETTERS,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": {"x-queue-type": "classic"},
            }
        ],
        "bindings": [
            {
                "source": DEAD_LETTERS,
                "vhost": vhost,
                "destination": DEAD_LETTERS,
                "destination_type": "queue",
                "routing_key": "",
                "arguments": {},
            }
        ],
    }


def missing_dead_letter_definitions(
    current: dict | None, config: settings.Settings, queues: list[str]
) -> dict[str, list[dict]]:
    """What of ``dead_letter_definitions`` the node lacks, compared on the keys we set (each
    one a key that ``export_definitions`` gives back: an exchange's "internal" is not)."""
    missing: dict[str, list[dict]] = {}
    for kind, wanted in dead_letter_definitions(config, queues).items():
        present = (current or {}).get(kind, [])
        for item in wanted:
            if not any(all(other.get(key) == value for key, value in item.items()) for other in present):
                missing.setdefault(kind, []).append(item)
    return missing


def wanted_definitions(current: dict | None, vhost: str, user: str, password: str) -> dict | None:
    """Definitions to import so the vhost, the user (with this password) and its permissions
    exist; None when the node already has them."""
    definitions = current or {}
    users = {u["name"]: u for u in definitions.get("users", [])}
    existing = users.get(user, {})
    permission = {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}

    password_ok = existing.get("hashing_algorithm") == HASHING_ALGORITHM and password_matches(
        password, existing.get("password_hash", "")
    )
    if (
        password_ok
        and existing.get("tags") in ([], "")
        and any(v["name"] == vhost for v in definitions.get("vhosts", []))
        and permission in definitions.get("permissions", [])
    ):
        return None
    return {
        "users": [
            {
                "name": user,
                "password_hash": existing["password_hash"] if password_ok else password_hash(password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": [],
                "limits": {},
            }
        ],
        "vhosts": [{"name": vhost, "limits": [], "metadata": {"description": "", "tags": []}}],
        "permissions": [permission],
    }


@deploy("RabbitMQ")
def rabbitmq_server(run: Run) -> None:
    config, secrets = run.node.config, run.secrets

    our_config = files.put(
        name="Write our RabbitMQ settings (listeners, limits, consumer timeout)",
        src=render(
            "rabbitmq.conf.j2",
            address=run.node.address,
            port=config.rabbitmq_port,
            prometheus_port=config.rabbitmq_prometheus_port,
            vm_memory_high_watermark=config.rabbitmq_vm_memory_high_watermark,
            disk_free_limit=config.rabbitmq_disk_free_limit,
            consumer_timeout=config.rabbitmq_consumer_timeout_ms,
        ),
        dest="/etc/rabbitmq/conf.d/50-stack.conf",
        user="root",
        group="rabbitmq",
        mode="0640",
    )
    plugins = files.put(
        name="Enable the rabbitmq_prometheus plugin",
        src=StringIO(f"[{','.join(PLUGINS)}].\n"),
        dest="/etc/rabbitmq/enabled_plugins",
        user="rabbitmq",
        group="rabbitmq",
        mode="0644",
    )
    restart = packaged_service(run, "RabbitMQ", UNIT, [our_config, plugins], silences.quiets(run, consumers=True))
    server.shell(
        name="Wait until RabbitMQ accepts commands",
        commands=["rabbitmqctl -q await_startup --timeout 120"],
        _if=restart.did_change,
    )

    current = host.get_fact(RabbitmqDefinitions)
    wanted = wanted_definitions(current, config.rabbitmq_vhost, config.rabbitmq_user, secrets.rabbitmq_password)
    if wanted:
        _import_definitions(f"Create or update vhost {config.rabbitmq_vhost} and user {config.rabbitmq_user}", wanted)
    dead_letters = missing_dead_letter_definitions(current, config, run.wiring.queues())
    if dead_letters:
        _import_definitions(
            f"Set the delivery limit ({config.rabbitmq_delivery_limit}) of the application's queues and "
            f"dead-letter tasks over it into the {DEAD_LETTERS} queue",
            dead_letters,
        )
    if current is None or any(u["name"] == "guest" for u in current.get("users", [])):
        server.shell(
            name="Delete the guest user",
            commands=["rabbitmqctl -q list_users | grep -q '^guest\\b' && rabbitmqctl -q delete_user guest || true"],
        )


def _import_definitions(name: str, definitions: dict) -> None:
    """Import ``definitions`` into the running node. From a file: RabbitMQ 4's CLI runs Erlang
    with -noinput, so reading them from standard input waits forever (seen on Debian 13); 3.x
    reads a file alike. The file holds a salted hash, never a password, and lives only for the
    command. A StringCommand quotes the JSON for the shell (pyinfra's hint says str only)."""
    server.shell(
        name=name,
        commands=[
            StringCommand(  # type: ignore[list-item]
                'definitions=$(mktemp) && printf "%s"',
                QuoteString(json.dumps(definitions)),
                '> "$definitions" && chown rabbitmq "$definitions" && '
                'rabbitmqctl -q import_definitions "$definitions"; status=$?; rm -f "$definitions"; exit $status',
            )
        ],
    )


def _ports(node: Node) -> list[Port]:
    config = node.config
    queues = Scrape(
        "rabbitmq-queues",
        path="/metrics/detailed",
        params={"family": ["queue_coarse_metrics", "queue_consumer_count"], "vhost": [config.rabbitmq_vhost]},
    )
    return [
        # Open to the application hosts whatever the broker (see tasks/redis.py).
        Port(config.rabbitmq_port, "AMQP", clients=settings.APP_GROUPS),
        Port(config.rabbitmq_prometheus_port, "RabbitMQ's metrics", scrapes=(Scrape("rabbitmq"), queues)),
        *(Port(number, "Erlang distribution") for number in ERLANG_PORTS),
    ]


SERVICE = Service(
    name="rabbitmq",
    groups=("rabbitmq",),
    single=True,
    packages=lambda node: ["rabbitmq-server"],
    units=lambda node: [f"{UNIT}.service"],
    ports=_ports,
    deploy=rabbitmq_server,
)
