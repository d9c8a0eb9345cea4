"""
Silences for what a deploy restarts: a normal deploy notifies no one, and a unit that dies
outside a deploy is still notified.

While a unit restarts it is not active: a Celery worker first finishes its running tasks (up
to ``worker_stop_timeout``), Gunicorn its requests. A stop longer than the rules' ``for``
(``alert_for``) fires UnitNotActive, CeleryWorkersMissing and their kin, and a deploy would
page an operator. So before a restart the host silences, in Alertmanager, the alerts that a
restart raises about it (``silenced`` below, with the matchers of ``quiets``). After the
restart (and, for the application, its health gate) the silence is cut short: it ends once
Prometheus has seen the unit again (``settle_seconds``: two scrapes and two evaluations).
Alertmanager still receives and shows the silenced alerts; it only holds their notifications,
and an alert still firing when its silence ends is notified at its group's next interval. A
deploy that fails half-way leaves a silence that ends by itself (``bound_seconds``), or when
the next deploy restarts the same units (it ends what a deploy left before it silences again).

A silence never holds an alert Alertmanager is notifying already (``Quiet.sparing``): the
operator was told it fires, so they must be told it ends, and Alertmanager would not tell them
when it fires again. It remembers the last notification of each group; an alert whose end was
muted stays "firing" there, and the same alert firing again is not notified until
``alertmanager_repeat_interval`` has passed (the bench saw CeleryWorkersMissing's next firing go
untold; the same in Grafana's Alertmanager: https://github.com/grafana/grafana/issues/80996).
An alert that ended just before the deploy, its end not yet notified (at most
``alertmanager_group_interval``), cannot be seen through Alertmanager's API and is not spared.

amtool makes the silences on the monitoring host, against its Alertmanager's private address,
through the connection pyinfra already holds to that host: no port is opened for it, and the
machine running pyinfra need not reach Alertmanager. Without a monitoring host nothing is
silenced; when Alertmanager does not answer (on the first deploy it is not installed yet, or it
is the unit restarting), the run says so and goes on.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.operations import python

import settings
from settings import checks
from tasks import peers
from tasks.service import Node, Run

#: Alerts about one host that its own restarts raise for a while (labelled with the host).
ABOUT_THE_HOST = ("UnitNotActive", "InstanceDown", "AppNotAnswering", "RedisDown", "PostgreSQLDown")
#: Alerts about the consumers as a whole (no host label, or the broker's): a worker that
#: restarts, or a broker that its workers reconnect to, raises them.
ABOUT_THE_CONSUMERS = ("CeleryWorkersMissing", "QueueWithoutConsumers")
#: Alerts about the requests a web host served over a window (AppLatencyHigh's 95th percentile
#: of the health probes): one slow probe while a unit of the host restarts holds them up for
#: the whole window, so their silence outlasts the restart by it.
ABOUT_THE_REQUESTS = ("AppLatencyHigh",)
#: The range of those alerts' expressions (templates/monitoring/rules.yml.j2 is rendered with it).
REQUESTS_WINDOW = "5m"
REQUESTS_WINDOW_SECONDS = int(checks.duration_seconds(REQUESTS_WINDOW))
#: Who the silences say made them.
AUTHOR = "pyinfra deploy"
#: Seconds a silence lasts beyond the longest restart, should the deploy never end it.
BOUND_MARGIN_SECONDS = 300
#: How long the end of a silence is retried while no Alertmanager answers (it restarted).
END_RETRY_SECONDS = 15
#: amtool's errors when no Alertmanager answers: not installed, not listening.
NOT_ANSWERING = ("not found", "connection refused")


#: Labels that tell apart the alerts of one name about one host (UnitNotActive's unit, a
#: queue, a scrape target), in the order tried: by one of them a silence leaves out an alert
#: that is notified already and still holds the others of its name.
IDENTITY_LABELS = ("name", "queue", "instance")


@dataclass(frozen=True)
class Quiet:
    """What one restart silences: the alerts of these names (about ``host``, when set), for
    ``outlasts`` seconds beyond the settle time."""

    alertnames: tuple[str, ...]
    host: str | None = None
    outlasts: int = 0

    @property
    def matchers(self) -> tuple[str, ...]:
        """amtool's matchers of the whole silence (all must match)."""
        return self._matchers(self.alertnames)

    def _matchers(self, names: tuple[str, ...], *more: str) -> tuple[str, ...]:
        about = (f"host={json.dumps(self.host)}",) if self.host is not None else ()
        return (f'alertname=~"{"|".join(names)}"', *about, *more)

    def holds(self, labels: dict[str, str]) -> bool:
        """Whether an alert with these labels is one this silence is for."""
        return labels.get("alertname") in self.alertnames and self.host in (None, labels.get("host"))

    def sparing(self, notified: list[dict[str, str]]) -> list[tuple[str, ...]]:
        """The matchers of the silences that hold this quiet's alerts except the ``notified``
        ones (the labels of the alerts Alertmanager notifies now): one silence for the names
        with none notified, and one per name with some, which leaves those out by an
        ``IDENTITY_LABELS`` label; a name whose notified alerts share none is not silenced."""
        spared = [labels for labels in notified if self.holds(labels)]
        calm = tuple(name for name in self.alertnames if all(labels["alertname"] != name for labels in spared))
        made = [self._matchers(calm)] if calm else []
        for name in self.alertnames:
            these = [labels for labels in spared if labels["alertname"] == name]
            label = next((label for label in IDENTITY_LABELS if these and all(label in it for it in these)), None)
            if label is not None:
                made.append(self._matchers((name,), *(f"{label}!={json.dumps(it[label])}" for it in these)))
        return made


def quiets(run: Run, consumers: bool = False, exporter: bool = False) -> list[Quiet]:
    """The silences a restart on this host needs: the alerts about this host; on a web host,
    those about its requests, for their window beyond; with ``consumers``, those about the
    consumers, wherever they are labelled; with ``exporter``
    (node_exporter itself restarts), HostRebooted, which reads node_exporter's start time and
    fires for ``alert_restart_window`` after it."""
    about = run.node.name
    made = [Quiet(ABOUT_THE_HOST, about)]
    if run.node.has("web"):
        made.append(Quiet(ABOUT_THE_REQUESTS, about, outlasts=REQUESTS_WINDOW_SECONDS))
    if consumers:
        made.append(Quiet(ABOUT_THE_CONSUMERS))
    if exporter:
        window = int(checks.duration_seconds(run.node.config.alert_restart_window))
        made.append(Quiet(("HostRebooted",), about, outlasts=window))
    return made


def settle_seconds(config: settings.Settings) -> int:
    """How long after a restart Prometheus has surely seen the unit back and resolved what the
    restart raised: two scrapes and two evaluations (one of each may be missed)."""
    return int(
        2
        * sum(map(checks.duration_seconds, (config.prometheus_scrape_interval, config.prometheus_evaluation_interval)))
    )


def bound_seconds(config: settings.Settings) -> int:
    """How long a silence lasts if the deploy never ends it: the longest a worker may take to
    stop, the health gate's timeout, and a margin."""
    return config.worker_stop_timeout + config.app_health_timeout_seconds + BOUND_MARGIN_SECONDS


def _monitoring(run: Run) -> Node | None:
    """The monitoring host, whose Alertmanager holds the silences (None: nothing to silence)."""
    return next(iter(run.wiring.hosts("monitoring")), None)


def _amtool(monitoring: Node, arguments: str) -> tuple[bool, str]:
    """Run amtool with ``arguments`` on the monitoring host, against its Alertmanager: whether
    it succeeded, and its output (or why it failed)."""
    url = f"http://{monitoring.address}:{monitoring.config.alertmanager_port}"
    try:
        return peers.run(monitoring.name, f"amtool --alertmanager.url={url} {arguments}")
    except Exception as error:  # noqa: BLE001 - a host outside this run (--limit), a lost connection
        return False, f"{type(error).__name__}: {error}"


def _not_answering(output: str) -> bool:
    """Whether amtool failed because no Alertmanager answers: not installed yet (the first
    deploy), or not started yet (Alertmanager is the unit that restarts)."""
    return any(reason in output.lower() for reason in NOT_ANSWERING)


def leftovers(listed: str, comment: str) -> list[str]:
    """The ids of the silences in ``listed`` (``amtool silence query -o json``, the active
    ones) that a deploy made with ``comment`` and never ended (it failed after the restart)."""
    return [
        silence["id"]
        for silence in json.loads(listed or "[]")
        if (silence["createdBy"], silence["comment"]) == (AUTHOR, comment)
    ]


def _silence(
    monitoring: Node, config: settings.Settings, what: str, made: list[Quiet], ids: list[tuple[str, int]]
) -> None:
    """Make the silences (the operation before the restart), sparing the alerts notified
    already, after ending those a deploy that failed after the same restart left; (id, seconds
    it outlasts the restart) of each goes into ``ids``."""
    comment = f"{host.name} restarts {what} (a deploy)"
    succeeded, listed = _amtool(monitoring, "silence query -o json")
    if not succeeded:
        if _not_answering(listed):
            logger.info(f"{host.name}: no Alertmanager answers yet, so none notifies: nothing to silence for {what}")
        else:
            _not_silenced(what, listed)
        return
    notified = _notified(monitoring)  # before the leftovers end: what they hold was never told
    stale = leftovers(listed, comment)
    if stale:
        _amtool(monitoring, f"silence expire {' '.join(stale)}")
    for quiet in made:
        spared = [labels for labels in notified if quiet.holds(labels)]
        if spared:
            logger.info(
                f"{host.name}: notified already, so left out of the silence to have its end told: {_named(spared)}"
            )
        for matchers in quiet.sparing(notified):
            succeeded, output = _amtool(
                monitoring,
                f"silence add --duration={bound_seconds(config) + quiet.outlasts}s --author={shlex.quote(AUTHOR)} "
                f"--comment={shlex.quote(comment)} {' '.join(map(shlex.quote, matchers))}",
            )
            if succeeded:
                ids.append((output, quiet.outlasts))
            else:
                _not_silenced(what, output)


def _named(alerts: list[dict[str, str]]) -> str:
    """Alerts by their labels, as an operator reads them: UnitNotActive{name="x", host="h"}."""
    return ", ".join(
        labels["alertname"]
        + "{"
        + ", ".join(f"{k}={json.dumps(v)}" for k, v in labels.items() if k != "alertname")
        + "}"
        for labels in alerts
    )


def _notified(monitoring: Node) -> list[dict[str, str]]:
    """The labels of the alerts Alertmanager notifies now (firing, neither silenced nor
    inhibited, or just received); none when it cannot say (the silences then hold them too)."""
    succeeded, listed = _amtool(monitoring, "alert query --active --unprocessed -o json")
    if not succeeded:
        return []
    return [alert["labels"] for alert in json.loads(listed or "[]")]


def _not_silenced(what: str, reason: str) -> None:
    logger.warning(
        f"{host.name}: the alerts of restarting {what} could not be silenced ({reason}): they may be notified"
    )


def _end(monitoring: Node, config: settings.Settings, ids: list[tuple[str, int]]) -> None:
    """Cut the silences ``ids`` short, to end once Prometheus has seen the restarted units (the
    operation after the restart); retried while Alertmanager starts, if it is what restarted."""
    while ids:
        silence, outlasts = ids.pop()
        end = f"$(date -u -d '+{settle_seconds(config) + outlasts} seconds' +%Y-%m-%dT%H:%M:%SZ)"
        deadline = time.monotonic() + END_RETRY_SECONDS
        while True:
            succeeded, output = _amtool(monitoring, f'silence update --end="{end}" {silence} > /dev/null')
            if succeeded or not _not_answering(output) or time.monotonic() > deadline:
                break
            time.sleep(1)  # pyinfra's CLI patched time for gevent: other hosts go on
        if not succeeded:
            logger.warning(f"{host.name}: the silence {silence} could not be cut short ({output}); it ends by itself")


@contextmanager
def silenced(run: Run, what: str, when: Callable[[], bool], made: list[Quiet] | None = None) -> Iterator[None]:
    """The operations called in this block (a restart, its checks) run with the alerts they
    raise silenced, when ``when()`` holds at execution (the restart's own condition); ``made``
    defaults to the alerts about this host. The callbacks are closures: the run's settings and
    secrets never appear among the operations' arguments."""
    monitoring, config = _monitoring(run), run.node.config
    if monitoring is None:
        yield
        return
    quiet = made if made is not None else quiets(run)
    # This host's silences, from the operation that makes them to the one that ends them.
    ids: list[tuple[str, int]] = []

    def silence() -> None:
        _silence(monitoring, config, what, quiet, ids)

    def end() -> None:
        _end(monitoring, config, ids)

    python.call(name=operation_names(what)[0], function=silence, _if=when)
    yield
    python.call(name=operation_names(what)[1], function=end, _if=when)


def operation_names(what: str) -> tuple[str, str]:
    """The names of the operations before and after a restart of ``what``."""
    return (
        f"Silence the alerts a restart of {what} raises (in Alertmanager, until it is back)",
        f"End the silence of {what} once it is seen back",
    )
