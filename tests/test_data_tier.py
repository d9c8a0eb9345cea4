"""
The data tier on both topologies, checked with real clients from outside the target host:
Redis (redis-py), RabbitMQ (pika, AMQP 0-9-1) and PostgreSQL (psql on an application host,
psycopg2 from this machine, which is in no application group).
"""

from __future__ import annotations

import time
import uuid

import pika
import psycopg2
import pytest
import redis
import testinfra

from bench import Cluster

pytestmark = pytest.mark.bench

REDIS_PORT, AMQP_PORT, PG_PORT = 6379, 5672, 5432


def wait_until(check, timeout: float = 60, interval: float = 0.5):
    """Call ``check`` until it returns a true value or stops raising; its value, or the last error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} still false after {timeout}s")
        time.sleep(interval)


# -- converge and idempotence -------------------------------------------------------------------


def test_converge_succeeds(deployed: Cluster):
    run = deployed.runs[0]
    assert run.returncode == 0, f"fresh deploy failed:\n{run.stderr[-6000:]}"


def test_second_run_changes_nothing(deployed: Cluster):
    assert len(deployed.runs) >= 2, "the idempotence run did not happen (the fresh deploy failed)"
    rerun = deployed.runs[1]
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    assert rerun.changed == [], "operations that changed on the re-run:\n" + "\n".join(rerun.changed)
    assert rerun.results["totals"]["no_change"] > 0


def test_services_active_enabled_and_restarted_by_systemd(deployed: Cluster):
    for group, unit in (("redis", "redis-server"), ("rabbitmq", "rabbitmq-server"), ("postgres", "postgresql@15-main")):
        node = testinfra.get_host(f"docker://{deployed.one(group).container.name}")
        service = node.service(unit)
        assert service.is_running and service.is_enabled, unit
        assert node.run(f"systemctl show -p Restart --value {unit}").stdout.strip() == "always", unit


# -- Redis --------------------------------------------------------------------------------------


def redis_client(cluster: Cluster, password: str | None = "from-cluster") -> redis.Redis:
    password = cluster.secrets["STACK_REDIS_PASSWORD"] if password == "from-cluster" else password
    # RESP2, as Celery's Redis transport speaks it.
    return redis.Redis(
        host=cluster.one("redis").address, port=REDIS_PORT, password=password, socket_timeout=10, protocol=2
    )


def test_redis_answers_with_password_and_refuses_without(deployed: Cluster):
    assert redis_client(deployed).ping()
    with pytest.raises(redis.exceptions.AuthenticationError, match="Authentication required"):
        redis_client(deployed, password=None).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis_client(deployed, password="not-the-password").ping()


def test_redis_persistence_and_eviction_settings(deployed: Cluster):
    config = redis_client(deployed).config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["save"] == "3600 1 300 100 60 10000"
    assert config["protected-mode"] == "yes"
    assert set(config["bind"].split()) == {deployed.one("redis").address, "127.0.0.1"}


@pytest.mark.parametrize("how", ["systemctl restart redis-server", "pkill -9 -x redis-server"])
def test_redis_keeps_data_across_restart_and_crash(deployed: Cluster, how: str):
    """A key written just before is there afterwards; after kill -9 only the AOF can have it,
    since no RDB save point (at least 60 s) has passed."""
    key, value = f"bench:{uuid.uuid4()}", uuid.uuid4().hex
    client = redis_client(deployed)
    client.set(key, value)
    time.sleep(1.5)  # appendfsync everysec: the write reaches the disk within about a second
    deployed.one("redis").exec(how)
    assert wait_until(lambda: redis_client(deployed).get(key), timeout=30).decode() == value


# -- RabbitMQ -----------------------------------------------------------------------------------


def amqp(cluster: Cluster, user: str = "celery", password: str | None = None, vhost: str = "celery"):
    credentials = pika.PlainCredentials(user, password or cluster.secrets["STACK_RABBITMQ_PASSWORD"])
    parameters = pika.ConnectionParameters(
        cluster.one("rabbitmq").address, AMQP_PORT, vhost, credentials, connection_attempts=1, socket_timeout=10
    )
    return pika.BlockingConnection(parameters)


def test_amqp_persistent_message_survives_broker_restart(deployed: Cluster):
    queue, body = f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    connection = amqp(deployed)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True)
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent), mandatory=True)
    connection.close()

    deployed.one("rabbitmq").exec("systemctl restart rabbitmq-server")

    connection = wait_until(lambda: amqp(deployed), timeout=90)
    channel = connection.channel()
    method, _properties, received = channel.basic_get(queue)
    assert received == body, "the persistent message did not survive the restart"
    channel.basic_ack(method.delivery_tag)
    channel.queue_delete(queue)
    connection.close()


def test_guest_is_gone_and_app_user_is_confined_to_its_vhost(deployed: Cluster):
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        amqp(deployed, user="guest", password="guest", vhost="/")
    node = deployed.one("rabbitmq")
    assert node.status("rabbitmqctl -q authenticate_user guest guest") != 0
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        amqp(deployed, vhost="/")


def test_rabbitmq_limits_and_prometheus_plugin(deployed: Cluster):
    node = deployed.one("rabbitmq")
    environment = node.exec("rabbitmqctl -q environment")
    assert "{consumer_timeout,3600000}" in environment
    assert "{vm_memory_high_watermark,{relative,0.4}}" in environment or "{vm_memory_high_watermark,0.4}" in environment
    metrics = node.exec(f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{node.address}:15692/metrics').read().decode())\"")
    assert "rabbitmq_build_info" in metrics


# -- PostgreSQL ---------------------------------------------------------------------------------


def psql_from(host, cluster: Cluster, sql: str, password: str | None = None) -> str:
    password = password or cluster.secrets["STACK_POSTGRESQL_PASSWORD"]
    server = cluster.one("postgres").address
    return host.exec(
        f"PGPASSWORD='{password}' psql -h {server} -p {PG_PORT} -U celeryuser -d celerydb -tAc \"{sql}\""
    ).strip()


def test_app_role_connects_from_app_host_with_scram(deployed: Cluster):
    app = deployed.one("workers")
    assert psql_from(app, deployed, "SELECT current_user") == "celeryuser"
    assert psql_from(app, deployed, "SELECT owner FROM (SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = 'celerydb') d") == "celeryuser"
    method = deployed.one("postgres").exec(
        "sudo -u postgres psql -tAc \"SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'celeryuser'\""
    )
    assert method.strip() == "SCRAM-SHA-256$"


def test_app_role_refused_from_host_in_no_app_group(deployed: Cluster):
    """This machine reaches the containers from the bridge's gateway: in no application group."""
    with pytest.raises(psycopg2.OperationalError, match="no pg_hba.conf entry"):
        psycopg2.connect(
            host=deployed.one("postgres").address, port=PG_PORT, user="celeryuser", dbname="celerydb",
            password=deployed.secrets["STACK_POSTGRESQL_PASSWORD"], connect_timeout=10,
        )


# -- secrets and bad input ----------------------------------------------------------------------


def test_missing_secret_stops_the_deploy_before_anything_runs(deployed: Cluster):
    run = deployed.deploy(env=deployed.environment(STACK_RABBITMQ_PASSWORD=""))
    assert run.returncode != 0
    assert "STACK_RABBITMQ_PASSWORD is missing or empty" in run.stderr
    assert "nothing was changed" in run.stderr
    assert "Starting operation" not in run.stderr


def test_password_rotation_applies_then_changes_nothing(deployed: Cluster):
    """Idempotent including when the password changes: the new PostgreSQL and RabbitMQ passwords
    are set (one operation each), work, the old ones stop working, and the next run is a no-op."""
    old = dict(deployed.secrets)
    deployed.secrets["STACK_POSTGRESQL_PASSWORD"] = uuid.uuid4().hex
    deployed.secrets["STACK_RABBITMQ_PASSWORD"] = uuid.uuid4().hex
    rotate = deployed.deploy()
    assert rotate.returncode == 0, rotate.stderr[-6000:]
    assert sorted(op.split(" @ ")[0] for op in rotate.changed) == [
        "PostgreSQL | Set the password of role celeryuser",
        "RabbitMQ | Create or update vhost celery and user celery",
    ]
    app = deployed.one("workers")
    assert psql_from(app, deployed, "SELECT 1") == "1"
    with pytest.raises(AssertionError, match="password authentication failed"):
        psql_from(app, deployed, "SELECT 1", password=old["STACK_POSTGRESQL_PASSWORD"])
    amqp(deployed).close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        amqp(deployed, password=old["STACK_RABBITMQ_PASSWORD"])
    again = deployed.deploy()
    assert again.returncode == 0 and again.changed == [], again.changed
