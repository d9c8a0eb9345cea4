"""
An application on a Celery too old for quorum queues everywhere (5.4, before
``task_create_missing_queue_exchange_type``) keeps working as before: its queues are classic,
the deploy says what it lacks and which Celery brings it, and its worker logs the same.

The application is generated here: a flat layout (a module beside requirements.txt), names of
its own, Celery pinned to 5.4 and every other dependency unpinned, on RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import Cluster
from clients import check_task_end_to_end

pytestmark = pytest.mark.bench

APP = "oldjobs"
CELERY = "5.4.0"

FILES = {
    "requirements.txt": f"celery=={CELERY}\nfastapi\nsqlalchemy\npsycopg2-binary\ngunicorn\nuvicorn-worker\n",
    "oldjobs.py": """\
import os

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel

celery = Celery("oldjobs", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
api = FastAPI()


@celery.task(name="oldjobs.square_sum")
def square_sum(n):
    return {"n": n, "answer": sum(i * i for i in range(n))}


class Job(BaseModel):
    n: int


@api.post("/tasks", status_code=202)
def submit(job: Job):
    return {"id": square_sum.delay(job.n).id}


@api.get("/tasks/{task_id}")
def status(task_id: str):
    result = celery.AsyncResult(task_id)
    return {"state": result.state, "result": result.result if result.successful() else None}
""",
}
WARNING = f"Celery {CELERY} cannot run every queue as a quorum queue"


@pytest.fixture(scope="module")
def old_celery(converge, tmp_path_factory) -> Cluster:
    root: Path = tmp_path_factory.mktemp("oldjobs")
    for name, text in FILES.items():
        (root / name).write_text(text)
    with converge(
        "old-celery",
        {"old": ["rabbitmq", "postgres", "web", "workers", "beat"]},
        pip_cache=False,  # the wheelhouse holds the reference app's pins only
        app_name=APP,
        app_source=str(root),
        app_requirements="requirements.txt",
        asgi_app="oldjobs:api",
        app_health_path="/openapi.json",  # no health endpoint of its own: FastAPI's schema answers
        celery_app="oldjobs:celery",
    ) as cluster:
        yield cluster


def test_deploys_on_classic_queues_says_what_the_app_lacks_and_changes_nothing_again(old_celery: Cluster):
    fresh, again = old_celery.runs[:2]
    assert fresh.returncode == 0, fresh.stderr[-6000:]
    assert again.returncode == 0 and again.changed == [], again.changed
    # The first run says it once the venv is installed; a re-run reads it before any operation.
    for run in (fresh, again):
        assert WARNING in run.output and "Celery 5.6 brings them" in run.output, run.output[-3000:]


def test_its_queue_is_classic_and_tasks_travel(old_celery: Cluster):
    host = old_celery.one("rabbitmq")
    listed = json.loads(host.exec("rabbitmqctl -q list_queues -p celery name type --formatter json"))
    queue = next(row for row in listed if row["name"] == "celery")
    assert queue["type"] == "classic", listed
    check_task_end_to_end(old_celery, reference=False)
    log = host.exec(f"journalctl -u {APP}-worker.service --no-pager")
    assert WARNING in log, log[-3000:]
