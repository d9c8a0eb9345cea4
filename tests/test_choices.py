"""
Broker and result backend are choices. On the split topology (hosts shared: the deployment is
switched in place, which is also the switch users make), every combination carries tasks end
to end; with Redis as broker, tasks queued while no worker runs survive a restart and a kill -9
of redis-server. The last step switches back to the defaults for the tests that follow.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from bench import Cluster
from clients import (
    APP,
    REDIS_BROKER_DB,
    REPORT,
    amqp,
    check_task_end_to_end,
    expected_answer,
    redis_client,
    submit_task,
    task_result,
    wait_until,
)

pytestmark = [pytest.mark.bench, pytest.mark.parametrize("deployed", ["split"], indirect=True)]

COMBINATIONS = [("redis", "redis"), ("redis", "postgresql"), ("rabbitmq", "redis"), ("rabbitmq", "postgresql")]


def queued_task_ids(cluster: Cluster) -> set[str]:
    """Ids of the task messages waiting in Redis' "celery" list (beat's heartbeats among them)."""
    messages = redis_client(cluster, db=REDIS_BROKER_DB).lrange("celery", 0, -1)
    return {json.loads(message)["headers"]["id"] for message in messages}


def switch(cluster: Cluster, broker: str, backend: str):
    run = cluster.deploy("--data", f"celery_broker={broker}", "--data", f"celery_result_backend={backend}")
    assert run.returncode == 0, run.stderr[-6000:]
    return run


def flower_sees_every_worker(cluster: Cluster) -> bool:
    """Whether Flower, on the beat host, serves its metrics and counts every worker host online."""
    metrics = requests.get(f"http://{cluster.one('beat').address}:5555/metrics", timeout=5).text
    online = [
        line for line in metrics.splitlines() if line.startswith("flower_worker_online{") and line.endswith(" 1.0")
    ]
    return len(online) == len(cluster.by_group("workers"))


def rabbitmq_task_queue(cluster: Cluster) -> tuple[int, int]:
    """(consumers, ready messages) of RabbitMQ's task queue, as RabbitMQ answers a passive
    declare (read from the queue itself, where its listed counts may lag)."""
    with amqp(cluster) as connection:
        method = connection.channel().queue_declare("celery", passive=True).method
        return method.consumer_count, method.message_count


def consumed_from(cluster: Cluster, broker: str) -> bool:
    """Whether the workers consume from ``broker`` and not from the other: RabbitMQ's task
    queue has a consumer per worker host, or none (a Redis queue has no consumers to count)."""
    consumers, _ = rabbitmq_task_queue(cluster)
    return consumers >= len(cluster.by_group("workers")) if broker == "rabbitmq" else consumers == 0


def left_in_the_other_broker(cluster: Cluster, broker: str) -> int:
    """Task messages waiting in the broker the deploy switched away from."""
    if broker == "rabbitmq":
        return redis_client(cluster, db=REDIS_BROKER_DB).llen("celery")
    return rabbitmq_task_queue(cluster)[1]


@pytest.mark.parametrize("broker, backend", COMBINATIONS, ids=[f"{b}+{r}" for b, r in COMBINATIONS])
def test_every_broker_and_backend_combination_carries_tasks_end_to_end(deployed: Cluster, broker, backend):
    """Tasks travel end to end; the workers consume from the new broker only (asked of RabbitMQ
    itself); Flower (Celery's metrics for Prometheus) runs on that broker too and sees every
    worker; a re-run changes nothing. What the units not yet restarted published to the old
    broker during the switch stays there, unconsumed: reported (docs/deploy.md)."""
    switch(deployed, broker, backend)
    check_task_end_to_end(deployed, backend=backend)
    wait_until(lambda: consumed_from(deployed, broker), timeout=60)
    REPORT.append(
        f"switch to {broker}+{backend}: {left_in_the_other_broker(deployed, broker)} task message(s) left "
        "in the broker switched away from"
    )
    wait_until(lambda: flower_sees_every_worker(deployed), timeout=60)
    again = switch(deployed, broker, backend)
    assert again.changed == [], again.changed


@pytest.mark.parametrize("fault", ["systemctl restart redis-server", "pkill -9 -x redis-server"])
def test_tasks_queued_in_redis_survive_redis_restart_and_crash(deployed: Cluster, fault: str):
    """Queued with no worker running, then Redis restarted (or killed: only the AOF, fsynced
    every second, holds the queue then), then workers started: every task completes."""
    switch(deployed, "redis", "postgresql")
    workers, web = deployed.by_group("workers"), deployed.one("web")
    try:
        for host in workers:
            host.exec(f"systemctl stop {APP}-worker.service")
        ids = [submit_task(web, n) for n in range(100, 150)]
        assert set(ids) <= queued_task_ids(deployed)
        time.sleep(1.5)  # appendfsync everysec
        deployed.one("redis").exec(fault)
        assert wait_until(lambda: set(ids) <= queued_task_ids(deployed), timeout=30)
    finally:
        for host in workers:
            host.exec(f"systemctl start {APP}-worker.service")
    for n, task_id in zip(range(100, 150), ids, strict=True):
        body = task_result(web, task_id, timeout=120)
        assert body["state"] == "SUCCESS" and body["result"]["answer"] == expected_answer(n), body


def test_switching_back_to_the_defaults(deployed: Cluster):
    switch(deployed, "rabbitmq", "postgresql")
    check_task_end_to_end(deployed)
    again = deployed.deploy()
    assert again.returncode == 0 and again.changed == [], again.changed
