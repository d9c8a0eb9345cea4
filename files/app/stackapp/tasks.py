"""
Tasks. Each is idempotent: delivered at least once, it may run more than once, and running it
again gives the same answer with no other effect than one more line in the executions record
(``stackapp.executions``), which is how duplicates are counted.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time

from celery import chain, chord
from celery.utils import uuid

from stackapp import executions
from stackapp.celery_app import app

#: The tasks of a chord's header.
CHORD_SIZE = 3


def tune() -> dict[str, str]:
    """Set this process's CPU priority and affinity to what they are, as thread pools and
    native libraries do: what each call answered ("allowed", or the error's name)."""
    calls = {
        "nice": lambda: os.nice(0),
        "sched_setaffinity": lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)),
    }
    answers = {}
    for name, call in calls.items():
        try:
            call()
            answers[name] = "allowed"
        except OSError as error:
            answers[name] = errno.errorcode.get(error.errno or 0, str(error))
    return answers


def _write_into(directories: list[str], name: str) -> dict[str, str]:
    """Write a file ``name`` (holding its name) into each directory, as an application writes
    uploads or reports: what each write answered ("written", or the error's name)."""
    answers = {}
    for directory in directories:
        try:
            with open(os.path.join(directory, name), "w") as file:
                file.write(name)
            answers[directory] = "written"
        except OSError as error:
            answers[directory] = errno.errorcode.get(error.errno or 0, str(error))
    return answers


@app.task(name="stackapp.compute", bind=True)
def compute(
    self,
    n: int,
    sleep: float = 0.0,
    child: bool = False,
    poison_until: str = "",
    tune_process: bool = False,
    write_into: list[str] | None = None,
) -> dict:
    """Sum of the squares of 0..n-1, after an optional ``sleep`` to make the task long.

    The caller can check the answer against the closed form (n-1)n(2n-1)/6. With ``child``,
    the task also publishes a task of its own (the same sum, as a task that calls ``.delay()``
    does) and returns its id, so the caller can follow it. With ``poison_until`` (a path), the
    task kills its own process, as an out-of-memory kill would, until that file exists: a
    poison task, and its fix. With ``tune_process``, the task also sets its process's CPU
    priority and affinity (``tune``) and returns what the calls answered; with ``write_into``
    (directories), it writes a file named after its id into each and says how that went."""
    execution = executions.started(self.request.id)
    if poison_until and not os.path.exists(poison_until):
        os.kill(os.getpid(), signal.SIGKILL)
    if sleep:
        time.sleep(sleep)
    answer = sum(i * i for i in range(n))
    result = {"n": n, "answer": answer, "worker": socket.gethostname()}
    if child:
        result["child"] = compute.delay(n).id
    if tune_process:
        result["tuned"] = tune()
    if write_into:
        result["written"] = _write_into(write_into, self.request.id)
    executions.finished(execution)
    return result


@app.task(name="stackapp.heartbeat")
def heartbeat(sent: float | None = None) -> dict:
    """Sent by beat on a schedule: its results show that beat and a worker are alive. ``sent``
    is when beat sent it (evaluated by beat at each run, before any publish retry), so a run
    sent late is told from a run skipped."""
    return {"sent": sent, "ran": time.time()}


@app.task(name="stackapp.tick")
def tick(sent: float | None = None) -> dict:
    """The heartbeat's twin on a short interval (STACKAPP_TICK_SECONDS), kept apart by its name:
    the fault suite counts its runs, and the slots they missed, around each fault."""
    return {"sent": sent, "ran": time.time()}


@app.task(name="stackapp.total", bind=True)
def total(self, results: list[dict]) -> dict:
    """A chord's callback: the sum of its header's answers."""
    execution = executions.started(self.request.id)
    answer = sum(result["answer"] for result in results)
    executions.finished(execution)
    return {"answer": answer, "parts": len(results)}


def workflow(shape: str, n: int, workflow_id: str | None = None):
    """A canvas of compute(n) tasks whose last task answers ``expected(shape, n)``: a chain of
    two (the second runs once the first succeeded) or a chord of three and their total.

    A chord's ids all derive from ``workflow_id`` (its callback's id): published again (a
    publishing task run twice), it is the same chord, whose callback may run twice, not a
    second chord beside a first one that waits for ever."""
    if shape == "chain":
        return chain(compute.si(n), compute.si(n))
    workflow_id = workflow_id or uuid()
    header = [compute.si(n).set(task_id=f"{workflow_id}-{i}") for i in range(CHORD_SIZE)]
    return chord(header, total.s()).set(task_id=f"{workflow_id}-header")


@app.task(name="stackapp.publish_chord")
def publish_chord(n: int, workflow_id: str) -> str:
    """Publish workflow("chord", n) with its callback's id ``workflow_id``, from a worker.

    Why not from the API: with a database result backend, Celery publishes a chord's
    ``chord_unlock`` (which polls the header's results every second until all are ready)
    before the header's tasks. The API fails fast while RabbitMQ blocks publishers, so a chord
    refused halfway left an unlock polling for ever for tasks that were never sent (seen on
    the bench: 21 of them after a 10 s memory alarm). The API's one publish happens or not; a
    worker's publishes wait for the broker, and run again they publish the same ids."""
    workflow("chord", n, workflow_id).apply_async(task_id=workflow_id)
    return workflow_id
