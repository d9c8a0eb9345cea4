"""
Real clients of the deployed stack, used from this machine (outside every target host) or, for
psql, from inside an application host: redis-py, pika (AMQP 0-9-1), psql and HTTP (requests).
"""

from __future__ import annotations

import json
import threading
import time
from itertools import pairwise

import pika
import redis
import requests

from bench import DEBIAN_RELEASES, Cluster, Host, debian_release, wait_until
from settings import APP_GROUPS
from tasks import registry

REDIS_PORT, AMQP_PORT, PG_PORT, WEB_PORT, NODE_EXPORTER_PORT = 6379, 5672, 5432, 8000, 9100
REDIS_BROKER_DB, REDIS_RESULT_DB = 0, 1
APP = "stackapp"
#: Group → the units of the stack's own services that its hosts run (as the service declarations
#: of tasks/ say, with the default settings on the bench's Debian release; monitoring apart).
RELEASE = DEBIAN_RELEASES[debian_release()]
MANAGED_UNITS = registry.units_by_group(("redis", "rabbitmq", "postgres", "web", "workers", "beat"), RELEASE)
#: PostgreSQL's unit on the bench's release (postgresql@<major>-main).
POSTGRESQL_UNIT = MANAGED_UNITS["postgres"][0]
#: Group → the application units its hosts run.
APP_UNITS = {group: MANAGED_UNITS[group] for group in APP_GROUPS}


def redis_client(cluster: Cluster, password: str | None = "from-cluster", db: int = 0) -> redis.Redis:
    password = cluster.secrets["STACK_REDIS_PASSWORD"] if password == "from-cluster" else password
    # RESP2, as Celery's Redis transport speaks it.
    return redis.Redis(
        host=cluster.one("redis").address, port=REDIS_PORT, password=password, socket_timeout=10, protocol=2, db=db
    )


def amqp(cluster: Cluster, user: str = "celery", password: str | None = None, vhost: str = "celery"):
    credentials = pika.PlainCredentials(user, password or cluster.secrets["STACK_RABBITMQ_PASSWORD"])
    parameters = pika.ConnectionParameters(
        cluster.one("rabbitmq").address, AMQP_PORT, vhost, credentials, connection_attempts=1, socket_timeout=10
    )
    return pika.BlockingConnection(parameters)


def psql_from(host: Host, cluster: Cluster, sql: str, password: str | None = None) -> str:
    """Run ``sql`` with psql on ``host`` as the application role, against the PostgreSQL host."""
    password = password or cluster.secrets["STACK_POSTGRESQL_PASSWORD"]
    server = cluster.one("postgres").address
    return host.exec(
        f"PGPASSWORD='{password}' psql -h {server} -p {PG_PORT} -U celeryuser -d celerydb -tAc \"{sql}\""
    ).strip()


def web_url(host: Host, path: str) -> str:
    return f"http://{host.address}:{WEB_PORT}{path}"


def main_pid(host: Host, unit: str) -> int:
    """The main process of ``unit`` (0 while it has none)."""
    return int(host.exec(f"systemctl show --property MainPID --value {unit}").strip())


def kill_9_until_restarted(host: Host, unit: str, timeout: float = 60) -> tuple[int, float]:
    """kill -9 of ``unit``'s main process, then until systemd has it active with a new one:
    the killed process and the seconds that took."""
    old = main_pid(host, unit)
    killed = time.monotonic()
    host.exec(f"kill -9 {old}")
    while not (host.status(f"systemctl is-active --quiet {unit}") == 0 and main_pid(host, unit) not in (0, old)):
        assert time.monotonic() - killed < timeout, f"{unit} on {host.name} not active again after {timeout}s"
        time.sleep(0.1)
    return old, time.monotonic() - killed


def expected_answer(n: int) -> int:
    """What stackapp.compute(n) must answer: the sum of the squares of 0..n-1, in closed form."""
    return (n - 1) * n * (2 * n - 1) // 6


def submit_task(web: Host, n: int, sleep: float = 0.0, countdown: float = 0.0) -> str:
    response = requests.post(web_url(web, "/tasks"), json={"n": n, "sleep": sleep, "countdown": countdown}, timeout=15)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def task_result(web: Host, task_id: str, timeout: float = 90) -> dict:
    """Poll the API until the task has finished; its state and result."""

    def finished():
        body = requests.get(web_url(web, f"/tasks/{task_id}"), timeout=10).json()
        return body if body["state"] in ("SUCCESS", "FAILURE") else None

    return wait_until(finished, timeout=timeout)


def stored_result(cluster: Cluster, task_id: str, backend: str = "postgresql") -> str:
    """``status name worker`` of a task as the result store holds it, read with its own client."""
    if backend == "redis":
        raw = redis_client(cluster, db=REDIS_RESULT_DB).get(f"celery-task-meta-{task_id}")
        meta = json.loads(raw) if raw else {}
        return f"{meta.get('status')} {meta.get('name')} {meta.get('worker')}"
    return psql_from(
        cluster.one("workers"),
        cluster,
        f"SELECT concat_ws(' ', status, name, worker) FROM celery_taskmeta WHERE task_id = '{task_id}'",
    )


def check_task_end_to_end(
    cluster: Cluster, n: int = 1234, backend: str = "postgresql", reference: bool = True
) -> list[str]:
    """Submit a task through every web host; each must come back right through the API and be
    in the result store (PostgreSQL's Celery table, or Redis). The task ids.

    Any application with the reference's HTTP contract (POST /tasks {"n"} → 202 {"id"}; GET
    /tasks/{id} → {"state", "result": {"answer"}}) can be checked; only the reference app
    (``reference``) also records executions and stores extended results (task name, worker)."""
    ids = []
    for web in cluster.by_group("web"):
        task_id = submit_task(web, n)
        body = task_result(web, task_id)
        assert body["state"] == "SUCCESS", body
        assert body["result"]["answer"] == expected_answer(n), body
        row = stored_result(cluster, task_id, backend)
        if reference:
            assert body["executions"] == 1, body  # recorded once, in the result store
            assert row.startswith("SUCCESS stackapp.compute worker@"), row
        else:
            assert row.split()[:1] == ["SUCCESS"], row
        ids.append(task_id)
    return ids


class RequestLoop:
    """``clients`` threads each sending GET / to every host in turn (the web port, or ``port``),
    one request at a time,
    until stopped (bounded: at most ``limit_seconds``); counts answers and failures, and the
    longest time the service went without answering. Container addresses only."""

    def __init__(self, hosts, clients: int = 1, limit_seconds: float = 600, port: int = WEB_PORT):
        self.hosts, self.limit, self.port = hosts, limit_seconds, port
        self.ok, self.failures, self.releases, self.served_by = 0, [], set(), set()
        self.answered_at: list[float] = []
        #: (when, release, host) of each answer, in the order they arrived.
        self.answers: list[tuple[float, str | None, str | None]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> RequestLoop:
        self.started_at = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.stopped_at = time.monotonic()

    def longest_gap(self) -> float:
        """Longest time between two successful answers (or from the start, or until the end)."""
        moments = [self.started_at, *sorted(self.answered_at), self.stopped_at]
        return max(later - earlier for earlier, later in pairwise(moments))

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        # A new connection per request: the case a reload can break. (A keep-alive connection
        # the server closes while the client sends on it is HTTP's own race, which clients
        # resolve by retrying idempotent requests.)
        while not self.stop.is_set() and time.monotonic() < deadline:
            for host in self.hosts:
                try:
                    response = requests.get(f"http://{host.address}:{self.port}/", timeout=10)
                    response.raise_for_status()
                    body = response.json()  # the reference app's says which release and host answered
                    with self.lock:
                        self.releases.add(body.get("release"))
                        self.served_by.add(body.get("host"))
                        self.ok += 1
                        self.answered_at.append(time.monotonic())
                        self.answers.append((self.answered_at[-1], body.get("release"), body.get("host")))
                except requests.RequestException as error:
                    with self.lock:
                        self.failures.append(f"{host.name}: {error}")
                    self.stop.wait(0.1)  # a host that is down refuses at once: do not spin


PROMETHEUS_PORT = 9090
#: Figures the tests measured, printed at the end of the session (conftest).
REPORT: list[str] = []


def prometheus_api(cluster: Cluster, path: str, **params) -> dict:
    """GET Prometheus' HTTP API on the monitoring host; the ``data`` of its answer."""
    url = f"http://{cluster.one('monitoring').address}:{PROMETHEUS_PORT}/api/v1/{path}"
    body = requests.get(url, params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]


def targets(cluster: Cluster) -> list[dict]:
    """Prometheus' active scrape targets, each with its ``health`` ("up" once scraped)."""
    return prometheus_api(cluster, "targets", state="active")["activeTargets"]


def scraped_everywhere(cluster: Cluster) -> bool:
    """Whether Prometheus has every host's node_exporter among its targets, and every target
    scraped ("up"). Right after its start it has no targets yet, which ``all()`` would accept:
    a fault suite's row once killed Redis 3 s before Prometheus' first sample."""
    found = targets(cluster)
    nodes = {target["labels"]["host"] for target in found if target["labels"]["job"] == "node"}
    return nodes == {host.address for host in cluster.hosts.values()} and all(
        target["health"] == "up" for target in found
    )


def firing_alerts(cluster: Cluster) -> list[str]:
    """The alerts Prometheus fires now but the watchdog, each with its labels."""
    return sorted(
        f"{alert['labels']['alertname']} {alert['labels']}"
        for alert in prometheus_api(cluster, "alerts")["alerts"]
        if alert["state"] == "firing" and alert["labels"]["alertname"] != "Watchdog"
    )


def gunicorn_workers_died(web: Host) -> float:
    """The count of Gunicorn workers that died, as node_exporter serves it on ``web`` (read
    from this machine, an admin source of the bench's firewall)."""
    metrics = requests.get(f"http://{web.address}:{NODE_EXPORTER_PORT}/metrics", timeout=10).text
    samples = [line for line in metrics.splitlines() if line.startswith("stack_gunicorn_workers_died_total{")]
    assert len(samples) == 1, f"{web.name}: node_exporter serves {samples or 'no'} Gunicorn death count"
    return float(samples[0].rsplit(" ", 1)[1])


def query(cluster: Cluster, expression: str) -> list[dict]:
    """The instant vector of a PromQL expression: ``[{"metric": {...}, "value": [t, "v"]}]``."""
    return prometheus_api(cluster, "query", query=expression)["result"]


def as_the_worker(host: Host, command: str, app: str = APP) -> str:
    """The output of ``command`` run on a worker host as the worker unit runs: as the
    application's user, with its environment file, working directory and the deploy's library
    (stack_celery) on the path. ``command`` must hold no single quote."""
    workdir = host.exec(f"systemctl show -p WorkingDirectory --value {app}-worker.service").strip()
    return host.exec(
        f"runuser -u {app} -- sh -c 'set -a && . /etc/{app}/app.env && cd {workdir} && "
        f"PYTHONPATH=/opt/{app}/lib {command}'"
    )


def worker_conf(cluster: Cluster, app: str = APP) -> dict:
    """The configuration the running worker reports (``celery inspect conf``)."""
    inspect = f"/opt/{app}/current/venv/bin/celery --app stack_celery inspect conf --json --timeout 10"
    output = as_the_worker(cluster.one("workers"), inspect, app)
    return next(iter(json.loads(output.strip().splitlines()[-1]).values()))
