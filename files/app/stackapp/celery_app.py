"""
The Celery application, configured so that no task is lost when a worker, the broker or the
result database crashes or restarts. Each setting says which failure it prevents.

The broker and result backend URLs (with credentials) come from the environment, which systemd
loads from the deploy's environment file.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("stackapp", include=["stackapp.tasks"])

BROKER_URL = os.environ["CELERY_BROKER_URL"]
# With Redis as broker, a task taken by a worker and never acknowledged (the worker crashed)
# goes back to the queue after this many seconds: longer than the longest task and any ETA, or
# a running task is given to a second worker. Results in Redis use the same value.
VISIBILITY_TIMEOUT = int(os.environ.get("STACK_VISIBILITY_TIMEOUT", "7200"))
if BROKER_URL.startswith("redis"):
    BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": VISIBILITY_TIMEOUT}
else:
    # Publisher confirms: apply_async returns only once RabbitMQ has taken the message, so a
    # broker crash right after "accepted" cannot swallow it.
    BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}

app.conf.update(
    broker_url=BROKER_URL,
    result_backend=os.environ["CELERY_RESULT_BACKEND"],
    # Acknowledge a task when it has finished, not when it is received: a worker that dies
    # mid-task leaves the message unacknowledged, and the broker delivers it again.
    task_acks_late=True,
    # When a pool process is killed (OOM killer, kill -9), requeue its task instead of
    # acknowledging it as failed with WorkerLostError.
    task_reject_on_worker_lost=True,
    # Each pool process reserves one task at a time: a crashed worker holds back (and a busy
    # one delays) at most one task per process instead of four.
    worker_prefetch_multiplier=1,
    broker_transport_options=BROKER_TRANSPORT_OPTIONS,
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    # Persistent messages (written to disk by RabbitMQ) in durable queues survive a broker
    # restart; persistent is Celery's default, stated here because the promise depends on it.
    task_default_delivery_mode="persistent",
    # Keep trying to reach the broker at start-up (systemd may start us before it) and
    # forever after a connection loss, instead of exiting after 100 attempts.
    broker_connection_retry_on_startup=True,
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    # When the broker connection drops, cancel the tasks running under it: their messages go
    # back to the queue and run again once, instead of finishing and failing to acknowledge.
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Publishing from the API retries a few times, then fails fast so the API can answer 503.
    task_publish_retry=True,
    task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
    # Storing a result retries (with back-off) while the result database restarts, instead of
    # losing the result of a task that did run.
    result_backend_always_retry=True,
    result_backend_max_retries=float("inf"),
    # Test pooled database connections before use, so the first query after a PostgreSQL
    # restart does not fail on a dead connection; give up connecting after 5 s, not never.
    database_engine_options={"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}},
    # Store the task's name, arguments and worker with its result: the row says what ran where.
    result_extended=True,
    task_track_started=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    beat_schedule={
        "heartbeat": {
            "task": "stackapp.heartbeat",
            "schedule": float(os.environ.get("STACK_HEARTBEAT_SECONDS", "60")),
        },
    },
)
