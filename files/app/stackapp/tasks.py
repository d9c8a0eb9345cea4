"""
Tasks. Each is idempotent: delivered at least once, it may run more than once, and running it
again gives the same answer with no other effect.
"""

from __future__ import annotations

import socket
import time

from stackapp.celery_app import app


@app.task(name="stackapp.compute")
def compute(n: int, sleep: float = 0.0) -> dict:
    """Sum of the squares of 0..n-1, after an optional ``sleep`` to make the task long.

    The caller can check the answer against the closed form (n-1)n(2n-1)/6."""
    if sleep:
        time.sleep(sleep)
    return {"n": n, "answer": sum(i * i for i in range(n)), "worker": socket.gethostname()}


@app.task(name="stackapp.heartbeat")
def heartbeat() -> float:
    """Sent by beat on a schedule: its results show that beat and a worker are alive."""
    return time.time()
