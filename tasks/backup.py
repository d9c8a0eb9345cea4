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

import hashlib
import json
from io import StringIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from tasks import peers, postgresql, render, shipped_file
from tasks.postgresql import PostgresValue
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
#: ``pgbackrest info``'s status codes: no stanza yet; a repository it cannot read (codes 2 to 6
#: say what else it lacks: no backup...).
MISSING_STANZA = 1
OTHER_ERROR = 99
#: The restore drill (templates/backup/stack-restore-drill.j2), on the database host.
DRILL = "/usr/local/sbin/stack-restore-drill"
#: The cluster's identity, which pgBackRest's stanza records: a replaced host's differs.
SYSTEM_ID = "SELECT system_identifier FROM pg_control_system()"
#: The oneshot unit that takes a backup of the type its instance names (full, diff).
BACKUP_UNIT = "stack-backup@.service"
#: The backup types that run on a timer, each with the setting of its calendar.
SCHEDULES = {"full": "backup_full_calendar", "diff": "backup_diff_calendar"}


class BackupStateError(PyinfraError):
    """What the hosts hold forbids the deploy (a repository it cannot read, a cluster that is
    not the one backed up): raised while the run is planned, so no host is changed."""


class CipherPassDigest(FactBase):
    """The SHA-256 of the repository passphrase our pgBackRest settings at ``path`` hold, or
    None when there are none: whether the passphrase changed, without reading it back."""

    def command(self, path: str) -> str:
        return f"test -f {path} && sed -n 's/^repo1-cipher-pass=//p' {path} | tr -d '\\n' | sha256sum || true"

    def process(self, output: list[str]) -> str | None:
        text = "\n".join(output).split()
        return text[0] if text else None


class PgbackrestInfo(FactBase):
    """``pgbackrest info`` of the stanza as JSON (its status code: 0 ok, 1 missing stanza path,
    2 no valid backups...; its backups), or None when pgBackRest is not installed yet."""

    def requires_command(self, *args, **kwargs) -> str:
        return "pgbackrest"

    def command(self, stanza: str) -> str:
        # Printable ASCII only: a repository read with another passphrase puts the bytes it
        # could not decrypt into its message, and pyinfra reads output as UTF-8.
        return f"pgbackrest --stanza={stanza} --output=json info 2>/dev/null | tr -cd '\\11\\12\\40-\\176' || true"

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
        _postgres_file(
            f"Install the backup's SSH key of the {side} host",
            private,
            f"{SSH_DIRECTORY}/id_ed25519",
            mode="0600",
        )
        _postgres_file(
            f"Install the public half of the {side} host's backup SSH key",
            public + "\n",
            f"{SSH_DIRECTORY}/id_ed25519.pub",
            mode="0644",
        )
    other_public = ssh_key(run.secrets.backup_cipher_pass, other_side)[1]
    _postgres_file(
        f"Let the {other_side} host run pgBackRest here, and nothing else, over SSH",
        f"{FORCED_COMMAND} {other_public}\n",
        f"{SSH_DIRECTORY}/authorized_keys",
        mode="0600",
    )
    host_key = peers.fact(other.name, FileContents, path=HOST_KEY)
    if not host_key:
        raise BackupStateError(f"host {other.name} has no {HOST_KEY}: its SSH host key cannot be pinned")
    key_type, key = host_key[0].split()[:2]
    _postgres_file(
        "Make postgres' SSH client trust only the pinned host key, and leave it alone",
        SSH_CLIENT_CONFIG,
        f"{SSH_DIRECTORY}/config",
        mode="0600",
    )
    _postgres_file(
        f"Pin the {other_side} host's SSH host key",
        f"{other.address} {key_type} {key}\n",
        f"{SSH_DIRECTORY}/known_hosts",
        mode="0644",
    )


def _postgres_file(name: str, content: str, dest: str, mode: str) -> OperationMeta:
    """``content`` at ``dest``, owned by postgres (who runs pgBackRest and its SSH)."""
    return files.put(name=name, src=StringIO(content), dest=dest, user="postgres", group="postgres", mode=mode)


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
    if run.node == database:
        files.put(
            name="Install the restore drill (stack-restore-drill)",
            src=render(
                "backup/stack-restore-drill.j2",
                stanza=STANZA,
                database=database.config.postgresql_database,
                version=postgresql.version(database),
                port=database.config.postgresql_port,
            ),
            dest=DRILL,
            mode="0755",
        )
    if repository is not None and run.node == database:
        _restore_if_replaced(run, repository)
    if holds_repository:
        _repository(run, options)


def _restore_if_replaced(run: Run, repository: Node) -> None:
    """Restore the repository's latest state into this host's cluster when the repository backs
    up a cluster other than this host's, and this one holds no database of ours: the database
    host was lost and this is its replacement (or a first deploy beside an old repository).
    A cluster that holds our database and is not the one backed up stops the deploy instead:
    which of the two to keep is the operator's choice."""
    info = peers.fact(repository.name, PgbackrestInfo, stanza=STANZA, _sudo=True, _sudo_user="postgres")
    if not info or not info.get("backup"):
        return
    backed_up = str(info["db"][-1]["system-id"])
    port = run.node.config.postgresql_port
    ours = host.get_fact(PostgresValue, sql=SYSTEM_ID, port=port, _sudo_user="postgres")
    if ours == backed_up:
        return
    database = run.node.config.postgresql_database
    if host.get_fact(
        PostgresValue, sql=f"SELECT 1 FROM pg_database WHERE datname = '{database}'", port=port, _sudo_user="postgres"
    ):
        raise BackupStateError(
            f"host {run.node.name}: its PostgreSQL cluster (system id {ours}) holds the database {database} but is not "
            f"the cluster the repository on {repository.name} backs up ({backed_up}). To restore the backup over it, "
            f"stop PostgreSQL and empty {postgresql.data_directory(run.node)}, then deploy again; to keep it, move the "
            f"repository on {repository.name} aside and deploy again, which starts a new one (docs/backups.md)."
        )
    unit = postgresql.unit(run.node)
    server.shell(
        name="Restore the database from the repository: this host replaces a lost one (latest backup, every archived WAL)",
        commands=[
            f"systemctl stop {unit}",
            f"runuser -u postgres -- pgbackrest --stanza={STANZA} --delta --log-level-console=warn restore",
            f"systemctl start {unit}",
            # Serving once recovery ends: until then it answers read-only.
            f'timeout 600 sh -c \'until [ "$(runuser -u postgres -- psql -p {port} -tAc "SELECT pg_is_in_recovery()")" = f ]; '
            "do sleep 1; done'",
        ],
    )


def _refuse_a_changed_passphrase(run: Run, info: dict | None) -> None:
    """Stop the run if the repository was made with another passphrase than the one set now
    (pgBackRest cannot re-encrypt a repository), or cannot be read at all. Compared by
    digest, so that no passphrase is ever read back from the host."""
    configured = host.get_fact(CipherPassDigest, path=CONFIG)
    changed = configured is not None and configured != _digest(run.secrets.backup_cipher_pass)
    code = info["status"]["code"] if info else None
    if changed and code not in (None, MISSING_STANZA, OTHER_ERROR):
        raise BackupStateError(
            f"host {run.node.name}: STACK_BACKUP_CIPHER_PASS is not the passphrase the backup repository of stanza "
            f"{STANZA} was made with, and pgBackRest cannot change it. Set the old passphrase back (docs/backups.md)."
        )
    if info is not None and code == OTHER_ERROR and not changed:
        reasons = [repo["status"].get("message", "") for repo in info.get("repo", [])] or [info["status"]["message"]]
        raise BackupStateError(
            f"host {run.node.name}: pgBackRest cannot read the repository of stanza {STANZA} "
            f"({reasons[0].splitlines()[0]}): was it made with another STACK_BACKUP_CIPHER_PASS? (docs/backups.md)"
        )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _repository(run: Run, options: OperationMeta) -> None:
    """On the host that holds the repository: the stanza, the timers, the check, and a first
    full backup when there is none."""
    info = host.get_fact(PgbackrestInfo, stanza=STANZA, _sudo=True, _sudo_user="postgres")
    _refuse_a_changed_passphrase(run, info)
    changes = [options]
    if info is None or info["status"]["code"] == MISSING_STANZA:
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
