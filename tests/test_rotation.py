"""
Secret rotation, last of the bench tests since it changes the shared topology's passwords:
changing the PostgreSQL and RabbitMQ passwords and re-deploying sets them (as hashes), rewrites
the application's environment file and restarts exactly the units that read it, Flower among them
(and nothing else); tasks still
travel end to end, the old passwords are refused, and the run after that changes nothing.
"""

from __future__ import annotations

import uuid

import pika
import pytest

from bench import Cluster
from clients import APP_UNITS, amqp, check_task_end_to_end, psql_from, wait_until

pytestmark = pytest.mark.bench


def test_password_rotation_applies_then_changes_nothing(deployed: Cluster):
    # Earlier tests restarted the broker; start from a steady stack so that the change list
    # speaks of the rotation only (a unit systemd is restarting would be started again).
    wait_until(lambda: deployed.active(APP_UNITS), timeout=60)
    old = dict(deployed.secrets)
    deployed.secrets["STACK_POSTGRESQL_PASSWORD"] = uuid.uuid4().hex
    deployed.secrets["STACK_RABBITMQ_PASSWORD"] = uuid.uuid4().hex
    rotate = deployed.deploy()
    assert rotate.returncode == 0, rotate.stderr[-6000:]

    data = {host.address for host in deployed.by_group("postgres")}
    expected = {f"PostgreSQL | Set the password of role celeryuser @ {address}" for address in data}
    expected |= {f"RabbitMQ | Create or update vhost celery and user celery @ {address}" for address in data}
    for host in deployed.by_group("workers"):
        expected |= {
            f"Application | {operation} @ {host.address}"
            for operation in (
                "Write the environment file (broker and result URLs, with credentials)",
                "Restart stackapp-worker.service for the changed code, requirements, environment or unit",
                "Restart stackapp-beat.service for the changed code, requirements, environment or unit",
                "Restart stackapp-gunicorn.service for changed requirements, environment, units or worker class",
            )
        }
    for host in deployed.by_group("beat"):  # Flower, beside beat, reads the broker URL too
        expected.add(
            f"Application | Restart stackapp-flower.service for the changed code, requirements, environment or unit @ {host.address}"
        )
    # The broker's new password ends the connections of the old one, so a worker or beat can
    # exit and be awaiting systemd's restart when the deploy reaches it: the deploy then
    # starts it ("Keep ... running") just before restarting it. The same units, either way.
    restarted_units = {"stackapp-worker.service", "stackapp-beat.service", "stackapp-gunicorn.service", "stackapp-flower.service"}
    started_early = {
        change for change in rotate.changed
        if any(change.startswith(f"Application | Keep {unit} enabled and running @ ") for unit in restarted_units)
    }
    assert sorted(set(rotate.changed) - started_early) == sorted(expected)

    app = deployed.one("workers")
    check_task_end_to_end(deployed)
    with pytest.raises(AssertionError, match="password authentication failed"):
        psql_from(app, deployed, "SELECT 1", password=old["STACK_POSTGRESQL_PASSWORD"])
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        amqp(deployed, password=old["STACK_RABBITMQ_PASSWORD"])

    again = deployed.deploy()
    assert again.returncode == 0 and again.changed == [], again.changed
