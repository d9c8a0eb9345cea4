"""
The application tier on both topologies: a task submitted over HTTP to every web host is
computed by a worker and comes back through the API and from PostgreSQL; the units are active,
enabled and run as the application user; /healthz and /metrics tell the truth; a code change
is a new release, switched to (and rolled back from) without failing a single request, and a
release that cannot be imported never serves.
"""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench import PROJECT_DIR, Cluster
from clients import (
    APP,
    APP_UNITS,
    REPORT,
    RequestLoop,
    check_task_end_to_end,
    gunicorn_workers_died,
    psql_from,
    wait_until,
    web_url,
    worker_conf,
)

pytestmark = pytest.mark.bench


@pytest.mark.core
def test_task_travels_end_to_end_through_every_web_host(deployed: Cluster):
    assert check_task_end_to_end(deployed)


def test_units_active_enabled_and_running_as_the_app_user(deployed: Cluster):
    for group, units in APP_UNITS.items():
        for host in deployed.by_group(group):
            for unit in units:
                service = host.node.service(unit)
                assert service.is_running and service.is_enabled, (host.name, unit)
                if unit.endswith(".socket"):
                    continue
                assert service.systemd_properties["Restart"] == "always", (host.name, unit)
                # The main process and its children (Celery's pool, Gunicorn's workers).
                pid = service.systemd_properties["MainPID"]
                users = host.exec(f"ps -o user= -p {pid}; ps -o user= --ppid {pid} || true").split()
                assert set(users) == {APP}, (host.name, unit, users)
                if unit != f"{APP}-beat.service":
                    assert len(users) >= 2, f"{unit} has no pool or worker processes"


def test_worker_stop_is_a_warm_shutdown_that_waits_for_the_longest_task(deployed: Cluster):
    for host in deployed.by_group("workers"):
        properties = host.node.service(f"{APP}-worker.service").systemd_properties
        assert (properties["KillMode"], properties["Type"]) == ("mixed", "exec")
        assert properties["TimeoutStopUSec"] == "5min 30s"  # celery_longest_task_seconds 300 + 30


@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_no_time_limit_unless_set_and_a_task_over_a_set_limit_fails_and_is_not_run_again(deployed: Cluster):
    """The deploy imposes no time limit: the worker reports none (the reference app sets none).
    With celery_task_time_limit_seconds, a task over it is killed and ends FAILURE
    (TimeLimitExceeded), and is never run again, as the setting's sentence says: Celery
    acknowledges it, so it is not redelivered."""
    assert worker_conf(deployed).get("task_time_limit") is None  # inspect conf omits unset settings
    web = deployed.one("web")

    def task(task_id: str) -> dict:
        return requests.get(web_url(web, f"/tasks/{task_id}"), timeout=15).json()

    def failed(task_id: str) -> dict | None:
        answer = task(task_id)
        return answer if answer["state"] == "FAILURE" else None

    try:
        run = deployed.deploy("--data", "celery_task_time_limit_seconds=2")
        assert run.returncode == 0, run.stderr[-3000:]
        task_id = requests.post(web_url(web, "/tasks"), json={"n": 10, "sleep": 6}, timeout=15).json()["id"]
        failure = wait_until(lambda: failed(task_id), timeout=60)
        assert failure["result"].startswith("TimeLimitExceeded"), failure
        time.sleep(8)  # a redelivered copy would have started by now (and been killed again)
        final = task(task_id)
        assert (final["state"], final["executions"]) == ("FAILURE", 1), final
    finally:
        restore = deployed.deploy()  # no limit again, for the tests that follow
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert worker_conf(deployed).get("task_time_limit") is None  # inspect conf omits unset settings


def test_beat_runs_on_exactly_one_host_and_its_heartbeats_keep_arriving(deployed: Cluster):
    """Beat runs on the beat host only, and its heartbeat (every 5 s on the bench) keeps being
    executed now: a new one is stored within three intervals, not just some heartbeat ever."""
    running = [h for h in deployed.hosts.values() if h.status(f"systemctl is-active -q {APP}-beat.service") == 0]
    assert [h.name for h in running] == [h.name for h in deployed.by_group("beat")] and len(running) == 1

    def heartbeats() -> int:
        sql = "SELECT count(*) FROM celery_taskmeta WHERE name = 'stackapp.heartbeat' AND status = 'SUCCESS'"
        return int(psql_from(deployed.one("workers"), deployed, sql))

    before = heartbeats()
    wait_until(lambda: heartbeats() > before, timeout=3 * float(deployed.data["beat_heartbeat_seconds"]) + 5)


def test_healthz_reports_broker_and_results(deployed: Cluster):
    for web in deployed.by_group("web"):
        response = requests.get(web_url(web, "/healthz"), timeout=15)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok", "broker": "ok", "results": "ok"}


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            total += float(match.group(2))
    return total


def test_metrics_count_every_request_across_gunicorn_workers(deployed: Cluster):
    """With several workers a request lands on any of them; in multi-process mode /metrics
    (also answered by any worker) still counts every one. Which worker accepts a connection is
    the kernel's choice (one idle worker may take forty in a row, seen in CI), so requests go
    eight at a time, in rounds of forty, until two workers have answered."""
    web = deployed.one("web")
    labels = dict(method="GET", route="/", status="200")
    before = _metric(requests.get(web_url(web, "/metrics"), timeout=10).text, "stackapp_http_requests_total", **labels)
    pids: set[int] = set()
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and sent < 400:
            answers = pool.map(lambda _: requests.get(web_url(web, "/"), timeout=10), range(40))
            pids |= {answer.json()["pid"] for answer in answers}
            sent += 40
    after = _metric(requests.get(web_url(web, "/metrics"), timeout=10).text, "stackapp_http_requests_total", **labels)
    assert len(pids) >= 2, f"all {sent} requests went to one worker: the test proves nothing"
    assert after - before == sent


def _gunicorn_pid(host) -> str:
    return host.exec(f"systemctl show -p MainPID --value {APP}-gunicorn.service").strip()


def _serve(webs, release: str) -> bool:
    return {requests.get(web_url(host, "/"), timeout=10).json()["release"] for host in webs} == {release}


def test_a_new_release_and_a_rollback_switch_without_a_failed_request(deployed: Cluster, tmp_path: Path):
    """A code change builds a new release beside the running one and switches to it: Gunicorn
    restarts (its socket holds the connections meanwhile) and no request fails. ``app_release
    =previous`` switches back to the release before, without building, gated the same way;
    its re-run changes nothing. Both take the time reported at the end of the session."""
    source = tmp_path / "app"
    shutil.copytree(PROJECT_DIR / "files" / "app", source)
    release = source / "stackapp" / "release.py"
    release.write_text(release.read_text().replace('"reference-1"', '"reference-2"'))
    webs = deployed.by_group("web")
    pids = {host.name: _gunicorn_pid(host) for host in webs}
    try:
        with RequestLoop(webs) as loop:
            time.sleep(1)
            started = time.monotonic()
            run = deployed.deploy("--data", f"app_source={source}")
            built = time.monotonic() - started
            time.sleep(3)
        assert run.returncode == 0, run.output[-6000:]
        names = {change.split(" @ ")[0] for change in run.changed}
        assert any(name.startswith("Application | Switch the application to the release ") for name in names), names
        assert any(name.startswith(f"Application | Restart {APP}-gunicorn.service") for name in names), names
        assert all(_gunicorn_pid(host) != pids[host.name] for host in webs), "Gunicorn was not restarted"
        assert loop.failures == [], f"{len(loop.failures)} failed requests of {loop.ok + len(loop.failures)}"
        assert loop.ok > 20
        assert _serve(webs, "reference-2")
        check_task_end_to_end(deployed)

        rollback = ["--data", f"app_source={source}", "--data", "app_release=previous"]
        with RequestLoop(webs) as loop:
            started = time.monotonic()
            back = deployed.deploy(*rollback)
            rolled_back = time.monotonic() - started
        assert back.returncode == 0, back.output[-6000:]
        assert not any("Install the Python packages" in name for name in back.changed), back.changed
        assert loop.failures == [], f"{len(loop.failures)} failed requests of {loop.ok + len(loop.failures)}"
        assert _serve(webs, "reference-1")
        check_task_end_to_end(deployed)
        again = deployed.deploy(*rollback)
        assert again.returncode == 0 and again.changed == [], again.changed
        REPORT.append(
            f"{len(webs)} web host(s): a code change released in {built:.0f} s, rolled back in {rolled_back:.0f} s "
            "(whole deploys, 0 failed requests)"
        )
    finally:
        restore = deployed.deploy()  # back to the shipped code, for the tests that follow
        assert restore.returncode == 0, restore.stderr[-6000:]


@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_a_release_whose_asgi_module_fails_to_import_never_serves(deployed: Cluster, tmp_path: Path):
    """The new release is imported before the switch: one whose ASGI module cannot be imported
    fails the deploy with the import error, and the running release serves throughout without
    a failed request. The next deploy of good code serves again."""
    source = tmp_path / "app"
    shutil.copytree(PROJECT_DIR / "files" / "app", source)
    api = source / "stackapp" / "api.py"
    api.write_text(api.read_text() + "\nimport stackapp_missing_module  # noqa: E402\n")
    webs = deployed.by_group("web")
    try:
        with RequestLoop(webs) as loop:
            run = deployed.deploy("--data", f"app_source={source}", "--data", "app_health_timeout_seconds=20")
        assert run.returncode != 0, "the deploy passed with an ASGI module that cannot be imported"
        said = f"{webs[0].address}: the release "
        assert said in run.output and "does not load on this host" in run.output, run.output[-4000:]
        failure = run.output.rpartition("does not load on this host")[2]
        assert f"which {APP}-gunicorn.service runs, fails to load" in failure, failure[-4000:]
        assert "No module named 'stackapp_missing_module'" in failure, failure[-4000:]
        assert not any("Switch the application" in name for name in run.changed_in_text), run.changed_in_text
        assert loop.failures == [] and loop.releases == {"reference-1"}, (loop.failures[:3], loop.releases)
    finally:
        restore = deployed.deploy()  # back to the shipped code, for the tests that follow
    assert restore.returncode == 0, restore.output[-6000:]
    check_task_end_to_end(deployed)


@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_a_rerun_that_changes_nothing_still_fails_while_a_worker_does_not_answer(deployed: Cluster):
    """The health gate runs on every deploy, not only after a change: with the worker's main
    process stopped (SIGSTOP: its unit active, its process alive, nothing a deploy would
    restart), a re-run fails naming the worker; the only change it made is the check tool's own
    timeout (this test's shorter one). Once the worker runs again, the next run passes."""
    host = deployed.one("workers")
    tool = f"Application | Install {APP}-check, which checks that the application works on this host"
    pid = host.exec(f"systemctl show -p MainPID --value {APP}-worker.service").strip()
    host.exec(f"kill -STOP {pid}")
    try:
        run = deployed.deploy("--data", "app_health_timeout_seconds=10")
    finally:
        host.exec(f"kill -CONT {pid}")
        restore = deployed.deploy()  # the default timeout again, for the tests that follow
    assert run.returncode != 0, "the deploy passed while the worker answered nothing"
    assert run.changed_in_text == [tool], run.output[-4000:]
    failure = run.gate_failure
    assert f"the Celery worker worker@{host.name} did not answer a ping" in failure, failure[-4000:]
    assert f"The exceptions in {APP}-worker.service's journal" in failure, failure[-4000:]
    assert restore.returncode == 0 and restore.changed == [f"{tool} @ {host.address}"], restore.output[-4000:]


def unit_files(host, app: str) -> list[str]:
    listed = host.exec(f"systemctl list-unit-files --no-legend '{app}-*'", check=False)  # exits 1 for none
    return sorted(line.split()[0] for line in listed.splitlines() if line.strip())


@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_a_renamed_application_retires_the_previous_one_before_it_starts(deployed: Cluster):
    """Changing ``app_name`` stops, disables and removes the previous application's units and
    tools before the new one's start (its socket held the web port, its beat would run a second
    schedule), and keeps its files; the renamed application serves and runs tasks, and a
    re-run changes nothing. Renaming it back retires the renamed one the same way."""
    host, renamed = deployed.one("web"), "renamed"
    suffixes = ["beat.service", "flower.service", "gunicorn.service", "gunicorn.socket", "worker.service"]
    try:
        run = deployed.deploy("--data", f"app_name={renamed}")
        assert run.returncode == 0, run.output[-6000:]
        assert f"app_name is now '{renamed}': the application '{APP}' is retired" in run.output
        assert unit_files(host, APP) == [], "the previous application's units are still installed"
        assert unit_files(host, renamed) == [f"{renamed}-{suffix}" for suffix in suffixes]
        assert (
            host.status(f"test -d /etc/{APP} && test -L /opt/{APP}/current && ! test -e /usr/local/sbin/{APP}-check")
            == 0
        )
        check_task_end_to_end(deployed)
        again = deployed.deploy("--data", f"app_name={renamed}")
        assert again.returncode == 0 and again.changed == [], again.changed
    finally:
        restore = deployed.deploy()
        host.exec(
            f"userdel {renamed}; rm -rf /etc/{renamed} /opt/{renamed} /var/lib/{renamed}-* /var/lib/private/{renamed}-*",
            check=False,
        )
    assert restore.returncode == 0, restore.output[-6000:]
    assert unit_files(host, renamed) == []
    check_task_end_to_end(deployed)


def test_repeated_graceful_reloads_under_load_fail_no_request(deployed: Cluster):
    """Ten reloads in a row while four clients send requests: the deploy's worker class drains
    connections it has accepted before it closes them; Uvicorn's own drops some (about one
    request per reload was reset here before the drain)."""
    webs = deployed.by_group("web")
    died = {host.name: gunicorn_workers_died(host) for host in webs}
    with RequestLoop(webs, clients=4) as loop:
        for _ in range(10):
            time.sleep(1.5)
            for host in webs:
                host.exec(f"systemctl reload {APP}-gunicorn.service")
        time.sleep(3)
    assert loop.failures == [], (
        f"{len(loop.failures)} failed requests of {loop.ok + len(loop.failures)}: {loop.failures[:3]}"
    )
    assert loop.ok > 200
    # The old workers exited when asked: none counts as died (GunicornWorkerDied stays quiet).
    assert {host.name: gunicorn_workers_died(host) for host in webs} == died
