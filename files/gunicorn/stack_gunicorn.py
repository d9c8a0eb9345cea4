"""
Gunicorn worker class of the deploy: uvicorn-worker's ``UvicornWorker``, with a short drain
between "stop accepting" and "close idle connections" when a worker shuts down; and
``WorkerDeaths``, the master's count of workers that died (below), for the GunicornWorkerDied alert.

Why: on a graceful reload (HUP) or stop, Uvicorn stops listening and at once closes every
connection that has not sent a request yet. A connection the worker accepted a moment earlier
is such a connection, although its request is already on the way: the client sees "connection
reset by peer" (gunicorn#2529). With the drain, the other workers take every new connection
while this one waits ``DRAIN_SECONDS`` for the requests of connections it already holds, answers
them (with ``Connection: close``), and only then shuts down.

Installed by the deploy into ``<app_dir>/lib`` and loaded through gunicorn.conf.py's
``pythonpath``; the application itself does not need to know about it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

DRAIN_SECONDS = 1.0


class DrainingServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Asked to stop (a reload, a stop): Uvicorn then ends the process with the signal it
        # caught, so Gunicorn's worker_exit never runs and the master sees a worker killed.
        # (_stopped_by says so again when that signal is raised: the master counts a pid once.)
        exiting()
        for server in self.servers:
            server.close()  # stop accepting: the kernel now hands new connections to other workers
        await asyncio.sleep(DRAIN_SECONDS)
        await super().shutdown(sockets=sockets)


class DrainingUvicornWorker(UvicornWorker):
    def init_signals(self) -> None:
        # UvicornWorker resets the stop signals to their default, which ends the process at
        # once, until Uvicorn's server installs its own handlers (and again once it restores
        # these and raises the signal it caught): a worker still booting when a reload stops it
        # died of its SIGTERM without a word (seen: a reload under way counted as a death). A
        # stop signal is a request to stop: say so, then end by that signal as before.
        super().init_signals()
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(stop, _stopped_by)

    async def _serve(self) -> None:
        # UvicornWorker._serve, with DrainingServer in place of uvicorn's Server.
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


def _stopped_by(signum: int, frame: object) -> None:
    """A worker's handler of a stop signal outside Uvicorn's: the worker stops on request, by
    that signal's default action (the exit status Gunicorn and systemd expect)."""
    exiting()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class WorkerDeaths:
    """Counts the Gunicorn workers that died instead of exiting, for node_exporter's textfile
    collector: those killed by a signal they did not handle (the OOM killer, ``kill -9``, a
    crash in C code) and those the master stopped for not answering within ``timeout``.

    Why: the master starts another worker at once and systemd sees nothing, so no alert would
    tell anyone; the requests the dead worker held failed all the same. Gunicorn's
    ``child_exit`` hook (in the master) is not told how a worker ended, and the exit status
    does not tell either: a Uvicorn worker asked to stop ends with the SIGTERM it caught, once
    it has shut down (tried: every worker of a reload was "sent SIGTERM"). So each worker that
    stops on request says so through a pipe the master opened before forking it: when it gets a
    stop signal (SIGTERM, SIGINT, SIGQUIT), when its server begins to shut down and when
    Gunicorn's ``worker_exit`` runs; a worker the master
    reaps without that word, or one it aborted for a timeout, died. The count starts at 0 with
    each master, which Prometheus' ``increase`` takes as a counter reset.
    """

    def __init__(self, path: str, unit: str) -> None:
        self.path, self.unit = path, unit
        self.died = 0
        self.exited: set[int] = set()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._publish()

    def exiting(self) -> None:
        """In a worker that stops on request: a write under PIPE_BUF bytes is atomic, so the
        words of workers stopping together do not mix."""
        try:
            os.write(self._write, f"{os.getpid()}\n".encode())
        except OSError:  # a count off by one is no reason to fail a worker's exit
            pass

    def reaped(self, worker) -> None:
        """In the master, once it has reaped ``worker`` (``child_exit``)."""
        while True:
            try:
                chunk = os.read(self._read, 4096)
            except BlockingIOError:
                break
            self.exited.update(int(pid) for pid in chunk.split())
        exited = worker.pid in self.exited
        self.exited.discard(worker.pid)
        if worker.aborted or not exited:
            self.died += 1
            self._publish()

    def _publish(self) -> None:
        """Rewrite the textfile whole (a new file renamed over the old: node_exporter never
        reads half of one), readable by node_exporter's user despite the unit's UMask. A file
        that cannot be written is logged, never raised: the master must go on serving."""
        text = (
            "# HELP stack_gunicorn_workers_died_total Gunicorn workers killed by a signal or stopped "
            "for a timeout since the master started.\n"
            "# TYPE stack_gunicorn_workers_died_total counter\n"
            f'stack_gunicorn_workers_died_total{{unit="{self.unit}"}} {self.died}\n'
        )
        partial = f"{self.path}.partial"
        try:
            with open(partial, "w") as stream:
                stream.write(text)
            os.chmod(partial, 0o644)
            os.replace(partial, self.path)
        except OSError as error:
            logging.getLogger("gunicorn.error").warning("cannot count dead workers in %s: %s", self.path, error)


#: The master's count (``count_deaths``, from Gunicorn's on_starting hook), which the workers
#: it forks inherit; None in a master started without that hook.
DEATHS: WorkerDeaths | None = None


def count_deaths(path: str, unit: str) -> None:
    """In the master, before it forks a worker (on_starting): start counting, into ``path``."""
    global DEATHS
    DEATHS = WorkerDeaths(path, unit)


def exiting() -> None:
    """In a worker that stops on request (its server's shutdown, Gunicorn's worker_exit)."""
    if DEATHS is not None:
        DEATHS.exiting()


def reaped(worker) -> None:
    """In the master, once it has reaped ``worker`` (child_exit)."""
    if DEATHS is not None:
        DEATHS.reaped(worker)
