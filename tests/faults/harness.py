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
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import requests

from bench import Cluster, wait_until
from clients import MANAGED_UNITS, RequestLoop, expected_answer, psql_from, web_url

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
    recovery_seconds: float
    refused: int
    longest_outage: float
    slowest_answer: float
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        return (
            f"| {self.fault} | {self.submitted} | {self.succeeded} | {len(self.lost)} | "
            + " | ".join(f"{count} ({lost})" for count, lost in (self.shapes[shape] for shape in SHAPES))
            + f" | {self.duplicates} "
            f"| {self.recovery_seconds:.1f} | {self.refused} | {self.longest_outage:.1f} |"
        )


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as the Markdown table docs/survival.md shows."""
    header = (
        "| fault | tasks submitted | succeeded | lost | children (lost) | countdowns (lost) | chains (lost) "
        "| chords (lost) | duplicate runs | recovery (s) | refused by the API (retried) | longest API outage (s) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    return "\n".join([header, *(outcome.row() for outcome in outcomes)])


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


def healthy(cluster: Cluster) -> bool:
    """Every managed unit active on its hosts, every web host's /healthz answering 200, and
    every worker host consuming the task queue (a worker that is alive but no longer
    consumes after a broker restart is a known Celery failure: this catches it)."""
    try:
        if not cluster.active(MANAGED_UNITS):
            return False
        for web in cluster.by_group("web"):
            if requests.get(web_url(web, "/healthz"), timeout=5).status_code != 200:
                return False
        return queue_state(cluster)["consumers"] >= len(cluster.by_group("workers"))
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


def waiting_messages(cluster: Cluster) -> dict[str, int]:
    """Messages, ready or unacknowledged, in the task queue and in Celery's delay queues."""
    output = cluster.one("rabbitmq").exec(
        "rabbitmqctl --quiet list_queues --vhost celery name messages --formatter json"
    )
    return {
        entry["name"]: entry["messages"]
        for entry in json.loads(output)
        if entry["name"] == "celery" or entry["name"].startswith("celery_delayed_")
    }


def wait_drained(cluster: Cluster, timeout: float = 60) -> None:
    """Until the task queue and the delay queues hold no message: a duplicate still queued (a
    requeued copy of a task that already succeeded) is counted, not missed."""
    try:
        wait_until(lambda: sum(waiting_messages(cluster).values()) == 0, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"the queues did not drain within {timeout}s: {waiting_messages(cluster)}") from None


def wait_healthy(cluster: Cluster, since: float) -> float:
    """Seconds from ``since`` until the stack is healthy; fails after RECOVERY_TIMEOUT."""
    try:
        wait_until(lambda: healthy(cluster), timeout=RECOVERY_TIMEOUT - (time.monotonic() - since), interval=0.25)
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


def run_fault(cluster: Cluster, fault: str, inject, **batch_options) -> Outcome:
    """Submit a batch, call ``inject()`` once half of it is accepted (and its first long tasks
    run), measure the recovery, wait for every task, and account for each. The outcome is
    recorded for the summary table whatever it is; the caller asserts on it."""
    assert wait_healthy(cluster, time.monotonic()) < RECOVERY_TIMEOUT  # start from a steady stack
    batch = Batch(cluster, **batch_options)
    with RequestLoop(cluster.by_group("web")) as loop:
        batch.submit()
        batch.half_submitted.wait(RECOVERY_TIMEOUT)
        _wait_for_a_long_task(batch)
        injected = time.monotonic()
        notes = inject(batch) or []
        recovery = wait_healthy(cluster, injected)
        batch.join()
    ids = list(batch.accepted)
    final = await_results(cluster, ids)
    succeeded = succeeded_tasks(cluster, final, batch.answers)
    children = {
        final[task_id]["result"]["child"]: batch.answers[task_id]
        for task_id in succeeded
        if "child" in final[task_id]["result"]
    }
    children_succeeded = succeeded_tasks(cluster, await_results(cluster, children), children)
    lost_children = sorted(set(children) - set(children_succeeded))
    wait_drained(cluster)
    counts = execution_counts(cluster, [*ids, *children])
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
        recovery_seconds=recovery,
        refused=batch.refused,
        longest_outage=loop.longest_gap(),
        slowest_answer=batch.slowest_answer,
        notes=list(notes),
    )
    if outcome.lost:
        stored = stored_states(cluster, ids)
        outcome.notes.append(f"queue after the deadline: {queue_state(cluster)}")
        outcome.notes += [
            f"{task_id}: API {final.get(task_id)}, PostgreSQL {stored.get(task_id)}" for task_id in outcome.lost[:5]
        ]
    assert children, "no task published a child: the batch proves nothing of children"
    empty = [shape for shape, ids in batch.shaped.items() if not ids]
    assert not empty, f"the batch has no task of these shapes, so it proves nothing of them: {empty}"
    never_ran = [task_id for task_id in [*succeeded, *children_succeeded] if counts.get(task_id, 0) == 0]
    assert not never_ran, f"succeeded without a recorded execution (the record is broken): {never_ran[:5]}"
    OUTCOMES.append(outcome)
    print("\n" + "\n".join([outcome.row(), *outcome.notes]))
    return outcome


def _wait_for_a_long_task(batch: Batch, timeout: float = 30) -> None:
    """Until a long task of the batch is running, so the fault lands mid-task."""
    try:
        wait_until(lambda: running_executions(batch.cluster, batch.ids(long_only=True)), timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"no long task started within {timeout}s") from None
