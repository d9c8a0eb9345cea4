"""
PostgreSQL from Debian's postgresql package: Celery's result database and its owner role.

The server listens on the private address (a conf.d file we own); pg_hba.conf, as packaged,
gets one managed block that admits the role, with SCRAM-SHA-256, from loopback and from the
hosts of the application groups only.

The role's password is compared with the SCRAM verifier PostgreSQL stores, here on the machine
running pyinfra, and set (as a verifier, never as plain text) only when it differs, so a re-run
changes nothing and a changed password is applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from typing import Any

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, postgres, systemd

import settings
from tasks import packaged_service, releases, render
from tasks.service import Node, Port, Run, Service

SCRAM_ITERATIONS = 4096
#: pgBackRest's name for the cluster, whose WAL archive_command pushes (tasks/backup.py).
BACKUP_STANZA = "stack"


def version(node: Node) -> str:
    """PostgreSQL major version on ``node``: the setting, or its release's (tasks/releases.py)."""
    if node.config.postgresql_version != "auto":
        return node.config.postgresql_version
    release = releases.known(node.release())
    if release is None:
        name, major = node.release()
        raise settings.SettingsError(
            f"host {node.name}: no known default PostgreSQL version for {name} {major} (known: {releases.names()}); "
            "set postgresql_version (e.g. in group_data/all.py)"
        )
    return release.postgresql


def data_directory(node: Node) -> str:
    """The data directory of the cluster Debian creates."""
    return f"/var/lib/postgresql/{version(node)}/main"


def unit(node: Node) -> str:
    """The packaged unit of the cluster Debian creates: postgresql@<major>-main."""
    return f"postgresql@{version(node)}-main"


class PostgresValue(FactBase):
    """The first value of the first row a query returns (run as the postgres user), or None:
    what the deploy reads of the server to decide whether to change it."""

    def requires_command(self, *args, **kwargs) -> str:
        return "psql"

    def command(self, sql: str, port: int) -> str:
        return f'psql -p {int(port)} -tAc "{sql}" 2>/dev/null || true'

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hashlib.sha256(client_key).digest(), server_key


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The verifier PostgreSQL stores for ``password`` (RFC 5803 format)."""
    salt = os.urandom(16) if salt is None else salt
    stored_key, server_key = _scram_keys(password, salt, iterations)
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{encode(salt)}${encode(stored_key)}:{encode(server_key)}"


def scram_matches(password: str, verifier: str | None) -> bool:
    """Whether ``verifier`` was made from ``password``."""
    if verifier is None:
        return False
    try:
        method, rest = verifier.split("$", 1)
        params, keys = rest.split("$")
        iterations, salt = params.split(":")
        if method != "SCRAM-SHA-256":
            return False
        expected = scram_verifier(password, base64.b64decode(salt), int(iterations))
    except (AttributeError, ValueError):
        return False
    return hmac.compare_digest(expected, verifier)


def _cidr(ip: str) -> str:
    return str(ipaddress.ip_network(ip))


@deploy("PostgreSQL")
def postgresql_server(run: Run) -> None:
    config, secrets = run.node.config, run.secrets
    config_dir = f"/etc/postgresql/{version(run.node)}/main"
    service = unit(run.node)
    psql: dict[str, Any] = dict(psql_port=config.postgresql_port, _sudo_user="postgres")

    our_config = files.put(
        name="Write our PostgreSQL settings (listen address, port, SCRAM, WAL archiving)",
        src=render(
            "postgresql.conf.j2",
            address=run.node.address,
            port=config.postgresql_port,
            stanza=BACKUP_STANZA,
            archive_timeout=config.backup_archive_timeout_seconds,
        ),
        dest=f"{config_dir}/conf.d/50-stack.conf",
        user="postgres",
        group="postgres",
        mode="0644",
    )
    hba = files.block(
        name="Admit the application role from loopback and the application hosts only",
        path=f"{config_dir}/pg_hba.conf",
        content=render(
            "pg_hba.block.j2",
            database=config.postgresql_database,
            user=config.postgresql_user,
            cidrs=["127.0.0.1/32"] + [_cidr(ip) for ip in sorted(run.wiring.addresses(settings.APP_GROUPS))],
        )
        .getvalue()
        .strip(),
        marker="# {mark} celery application access, managed by the deploy",
    )
    packaged_service(run, "PostgreSQL", service, [our_config])
    systemd.service(
        name="Reload PostgreSQL to apply the changed pg_hba.conf",
        service=service,
        reloaded=True,
        _if=hba.did_change,
    )

    postgres.role(name=f"Create role {config.postgresql_user}", role=config.postgresql_user, login=True, **psql)
    verifier = host.get_fact(
        PostgresValue,
        sql=f"SELECT rolpassword FROM pg_authid WHERE rolname = '{config.postgresql_user}'",
        port=config.postgresql_port,
        _sudo_user="postgres",
    )
    if not scram_matches(secrets.postgresql_password, verifier):
        postgres.sql(
            name=f"Set the password of role {config.postgresql_user}",
            sql=f"ALTER ROLE \"{config.postgresql_user}\" PASSWORD '{scram_verifier(secrets.postgresql_password)}'",
            **psql,
        )
    postgres.database(
        name=f"Create database {config.postgresql_database} owned by {config.postgresql_user}",
        database=config.postgresql_database,
        owner=config.postgresql_user,
        encoding="UTF8",
        **psql,
    )


SERVICE = Service(
    name="postgres",
    groups=("postgres",),
    single=True,
    packages=lambda node: [f"postgresql-{version(node)}"],
    units=lambda node: [f"{unit(node)}.service"],
    # Open to the application hosts whatever the result store (see tasks/redis.py).
    ports=lambda node: [Port(node.config.postgresql_port, "PostgreSQL", clients=settings.APP_GROUPS)],
    deploy=postgresql_server,
)
