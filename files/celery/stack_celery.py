"""
The application's Celery app, with the deploy's no-task-lost settings applied over its own.

The worker and beat units run ``celery --app stack_celery``; Gunicorn's workers import this
module after loading the ASGI app (gunicorn.conf.py). It finds the application's Celery app by
``STACK_CELERY_APP`` with Celery's own rules (as ``celery --app`` would), so the project needs
no change, and, when ``STACK_CELERY_DURABILITY`` is 1 (setting ``celery_enforce_durability``),
sets what the promise "no task is lost" rests on. Each setting says which failure it prevents.

Publishing depends on the role (``STACK_CELERY_ROLE``, set by each unit):

- the API (no role) fails fast: a few retries over about 2 s while the broker is unreachable,
  and at once while RabbitMQ blocks publishers (a memory or disk alarm), so it answers 503 and
  its client knows. Tried on RabbitMQ 4.0: a publish refused that way is still queued once the
  alarm clears (RabbitMQ had read it before blocking), so a 503 then means "not accepted, may
  still run once", as at-least-once delivery allows.
- beat and the workers (a periodic run, a task published by a task) have nobody to answer:
  they keep retrying while the broker is unreachable, for ``STACK_PUBLISH_RETRY_SECONDS``
  (setting ``celery_publish_retry_seconds``), and wait while it blocks publishers.

Queues (RabbitMQ): with ``STACK_QUEUE_TYPE`` quorum (the deploy's choice, tasks/rabbitmq.py), the
application's queues are quorum queues on topic exchanges, so that Celery delays countdown/ETA
tasks in RabbitMQ (native delayed delivery) instead of a worker holding them unacknowledged
past the consumer timeout, and RabbitMQ counts deliveries, so a task whose process dies every
time ends in the dead-letters queue. A Celery without ``task_create_missing_queue_exchange_type``
(older than 5.6) gets classic queues, and a warning in the log says what it lacks.

Installed by the deploy into ``<app_dir>/lib``.
"""

from __future__ import annotations

import logging
import math
import os

import celery
from celery.app.defaults import NAMESPACES
from celery.app.utils import find_app
from kombu.transport import pyamqp

app = find_app(os.environ["STACK_CELERY_APP"])
ROLE = os.environ.get("STACK_CELERY_ROLE", "web")
#: With Redis: seconds after which a task taken but not acknowledged goes to another worker.
VISIBILITY_TIMEOUT = int(os.environ.get("STACK_VISIBILITY_TIMEOUT", "7200"))
#: How long beat and the workers keep retrying a publish to an unreachable broker.
PUBLISH_RETRY_SECONDS = float(os.environ.get("STACK_PUBLISH_RETRY_SECONDS", "600"))
#: With a database result backend: how long a chord's unlock polls for its header (0: for ever).
CHORD_TIMEOUT_SECONDS = float(os.environ.get("STACK_CHORD_TIMEOUT_SECONDS", "0"))
#: "quorum" or "classic": the type of the application's queues on RabbitMQ.
QUEUE_TYPE = os.environ.get("STACK_QUEUE_TYPE", "classic")
#: What an application on classic queues lacks, for the warning.
CLASSIC_LACKS = (
    "no delivery limit (a task whose process dies every time is redelivered for ever) and "
    "countdown/ETA tasks held unacknowledged by a worker (RabbitMQ's consumer timeout closes its "
    "channel when they wait longer)"
)
#: The longest wait between two tries of a publish.
RETRY_INTERVAL_MAX = 2.0

#: The API's publish policy: about 2 s in all, then the API answers 503.
FAIL_FAST = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


def patient_policy(seconds: float) -> dict:
    """A publish policy that keeps trying for at least ``seconds``: tries every
    RETRY_INTERVAL_MAX seconds once the back-off has grown (each try may also wait for a
    connection), so a broker restart or a host reboot shorter than that loses no publish."""
    return {
        "max_retries": math.ceil(seconds / RETRY_INTERVAL_MAX) + 1,
        "interval_start": 0.2,
        "interval_step": 0.5,
        "interval_max": RETRY_INTERVAL_MAX,
    }


class PublishersBlocked(Exception):
    """RabbitMQ blocks this connection's publishes (a memory or disk alarm)."""


class FailFastConnection(pyamqp.Connection):
    """An AMQP connection that gives up when RabbitMQ blocks it, instead of waiting for the
    alarm to clear with the publish (and the API request behind it) hanging. The socket is
    dropped first: closing a blocked connection politely waits for RabbitMQ as well (tried)."""

    def _on_blocked(self) -> None:
        self.collect()
        raise PublishersBlocked("RabbitMQ blocks publishers (a memory or disk alarm; see its log)")


class FailFastTransport(pyamqp.Transport):
    """kombu's py-amqp transport with FailFastConnection (``broker_transport`` of the API).
    The deploy's broker URL is plain ``amqp://``; one with TLS would need pyamqp.SSLTransport."""

    Connection = FailFastConnection


#: For every process that publishes tasks (the API, beat, tasks that call other tasks).
PUBLISHER = dict(
    # Persistent messages in durable queues survive a broker restart.
    task_default_delivery_mode="persistent",
    task_publish_retry=True,
    # Keep reconnecting to a broker that restarts, at start-up and after, instead of exiting.
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,
)

#: For the worker and beat only: a web process reading results should answer, not wait.
WORKER = dict(
    # Acknowledge a task when it has finished: a worker that dies mid-task leaves it unacknowledged
    # and the broker delivers it again.
    task_acks_late=True,
    # A killed pool process (OOM killer, kill -9) requeues its task instead of failing it.
    task_reject_on_worker_lost=True,
    # Each pool process reserves one task at a time: a crash holds back at most one per process.
    worker_prefetch_multiplier=1,
    # On a lost broker connection, running tasks are cancelled and requeued, since their
    # acknowledgement could no longer be delivered.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Storing a result retries while the result store restarts, instead of losing it.
    result_backend_always_retry=True,
    result_backend_max_retries=float("inf"),
    # No time limit: a hard limit would fail a task and acknowledge it (it is not run again).
    # The application's own limits stand; celery_task_time_limit_seconds sets one on the
    # worker's command line.
    worker_send_task_events=True,
    task_send_sent_event=True,
)


def quorum_capable() -> bool:
    """Whether this Celery can put every queue, including those a worker creates from its -Q
    list, on quorum queues and topic exchanges (Celery 5.6 and later)."""
    return "create_missing_queue_exchange_type" in NAMESPACES["task"]


#: Quorum queues on topic exchanges: Celery disables global QoS (quorum queues have none) and,
#: for a countdown or ETA, publishes to its delay exchanges (topic exchanges only).
QUORUM = dict(
    task_default_queue_type="quorum",
    task_default_exchange_type="topic",
    task_create_missing_queue_type="quorum",
    task_create_missing_queue_exchange_type="topic",
    worker_detect_quorum_queues=True,
)


def queue_settings() -> dict:
    """Celery settings for the queue type the deploy chose, or {} for classic queues (Celery's
    default). Logs what the application lacks when it gets classic queues for want of a
    Celery that supports quorum queues."""
    if redis_broker() or QUEUE_TYPE != "quorum":
        return {}
    if not quorum_capable():
        logging.getLogger(__name__).warning(
            "Celery %s cannot run every queue as a quorum queue: the queues are classic, with %s. "
            "Celery 5.6 brings them.",
            celery.__version__,
            CLASSIC_LACKS,
        )
        return {}
    return QUORUM


#: With Redis: a worker looks for tasks past their visibility timeout every 10 s (kombu's
#: unacked_restore_interval) and, with a throttle of 1, searches Redis every time; kombu's
#: default throttle (10, kombu 5.7) searches every tenth time, so a task taken by a worker that
#: died came back up to 100 s after its timeout (read in kombu 5.7's Redis transport). A kombu
#: without the option never reads it (a channel reads only the options its transport lists).
REDIS_RESTORE = {"unacked_restore_throttle": 1}


def transport_options() -> dict:
    """Broker transport options merged over the application's: publisher confirms with
    RabbitMQ (a publish returns once the broker has the message); with Redis, the visibility
    timeout after which an unacknowledged task goes to another worker, and how soon after it."""
    ours = {"visibility_timeout": VISIBILITY_TIMEOUT, **REDIS_RESTORE} if redis_broker() else {"confirm_publish": True}
    return {**(app.conf.broker_transport_options or {}), **ours}


def bound_chord_unlock(sender: celery.Celery, **_) -> None:
    """Give Celery's ``chord_unlock`` a number of retries that lasts CHORD_TIMEOUT_SECONDS.

    With a database result backend, a chord's unlock task checks every
    ``result_chord_retry_interval`` seconds whether its header's tasks are done, with no limit:
    a chord whose header was never published (Celery publishes the unlock first, and the API
    fails fast) would poll for ever. Past the limit the unlock stops, and Celery 5.7 and later
    marks the chord's callback failed. A chord given ``max_retries`` by its caller keeps it."""
    if CHORD_TIMEOUT_SECONDS > 0:
        interval = sender.conf.result_chord_retry_interval or 1.0
        sender.tasks["celery.chord_unlock"].max_retries = math.ceil(CHORD_TIMEOUT_SECONDS / interval)


def redis_broker() -> bool:
    return os.environ.get("STACK_CELERY_BROKER") == "redis"


def apply(role: str) -> None:
    """Apply the settings of a publisher in ``role`` ("web", "beat" or "worker"), and those
    of a worker for "worker"."""
    app.conf.update(
        PUBLISHER,
        **queue_settings(),
        task_publish_retry_policy=FAIL_FAST if role == "web" else patient_policy(PUBLISH_RETRY_SECONDS),
        broker_transport_options=transport_options(),
        # With a database result store: test pooled connections before use, so the first query
        # after a database restart does not fail on a dead connection.
        database_engine_options={**(app.conf.database_engine_options or {}), "pool_pre_ping": True},
    )
    if role == "web" and not redis_broker():
        app.conf.broker_transport = f"{__name__}:FailFastTransport"
    if role != "worker":
        # With a database result store, Celery makes a backend per thread, and its constructor
        # connects to create the tables: while PostgreSQL was down, a web thread's first
        # submission failed (503), although publishing needs only the broker (seen in the fault
        # suite). Without it, the tables are made at the first query that needs them; the
        # workers make them at start.
        app.conf.database_create_tables_at_setup = False
    if role == "worker":
        # The unlock retries in the worker, which reads its max_retries there.
        if app.finalized:
            bound_chord_unlock(app)
        else:
            app.on_after_finalize.connect(bound_chord_unlock, weak=False)
        app.conf.update(
            WORKER,
            result_backend_transport_options={
                **(app.conf.result_backend_transport_options or {}),
                "visibility_timeout": VISIBILITY_TIMEOUT,
            },
        )


if os.environ.get("STACK_CELERY_DURABILITY") == "1":
    apply(ROLE)
