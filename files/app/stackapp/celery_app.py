"""
The Celery application. It sets no durability setting of its own (late acks, requeue on
worker loss, prefetch, publisher confirms, retries): the deploy applies those over any
application's configuration (files/celery/stack_celery.py), and the fault suite runs against
this app so that it proves the deploy's settings, not the app's.

The broker and result backend URLs (with credentials) come from the environment, which systemd
loads from the deploy's environment file.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.beat import BeatLazyFunc

app = Celery("stackapp", include=["stackapp.tasks"])

#: Beat's schedule: the heartbeat; and, where STACKAPP_TICK_SECONDS is set (the fault suite's
#: hosts), a tick every few seconds, whose runs the suite counts slot by slot.
schedule = {
    "heartbeat": {
        "task": "stackapp.heartbeat",
        "schedule": float(os.environ.get("STACK_HEARTBEAT_SECONDS", "60")),
        "kwargs": {"sent": BeatLazyFunc(time.time)},
    },
}
if os.environ.get("STACKAPP_TICK_SECONDS"):
    schedule["tick"] = {
        "task": "stackapp.tick",
        "schedule": float(os.environ["STACKAPP_TICK_SECONDS"]),
        "kwargs": {"sent": BeatLazyFunc(time.time)},
    }

app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    result_backend=os.environ["CELERY_RESULT_BACKEND"],
    # Give up connecting to the result database after 5 s, not never.
    database_engine_options={"connect_args": {"connect_timeout": 5}},
    # Store the task's name, arguments and worker with its result: the row says what ran where.
    result_extended=True,
    task_track_started=True,
    beat_schedule=schedule,
)
