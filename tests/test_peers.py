"""
Reading another host while every host is planned at once (tasks/peers.py), without any host:
the application hosts all read the broker's queues and the first host's lock, and OpenSSH
refuses an eleventh channel on one connection (``bench/deploy_speed.py --only fleet`` saw a
12-host deploy fail so before it changed anything).
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
from pyinfra.api import FactBase
from pyinfra.api.state import State, StateStage
from pyinfra.context import ctx_inventory, ctx_state

from bench.fakes import FakeHost, FakeInventory
from tasks import peers

#: What OpenSSH's sshd serves at once on one connection by default (MaxSessions).
MAX_SESSIONS = 10
#: Application hosts that ask at once, as a 12-host fleet's do.
ASKING = 11


class Queues(FactBase):
    """Stands for a fact of the broker host (the deploy reads RabbitmqDefinitions)."""

    command = "true"


class Broker(FakeHost):
    """A host whose reads take a while (as one over SSH does) and count the channels held at once."""

    def __init__(self) -> None:
        super().__init__("data", ["rabbitmq"])
        self.reads: list[tuple[type, dict]] = []
        self.open = self.most_open = 0

    def _channel(self) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        gevent.sleep(0.01)
        self.open -= 1

    def get_fact(self, fact, *args, **kwargs):
        self.reads.append((fact, kwargs))
        self._channel()
        return {"read": len(self.reads)}

    def run_shell_command(self, command):
        self._channel()
        return True, type("Output", (), {"stdout": " done\n", "stderr": ""})()


@pytest.fixture
def broker() -> Iterator[Broker]:
    broker = Broker()
    with ctx_state.use(State()), ctx_inventory.use(FakeInventory([broker])):
        yield broker


def at_once(*calls) -> list:
    """Run every call in its own greenlet, as pyinfra plans every host at once; their answers."""
    greenlets = [gevent.spawn(call) for call in calls]
    gevent.joinall(greenlets, raise_error=True)
    return [greenlet.value for greenlet in greenlets]


def test_a_fact_every_host_asks_for_while_planning_is_read_once_and_shared(broker):
    answers = at_once(*[lambda: peers.fact("data", Queues)] * ASKING)
    assert broker.reads == [(Queues, {})]
    assert answers == [{"read": 1}] * ASKING


def test_other_arguments_are_another_read(broker):
    at_once(lambda: peers.fact("data", Queues, path="/a"), lambda: peers.fact("data", Queues, path="/b"))
    assert sorted(kwargs["path"] for _, kwargs in broker.reads) == ["/a", "/b"]


def test_at_run_time_a_fact_is_read_anew(broker):
    ctx_state.get().current_stage = StateStage.Execute
    assert [peers.fact("data", Queues), peers.fact("data", Queues)] == [{"read": 1}, {"read": 2}]


def test_reads_of_one_host_leave_a_channel_for_its_own_operation_under_sshds_default(broker):
    at_once(*[lambda number=number: peers.fact("data", Queues, path=f"/{number}") for number in range(ASKING)])
    at_once(*[lambda: peers.run("data", "amtool silence query")] * ASKING)
    assert len(broker.reads) == ASKING
    assert broker.most_open == peers.PER_HOST
    assert peers.PER_HOST + 1 <= MAX_SESSIONS


def test_a_command_answers_whether_it_succeeded_and_its_stripped_output(broker):
    assert peers.run("data", "amtool silence query") == (True, "done")
