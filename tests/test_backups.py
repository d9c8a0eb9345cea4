"""
Backups (tasks/backup.py), on hosts of their own: the database on ``db``, the repository and
the rest of the stack on ``vault`` (the ``backup`` group).

In order: the first deploy takes an encrypted full backup and Prometheus reads both the
archiver's and the backup's figures; the restore drill brings back exactly the task results
written before a point in time; archiving that fails and a backup that is too old are told; a
changed passphrase stops the deploy before it changes anything; last, ``db`` is lost for good (container and disk removed), a new empty host takes its place,
and the deploy restores it from the repository: the application serves the results written
before the loss, and new tasks run. RPO (what the loss cost) and RTO (to a serving database)
are measured and printed.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from bench import Cluster, Host
from bench.topologies import APP
from clients import check_task_end_to_end, expected_answer, query, submit_task, task_result, wait_until

pytestmark = pytest.mark.bench

TOPOLOGY = {"db": ["postgres"], "vault": ["redis", "rabbitmq", *APP, "monitoring", "backup"]}
#: The bench's archive_timeout: a WAL segment is archived at least this often while written.
ARCHIVE_TIMEOUT = 10
#: The age past which BackupTooOld fires here.
MAX_AGE_HOURS = 1
#: What pgBackRest's ssh and push may add to ARCHIVE_TIMEOUT under the bench's load.
ARCHIVE_SLACK = 20


@pytest.fixture(scope="module")
def backed_up(converge) -> Cluster:
    with converge(
        "backups",
        TOPOLOGY,
        backup_archive_timeout_seconds=str(ARCHIVE_TIMEOUT),
        backup_max_age_hours=str(MAX_AGE_HOURS),
    ) as cluster:
        yield cluster


def as_postgres(host: Host, command: str) -> str:
    return host.exec(f"runuser -u postgres -- {command}")


def sql(host: Host, statement: str) -> str:
    """``statement``'s rows (``|`` between columns) in the stack's database on ``host``, as postgres."""
    return as_postgres(host, f'psql -d celerydb -XtAc "{statement}"').strip()


def repository_info(vault: Host) -> dict:
    return json.loads(as_postgres(vault, "pgbackrest --stanza=stack --output=json info"))[0]


def drill(db: Host, *arguments: str) -> dict[str, object]:
    """Run the restore drill on ``db``; what it printed: restored, rto_seconds, rows per
    table, and the query's lines."""
    output = db.exec(" ".join(["stack-restore-drill", *arguments]))
    head, _, rows = output.partition("query:")
    report: dict[str, object] = {"query": rows.split(), "rows": {}}
    for line in head.splitlines():
        key, _, value = line.partition(": ")
        if key.startswith("rows "):
            report["rows"][key.removeprefix("rows ")] = int(value)  # type: ignore[index]
        elif key:
            report[key] = value
    return report


def test_the_first_deploy_takes_an_encrypted_full_backup_and_prometheus_reads_it(backed_up: Cluster):
    vault, db = backed_up.one("backup"), backed_up.one("postgres")
    info = repository_info(vault)
    assert info["status"]["code"] == 0, info["status"]
    assert info["cipher"] == "aes-256-cbc"
    assert [backup["type"] for backup in info["backup"]] == ["full"]
    # The repository's files cannot be read without the passphrase.
    manifest = vault.exec("cat /var/lib/pgbackrest/backup/stack/backup.info", check=False)
    assert "backup-current" not in manifest and "[db]" not in manifest
    # The database host pushes its WAL to the repository, not to a directory of its own.
    assert as_postgres(db, "pgbackrest --stanza=stack --log-level-console=warn check") == ""
    assert db.status("test -e /var/lib/pgbackrest/archive") != 0
    # What the alerts read: the archiver's counters (postgres_exporter) and the last backup's time.
    archived = wait_until(
        lambda: query(backed_up, f'pg_stat_archiver_archived_count{{host="{db.address}"}} > 0'), timeout=60
    )
    assert archived
    backup = wait_until(lambda: query(backed_up, "stack_backup_last_success_timestamp_seconds"), timeout=60)
    assert [(sample["metric"]["host"], sample["metric"]["type"]) for sample in backup] == [(vault.address, "full")]
    assert time.time() - float(backup[0]["value"][1]) < 3600


def test_the_drill_restores_exactly_the_results_written_before_a_point_in_time(backed_up: Cluster):
    db, web = backed_up.one("postgres"), backed_up.one("web")
    before = [submit_task(web, n) for n in range(100, 105)]
    for task_id in before:
        assert task_result(web, task_id)["state"] == "SUCCESS"
    target = sql(db, "SELECT clock_timestamp()")
    time.sleep(1)
    after = [submit_task(web, n) for n in range(200, 205)]
    for task_id in after:
        assert task_result(web, task_id)["state"] == "SUCCESS"

    report = drill(db, "--target", f"'{target}'", "--sql", "'SELECT task_id FROM celery_taskmeta'")
    restored = set(report["query"])  # type: ignore[arg-type]
    live = set(sql(db, "SELECT task_id FROM celery_taskmeta").split())
    # Beat's periodic tasks write results too; those stored within a second of the target may
    # fall either side of it (date_done is the worker's clock, before its commit).
    settled = set(
        sql(
            db,
            "SELECT task_id FROM celery_taskmeta "
            f"WHERE date_done < ('{target}'::timestamptz AT TIME ZONE 'UTC') - interval '1 second'",
        ).split()
    )
    assert set(before) <= restored
    assert not set(after) & restored
    assert restored <= live, "the restored database holds results the live one never had"
    assert settled <= restored
    print(f"\nrestore drill to a point in time: {report['rto_seconds']} s to a serving database, {report['rows']}")


def test_archiving_that_fails_and_a_backup_too_old_are_told(backed_up: Cluster):
    db, vault = backed_up.one("postgres"), backed_up.one("backup")
    since = time.monotonic()
    # pgBackRest reaches the repository over SSH: without it, every segment fails to archive.
    vault.exec("systemctl stop ssh.service; systemctl stop ssh.socket 2>/dev/null || true")
    try:
        sql(db, "SELECT pg_switch_wal() FROM (SELECT txid_current()) AS written")
        told = wait_until(lambda: backed_up.receiver.firing("WALArchivingFailing", since), timeout=240, interval=2)
        assert told[0][1]["labels"]["host"] == db.address
    finally:
        vault.exec("systemctl start ssh.service")
    # The last backup's time, as its unit writes it, a second older than backup_max_age_hours.
    old = int(time.time()) - MAX_AGE_HOURS * 3600 - 1
    prom = "/var/lib/prometheus/node-exporter/stack-backup-full.prom"
    vault.exec(f"sed -i 's/}} [0-9]*$/}} {old}/' {prom}")
    try:
        told = wait_until(lambda: backed_up.receiver.firing("BackupTooOld", since), timeout=120, interval=2)
        assert told[0][1]["labels"]["host"] == vault.address
    finally:
        # A backup that succeeds writes its time anew: the alert ends.
        vault.exec("systemctl start stack-backup@diff.service")
    wait_until(lambda: backed_up.receiver.received("BackupTooOld", "resolved", since), timeout=120, interval=2)
    # Archiving catches up once the repository answers again (PostgreSQL retries a minute on).
    check = "runuser -u postgres -- pgbackrest --stanza=stack --log-level-console=warn check"
    wait_until(lambda: db.status(check) == 0, timeout=240, interval=5)


def test_a_changed_cipher_passphrase_stops_the_deploy_before_any_change_naming_it(backed_up: Cluster):
    vault = backed_up.one("backup")
    configured = vault.exec("sha256sum /etc/pgbackrest/conf.d/50-stack.conf")
    changed = backed_up.deploy(env=backed_up.environment(STACK_BACKUP_CIPHER_PASS="another-passphrase-0123456789"))
    assert changed.returncode != 0
    assert "STACK_BACKUP_CIPHER_PASS is not the passphrase the backup repository" in changed.output, changed.output[
        -3000:
    ]
    assert "Starting operation" not in changed.output  # stopped while planning
    assert vault.exec("sha256sum /etc/pgbackrest/conf.d/50-stack.conf") == configured
    assert repository_info(vault)["status"]["code"] == 0


def test_a_lost_database_host_is_restored_by_the_deploy_and_serves_its_old_results(backed_up: Cluster):
    db, web = backed_up.one("postgres"), backed_up.one("web")
    kept = {submit_task(web, n): n for n in range(300, 305)}
    for task_id in kept:
        assert task_result(web, task_id)["state"] == "SUCCESS"
    # A write every 0.2 s until the host is lost: the newest one restored tells what was lost.
    sql(db, "CREATE TABLE drill_heartbeat (at timestamptz)")
    db.exec(
        "systemd-run --unit=drill-heartbeat --uid=postgres sh -c 'while :; do psql -d celerydb -Xqc "
        '"INSERT INTO drill_heartbeat VALUES (clock_timestamp())"; sleep 0.2; done\''
    )
    time.sleep(3 * ARCHIVE_TIMEOUT)
    lost_at = time.time()
    new_db = backed_up.replace(db)

    restore = backed_up.deploy()
    assert restore.returncode == 0, restore.stderr[-6000:]
    restored = [line for line in restore.changed if "Restore the database from the repository" in line]
    assert restored == [
        f"Backups | Restore the database from the repository: this host replaces a lost one "
        f"(latest backup, every archived WAL) @ {new_db.address}"
    ], restore.changed
    newest = float(sql(new_db, "SELECT extract(epoch FROM max(at)) FROM drill_heartbeat"))
    rpo = lost_at - newest
    assert rpo <= ARCHIVE_TIMEOUT + ARCHIVE_SLACK, f"lost the last {rpo:.1f} s of writes"
    written = int(sql(new_db, "SELECT count(*) FROM drill_heartbeat"))
    assert written > 2 * ARCHIVE_TIMEOUT  # writes ran for 3 archive timeouts, 5 a second

    for task_id, n in kept.items():
        body = task_result(web, task_id, timeout=30)
        assert body["state"] == "SUCCESS" and body["result"]["answer"] == expected_answer(n), body
    check_task_end_to_end(backed_up)
    print(
        f"\nlost database host: RPO {rpo:.1f} s (archive_timeout {ARCHIVE_TIMEOUT} s); "
        f"RTO {restore.seconds:.0f} s (the deploy onto the new host, to a serving stack)"
    )

    again = backed_up.deploy()
    assert again.returncode == 0, again.stderr[-6000:]
    assert again.changed == [], again.changed
    # Backups go on from the restored cluster (a new timeline of the same stanza).
    vault = backed_up.one("backup")
    vault.exec("systemctl start stack-backup@diff.service")
    assert [backup["type"] for backup in repository_info(vault)["backup"]][-1] == "diff"
    assert re.search(r"\S", as_postgres(new_db, "pgbackrest --stanza=stack --log-level-console=warn check")) is None
