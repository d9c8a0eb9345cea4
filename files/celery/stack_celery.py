"""
The application's Celery app, with the deploy's no-task-lost settings applied over its own.

The worker and beat units run ``celery --app stack_celery``; Gunicorn's workers import this
module after loading the ASGI app (gunicorn.conf.py). It finds the application's Celery app by
``STACK_CELERY_APP`` with Celery's own rules (as ``celery --app`` would), so the project needs
no change, and, when ``STACK_CELERY_DURABILITY`` is 1 (setting ``celery_enforce_durability``),
sets what the promise "no task is lost" rests on. Each setting says which failure it prevents.

Installed by the deploy into ``<app_dir>/lib``.
"""

from __future__ import annotations

import os

from celery.app.utils import find_app

app = find_app(os.environ["STACK_CELERY_APP"])
#: With Redis: seconds after which a task taken but not acknowledged goes to another worker.
VISIBILITY_TIMEOUT = int(os.environ.get("STACK_VISIBILITY_TIMEOUT", "7200"))

#: For every process that publishes tasks (the API, beat, tasks that call other tasks).
PUBLISHER = dict(
    # Persistent messages in durable queues survive a broker restart.
    task_default_delivery_mode="persistent",
    # Publishing retries a few times, then fails fast, so an API can answer an error at once.
    task_publish_retry=True,
    task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
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


def transport_options() -> dict:
    """Broker transport options merged over the application's: publisher confirms with
    RabbitMQ (a publish returns once the broker has the message); with Redis, the visibility
    timeout after which an unacknowledged task goes to another worker."""
    ours = (
        {"visibility_timeout": VISIBILITY_TIMEOUT}
        if os.environ.get("STACK_CELERY_BROKER") == "redis"
        else {"confirm_publish": True}
    )
    return {**(app.conf.broker_transport_options or {}), **ours}


def apply(worker: bool) -> None:
    """Apply the settings of a publisher, and of a worker when ``worker``."""
    app.conf.update(PUBLISHER, broker_transport_options=transport_options())
    if worker:
        app.conf.update(
            WORKER,
            result_backend_transport_options={
                **(app.conf.result_backend_transport_options or {}),
                "visibility_timeout": VISIBILITY_TIMEOUT,
            },
            # With a database result store: test pooled connections before use, so the first
            # store after a database restart does not fail on a dead connection.
            database_engine_options={**(app.conf.database_engine_options or {}), "pool_pre_ping": True},
        )


if os.environ.get("STACK_CELERY_DURABILITY") == "1":
    apply(worker=os.environ.get("STACK_CELERY_ROLE") == "worker")
