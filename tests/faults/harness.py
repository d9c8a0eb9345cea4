"""
The fault harness: a batch of tasks submitted through the API while a fault is injected, then
what became of every task (read through the API, checked in PostgreSQL), how many ran twice,
and how long the stack took to be healthy again.

A task is the stack's responsibility once the API answered 202. Before that, the client's: the
batch's client retries what the API refuses (503, or no connection while a host reboots) as
any real client must, and counts the refusals. Some tasks of each batch publish a child task
from the worker (as ``.delay()`` inside a task does): a child is the stack's responsibility
once its parent succeeded, and a parent that succeeded without its child counts as lost. Some
are submitted with a countdown, so the fault also lands on tasks waiting in RabbitMQ's delay
queues; some are workflows (a chain of two tasks, a chord of three and their total), followed
by their last task, whose answer depends on every task before it.

Beat sends a tick (stackapp.tick) every TICK_SECONDS: each fault's row counts the ticks sent
around it, the slots they missed and the slots run twice.

Throughout the fault, a second client submits a short task every SUBMIT_INTERVAL seconds: the
longest time the API accepted no task is the outage a client sees (what it needs is to submit,
not a page), and its tasks are accounted for as the batch's are.

Where the hosts have a monitoring host, each row lists the alerts that became active after the
fault and reached the test's webhook receiver, with the seconds from the fault to each; a row
that names the alert its fault must raise waits for it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise

import requests

from bench import Cluster, wait_until
from clients import (
    APP,
    MANAGED_UNITS,
    REDIS_BROKER_DB,
    as_the_worker,
    expected_answer,
    psql_from,
    redis_client,
    scraped_everywhere,
    web_url,
)

#: Tasks in a chord's header (stackapp.tasks.CHORD_SIZE): its total is that many answers.
CHORD_SIZE = 3
#: The shapes the table counts, beside plain tasks: what each row reports as "submitted (lost)".
SHAPES = ("children", "countdowns", "chains", "chords")

#: Outcomes of the session's faults, in order, for the summary table.
OUTCOMES: list[Outcome] = []

#: How long a fault may keep the stack from being healthy, and a batch from finishing.
RECOVERY_TIMEOUT = 180
RESULTS_TIMEOUT = 300
#: The countdown of a batch's countdown tasks.
COUNTDOWN_SECONDS = 5.0
#: How often the submission loop posts a task: the resolution of the measured outage.
SUBMIT_INTERVAL = 0.25
#: The tick's interval on the fault suite's hosts (STACKAPP_TICK_SECONDS, tests/faults).
TICK_SECONDS = 5.0
#: How long after a fault its alert may reach the receiver: on the bench, a scrape and an
#: evaluation every 5 s, the alerts' 10 s ``for``, Alertmanager's 5 s group_wait, and a
#: host's reboot before its exporters answer again.
NOTICE_TIMEOUT = 120


@dataclass
class Alert:
    """An alert a fault must raise: its name, and labels it must carry (``host`` is the
    host's inventory name, ``name`` a systemd unit's)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, alert: dict) -> bool:
        labels = alert["labels"]
        return labels["alertname"] == self.name and all(labels.get(k) == v for k, v in self.labels.items())

    def __str__(self) -> str:
        return self.name + "".join(f" {key}={value}" for key, value in self.labels.items())


@dataclass
class Notice:
    """A firing alert that became active after the fault, and when it reached the receiver."""

    seconds: float
    alert: dict

    @property
    def name(self) -> str:
        return self.alert["labels"]["alertname"]


def notices_since(cluster: Cluster, injected: float, injected_at: float) -> list[Notice]:
    """Firing alerts that became active after the fault (injected at ``injected``, monotonic,
    and ``injected_at``, epoch seconds), in order of arrival, each once. An alert still firing
    from an earlier fault is sent again whenever its group changes; its start says it is not
    this fault's."""
    seen: dict[tuple, Notice] = {}
    for arrived, alert in cluster.receiver.alerts(injected):
        began = datetime.fromisoformat(alert["startsAt"]).timestamp()
        key = tuple(sorted(alert["labels"].items()))
        if alert["status"] == "firing" and began >= injected_at - 1 and key not in seen:
            seen[key] = Notice(arrived - injected, alert)
    return sorted(seen.values(), key=lambda notice: notice.seconds)


@dataclass
class Outcome:
    """What one fault did to one batch."""

    fault: str
    submitted: int
    succeeded: int
    lost: list[str]
    #: Shape (SHAPES) → (how many, how many lost).
    shapes: dict[str, tuple[int, int]]
    duplicates: int
    executions: dict[str, int]
    #: The tick's runs sent from the batch's start until the queues drained, with the slots
    #: they missed and those run twice (Ticks says how each is counted).
    periodic: Ticks
    recovery_seconds: float
    #: Submissions the API refused (503, or no connection), the batch's and the loop's.
    refused: int
    #: Longest time the API accepted no task (POST /tasks), from the loop's submissions.
    longest_outage: float
    #: Slowest answer of the API to a submission (a refusal included).
    slowest_answer: float
    #: The alerts this fault raised, by arrival (None: the hosts have no monitoring host).
    notices: list[Notice] | None = None
    #: The alert the fault must raise, if the row names one.
    expected: Alert | None = None
    notes: list[str] = field(default_factory=list)

    def told(self) -> Notice | None:
        """The first notification of the expected alert."""
        assert self.expected and self.notices is not None, "the row names no alert, or its hosts have no monitoring"
        return next((notice for notice in self.notices if self.expected.matches(notice.alert)), None)

    def notified(self) -> str:
        """Each alert's name and the seconds from the fault to its first notification."""
        if self.notices is None:
            return "no monitoring"
        first: dict[str, float] = {}
        for notice in self.notices:
            first.setdefault(notice.name, notice.seconds)
        return ", ".join(f"{name} {seconds:.0f}" for name, seconds in first.items()) or "none"

    def row(self) -> str:
        return (
            f"| {self.fault} | {self.submitted} | {self.succeeded} | {len(self.lost)} | "
            + " | ".join(f"{count} ({lost})" for count, lost in (self.shapes[shape] for shape in SHAPES))
            + f" | {self.duplicates} | {self.periodic} "
            f"| {self.recovery_seconds:.1f} | {self.refused} | {self.longest_outage:.1f} | {self.notified()} |"
        )


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as the Markdown table docs/survival.md shows."""
    header = (
        "| fault | tasks submitted | succeeded | lost | children (lost) | countdowns (lost) | chains (lost) "
        "| chords (lost) | duplicate runs | periodic runs (missed slots, doubled) | recovery (s) "
        "| refused by the API (retried) | longest POST /tasks outage (s) | alerts received (s after the fault) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    return "\n".join([header, *(outcome.row() for outcome in outcomes)])


@dataclass
class Ticks:
    """The tick's runs sent within a fault's window (epoch seconds, as beat sent them), and the
    last one before the window, so that a gap across the window's start is seen."""

    before: list[float]
    within: list[float]
    #: When the stack was healthy again (epoch seconds).
    recovered: float

    def gaps(self) -> list[tuple[float, float]]:
        return list(pairwise([*self.before, *self.within]))

    @property
    def runs(self) -> int:
        return len(self.within)

    @staticmethod
    def slots_missed(earlier: float, later: float) -> int:
        """Slots no run was sent for between two runs: a gap of two intervals (a tenth spared)
        missed one. A shorter gap is a late run, not a missed one: beat schedules each run an
        interval after the previous one was sent, so a late wake-up (seen 3.4 s on a loaded
        CI machine) delays the runs after it and skips none."""
        return max(0, int((later - earlier) / TICK_SECONDS + 0.1) - 1)

    @property
    def missed(self) -> int:
        return sum(self.slots_missed(earlier, later) for earlier, later in self.gaps())

    @property
    def doubled(self) -> int:
        """Runs sent less than half an interval after the previous one: a slot run twice."""
        return sum(1 for earlier, later in self.gaps() if later - earlier < TICK_SECONDS / 2)

    def missed_after_recovery(self) -> list[float]:
        """Gaps that missed a slot and began once the stack had recovered."""
        return [
            later - earlier
            for earlier, later in self.gaps()
            if earlier >= self.recovered and self.slots_missed(earlier, later)
        ]

    def __str__(self) -> str:
        return f"{self.runs} ({self.missed}, {self.doubled})"


#: Tick task id → when beat sent it, as the API reports it (read once per task).
SENT_TICKS: dict[str, float] = {}


def ticks_sent(cluster: Cluster) -> list[float]:
    """When beat sent each tick that has run (epoch seconds, oldest first)."""
    sql = "SELECT task_id FROM celery_taskmeta WHERE name IN ({ids}) AND status = 'SUCCESS'"
    ids = [task_id for (task_id,) in rows_of_tasks(cluster, sql, ["stackapp.tick"])]
    for task_id in ids:
        if task_id not in SENT_TICKS:
            response = requests.get(web_url(cluster.by_group("web")[0], f"/tasks/{task_id}"), timeout=10)
            SENT_TICKS[task_id] = response.json()["result"]["sent"]
    return sorted(SENT_TICKS[task_id] for task_id in ids)


def ticks_between(cluster: Cluster, start: float, end: float, recovered: float) -> Ticks:
    """The ticks sent from ``start`` to ``end`` (epoch seconds), and the last one before."""
    sent = ticks_sent(cluster)
    before = [moment for moment in sent if moment < start][-1:]
    return Ticks(before, [moment for moment in sent if start <= moment <= end], recovered)


class Batch:
    """``size`` tasks: every ``long_every``-th sleeps ``long_sleep`` s, every ``child_every``-th
    (the 3rd, 3+child_every-th…) publishes a child task, every ``countdown_every``-th (the 5th…)
    has a countdown of COUNTDOWN_SECONDS, every ``workflow_every``-th (the 6th…) is a chain and
    the one ``workflow_every`` later a chord (POST /workflows), the others are short.
    ``submit()`` posts them from a background thread, spreading them over the web hosts."""

    def __init__(
        self,
        cluster: Cluster,
        size: int = 200,
        long_every: int = 8,
        long_sleep: float = 4.0,
        child_every: int = 8,
        countdown_every: int = 8,
        workflow_every: int = 8,
    ):
        self.cluster = cluster
        self.specs = [
            (
                1000 + 37 * i,
                long_sleep if i % long_every == 0 else 0.0,
                i % child_every == 3,
                COUNTDOWN_SECONDS if i % countdown_every == 5 else 0.0,
                ("chain", "chord")[i // workflow_every % 2] if i % workflow_every == 6 else "",
            )
            for i in range(size)
        ]
        self.accepted: dict[str, tuple[int, float]] = {}
        #: Task id → the answer its result must hold.
        self.answers: dict[str, int] = {}
        #: Shape (countdowns, chains, chords) → the ids of the batch's tasks of that shape.
        self.shaped: dict[str, set[str]] = {"countdowns": set(), "chains": set(), "chords": set()}
        self.slowest_answer = 0.0
        self.lock = threading.Lock()
        self.refused = 0
        self.half_submitted = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._submit_all, daemon=True)

    def ids(self, long_only: bool = False) -> set[str]:
        """The tasks accepted so far (only the long ones, with ``long_only``)."""
        with self.lock:
            return {task_id for task_id, (_, sleep) in self.accepted.items() if sleep or not long_only}

    def submit(self) -> Batch:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(RECOVERY_TIMEOUT + 60)
        assert not self.thread.is_alive(), "the batch is still being submitted"
        assert not self.errors, self.errors

    def _submit_all(self) -> None:
        webs = self.cluster.by_group("web")
        for index, (n, sleep, child, countdown, workflow) in enumerate(self.specs):
            if workflow:
                path, body = "/workflows", {"shape": workflow, "n": n}
            else:
                path, body = "/tasks", {"n": n, "sleep": sleep, "child": child, "countdown": countdown}
            try:
                task_id = self._submit_one(webs[index % len(webs)], path, body)
            except Exception as error:  # reported by join(), on the test's thread
                self.errors.append(f"task {index} (n={n}) was never accepted: {error}")
                self.half_submitted.set()
                return
            with self.lock:
                self.accepted[task_id] = (n, sleep)
                self.answers[task_id] = expected_answer(n) * (CHORD_SIZE if workflow == "chord" else 1)
                if countdown:
                    self.shaped["countdowns"].add(task_id)
                if workflow:
                    self.shaped[f"{workflow}s"].add(task_id)
            if index + 1 == len(self.specs) // 2:
                self.half_submitted.set()

    def _submit_one(self, web, path: str, body: dict) -> str:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            asked = time.monotonic()
            try:
                response = requests.post(web_url(web, path), json=body, timeout=15)
                if response.status_code == 202:
                    return response.json()["id"]
                if response.status_code != 503:
                    raise AssertionError(f"POST {path} answered {response.status_code}: {response.text}")
                refusal = response.text
            except requests.RequestException as error:
                refusal = str(error)
            finally:  # a timeout counts as a 15 s answer
                self.slowest_answer = max(self.slowest_answer, time.monotonic() - asked)
            self.refused += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"refused for {RECOVERY_TIMEOUT}s; last: {refusal}")
            time.sleep(0.5)


class SubmissionLoop:
    """One client posting a short task (POST /tasks) every SUBMIT_INTERVAL seconds, to the web
    hosts in turn, until stopped. It does not resubmit what the API refused: its next
    submission is that retry. ``answers`` holds the accepted tasks (id → the answer it must
    give), ``accepted_at`` when each 202 arrived."""

    def __init__(self, cluster: Cluster):
        self.webs = cluster.by_group("web")
        self.answers: dict[str, int] = {}
        self.accepted_at: list[float] = []
        self.refused = 0
        self.slowest_answer = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SubmissionLoop:
        self.started_at = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(30)
        self.stopped_at = time.monotonic()

    def longest_outage(self) -> float:
        """Longest time between two accepted submissions (or from the start, or until the end)."""
        moments = [self.started_at, *self.accepted_at, self.stopped_at]
        return max(later - earlier for earlier, later in pairwise(moments))

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            asked = time.monotonic()
            try:
                response = requests.post(web_url(self.webs[n % len(self.webs)], "/tasks"), json={"n": n}, timeout=15)
                accepted = response.status_code == 202
            except requests.RequestException:
                accepted = False
            answered = time.monotonic()
            self.slowest_answer = max(self.slowest_answer, answered - asked)
            if accepted:
                self.answers[response.json()["id"]] = expected_answer(n)
                self.accepted_at.append(answered)
            else:
                self.refused += 1
            self.stop.wait(max(0.0, SUBMIT_INTERVAL - (answered - asked)))


def rows_of_tasks(cluster: Cluster, sql: str, task_ids) -> list[list[str]]:
    """Rows (as lists of strings) of ``sql``, whose ``{ids}`` is replaced by the quoted
    ``task_ids``, read with psql from an application host; none for no ids."""
    if not task_ids:
        return []
    listed = ",".join(f"'{task_id}'" for task_id in task_ids)
    output = psql_from(cluster.one("workers"), cluster, sql.format(ids=listed))
    return [line.split("|") for line in output.splitlines()]


def running_executions(cluster: Cluster, task_ids: set[str]) -> list[tuple[str, str, int]]:
    """``(task id, host, pid)`` of the executions of ``task_ids`` that have started and not
    finished, as the result store records them."""
    rows = rows_of_tasks(
        cluster,
        "SELECT task_id, host, pid FROM stackapp_executions WHERE finished_at IS NULL AND task_id IN ({ids})",
        task_ids,
    )
    return [(task_id, host, int(pid)) for task_id, host, pid in rows]


def healthy(cluster: Cluster, broker: str = "rabbitmq") -> bool:
    """Every managed unit active on its hosts, every web host's /healthz answering 200, and,
    with RabbitMQ, every worker host consuming the task queue (a worker that is alive but no
    longer consumes after a broker restart is a known Celery failure: this catches it; a Redis
    queue has no consumers to count)."""
    try:
        if not cluster.active(MANAGED_UNITS):
            return False
        for web in cluster.by_group("web"):
            if requests.get(web_url(web, "/healthz"), timeout=5).status_code != 200:
                return False
        return broker == "redis" or queue_state(cluster)["consumers"] >= len(cluster.by_group("workers"))
    except Exception:  # a host rebooting, a service starting
        return False


def queue_state(cluster: Cluster, queue: str = "celery") -> dict:
    """The task queue as RabbitMQ sees it: consumers, messages ready and unacknowledged."""
    output = cluster.one("rabbitmq").exec(
        "rabbitmqctl --quiet list_queues --vhost celery name consumers messages_ready messages_unacknowledged "
        "--formatter json"
    )
    for entry in json.loads(output):
        if entry["name"] == queue:
            return entry
    raise AssertionError(f"no queue {queue} in {output}")


def waiting_messages(cluster: Cluster, broker: str = "rabbitmq") -> dict[str, int]:
    """Messages, ready or unacknowledged, in the task queue and in Celery's delay queues; with
    Redis, in the task queue's lists (one per priority) and in the hash of messages delivered
    and not acknowledged (kombu's ``unacked``, where a task taken by a worker that died waits
    for the visibility timeout)."""
    if broker == "redis":
        client = redis_client(cluster, db=REDIS_BROKER_DB)
        lists = {key.decode(): client.llen(key) for key in client.scan_iter(match="celery*", _type="list")}
        return {**lists, "unacked": client.hlen("unacked")}
    output = cluster.one("rabbitmq").exec(
        "rabbitmqctl --quiet list_queues --vhost celery name messages --formatter json"
    )
    return {
        entry["name"]: entry["messages"]
        for entry in json.loads(output)
        if entry["name"] == "celery" or entry["name"].startswith("celery_delayed_")
    }


def wait_drained(cluster: Cluster, broker: str = "rabbitmq", timeout: float = 60) -> None:
    """Until the task queue and the delay queues hold no message: a duplicate still queued (a
    requeued copy of a task that already succeeded) is counted, not missed."""
    try:
        wait_until(lambda: sum(waiting_messages(cluster, broker).values()) == 0, timeout=timeout, interval=0.5)
    except AssertionError:
        left = {name: count for name, count in waiting_messages(cluster, broker).items() if count}
        # Ready or held by a worker (unacknowledged), and by how many consumers: which way to look.
        held = f"; the task queue: {queue_state(cluster)}" if broker == "rabbitmq" else ""
        raise AssertionError(
            f"the queues did not drain within {timeout}s: {left}{held}\n{worker_holdings(cluster)}"
        ) from None


def worker_holdings(cluster: Cluster) -> str:
    """What the worker says it holds (tasks running, reserved, scheduled for a countdown), the
    tasks its journal shows received and never finished, its warnings, and RabbitMQ's channels
    with what each holds: a message held unacknowledged that the worker does not name is one the
    worker lost track of, not one the broker kept."""
    worker = cluster.one("workers")
    held = {}
    for method in ("active", "reserved", "scheduled"):
        inspect = f"/opt/{APP}/current/venv/bin/celery --app stack_celery inspect {method} --json --timeout 5"
        try:
            held[method] = as_the_worker(worker, inspect).strip().splitlines()[-1]
        except AssertionError as error:
            held[method] = f"(failed: {error})"
    journal = worker.exec(f"journalctl -u {APP}-worker.service --since -10min -o short-precise --no-pager")
    # A task received twice (a duplicate) and finished once is one still held.
    received = Counter(re.findall(r"Task \S+\[(\S+)\] received", journal))
    received.subtract(re.findall(r"Task \S+\[(\S+)\] (?:succeeded|raised|retry)", journal))
    unfinished = [
        line for line in journal.splitlines() if any(f"[{i}] received" in line for i, n in received.items() if n > 0)
    ]
    warnings = re.findall(r"^.*(?:WARNING|ERROR|CRITICAL).*$", journal, re.M)
    channels = ""
    if cluster.by_group("rabbitmq"):
        channels = cluster.one("rabbitmq").exec(
            "rabbitmqctl --quiet list_channels connection number consumer_count "
            "messages_unacknowledged prefetch_count --formatter json",
            check=False,
        )
    return (
        f"the worker holds: {held}\nreceived, never finished: {unfinished}\n"
        f"RabbitMQ's channels: {channels}\nthe worker's warnings (10 min):\n" + "\n".join(warnings[-40:])
    )


def wait_healthy(cluster: Cluster, since: float, broker: str = "rabbitmq") -> float:
    """Seconds from ``since`` until the stack is healthy; fails after RECOVERY_TIMEOUT."""
    try:
        wait_until(
            lambda: healthy(cluster, broker), timeout=RECOVERY_TIMEOUT - (time.monotonic() - since), interval=0.25
        )
    except AssertionError:
        raise AssertionError(f"the stack was not healthy {RECOVERY_TIMEOUT}s after the fault") from None
    return time.monotonic() - since


def await_results(cluster: Cluster, task_ids) -> dict[str, dict]:
    """Each task's final answer from the API (state SUCCESS or FAILURE), waiting up to
    RESULTS_TIMEOUT; the API may answer 503 meanwhile. Tasks still pending at the deadline
    are missing from the answer."""
    webs = cluster.by_group("web")
    pending, final = set(task_ids), {}
    deadline = time.monotonic() + RESULTS_TIMEOUT
    while pending and time.monotonic() < deadline:
        for task_id in sorted(pending):
            try:
                response = requests.get(web_url(webs[0], f"/tasks/{task_id}"), timeout=10)
            except requests.RequestException:
                break
            if response.status_code != 200:
                break
            body = response.json()
            if body["state"] in ("SUCCESS", "FAILURE"):
                final[task_id] = body
                pending.discard(task_id)
        if pending:
            time.sleep(1)
    return final


def lost_tasks(cluster: Cluster, answers: dict[str, int]) -> list[dict | None]:
    """What the API last said of each task of ``answers`` (task id → the answer it must give)
    that did not succeed with its answer, waiting for them as ``await_results`` does."""
    final = await_results(cluster, answers)
    return [
        final.get(task)
        for task, answer in answers.items()
        if (final.get(task, {}).get("result") or {}).get("answer") != answer
    ]


def succeeded_tasks(cluster: Cluster, final: dict[str, dict], answers: dict[str, int]) -> list[str]:
    """The tasks of ``answers`` (task id → the answer it must give) that ended SUCCESS with
    that answer, as the API says (``final``) and PostgreSQL's celery_taskmeta stores."""
    stored = stored_states(cluster, list(answers))
    return [
        task_id
        for task_id, answer in answers.items()
        if final.get(task_id, {}).get("state") == "SUCCESS"
        and final[task_id]["result"]["answer"] == answer
        and stored.get(task_id) == "SUCCESS"
    ]


def stored_states(cluster: Cluster, task_ids) -> dict[str, str]:
    """Task id → status in PostgreSQL's celery_taskmeta, read with psql."""
    return dict(
        rows_of_tasks(cluster, "SELECT task_id, status FROM celery_taskmeta WHERE task_id IN ({ids})", task_ids)
    )


def execution_counts(cluster: Cluster, task_ids) -> dict[str, int]:
    """Task id → how many times it started running, from the executions table."""
    sql = "SELECT task_id, count(*) FROM stackapp_executions WHERE task_id IN ({ids}) GROUP BY task_id"
    return {task_id: int(count) for task_id, count in rows_of_tasks(cluster, sql, task_ids)}


def run_fault(
    cluster: Cluster, fault: str, inject, broker: str = "rabbitmq", told: Alert | None = None, **batch_options
) -> Outcome:
    """Submit a batch, call ``inject()`` once half of it is accepted (and its first long tasks
    run), measure the recovery, wait for every task, and account for each. The outcome is
    recorded for the summary table whatever it is; the caller asserts on it. ``broker`` is
    the one the deploy chose (the results must be in PostgreSQL); ``told``, the alert the
    fault must raise, waited for up to NOTICE_TIMEOUT after the fault."""
    assert wait_healthy(cluster, time.monotonic(), broker) < RECOVERY_TIMEOUT  # start from a steady stack
    if cluster.receiver:
        # An alert on a counter's increase (a unit's restarts) needs a sample from before the
        # fault: the first row starts seconds after the deploy (restarted) Prometheus, and a
        # row after a reboot while the host's exporters come back.
        wait_until(lambda: scraped_everywhere(cluster), timeout=RECOVERY_TIMEOUT)
    batch = Batch(cluster, **batch_options)
    started = time.time()
    with SubmissionLoop(cluster) as loop:
        batch.submit()
        batch.half_submitted.wait(RECOVERY_TIMEOUT)
        _wait_for_a_long_task(batch)
        injected, injected_at = time.monotonic(), time.time()
        notes = inject(batch) or []
        recovery = wait_healthy(cluster, injected, broker)
        recovered = time.time()
        batch.join()
    answers = {**batch.answers, **loop.answers}
    ids = list(answers)
    final = await_results(cluster, ids)
    succeeded = succeeded_tasks(cluster, final, answers)
    children = {
        final[task_id]["result"]["child"]: answers[task_id]
        for task_id in succeeded
        if "child" in final[task_id]["result"]
    }
    children_succeeded = succeeded_tasks(cluster, await_results(cluster, children), children)
    lost_children = sorted(set(children) - set(children_succeeded))
    ended = time.time()  # a tick sent before is queued or has run: the queues drain of it too
    wait_drained(cluster, broker)
    counts = execution_counts(cluster, [*ids, *children])
    notices = None
    if cluster.receiver:
        if told:
            deadline = injected + NOTICE_TIMEOUT
            while time.monotonic() < deadline and not any(
                told.matches(notice.alert) for notice in notices_since(cluster, injected, injected_at)
            ):
                time.sleep(1)
        notices = notices_since(cluster, injected, injected_at)
    outcome = Outcome(
        fault=fault,
        submitted=len(ids),
        succeeded=len(succeeded),
        lost=sorted(set(ids) - set(succeeded)) + [f"child {child}" for child in lost_children],
        shapes={
            "children": (len(children), len(lost_children)),
            **{shape: (len(ids), len(ids - set(succeeded))) for shape, ids in batch.shaped.items()},
        },
        duplicates=sum(count - 1 for count in counts.values() if count > 1),
        executions=counts,
        periodic=ticks_between(cluster, started, ended, recovered),
        recovery_seconds=recovery,
        refused=batch.refused + loop.refused,
        longest_outage=loop.longest_outage(),
        slowest_answer=max(batch.slowest_answer, loop.slowest_answer),
        notices=notices,
        expected=told,
        notes=list(notes),
    )
    if outcome.lost:
        stored = stored_states(cluster, ids)
        outcome.notes.append(f"queues after the deadline: {waiting_messages(cluster, broker)}")
        outcome.notes += [
            f"{task_id}: API {final.get(task_id)}, PostgreSQL {stored.get(task_id)}" for task_id in outcome.lost[:5]
        ]
    assert children, "no task published a child: the batch proves nothing of children"
    empty = [shape for shape, ids in batch.shaped.items() if not ids]
    assert not empty, f"the batch has no task of these shapes, so it proves nothing of them: {empty}"
    never_ran = [task_id for task_id in [*succeeded, *children_succeeded] if counts.get(task_id, 0) == 0]
    assert not never_ran, f"succeeded without a recorded execution (the record is broken): {never_ran[:5]}"
    assert outcome.periodic.runs > 0, "beat sent no tick during the batch: the row proves nothing of periodic runs"
    OUTCOMES.append(outcome)
    print("\n" + "\n".join([outcome.row(), *outcome.notes]))
    return outcome


def warm_stop_and_start(cluster: Cluster, batch: Batch, seen: dict) -> list[str]:
    """A fault: ``systemctl stop`` of the worker, which returns once its running tasks have
    ended (a warm shutdown), then a start. ``seen`` records the executions running at the stop
    and those of them still unfinished after it, for ``assert_warm_stop``."""
    worker = cluster.one("workers")
    seen["running"] = running_executions(cluster, batch.ids())
    worker.exec(f"systemctl stop {APP}-worker.service")
    seen["unfinished"] = running_executions(cluster, {task_id for task_id, _, _ in seen["running"]})
    worker.exec(f"systemctl start {APP}-worker.service")
    return [f"{len(seen['running'])} tasks running at the stop, {len(seen['unfinished'])} left unfinished"]


def assert_told(outcome: Outcome) -> None:
    """The operator heard of the fault: its alert reached the receiver (Alertmanager's webhook)."""
    assert outcome.told(), (
        f"{outcome.expected} did not reach the receiver within {NOTICE_TIMEOUT}s of the fault; "
        f"received: {outcome.notified()}"
    )


def assert_warm_stop(outcome: Outcome, seen: dict) -> None:
    """The stop let every running task finish, and none ran twice."""
    assert seen["running"], "no task was running at the stop: the row proves nothing"
    assert seen["unfinished"] == [], "the stop killed running tasks"
    assert outcome.duplicates == 0, outcome.row()


def _wait_for_a_long_task(batch: Batch, timeout: float = 30) -> None:
    """Until a long task of the batch is running, so the fault lands mid-task."""
    try:
        wait_until(lambda: running_executions(batch.cluster, batch.ids(long_only=True)), timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"no long task started within {timeout}s") from None
