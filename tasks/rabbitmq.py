"""
RabbitMQ from Debian's rabbitmq-server package: the application's vhost and user with rights on
that vhost only, guest deleted, limits and listeners in a conf.d file we own, and the
rabbitmq_prometheus plugin enabled.

Users, vhosts and permissions are compared with ``rabbitmqctl export_definitions`` and changed
with ``rabbitmqctl import_definitions``: the password is checked against its stored salted hash
here, on the machine running pyinfra, and only a new hash is ever sent, never the password, so
a re-run with nothing to change runs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, QuoteString, StringCommand, deploy
from pyinfra.operations import files, server

import settings
from tasks import packaged_service, render
from tasks.service import Node, Port, Run, Scrape, Service

UNIT = "rabbitmq-server"
PLUGINS = ["rabbitmq_prometheus"]
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: Erlang's port mapper and RabbitMQ's distribution port: this deploy runs no RabbitMQ cluster,
#: so only the host itself (rabbitmqctl) talks to them.
ERLANG_PORTS = (4369, 25672)


class RabbitmqDefinitions(FactBase):
    """Users, vhosts and permissions of the running node (``export_definitions``), or None when
    RabbitMQ is not installed or not running yet."""

    def requires_command(self) -> str:
        return "rabbitmqctl"

    def command(self) -> str:
        return "systemctl is-active -q rabbitmq-server && rabbitmqctl -q export_definitions - --format json || true"

    def process(self, output: list[str]) -> dict | None:
        text = "\n".join(output).strip()
        return json.loads(text) if text.startswith("{") else None


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's SHA-256 password hash: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def password_matches(password: str, stored: str) -> bool:
    raw = base64.b64decode(stored)
    return hmac.compare_digest(password_hash(password, raw[:4]), stored)


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
    restart = packaged_service("RabbitMQ", UNIT, [our_config, plugins])
    server.shell(
        name="Wait until RabbitMQ accepts commands",
        commands=["rabbitmqctl -q await_startup --timeout 120"],
        _if=restart.did_change,
    )

    current = host.get_fact(RabbitmqDefinitions)
    wanted = wanted_definitions(current, config.rabbitmq_vhost, config.rabbitmq_user, secrets.rabbitmq_password)
    if wanted:
        server.shell(
            name=f"Create or update vhost {config.rabbitmq_vhost} and user {config.rabbitmq_user}",
            # From a file: RabbitMQ 4's CLI runs Erlang with -noinput, so reading the definitions
            # from standard input waits forever (seen on Debian 13); 3.x reads a file alike. The
            # file holds a salted hash, not the password, and lives only for the command. A
            # StringCommand quotes the JSON for the shell (pyinfra's hint says str only).
            commands=[
                StringCommand(  # type: ignore[list-item]
                    'definitions=$(mktemp) && printf "%s"',
                    QuoteString(json.dumps(wanted)),
                    '> "$definitions" && chown rabbitmq "$definitions" && '
                    'rabbitmqctl -q import_definitions "$definitions"; status=$?; rm -f "$definitions"; exit $status',
                )
            ],
        )
    if current is None or any(u["name"] == "guest" for u in current.get("users", [])):
        server.shell(
            name="Delete the guest user",
            commands=["rabbitmqctl -q list_users | grep -q '^guest\\b' && rabbitmqctl -q delete_user guest || true"],
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
