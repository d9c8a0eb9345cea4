"""
Scale-out: six hosts, the same code. nginx on a front host balances over two web hosts
(upstreams from the inventory, passive health checks); two worker hosts consume the same
queue; beat runs on exactly one of them; the monitoring host sits beside the data services,
and every host runs the firewall. Requests through the front are served by both web hosts,
tasks are executed by both worker hosts, taking a web host out of service fails no request
through the front, and Prometheus scrapes every target of every host through the firewalls.
"""

from __future__ import annotations

import time

import pytest
import requests

from bench import Cluster
from bench.topologies import TOPOLOGIES
from clients import RequestLoop, check_task_end_to_end, expected_answer, prometheus_api, task_result, wait_until

pytestmark = pytest.mark.bench

FRONT_PORT = 80
APP = "stackapp"


@pytest.fixture(scope="module")
def scaled(converge) -> Cluster:
    with converge("scale-out", TOPOLOGIES["scale-out"]) as cluster:
        yield cluster


def front_url(cluster: Cluster, path: str) -> str:
    return f"http://{cluster.one('front').address}:{FRONT_PORT}{path}"


def test_six_hosts_converge_and_a_rerun_changes_nothing(scaled: Cluster):
    fresh, again = scaled.runs[:2]
    assert fresh.returncode == 0, fresh.stderr[-6000:]
    assert again.returncode == 0 and again.changed == [], again.changed


def test_prometheus_reaches_every_target_of_every_host_through_the_firewalls(scaled: Cluster):
    """The combination the firewall once got wrong: with a front, the web port was opened to
    the front only, and the monitoring host's scrape of the application was dropped."""

    def targets() -> list[dict]:
        return prometheus_api(scaled, "targets", state="active")["activeTargets"]

    try:
        wait_until(lambda: all(target["health"] == "up" for target in targets()), timeout=90)
    except AssertionError:
        down = [(t["labels"]["job"], t["labels"]["instance"], t["lastError"]) for t in targets() if t["health"] != "up"]
        pytest.fail(f"targets down: {down}")
    found = targets()
    app = {target["labels"]["instance"] for target in found if target["labels"]["job"] == "app"}
    assert app == {f"{web.address}:8000" for web in scaled.by_group("web")}
    nodes = {target["labels"]["instance"].split(":")[0] for target in found if target["labels"]["job"] == "node"}
    assert nodes == {host.address for host in scaled.hosts.values()}


def test_requests_through_the_front_are_served_by_every_web_host(scaled: Cluster):
    served = {requests.get(front_url(scaled, "/"), timeout=10).json()["host"] for _ in range(20)}
    assert served == {"web1", "web2"}
    assert requests.get(front_url(scaled, "/healthz"), timeout=10).status_code == 200


def test_tasks_are_executed_by_every_worker_host_and_beat_runs_once(scaled: Cluster):
    check_task_end_to_end(scaled)
    ids = []
    for n in range(30):
        response = requests.post(front_url(scaled, "/tasks"), json={"n": n, "sleep": 0.3}, timeout=15)
        assert response.status_code == 202, response.text
        ids.append((n, response.json()["id"]))
    workers = set()
    for n, task_id in ids:
        body = task_result(scaled.one("web"), task_id)
        assert body["state"] == "SUCCESS" and body["result"]["answer"] == expected_answer(n), body
        workers.add(body["result"]["worker"])
    assert workers == {"worker1", "worker2"}
    running = [h.name for h in scaled.hosts.values() if h.status(f"systemctl is-active -q {APP}-beat.service") == 0]
    assert running == ["worker1"]


def test_a_web_host_out_of_service_fails_no_request_through_the_front(scaled: Cluster):
    web1 = scaled.hosts["web1"]
    front = [scaled.one("front")]
    try:
        with RequestLoop(front, clients=2, port=FRONT_PORT) as loop:
            time.sleep(2)
            web1.exec(f"systemctl stop {APP}-gunicorn.socket {APP}-gunicorn.service")
            time.sleep(5)
            submitted = requests.post(front_url(scaled, "/tasks"), json={"n": 7}, timeout=15)
            time.sleep(2)
        assert loop.failures == [], (
            f"{len(loop.failures)} failed of {loop.ok + len(loop.failures)}: {loop.failures[:3]}"
        )
        assert loop.ok > 50 and loop.served_by == {"web1", "web2"}
        assert submitted.status_code == 202, submitted.text
    finally:
        web1.exec(f"systemctl start {APP}-gunicorn.socket {APP}-gunicorn.service")
    wait_until(
        lambda: (
            {requests.get(front_url(scaled, "/"), timeout=10).json()["host"] for _ in range(10)} == {"web1", "web2"}
        ),
        timeout=60,
    )
