"""
PostgreSQL's backups with Debian's pgBackRest: WAL archived continuously, full and differential
backups on systemd timers, the repository encrypted (aes-256-cbc, ``STACK_BACKUP_CIPHER_PASS``).

The repository lives on the host of the ``backup`` group when the inventory has one, so that
losing the database host for good loses no backup; without one, on the database host itself
(which survives a crash, a dropped table or a bad migration, not the host's loss: said when the
deploy starts). Both sides run pgBackRest as ``postgres`` (the user Debian's postgresql-common
makes, and owner of Debian's ``/var/lib/pgbackrest``) and reach each other over SSH with keys
made here from the cipher secret (HKDF, one per side), so either side's public key is known
while the run is planned, with nothing read from the other host but its SSH host key
(pinned in ``known_hosts``). Each side's ``authorized_keys`` lets the other run pgBackRest only.

The stanza is made once (``stanza-create`` when ``info`` says it is missing), the first full
backup taken at once, and ``check`` (a WAL segment archived and found in the repository) runs
whenever the configuration changed: a deploy that exits 0 has archiving that works.
"""

from __future__ import annotations

import json
from io import StringIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from tasks import peers, postgresql, render, shipped_file
from tasks.service import Node, Run, Service

STANZA = postgresql.BACKUP_STANZA
#: Our options, read after Debian's /etc/pgbackrest.conf (pgBackRest's config-include-path).
CONFIG = "/etc/pgbackrest/conf.d/50-stack.conf"
SSH_DIRECTORY = "/var/lib/postgresql/.ssh"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"
#: OpenSSH's client adds every host key the server offers to known_hosts (UpdateHostKeys, on by
#: default): our pinned file grew by two lines at each connection, and each deploy wrote it back
#: (seen on the bench). Off, and no host but a pinned one is trusted.
SSH_CLIENT_CONFIG = "# Managed by the deploy (tasks/backup.py).\nUpdateHostKeys no\nStrictHostKeyChecking yes\n"
#: What a key from the other side may run: pgBackRest, with the arguments it asked for.
FORCED_COMMAND = 'command="/usr/bin/pgbackrest ${SSH_ORIGINAL_COMMAND#* }",restrict'
#: The oneshot unit that takes a backup of the type its instance names (full, diff).
BACKUP_UNIT = "stack-backup@.service"
#: The backup types that run on a timer, each with the setting of its calendar.
SCHEDULES = {"full": "backup_full_calendar", "diff": "backup_diff_calendar"}


class PgbackrestInfo(FactBase):
    """``pgbackrest info`` of the stanza as JSON (its status code: 0 ok, 1 missing stanza path,
    2 no valid backups...; its backups), or None when pgBackRest is not installed yet."""

    def requires_command(self, *args, **kwargs) -> str:
        return "pgbackrest"

    def command(self, stanza: str) -> str:
        return f"pgbackrest --stanza={stanza} --output=json info 2>/dev/null || true"

    def process(self, output: list[str]) -> dict | None:
        text = "\n".join(output).strip()
        stanzas = json.loads(text) if text.startswith("[") else []
        return stanzas[0] if stanzas else None


def ssh_key(secret: str, side: str) -> tuple[str, str]:
    """The SSH key of ``side`` ("database" or "repository"), derived from ``secret``: (OpenSSH
    private key, public key line). The private key's file differs at each call (OpenSSH's
    format holds a random check number), the key itself never."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"stack backup ssh {side}".encode())
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed.derive(secret.encode()))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} postgres@stack-backup-{side}"


def repository_node(run: Run) -> Node | None:
    """The host of the repository when it is not the database host: the ``backup`` group's;
    None when the database host holds it."""
    hosts = [node for node in run.wiring.hosts("backup") if not node.has("postgres")]
    return hosts[0] if hosts else None


def database_node(run: Run) -> Node:
    return run.wiring.hosts("postgres")[0]


def _trust(run: Run, side: str, other: Node, other_side: str) -> None:
    """This host's key (``side``), and the other side's key and host key: what SSH between the
    two needs, as ``postgres``."""
    private, public = ssh_key(run.secrets.backup_cipher_pass, side)
    files.directory(
        name="Make postgres' SSH directory", path=SSH_DIRECTORY, user="postgres", group="postgres", mode="0700"
    )
    if host.get_fact(FileContents, path=f"{SSH_DIRECTORY}/id_ed25519.pub") != [public]:
        files.put(
            name=f"Install the backup's SSH key of the {side} host",
            src=StringIO(private),
            dest=f"{SSH_DIRECTORY}/id_ed25519",
            user="postgres",
            group="postgres",
            mode="0600",
        )
        files.put(
            name=f"Install the public half of the {side} host's backup SSH key",
            src=StringIO(public + "\n"),
            dest=f"{SSH_DIRECTORY}/id_ed25519.pub",
            user="postgres",
            group="postgres",
            mode="0644",
        )
    other_public = ssh_key(run.secrets.backup_cipher_pass, other_side)[1]
    files.put(
        name=f"Let the {other_side} host run pgBackRest here, and nothing else, over SSH",
        src=StringIO(f"{FORCED_COMMAND} {other_public}\n"),
        dest=f"{SSH_DIRECTORY}/authorized_keys",
        user="postgres",
        group="postgres",
        mode="0600",
    )
    host_key = peers.fact(other.name, FileContents, path=HOST_KEY)
    if not host_key:
        raise RuntimeError(f"host {other.name} has no {HOST_KEY}: its SSH host key cannot be pinned")
    key_type, key = host_key[0].split()[:2]
    files.put(
        name="Make postgres' SSH client trust only the pinned host key, and leave it alone",
        src=StringIO(SSH_CLIENT_CONFIG),
        dest=f"{SSH_DIRECTORY}/config",
        user="postgres",
        group="postgres",
        mode="0600",
    )
    files.put(
        name=f"Pin the {other_side} host's SSH host key",
        src=StringIO(f"{other.address} {key_type} {key}\n"),
        dest=f"{SSH_DIRECTORY}/known_hosts",
        user="postgres",
        group="postgres",
        mode="0644",
    )


@deploy("Backups")
def backups(run: Run) -> None:
    config = run.node.config
    database, repository = database_node(run), repository_node(run)
    holds_repository = repository is None or run.node == repository
    # The address the database host reaches the repository at (None: it holds it).
    remote_repository = None
    if repository is not None and run.node == repository:
        _trust(run, "repository", database, "database")
    elif repository is not None:
        _trust(run, "database", repository, "repository")
        remote_repository = repository.address
    options = files.put(
        name="Write our pgBackRest settings (repository, encryption, retention)",
        src=render(
            "backup/pgbackrest.conf.j2",
            stanza=STANZA,
            holds_repository=holds_repository,
            repository_host=remote_repository,
            database_host=database.address if run.node == repository else None,
            data_directory=postgresql.data_directory(database),
            port=database.config.postgresql_port,
            retention_full=config.backup_retention_full,
            cipher_pass=run.secrets.backup_cipher_pass,
        ),
        dest=CONFIG,
        user="postgres",
        group="postgres",
        mode="0640",
    )
    if holds_repository:
        _repository(run, options)


def _repository(run: Run, options: OperationMeta) -> None:
    """On the host that holds the repository: the stanza, the timers, the check, and a first
    full backup when there is none."""
    info = host.get_fact(PgbackrestInfo, stanza=STANZA, _sudo=True, _sudo_user="postgres")
    changes = [options]
    if info is None or info["status"]["code"] == 1:
        changes.append(
            server.shell(
                name=f"Create the pgBackRest stanza {STANZA} in the repository",
                commands=[f"pgbackrest --stanza={STANZA} --log-level-console=warn stanza-create"],
                _sudo=True,
                _sudo_user="postgres",
            )
        )
    service = files.put(
        name="Write the unit that takes a backup",
        src=shipped_file("backup/stack-backup@.service"),
        dest=f"/etc/systemd/system/{BACKUP_UNIT}",
        mode="0644",
    )
    timers = [
        files.put(
            name=f"Write the timer of the {kind} backups",
            src=render("backup/stack-backup.timer.j2", kind=kind, calendar=getattr(run.node.config, calendar)),
            dest=f"/etc/systemd/system/stack-backup-{kind}.timer",
            mode="0644",
        )
        for kind, calendar in SCHEDULES.items()
    ]
    systemd.daemon_reload(name="Reload systemd after the backup units changed", _if=any_changed(service, *timers))
    for kind in SCHEDULES:
        systemd.service(
            name=f"Keep the timer of the {kind} backups enabled and started",
            service=f"stack-backup-{kind}.timer",
            running=True,
            enabled=True,
        )
    server.shell(
        name="Check that PostgreSQL archives its WAL into the repository (pgBackRest's check)",
        commands=[f"pgbackrest --stanza={STANZA} --log-level-console=warn check"],
        _sudo=True,
        _sudo_user="postgres",
        _if=any_changed(*changes),
    )
    if info is None or not info.get("backup"):
        server.shell(
            name="Take the first full backup now (the timers take the next ones)",
            commands=[f"systemctl start {BACKUP_UNIT.replace('@', '@full')}"],
        )


def _runs(node: Node) -> bool:
    """On the database host and the repository's, when the inventory has a database."""
    return "postgres" in node.inventory_groups


def _timers(node: Node) -> list[str]:
    """The timers of the host that holds the repository, each alerting when it is not active."""
    holds = node.has("backup") or not ("backup" in node.inventory_groups and node.has("postgres"))
    return [f"stack-backup-{kind}.timer" for kind in SCHEDULES] if holds else []


SERVICE = Service(
    name="backup",
    groups=("postgres", "backup"),
    single=True,
    when=_runs,
    units=_timers,
    packages=lambda node: ["pgbackrest"],
    deploy=backups,
)
