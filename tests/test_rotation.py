"""
Secret rotation, last of the bench tests since it changes the shared topology's passwords:
changing the PostgreSQL, RabbitMQ and Redis passwords and re-deploying sets them (PostgreSQL's
and RabbitMQ's as hashes), rewrites the application's environment files, Redis's configuration
and its exporter's, and restarts exactly the units that read them (and nothing else); pyinfra's
most verbose output holds neither the old nor the new passwords; tasks still travel end to end,
the old passwords are refused, and the run after that changes nothing.
"""

from __future__ import annotations

import uuid

import pika
import pytest
import redis

from bench import Cluster
from clients import APP_UNITS, amqp, check_task_end_to_end, psql_from, redis_client, wait_until
from tasks import silences

pytestmark = pytest.mark.bench


def test_password_rotation_applies_then_changes_nothing(deployed: Cluster):
    # Earlier tests restarted the broker; start from a steady stack so that the change list
    # speaks of the rotation only (a unit systemd is restarting would be started again).
    wait_until(lambda: deployed.active(APP_UNITS), timeout=60)
    old = dict(deployed.secrets)
    for name in ("STACK_POSTGRESQL_PASSWORD", "STACK_RABBITMQ_PASSWORD", "STACK_REDIS_PASSWORD"):
        deployed.secrets[name] = uuid.uuid4().hex
    # Most verbose: pyinfra prints every command it runs and its output; none may carry a
    # password, old or new (Cluster.deploy checks the new ones; the old ones here).
    rotate = deployed.deploy("-vvv")
    assert rotate.returncode == 0, rotate.stderr[-6000:]
    assert not [name for name, value in old.items() if value in rotate.output]

    data = {host.address for host in deployed.by_group("postgres")}
    expected = {f"PostgreSQL | Set the password of role celeryuser @ {address}" for address in data}
    expected |= {f"RabbitMQ | Create or update vhost celery and user celery @ {address}" for address in data}
    # Redis and its exporter, the only users of Redis's password with the default choices.
    for address in {host.address for host in deployed.by_group("redis")}:
        expected |= {
            f"Redis | Write our Redis settings (persistence, auth, bind, memory limit, noeviction) @ {address}",
            f"Redis | Restart Redis to apply the changed configuration @ {address}",
            f"Monitoring exporters | Configure redis_exporter (private address, secret) @ {address}",
            f"Monitoring exporters | Restart redis_exporter to apply the changed configuration @ {address}",
            # The alerts each restart raises are silenced around it (tasks/silences.py).
            *(f"Redis | {name} @ {address}" for name in silences.operation_names("Redis")),
            *(f"Monitoring exporters | {name} @ {address}" for name in silences.operation_names("redis_exporter")),
        }
    for host in deployed.by_group("workers"):
        expected |= {
            f"Application | {operation} @ {host.address}"
            for operation in (
                "Write the environment file (broker and result URLs, with credentials, and the app's own)",
                "Restart stackapp-worker.service for its changed release, environment, deploy's modules or unit",
                "Restart stackapp-beat.service for its changed release, environment, deploy's modules or unit",
                "Restart stackapp-gunicorn.service for its changed release, environment, deploy's modules, socket unit or unit",
                *silences.operation_names("the application's units"),
            )
        }
    for host in deployed.by_group("beat"):  # Flower, beside beat, reads the broker URL from a file of its own
        expected |= {
            f"Application | {operation} @ {host.address}"
            for operation in (
                "Write Flower's environment file (the broker URL, with credentials)",
                "Restart stackapp-flower.service for its changed Flower packages, Flower environment or unit",
            )
        }
    # The broker's new password ends the connections of the old one, so a worker or beat can
    # exit and be awaiting systemd's restart when the deploy reaches it: the deploy then
    # starts it ("Keep ... running"), with the new environment, instead of restarting it.
    restarted_units = {
        "stackapp-worker.service",
        "stackapp-beat.service",
        "stackapp-gunicorn.service",
        "stackapp-flower.service",
    }
    started_early = {
        change
        for change in rotate.changed
        if any(change.startswith(f"Application | Keep {unit} running @ ") for unit in restarted_units)
    }
    for change in started_early:
        unit, host = change.removeprefix("Application | Keep ").split(" running @ ")
        expected = {
            e for e in expected if not (e.startswith(f"Application | Restart {unit} for ") and e.endswith(f"@ {host}"))
        }
    assert sorted(set(rotate.changed) - started_early) == sorted(expected)

    app = deployed.one("workers")
    check_task_end_to_end(deployed)
    with pytest.raises(AssertionError, match="password authentication failed"):
        psql_from(app, deployed, "SELECT 1", password=old["STACK_POSTGRESQL_PASSWORD"])
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        amqp(deployed, password=old["STACK_RABBITMQ_PASSWORD"])
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(deployed, password=old["STACK_REDIS_PASSWORD"]).ping()
    assert redis_client(deployed).ping()

    again = deployed.deploy()
    assert again.returncode == 0 and again.changed == [], again.changed
