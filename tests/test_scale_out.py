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

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests
from test_grafana import FRONT_METRICS, expressions, metric_names

import settings
from bench import PROJECT_DIR, Cluster
from bench.topologies import TOPOLOGIES
from clients import (
    REPORT,
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
from faults.harness import SubmissionLoop, lost_tasks
from tasks.front import UPSTREAM

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
    fresh = scaled.runs[0]
    assert fresh.returncode == 0, fresh.stderr[-6000:]
    again = scaled.runs[1]
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


def front_requests(cluster: Cluster) -> dict[str, float]:
    """The requests the front counted, by status, as mtail serves them now (this machine is an
    admin source of the bench's firewall)."""
    port = settings.Settings().front_metrics_port
    metrics = requests.get(f"http://{cluster.one('front').address}:{port}/metrics", timeout=10).text
    return {
        status: float(count)
        for status, count in re.findall(r'^stack_front_requests_total\{status="(\d+)"\} (\S+)$', metrics, re.M)
    }


def test_the_front_counts_its_requests_by_status_and_latency_for_any_application(scaled: Cluster):
    """mtail on the front reads nginx's request log: it counts exactly the requests sent through
    the front, by status (20 answered 200, 10 answered 404), with their latency, and not the
    health probes; Prometheus scrapes those counts, and the application dashboard's front
    panels get data."""

    def settled() -> tuple[dict[str, float]] | None:
        """The counts once mtail has read what the tests before sent (it reads every 250 ms)."""
        first = front_requests(scaled)
        time.sleep(1)
        return (first,) if front_requests(scaled) == first else None

    (before,) = wait_until(settled, timeout=30)
    for _ in range(20):
        assert requests.get(front_url(scaled, "/"), timeout=10).status_code == 200
    for _ in range(10):
        assert requests.get(front_url(scaled, "/no-such-page"), timeout=10).status_code == 404
    expected = {**before, "200": before.get("200", 0) + 20, "404": before.get("404", 0) + 10}
    try:
        wait_until(lambda: front_requests(scaled) == expected, timeout=30)
    except AssertionError:
        pytest.fail(f"the front counted {front_requests(scaled)}, expected {expected} (before: {before})")

    def scraped() -> dict[str, float]:
        return {
            series["metric"]["status"]: float(series["value"][1])
            for series in query(scaled, "stack_front_requests_total")
        }

    wait_until(lambda: scraped() == expected, timeout=60)
    assert query(scaled, "sum(stack_front_request_seconds_count)"), "no latency recorded"
    dashboard = json.loads((PROJECT_DIR / "files/grafana/dashboards/app.json").read_text())
    front_panels = [expression for expression in expressions(dashboard) if metric_names(expression) & FRONT_METRICS]
    assert front_panels
    for expression in front_panels:  # a rate needs two scrapes of the series the requests created
        try:
            wait_until(lambda: query(scaled, expression), timeout=30)  # noqa: B023 (called at once)
        except AssertionError:
            pytest.fail(f"no data for the dashboard's {expression}")


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


# The rolling switches below restart the workers: they come after the long task's test, which
# they would otherwise wait for.


def _release_source(tmp_path: Path, release: str) -> Path:
    """A copy of the reference app that says it is ``release``."""
    source = tmp_path / release
    shutil.copytree(PROJECT_DIR / "files" / "app", source)
    module = source / "stackapp" / "release.py"
    module.write_text(module.read_text().replace('"reference-1"', f'"{release}"'))
    return source


def _positions(run, *wanted: tuple[str, str]) -> list[int]:
    """Where each (operation name prefix, host name) of ``wanted`` ran among the operations
    that changed something, in the order pyinfra ran them; AssertionError for one that did not."""
    ran = [(operation["name"], host) for operation in run.results["operations"] for host in operation["success"]]
    positions = []
    for prefix, host in wanted:
        found = [i for i, (name, on) in enumerate(ran) if name.startswith(prefix) and on == host]
        assert found, f"{prefix!r} did not run on {host}: {ran}"
        positions.append(found[0])
    return positions


def test_a_release_rolls_over_the_hosts_in_batches_without_a_failed_request_or_a_lost_task(
    scaled: Cluster, tmp_path: Path
):
    """A code change rolled over the six hosts (app_batch_size 1) while two clients send
    requests through the front and another submits tasks: the application hosts switch one
    after the other, each web host taken out of the front before its switch and back after its
    gate; no request fails, no task is lost, and a re-run changes nothing."""
    front = scaled.one("front")
    source = _release_source(tmp_path, "reference-2")
    try:
        with RequestLoop([front], clients=2, port=FRONT_PORT) as loop, SubmissionLoop(scaled) as stream:
            time.sleep(1)
            started = time.monotonic()
            run = scaled.deploy("--data", f"app_source={source}")
            took = time.monotonic() - started
            time.sleep(2)
        assert run.returncode == 0, run.output[-6000:]
        batches = _application_hosts(scaled)
        switch = "Application | Switch the application to the release "
        expected = []
        for number, host in enumerate(batches, start=1):
            batch = f"batch {number} of 4 ({host.address})"
            if "web" in host.groups:
                expected.append((f"Front (nginx) | Take the web hosts of {batch} out of the front", front.address))
            expected.append((switch, host.address))
            if "web" in host.groups:
                expected.append((f"Front (nginx) | Take the web hosts of {batch} back into the front", front.address))
        order = _positions(run, *expected)
        assert order == sorted(order), order
        assert front.exec(f"grep -c ' down;' {UPSTREAM} || true").strip() == "0", front.exec(f"cat {UPSTREAM}")
        assert loop.failures == [], (
            f"{len(loop.failures)} failed of {loop.ok + len(loop.failures)}: {loop.failures[:3]}"
        )
        # Once a web host answered with the new release, the other still answered with the old one.
        first_new = min(when for when, release, host in loop.answers if release == "reference-2")
        assert any(when > first_new and release == "reference-1" for when, release, host in loop.answers)
        assert stream.refused == 0 and len(stream.answers) > 10, (stream.refused, len(stream.answers))
        lost = lost_tasks(scaled, stream.answers)
        assert lost == [], f"{len(lost)} of {len(stream.answers)} tasks did not succeed: {lost[:3]}"
        again = scaled.deploy("--data", f"app_source={source}")
        assert again.returncode == 0 and again.changed == [], again.changed
        REPORT.append(
            f"6 hosts, app_batch_size 1: a release rolled over 4 application hosts in {took:.0f} s (whole deploy) "
            f"under load: {loop.ok} requests through the front, 0 failed; {len(stream.answers)} tasks, 0 lost"
        )
    finally:
        restore = scaled.deploy()
        assert restore.returncode == 0, restore.output[-6000:]


def _application_hosts(cluster: Cluster) -> list:
    """The application hosts in the order they switch: by inventory name (here their addresses)."""
    return sorted(
        (host for host in cluster.hosts.values() if host.name not in ("front", "data")), key=lambda host: host.address
    )


def test_a_release_that_fails_its_gate_in_the_first_batch_never_reaches_the_next(scaled: Cluster, tmp_path: Path):
    """A release whose health answer fails (it imports, so the load check passes) switches the
    first web host's batch only: its gate fails, the host switches back to the release it ran
    and the front takes it back; the run stops before the next batch, so no later host ever runs
    the release. No request through the front fails meanwhile."""
    source = _release_source(tmp_path, "reference-3")
    api = source / "stackapp" / "api.py"
    api.write_text(api.read_text().replace("healthy = all(", "healthy = False and all("))
    front = scaled.one("front")
    hosts = _application_hosts(scaled)
    failing = next(host for host in hosts if "web" in host.groups)
    current = {host.name: host.exec(f"readlink /opt/{APP}/current") for host in hosts}
    try:
        with RequestLoop([front], clients=2, port=FRONT_PORT) as loop:
            run = scaled.deploy("--data", f"app_source={source}", "--data", "app_health_timeout_seconds=10")
        assert run.returncode != 0, "the deploy passed with a release whose health answer fails"
        said = run.output.rpartition(f"{failing.address}: the application does not work after this deploy")[2]
        assert "answered 503" in said and "Switched back to the release" in said and "it works" in said, said[-3000:]
        stopped = f"{failing.address}: the health gate failed (above): the rolling switch stops before the next batch"
        assert stopped in run.output, run.output[-4000:]
        unchanged = [host for host in hosts if host.address >= failing.address]  # itself: switched back
        assert {host.name: host.exec(f"readlink /opt/{APP}/current") for host in unchanged} == {
            host.name: current[host.name] for host in unchanged
        }
        assert front.exec(f"grep -c ' down;' {UPSTREAM} || true").strip() == "0", front.exec(f"cat {UPSTREAM}")
        assert loop.failures == [] and loop.releases == {"reference-1"}, (loop.failures[:3], loop.releases)
    finally:
        restore = scaled.deploy()
        assert restore.returncode == 0, restore.output[-6000:]
    check_task_end_to_end(scaled)


def _venv_of(host) -> str:
    return host.exec(f"readlink -f /opt/{APP}/current/venv").strip()


def test_a_host_that_builds_a_venv_later_installs_the_packages_the_others_run(scaled: Cluster):
    """Every host of a release runs the same packages, a host that builds its venv later
    included: a build keeps what pip installed as the venv's lock, and another host's build of
    the same venv installs under it. A new venv (an extra package) built on web1 alone
    (--limit), then on worker2: with web1's lock changed to pin a version that does not exist,
    worker2's build fails naming it; with web1's lock as its build made it, worker2 installs
    exactly web1's packages."""
    web1, worker2 = scaled.hosts["web1"], scaled.hosts["worker2"]
    data = ["--data", "app_python_packages=humanize"]
    before = _venv_of(worker2)
    try:
        first = scaled.deploy(*data, "--limit", web1.address)
        assert first.returncode == 0, first.output[-6000:]
        venv = _venv_of(web1)
        lock = f"{venv}/requirements.lock"
        pinned = web1.exec(f"grep '^humanize==' {lock}").strip()
        web1.exec(f"sed -i 's/^humanize==.*/humanize==0.0.1/' {lock}")
        refused = scaled.deploy(*data, "--limit", worker2.address)
        assert refused.returncode != 0, "worker2's build did not install under web1's lock"
        assert "humanize==0.0.1" in refused.output, refused.output[-4000:]
        assert _venv_of(worker2) == before
        web1.exec(f"sed -i 's/^humanize==.*/{pinned}/' {lock}")
        built = scaled.deploy(*data, "--limit", worker2.address)
        assert built.returncode == 0, built.output[-6000:]
        assert _venv_of(worker2) == venv
        assert (
            worker2.exec(f"head -1 {venv}/peer.lock").strip()
            == f"# The packages of the venv {venv.rsplit('/', 1)[1]} on {web1.address}."
        )
        freeze = f"{venv}/bin/pip freeze --all --exclude-editable | sed '/ @ /d'"
        assert worker2.exec(freeze) == web1.exec(freeze) == web1.exec(f"cat {lock}")
    finally:
        restore = scaled.deploy()
        assert restore.returncode == 0, restore.output[-6000:]
    check_task_end_to_end(scaled)
