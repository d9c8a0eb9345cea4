"""
Scale-out: six hosts, the same code. nginx on a front host balances over two web hosts
(upstreams from the inventory, passive health checks); two worker hosts consume the same
queue; beat runs on exactly one of them; the monitoring host sits beside the data services,
and every host runs the firewall. Requests through the front are served by both web hosts,
tasks are executed by both worker hosts, taking a web host out of service fails no request
through the front, and Prometheus scrapes every target of every host through the firewalls.
A task longer than the time limit the deploy used to impose runs to its end, once, while the
other tests run.
"""

from __future__ import annotations

import time

import pytest
import requests

import settings
from bench import Cluster
from bench.topologies import TOPOLOGIES
from clients import (
    RequestLoop,
    check_task_end_to_end,
    expected_answer,
    prometheus_api,
    psql_from,
    query,
    submit_task,
    task_result,
    wait_until,
)

pytestmark = pytest.mark.bench

FRONT_PORT = 80
APP = "stackapp"
#: How long the long task runs: more than the 300 s hard time limit the deploy once imposed
#: (celery_longest_task_seconds' default), which killed such a task and marked it FAILURE.
LONG_TASK_SECONDS = 310


@pytest.fixture(scope="module")
def scaled(converge) -> Cluster:
    with converge("scale-out", TOPOLOGIES["scale-out"]) as cluster:
        yield cluster


@pytest.fixture(scope="module", autouse=True)
def long_task(scaled: Cluster) -> tuple[str, float]:
    """A task of LONG_TASK_SECONDS, submitted before the module's first test (the wait is
    theirs) and checked by its last; its id and when it was submitted."""
    return submit_task(scaled.one("web"), n=4321, sleep=LONG_TASK_SECONDS), time.monotonic()


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
    # The blackbox exporter gets the health path from every web host and through the front.
    probed = {target["labels"]["instance"] for target in found if target["labels"]["job"] == "health"}
    entries = [f"{web.address}:8000" for web in scaled.by_group("web")] + [
        f"{scaled.one('front').address}:{FRONT_PORT}"
    ]
    assert probed == {f"http://{entry}/healthz" for entry in entries}, probed
    wait_until(lambda: len(query(scaled, 'probe_success{job="health"} == 1')) == len(entries), timeout=60)
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


#: A web host that takes a request and then fails without answering: it reads what it is sent,
#: counts the POSTs in /root/posts, and closes the connection.
#: How long nginx leaves out a web host that failed (the bench sets no other).
FAIL_TIMEOUT_SECONDS = settings.Settings().front_fail_timeout_seconds
FAILING_WEB_HOST = """
import socket
server = socket.create_server(("{address}", {port}))
while True:
    connection, _ = server.accept()
    if connection.recv(65536).startswith(b"POST"):
        with open("/root/posts", "a") as posts:
            posts.write("POST\\n")
    connection.close()
"""


def test_a_post_that_reached_a_failing_web_host_is_never_resent(scaled: Cluster):
    """nginx resends a request to the next web host only when the failed one never received
    it: a POST that reached a host which then failed is answered with an error, not submitted
    a second time on the other host (a task would run twice).

    POSTs go on until one reaches the failing host: the monitoring host's probe of the front
    may fail on that host first, and nginx then leaves it out for front_fail_timeout_seconds."""
    web1 = scaled.hosts["web1"]
    web1.exec(f"systemctl stop {APP}-gunicorn.socket {APP}-gunicorn.service && rm -f /root/posts")
    web1.container.exec_run(["python3", "-c", FAILING_WEB_HOST.format(address=web1.address, port=8000)], detach=True)

    def received() -> int:
        return len(web1.exec("cat /root/posts 2>/dev/null || true").split())

    try:
        wait_until(lambda: web1.status(f"ss -Hltn 'sport = :8000' | grep -q {web1.address}") == 0, timeout=10)
        answers: list[int] = []
        deadline = time.monotonic() + 3 * FAIL_TIMEOUT_SECONDS
        while len(answers) < 10 or (received() == 0 and time.monotonic() < deadline):
            answers.append(requests.post(front_url(scaled, "/tasks"), json={"n": len(answers)}, timeout=15).status_code)
            time.sleep(0.5)
        assert received() >= 1, f"no POST reached the failing host: {answers}"
        assert len([code for code in answers if code != 202]) == received(), answers
        assert all(code in (202, 502) for code in answers), answers
    finally:
        web1.exec("pkill -f '[s]ocket.create_server' || true")
        web1.exec(f"systemctl start {APP}-gunicorn.socket {APP}-gunicorn.service")
    wait_until(
        lambda: (
            {requests.get(front_url(scaled, "/"), timeout=10).json()["host"] for _ in range(10)} == {"web1", "web2"}
        ),
        timeout=60,
    )


def test_a_broken_nginx_configuration_stops_the_deploy_and_the_front_keeps_serving(scaled: Cluster):
    """A changed site is checked with ``nginx -t`` before nginx reloads it: with a broken file
    beside it, the deploy fails with nginx's own message and the running front serves on."""
    front = scaled.one("front")
    front.exec("echo 'this is not nginx;' > /etc/nginx/conf.d/zz-broken.conf")
    try:
        failed = scaled.deploy("--data", "front_fail_timeout_seconds=11")
        assert failed.returncode != 0
        assert "Check nginx's configuration" in failed.output and "[emerg]" in failed.output, failed.output[-3000:]
        assert front.exec("systemctl is-active nginx").strip() == "active"
        served = {requests.get(front_url(scaled, "/"), timeout=10).json()["host"] for _ in range(10)}
        assert served == {"web1", "web2"}
    finally:
        front.exec("rm -f /etc/nginx/conf.d/zz-broken.conf")
    fixed = scaled.deploy()
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_a_task_longer_than_the_old_300s_limit_runs_to_its_end_once(scaled: Cluster, long_task: tuple[str, float]):
    """With the default settings nothing stops a long task: it succeeds with its answer after
    LONG_TASK_SECONDS, and ran once (no limit killed it, no timeout of the broker handed it to
    another worker). The broker's consumer timeout (1 h) is the ceiling the settings check."""
    task_id, submitted = long_task
    remaining = LONG_TASK_SECONDS - (time.monotonic() - submitted)
    body = task_result(scaled.one("web"), task_id, timeout=remaining + 120)
    assert body["state"] == "SUCCESS" and body["result"]["answer"] == expected_answer(4321), body
    assert body["executions"] == 1, body
    ran = psql_from(
        scaled.one("workers"),
        scaled,
        f"SELECT extract(epoch FROM finished_at - started_at) FROM stackapp_executions WHERE task_id = '{task_id}'",
    )
    assert float(ran) >= LONG_TASK_SECONDS, f"the task ran {ran}s"
