"""
Every execution of a task is written down, so that at-least-once delivery can be measured: a
task whose worker died mid-run, or whose broker connection dropped, is delivered again and
shows two executions. The record lives in the result store, which every deployment has: a
table ``stackapp_executions`` in PostgreSQL, or a list per task in Redis.

Writes wait (up to ``WAIT_SECONDS``) for a result store that is restarting, as Celery's own
result writes do; reads, made by the API, fail at once so that it can answer 503.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, func, select
from sqlalchemy.exc import DBAPIError

RESULT_URL = os.environ["CELERY_RESULT_BACKEND"]
WAIT_SECONDS = 120
REDIS_EXPIRY_SECONDS = 86_400  # as long as Celery keeps a result in Redis

metadata = MetaData()
executions = Table(
    "stackapp_executions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", String(155), nullable=False, index=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True)),
)


@dataclass
class Execution:
    """One run of one task: where to mark it finished."""

    task_id: str
    key: int


class _Store:
    """The result store's connection, opened in the process that uses it (after the fork)."""

    def __init__(self) -> None:
        self.pid, self.client = None, None

    def get(self):
        if self.pid != os.getpid():
            self.pid, self.client = os.getpid(), self._connect()
        return self.client

    @staticmethod
    def _connect():
        if RESULT_URL.startswith("redis"):
            import redis

            return redis.Redis.from_url(RESULT_URL, socket_timeout=10, socket_connect_timeout=5)
        engine = create_engine(RESULT_URL.removeprefix("db+"), pool_pre_ping=True, connect_args={"connect_timeout": 5})
        return engine


_store = _Store()
_tables_ready = False


def _waiting(call):
    """``call()``, tried again every second while the result store is unreachable."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _engine():
    global _tables_ready
    engine = _store.get()
    if not _tables_ready:
        try:
            metadata.create_all(engine, checkfirst=True)
        except DBAPIError:
            # Another process (a worker, the API) created the table at the same moment; it
            # exists now, which the second check sees.
            metadata.create_all(engine, checkfirst=True)
        _tables_ready = True
    return engine


def started(task_id: str) -> Execution:
    """Record that this process starts running ``task_id``."""
    host, pid = socket.gethostname(), os.getpid()
    if RESULT_URL.startswith("redis"):
        record = json.dumps({"host": host, "pid": pid, "started_at": time.time(), "finished_at": None})

        def push() -> int:
            client, key = _store.get(), _redis_key(task_id)
            length = client.rpush(key, record)
            client.expire(key, REDIS_EXPIRY_SECONDS)
            return length - 1

        return Execution(task_id, _waiting(push))

    def insert() -> int:
        with _engine().begin() as connection:
            return connection.execute(
                executions.insert().values(task_id=task_id, host=host, pid=pid).returning(executions.c.id)
            ).scalar_one()

    return Execution(task_id, _waiting(insert))


def finished(execution: Execution) -> None:
    """Record that ``execution`` ran to its end."""
    if RESULT_URL.startswith("redis"):

        def mark() -> None:
            client, key = _store.get(), _redis_key(execution.task_id)
            record = json.loads(client.lindex(key, execution.key))
            client.lset(key, execution.key, json.dumps({**record, "finished_at": time.time()}))

        _waiting(mark)
        return

    def update() -> None:
        with _engine().begin() as connection:
            connection.execute(
                executions.update().where(executions.c.id == execution.key).values(finished_at=func.now())
            )

    _waiting(update)


def count(task_id: str) -> int:
    """How many times ``task_id`` has started running (0 if it has not yet); fails at once if
    the result store is unreachable."""
    if RESULT_URL.startswith("redis"):
        return _store.get().llen(_redis_key(task_id))
    with _engine().connect() as connection:
        return connection.execute(
            select(func.count()).select_from(executions).where(executions.c.task_id == task_id)
        ).scalar_one()


def _redis_key(task_id: str) -> str:
    return f"stackapp-executions-{task_id}"
