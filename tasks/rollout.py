"""
Rolling switches: application hosts that replace a running release do it in batches of
``app_batch_size`` (the application hosts sorted by name), one batch after the other, so the
hosts of the other batches keep serving and consuming meanwhile. With a front, nginx stops
sending new requests to a batch's web hosts before they switch (they finish the requests they
hold: Gunicorn's graceful stop) and takes them back once their health gate ran: passed, or failed
and switched them back to the release they ran. A failed gate stops the run before the next
batch, so at most one batch ever runs a release that does not work.

A host that replaces no running release (its first deploy, a re-run, a change that only
restarts its units) does its part in the first batch: nothing of it serves a release to drain.
A batch that holds every web host is not drained (nginx would have nobody to send requests to):
Gunicorn's socket holds the connections while it restarts, as on a single web host.

How the hosts are ordered: pyinfra runs each operation on every host before the next one, in an
order it derives from each host's own sequence of operations; operations called from the same
lines are one operation shared by the hosts that call them, and only these order one host's
operations against another's. So every host passes, for each batch, the same steps (``step``, an
operation with nothing to do) called from the same lines below, and does its own part between
them: the fronts drain, [step], the batch's hosts switch, restart and run their gate, [step], the
fronts take them back, [step], which fails the hosts whose gate failed (config.py then stops the
run). A first step, before any batch, waits for every host to have built and load-checked its
release, and fails a host whose build of a venv installed other packages than another host's
build of it in the same run (``Switch.check``, tasks/app.py): no host switches then.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pyinfra import host
from pyinfra.api import StringCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.context import state

import settings
from tasks import front
from tasks.service import Node, Run, Wiring

#: Host name → the batch (0-based) in which it replaces its running release. Filled while pyinfra
#: plans the operations (each application host's deploy), read while it runs them (the fronts'
#: drains): pyinfra plans every host before it runs any operation.
REPLACING: dict[str, int] = {}


@dataclass(frozen=True)
class Switch:
    """An application host's part of the rolling switch: ``operations`` plans them (the switch,
    the units' restarts, the health gate) and returns the gate's operation; ``replaces`` says
    whether they replace a release the host runs (then they wait for the host's batch);
    ``check``, once every host has built its release, returns a ``refusal`` or None."""

    operations: Callable[[], OperationMeta]
    replaces: bool
    check: Callable[[], str | None] | None = None


def batches(wiring: Wiring) -> list[list[Node]]:
    """The application hosts, sorted by name (pyinfra's inventory order follows its groups, which
    users do not think of), in batches of ``app_batch_size`` (which the settings check holds the
    same on all of them); one empty batch without any."""
    hosts = sorted(wiring.hosts(*settings.APP_GROUPS), key=lambda node: node.name)
    if not hosts:
        return [[]]
    size = hosts[0].config.app_batch_size
    return [hosts[start : start + size] for start in range(0, len(hosts), size)]


def drained(wiring: Wiring, batch: int) -> set[str]:
    """The web hosts the fronts take out while ``batch`` switches: those replacing their
    release in it, unless that is every web host. Read while the run runs (``REPLACING``)."""
    webs = {node.name for node in wiring.hosts("web")}
    replacing = {name for name in webs if REPLACING.get(name) == batch}
    return replacing if replacing != webs else set()


def refusal(said: str, first: str = "") -> str:
    """The command that fails a host at a ``step``, saying ``said``, after running ``first``."""
    return f"{first + '; ' if first else ''}printf '%s\\n' {shlex.quote(said)} >&2; exit 1"


@operation(is_idempotent=True)
def step(check: Callable[[], str | None] | None = None):
    """
    Nothing to do: a point every host passes (see the module's docstring); when ``check()``,
    called once the run reaches it, returns a ``refusal``, run it: the host fails there.
    """
    refused = check() if state.is_executing and check is not None else None
    if refused:
        yield StringCommand(refused)


def roll(run: Run, switch: Switch | None) -> None:
    """This host's part of the rolling switch: its own switch (an application host) in its
    batch, the drains around each batch (a front), and the steps every host passes."""
    plan = batches(run.wiring)
    mine = None
    if switch is not None:
        mine = next(number for number, batch in enumerate(plan) if run.node in batch) if switch.replaces else 0
        if switch.replaces:
            REPLACING[host.name] = mine
    step(
        name="Rolling switch: begin, every host having built and load-checked its release",
        check=switch.check if switch is not None else None,
    )
    for number in host.loop(range(len(plan))):
        label = f"batch {number + 1} of {len(plan)} ({', '.join(node.name for node in plan[number])})"
        if run.node.has("front"):
            front.drain(run=run, hosts=partial(drained, run.wiring, number), label=label)
        step(name=f"Rolling switch: {label} switches")
        gate = switch.operations() if switch is not None and mine == number else None
        step(name=f"Rolling switch: {label} ran its health gates")
        if run.node.has("front"):
            front.drain(run=run, hosts=partial(drained, run.wiring, number), label=label, back=True)
        step(name=f"Rolling switch: {label} done", check=partial(_stop, gate) if gate is not None else None)


def _stop(gate: OperationMeta) -> str | None:
    """The refusal of a host whose health gate failed (its error was held until the front took
    it back), which stops the run before the next batch."""
    if not gate.did_error():
        return None
    return refusal(f"{host.name}: the health gate failed (above): the rolling switch stops before the next batch")
