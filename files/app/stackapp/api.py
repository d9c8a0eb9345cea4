"""
The HTTP API: submit a task, read its state and result, health and metrics.

``/healthz`` answers 503 with the reason when the broker or the result database cannot be
reached, and the task endpoints answer 503 (not a traceback) when the service they need is
down. ``/metrics`` is Prometheus' text format, correct across Gunicorn's worker processes
(prometheus_client's multi-process mode, directory in PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Literal

from celery.result import AsyncResult
from celery.utils import uuid
from fastapi import FastAPI, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from pydantic import BaseModel, Field
from sqlalchemy import text

from stackapp import executions
from stackapp.celery_app import app as celery
from stackapp.release import RELEASE
from stackapp.tasks import compute, publish_chord, workflow

# The API must answer, not wait: a read tries the result database twice more while it
# restarts, then the API answers 503. (Workers, which must store every result, retry for ever:
# celery_app.py.) Set before the backend is first used, which is when Celery reads it.
celery.conf.result_backend_max_retries = 2

app = FastAPI(title="stackapp", version=RELEASE)

REQUESTS = Counter("stackapp_http_requests_total", "HTTP requests handled.", ["method", "route", "status"])
LATENCY = Histogram("stackapp_http_request_duration_seconds", "Time to answer an HTTP request.", ["method", "route"])
TASKS_SUBMITTED = Counter("stackapp_tasks_submitted_total", "Tasks accepted by the broker.")
CHECK_TIMEOUT = 3.0


class TaskRequest(BaseModel):
    n: int = Field(ge=0, le=10_000_000, description="Sum the squares of 0..n-1.")
    sleep: float = Field(0.0, ge=0, le=3600, description="Seconds the task sleeps first.")
    child: bool = Field(False, description="The task publishes a child task (same n) and returns its id.")
    countdown: float = Field(0.0, ge=0, le=86_400, description="Seconds before the task may run.")
    poison_until: str = Field("", description="The task kills its process until this file exists.")
    tune_process: bool = Field(
        False,
        description="The task also sets its CPU priority and affinity, as thread pools do, and says how that went.",
    )
    write_into: list[str] = Field(
        [],
        max_length=4,
        description="Directories the task writes a file into (named after its id), saying how each write went.",
    )


class WorkflowRequest(BaseModel):
    shape: Literal["chain", "chord"] = Field(
        description="A chain of two compute(n), or a chord of three and their total."
    )
    n: int = Field(ge=0, le=10_000_000, description="Sum the squares of 0..n-1, in each task.")


@app.middleware("http")
async def measure(request: Request, call_next):
    started = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        REQUESTS.labels(request.method, path, str(status)).inc()


@app.get("/")
def index() -> dict:
    return {"app": "stackapp", "release": RELEASE, "host": socket.gethostname(), "pid": os.getpid()}


def unavailable(service: str, error: Exception) -> HTTPException:
    """503 naming the service and the error at the root of ``error`` (Celery wraps the
    database's own error in BackendGetMetaError, which says only "failed to get meta")."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    reason = (str(error).strip().splitlines() or [""])[0]
    return HTTPException(503, f"{service} unavailable: {type(error).__name__}: {reason}")


@app.post("/tasks", status_code=202)
def submit(task: TaskRequest) -> dict:
    try:
        kwargs = task.model_dump(exclude={"countdown"})
        result = compute.apply_async(kwargs=kwargs, countdown=task.countdown or None)
    except Exception as error:  # the broker is unreachable after the publish retries
        raise unavailable("broker", error) from None
    TASKS_SUBMITTED.inc()
    return {"id": result.id}


@app.post("/workflows", status_code=202)
def submit_workflow(request: WorkflowRequest) -> dict:
    """A chain or a chord; the id is its last task's, whose result is the workflow's. Either
    is one publish: a chain travels in its first task's message, and a chord is published by
    a task (tasks.publish_chord says why)."""
    try:
        if request.shape == "chord":
            workflow_id = uuid()
            publish_chord.delay(request.n, workflow_id)
        else:
            workflow_id = workflow(request.shape, request.n).apply_async().id
    except Exception as error:  # the broker is unreachable after the publish retries
        raise unavailable("broker", error) from None
    TASKS_SUBMITTED.inc()
    return {"id": workflow_id}


@app.get("/tasks/{task_id}")
def status(task_id: str) -> dict:
    try:
        # Inside the try: Celery makes a result backend per thread, and the database backend
        # connects at once to create its tables unless told not to (the deploy tells web
        # processes, stack_celery.py), so a request thread's first read may fail here while
        # PostgreSQL is down (seen: a 500 instead of the 503).
        result = AsyncResult(task_id, app=celery)
        state = result.state
        value = result.result if result.ready() else None
        runs = executions.count(task_id)
    except Exception as error:  # the result database is unreachable
        raise unavailable("result backend", error) from None
    if isinstance(value, Exception):
        value = f"{type(value).__name__}: {value}"
    return {"id": task_id, "state": state, "result": value, "executions": runs}


def _check_broker() -> None:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)


def _check_results() -> None:
    backend = celery.backend
    if hasattr(backend, "ResultSession"):  # PostgreSQL (SQLAlchemy) backend
        session = backend.ResultSession()
        try:
            session.execute(text("SELECT 1"))
        finally:
            session.close()
    elif hasattr(backend, "client"):  # Redis backend
        backend.client.ping()


@app.get("/healthz")
def healthz(response: Response) -> dict:
    checks = {}
    for name, check in (("broker", _check_broker), ("results", _check_results)):
        try:
            check()
            checks[name] = "ok"
        except Exception as error:
            checks[name] = f"unreachable: {type(error).__name__}: {error}"
    healthy = all(value == "ok" for value in checks.values())
    response.status_code = 200 if healthy else 503
    return {"status": "ok" if healthy else "unavailable", **checks}


@app.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
