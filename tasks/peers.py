"""
Reading another host of the run: the broker's queues, another application host's lock, amtool
on the monitoring host.

pyinfra plans every host at once (deploy.py runs for each in its own greenlet) and holds one SSH
connection per host; reading another host's fact, or running a command there, opens a channel on
that host's connection. OpenSSH serves at most ``MaxSessions`` channels of one connection at once
(10 by default) and refuses the rest: with 12 application hosts each reading the broker's
definitions while they were planned, the broker's sshd refused channels and the deploy failed
before it changed anything ("Secsh channel open FAILED", ``bench/deploy_speed.py --only fleet``).
So, here:

- a fact of another host read while planning is read once per run and shared by every host that
  asks (nothing changes on a host while pyinfra plans, so each would read the same answer);
- at most ``PER_HOST`` reads of one host by the others run at once, at run time too; with the
  host's own operation, that stays under OpenSSH's default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

from gevent.lock import BoundedSemaphore, Semaphore  # type: ignore[import-untyped]  # no stubs (pyinfra's own dependency)
from pyinfra import inventory
from pyinfra.api import FactBase, StringCommand
from pyinfra.api.state import State, StateStage
from pyinfra.context import ctx_state

#: At most this many reads of one host by the others at once (OpenSSH's MaxSessions is 10 by
#: default; the host's own operation or fact holds one more channel).
PER_HOST = 4

#: Per run (pyinfra's State): the channels' guard of each host, by host name.
_GUARDS: WeakKeyDictionary[State, dict[str, BoundedSemaphore]] = WeakKeyDictionary()
#: Per run: the facts read while planning, and the lock each is read under, by (host, fact, arguments).
_PLANNED: WeakKeyDictionary[State, dict[tuple, Any]] = WeakKeyDictionary()
_READING: WeakKeyDictionary[State, dict[tuple, Semaphore]] = WeakKeyDictionary()


@contextmanager
def channel(name: str) -> Iterator[None]:
    """Hold one of the ``PER_HOST`` channels of the host ``name`` (waits while all are held)."""
    guards = _GUARDS.setdefault(ctx_state.get(), {})
    with guards.setdefault(name, BoundedSemaphore(PER_HOST)):
        yield


def fact(name: str, cls: type[FactBase], **arguments: Any) -> Any:
    """The fact ``cls`` (with ``arguments``) of the host ``name``: while planning, read once
    and shared with every host that asks for it in this run; at run time, read anew."""
    state = ctx_state.get()
    peer = inventory.get_host(name)
    if state.current_stage >= StateStage.Execute:
        with channel(name):
            return peer.get_fact(cls, **arguments)
    key = (name, cls, tuple(sorted(arguments.items())))
    planned = _PLANNED.setdefault(state, {})
    with _READING.setdefault(state, {}).setdefault(key, Semaphore()):
        if key not in planned:  # the first to ask reads it; the others wait for its answer
            with channel(name):
                planned[key] = peer.get_fact(cls, **arguments)
    return planned[key]


def run(name: str, command: str) -> tuple[bool, str]:
    """Run ``command`` on the host ``name``: whether it succeeded, and its output (stdout when it
    did, stderr when not), stripped."""
    with channel(name):
        succeeded, output = inventory.get_host(name).run_shell_command(StringCommand(command))
    return succeeded, (output.stdout if succeeded else output.stderr).strip()
