"""
Tasks. Each is idempotent: delivered at least once, it may run more than once, and running it
again gives the same answer with no other effect than one more line in the executions record
(``stackapp.executions``), which is how duplicates are counted.
"""

from __future__ import annotations

import socket
import time

from stackapp import executions
from stackapp.celery_app import app


@app.task(name="stackapp.compute", bind=True)
def compute(self, n: int, sleep: float = 0.0) -> dict:
    """Sum of the squares of 0..n-1, after an optional ``sleep`` to make the task long.

    The caller can check the answer against the closed form (n-1)n(2n-1)/6."""
    execution = executions.started(self.request.id)
    if sleep:
        time.sleep(sleep)
    answer = sum(i * i for i in range(n))
    executions.finished(execution)
    return {"n": n, "answer": answer, "worker": socket.gethostname()}


@app.task(name="stackapp.heartbeat")
def heartbeat() -> float:
    """Sent by beat on a schedule: its results show that beat and a worker are alive."""
    return time.time()
