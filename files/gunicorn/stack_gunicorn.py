"""
Gunicorn worker class of the deploy: uvicorn-worker's ``UvicornWorker``, with a short drain
between "stop accepting" and "close idle connections" when a worker shuts down.

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
import socket
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

DRAIN_SECONDS = 1.0


class DrainingServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting: the kernel now hands new connections to other workers
        await asyncio.sleep(DRAIN_SECONDS)
        await super().shutdown(sockets=sockets)


class DrainingUvicornWorker(UvicornWorker):
    async def _serve(self) -> None:
        # UvicornWorker._serve, with DrainingServer in place of uvicorn's Server.
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
