"""
The data tier on both topologies, checked with real clients from outside the target host:
Redis (redis-py), RabbitMQ (pika, AMQP 0-9-1) and PostgreSQL (psql on an application host,
psycopg2 from this machine, which is in no application group).
"""

from __future__ import annotations

import json
import time
import uuid

import pika
import psycopg2
import pytest
import redis

from bench import Cluster
from clients import MANAGED_UNITS, PG_PORT, amqp, check_task_end_to_end, psql_from, redis_client, wait_until

pytestmark = pytest.mark.bench


def test_services_active_enabled_and_restarted_by_systemd(deployed: Cluster):
    for group in ("redis", "rabbitmq", "postgres"):
        for unit in MANAGED_UNITS[group]:
            service = deployed.one(group).node.service(unit)
            assert service.is_running and service.is_enabled, unit
            if unit.endswith(".service"):  # not the backups' timers, which start a oneshot and have no Restart=
                assert service.systemd_properties["Restart"] == "always", unit


# -- Redis --------------------------------------------------------------------------------------


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


def test_redis_has_half_the_hosts_memory_and_refuses_writes_beyond_it(deployed: Cluster):
    """redis_maxmemory = auto: half the host's memory. At the limit Redis refuses a write (it
    evicts nothing), and writes again once there is room (the limit lowered for the test)."""
    host_kib = int(deployed.one("redis").exec("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    client = redis_client(deployed)
    limit = int(client.config_get("maxmemory")["maxmemory"])
    assert abs(limit - host_kib * 1024 / 2) < 0.01 * host_kib * 1024, (limit, host_kib)
    key = f"bench:{uuid.uuid4()}"
    client.config_set("maxmemory", 1)
    try:
        # redis-py takes Redis' "OOM" prefix into the exception's class.
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="command not allowed when used memory"):
            client.set(key, "x")
    finally:
        client.config_set("maxmemory", limit)
    assert client.set(key, "x") and client.delete(key)


def test_redis_host_asks_for_memory_overcommit(deployed: Cluster):
    """vm.overcommit_memory = 1 persists in /etc/sysctl.d; a container cannot set the kernel's
    value, which is its host's: then the deploy says so, naming the setting, on every run."""
    redis_host = deployed.one("redis")
    assert "vm.overcommit_memory = 1" in redis_host.exec("cat /etc/sysctl.d/60-stack-redis.conf")
    if redis_host.exec("cat /proc/sys/vm/overcommit_memory").strip() != "1":
        for run in deployed.runs[:2]:
            assert "Set vm.overcommit_memory = 1 on that host" in run.output, run.output[-3000:]


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


def test_amqp_persistent_message_survives_broker_restart(deployed: Cluster):
    queue, body = f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    connection = amqp(deployed)
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, durable=True)
    channel.basic_publish(
        "", queue, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent), mandatory=True
    )
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
    # disk_free_limit.absolute = 1GB, as configured and as the node applies it (in bytes).
    assert '{disk_free_limit,"1GB"}' in environment
    status = json.loads(node.exec("rabbitmq-diagnostics -q status --formatter json"))
    assert status["disk_free_limit"] == 1_000_000_000, status["disk_free_limit"]
    assert "{vm_memory_high_watermark,{relative,0.4}}" in environment or "{vm_memory_high_watermark,0.4}" in environment
    metrics = node.exec(
        f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{node.address}:15692/metrics').read().decode())\""
    )
    assert "rabbitmq_build_info" in metrics


def test_the_stack_uses_no_deprecated_rabbitmq_feature(deployed: Cluster):
    """RabbitMQ 4 turns its deprecated features off release after release (global QoS, transient
    non-exclusive queues...): with the workers, beat, Flower and the API connected and a task
    run, RabbitMQ reports none in use. A transient non-exclusive queue declared here shows that
    the report would name one."""
    node = deployed.one("rabbitmq")
    report = "rabbitmq-diagnostics -q check_if_any_deprecated_features_are_used"
    if node.status("rabbitmq-diagnostics help | grep -q check_if_any_deprecated_features_are_used") != 0:
        pytest.skip("this RabbitMQ (before 3.13) has no report of deprecated features in use")
    check_task_end_to_end(deployed)
    assert node.status(report) == 0, node.exec(report, check=False)
    connection, probe = amqp(deployed), f"probe-{uuid.uuid4()}"
    channel = connection.channel()
    try:
        channel.queue_declare(probe, durable=False, exclusive=False)
        wait_until(lambda: "transient_nonexcl_queues" in node.exec(report, check=False), timeout=30)
    finally:
        channel.queue_delete(probe)
        connection.close()


# -- PostgreSQL ---------------------------------------------------------------------------------


def test_app_role_connects_from_app_host_with_scram(deployed: Cluster):
    app = deployed.one("workers")
    assert psql_from(app, deployed, "SELECT current_user") == "celeryuser"
    assert (
        psql_from(
            app,
            deployed,
            "SELECT owner FROM (SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = 'celerydb') d",
        )
        == "celeryuser"
    )
    method = deployed.one("postgres").exec(
        "sudo -u postgres psql -tAc \"SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'celeryuser'\""
    )
    assert method.strip() == "SCRAM-SHA-256$"


def test_app_role_refused_from_host_in_no_app_group(deployed: Cluster):
    """This machine reaches the containers from the bridge's gateway: in no application group."""
    with pytest.raises(psycopg2.OperationalError, match="no pg_hba.conf entry"):
        psycopg2.connect(
            host=deployed.one("postgres").address,
            port=PG_PORT,
            user="celeryuser",
            dbname="celerydb",
            password=deployed.secrets["STACK_POSTGRESQL_PASSWORD"],
            connect_timeout=10,
        )
