"""
Task shapes beyond "run now, once" on RabbitMQ: the application's queues are quorum queues, so
a countdown longer than RabbitMQ's consumer timeout waits in RabbitMQ (Celery's native delayed
delivery) instead of in a worker, and runs once with no worker restart; a poison task (its
process dies at every delivery) stops after the delivery limit in the dead-letters queue, the
operator is alerted, and once fixed, ``<app>-dead-letters replay`` runs it once more; a chord
whose header was never sent stops waiting after ``celery_chord_timeout_seconds``.

On the split topology (its monitoring host alerts this process's webhook receiver), deployed
again for these tests with RabbitMQ's consumer timeout shortened to CONSUMER_TIMEOUT_SECONDS
and the chord timeout to CHORD_TIMEOUT_SECONDS, and restored after.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from bench import Cluster, Host, wait_until
from clients import APP, REPORT, amqp, as_the_worker, task_result, web_url
from faults.harness import waiting_messages, worker_holdings
from settings.declarations import Settings
from tasks.rabbitmq import DEAD_LETTERS, POLICY

pytestmark = [pytest.mark.bench, pytest.mark.parametrize("deployed", ["split"], indirect=True)]

#: RabbitMQ's consumer timeout for these tests (the default is an hour).
CONSUMER_TIMEOUT_SECONDS = 20
#: The countdown of the delayed task: beyond the consumer timeout, with a margin for the
#: samples taken after it.
COUNTDOWN_SECONDS = CONSUMER_TIMEOUT_SECONDS + 20
#: How long a chord waits for its header in these tests (the default is a day).
CHORD_TIMEOUT_SECONDS = 15


@pytest.fixture(scope="module")
def short_timeouts(deployed: Cluster) -> Iterator[Cluster]:
    """The topology with a 20 s consumer timeout (the longest task lowered to fit under it) and
    a 15 s chord timeout."""
    run = deployed.deploy(
        "--data",
        f"rabbitmq_consumer_timeout_ms={CONSUMER_TIMEOUT_SECONDS * 1000}",
        "--data",
        f"celery_longest_task_seconds={CONSUMER_TIMEOUT_SECONDS // 2}",
        "--data",
        f"celery_chord_timeout_seconds={CHORD_TIMEOUT_SECONDS}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    try:
        yield deployed
    finally:
        restore = deployed.deploy()
        assert restore.returncode == 0, restore.stderr[-3000:]


def queues(rabbitmq: Host) -> dict[str, dict]:
    """The application vhost's queues as RabbitMQ lists them, by name."""
    rows = rabbitmq.exec(
        "rabbitmqctl -q list_queues -p celery name type policy messages messages_unacknowledged --formatter json"
    )
    return {row["name"]: row for row in json.loads(rows)}


def submit(web: Host, **task) -> str:
    response = requests.post(web_url(web, "/tasks"), json={"n": 100, **task}, timeout=15)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def worker_process(cluster: Cluster) -> tuple[str, str]:
    """The worker unit's main PID and how often systemd restarted it."""
    worker = cluster.one("workers")
    values = worker.exec(f"systemctl show -p MainPID -p NRestarts --value {APP}-worker.service").split()
    return values[0], values[1]


def test_application_queues_are_quorum_queues_with_a_delivery_limit_and_a_dead_letters_queue(deployed: Cluster):
    listed = queues(deployed.one("rabbitmq"))
    assert (listed["celery"]["type"], listed["celery"]["policy"]) == ("quorum", POLICY), listed["celery"]
    assert listed[DEAD_LETTERS]["type"] == "classic", listed[DEAD_LETTERS]
    # Celery's delay queues: a worker declares them when native delayed delivery is on.
    assert any(name.startswith("celery_delayed_") for name in listed), sorted(listed)
    policy = json.loads(deployed.one("rabbitmq").exec("rabbitmqctl -q list_policies -p celery --formatter json"))
    assert [json.loads(p["definition"]) for p in policy if p["name"] == POLICY] == [
        {
            "delivery-limit": Settings().rabbitmq_delivery_limit,
            "dead-letter-exchange": DEAD_LETTERS,
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
        }
    ], policy


def test_a_countdown_beyond_the_consumer_timeout_waits_in_rabbitmq_and_runs_once(short_timeouts: Cluster):
    """The task waits in Celery's delay queues, not unacknowledged in a worker, so RabbitMQ's
    consumer timeout never closes the worker's channel (which, with classic queues, made the
    worker exit and run its tasks again, every timeout)."""
    cluster = short_timeouts
    web, rabbitmq = cluster.one("web"), cluster.one("rabbitmq")
    before = worker_process(cluster)
    task_id = submit(web, countdown=COUNTDOWN_SECONDS)
    time.sleep(CONSUMER_TIMEOUT_SECONDS + 5)
    # Other tasks are unacknowledged in celery while a worker runs them, beat's heartbeat every
    # 5 s among them (CI once sampled one there beside the waiting countdown task). A worker
    # holding the countdown task would hold it in every sample.
    seen: list[tuple[int, int]] = []

    def waits_in_rabbitmq() -> bool:
        listed = queues(rabbitmq)
        delayed = sum(row["messages"] for name, row in listed.items() if name.startswith("celery_delayed_"))
        seen.append((delayed, listed["celery"]["messages_unacknowledged"]))
        return seen[-1] == (1, 0)

    try:
        wait_until(waits_in_rabbitmq, timeout=8, interval=0.5)
    except AssertionError:
        held = worker_holdings(cluster)
        raise AssertionError(f"(in the delay queues, unacknowledged in celery) for 8 s: {seen}; {held}") from None
    result = task_result(web, task_id, timeout=COUNTDOWN_SECONDS + 30)
    assert (result["state"], result["executions"]) == ("SUCCESS", 1), result
    assert worker_process(cluster) == before, "the worker restarted while the task waited"
    REPORT.append(
        f"a {COUNTDOWN_SECONDS}s countdown with a {CONSUMER_TIMEOUT_SECONDS}s consumer timeout: waited in "
        f"RabbitMQ's delay queues, ran once, the worker kept its process"
    )


#: What a chord refused halfway leaves (run with the worker's environment; argv[1] is the
#: callback's id): Celery publishes the unlock first, and the header is never sent.
HALF_SENT_CHORD = """
import sys
from celery.result import AsyncResult, GroupResult
from stack_celery import app
callback = sys.argv[1]
header = GroupResult(callback + "-header", [AsyncResult(callback + "-0", app=app)], app=app)
app.backend.fallback_chord_unlock(header, app.signature("stackapp.total").set(task_id=callback))
"""


def test_a_chord_whose_header_was_never_sent_fails_after_the_chord_timeout(short_timeouts: Cluster):
    """Celery's chord_unlock polls the header's results every second, with no limit by default,
    so a chord refused halfway (seen: 21 unlocks polling after a 10 s memory alarm, before the
    reference API sent chords from a task) polled for ever. With celery_chord_timeout_seconds
    it stops after that long, the chord's callback is marked failed, and RabbitMQ holds no
    message of it."""
    cluster = short_timeouts
    worker, web = cluster.one("workers"), cluster.one("web")
    script = base64.b64encode(HALF_SENT_CHORD.encode()).decode()
    worker.exec(f"echo {script} | base64 -d > /tmp/half_sent_chord.py && chmod 644 /tmp/half_sent_chord.py")
    callback = f"half-sent-{uuid.uuid4()}"
    started = time.monotonic()
    as_the_worker(worker, f"/opt/{APP}/current/venv/bin/python /tmp/half_sent_chord.py {callback}")
    result = task_result(web, callback, timeout=CHORD_TIMEOUT_SECONDS + 60)
    waited = time.monotonic() - started
    assert result["state"] == "FAILURE" and "chord_unlock" in str(result["result"]), result
    assert waited >= CHORD_TIMEOUT_SECONDS, f"the chord failed after {waited:.1f}s, before its timeout"

    wait_until(lambda: sum(waiting_messages(cluster).values()) == 0, timeout=30, interval=1)
    REPORT.append(
        f"a chord whose header was never sent, with a {CHORD_TIMEOUT_SECONDS}s chord timeout: its callback "
        f"failed after {waited:.1f}s and its unlock stopped"
    )


def dead_lettered(cluster: Cluster) -> int:
    """Messages in the dead-letters queue, read with an AMQP client (a passive declare)."""
    with amqp(cluster) as connection:
        return connection.channel().queue_declare(DEAD_LETTERS, passive=True).method.message_count


def test_a_poison_task_is_dead_lettered_after_the_delivery_limit_alerted_and_replayed_once_fixed(
    short_timeouts: Cluster,
):
    cluster = short_timeouts
    web, worker = cluster.one("web"), cluster.one("workers")
    limit = Settings().rabbitmq_delivery_limit
    fix = f"/opt/{APP}/poison-fixed-{uuid.uuid4().hex}"
    since = time.monotonic()
    task_id = submit(web, poison_until=fix)

    wait_until(lambda: dead_lettered(cluster) == 1, timeout=180, interval=1)
    stopped = requests.get(web_url(web, f"/tasks/{task_id}"), timeout=10).json()
    assert stopped["state"] != "SUCCESS" and stopped["executions"] in (limit, limit + 1), stopped
    # The workers go on with other tasks.
    assert task_result(web, submit(web), timeout=60)["state"] == "SUCCESS"

    told = wait_until(lambda: cluster.receiver.firing("TasksDeadLettered", since), timeout=120, interval=1)
    alerted = told[0][0] - since

    listing = worker.exec(f"{APP}-dead-letters list")
    assert task_id in listing and "1 task(s) in dead-letters" in listing, listing
    worker.exec(f"touch {fix} && chmod 0644 {fix}")
    try:
        replay = worker.exec(f"{APP}-dead-letters replay {task_id}")
        assert "1 of 1 task(s) replayed" in replay, replay
        result = task_result(web, task_id, timeout=60)
        assert (result["state"], result["executions"]) == ("SUCCESS", stopped["executions"] + 1), result
        assert dead_lettered(cluster) == 0
        REPORT.append(
            f"a poison task: ran {stopped['executions']} times (delivery limit {limit}), then dead-lettered; "
            f"TasksDeadLettered received {alerted:.0f}s after it was submitted; replayed once fixed: ran once, SUCCESS"
        )
    finally:
        worker.exec(f"rm -f {fix}")
