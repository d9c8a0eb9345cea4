"""
Bring your own application: a second app, generated here, laid out unlike the reference app and
deployed with settings only (no change to the deploy's code or to the app's):

- a git repository (fetched at a tag), package under ``src/``, installed from pyproject.toml
  under a constraints file, plus an extra package (app_python_packages);
- its own import paths for the ASGI app and the Celery app, and its own variable names for the
  broker and result URLs (Redis broker, PostgreSQL results);
- a dependency compiled from source (psycopg2, which needs libpq-dev, python3-dev and a
  compiler: app_system_packages);
- a template read relative to the working directory (app_workdir), its own environment
  variables (one with quotes and a backslash) and a secret variable;
- its worker hosts in an inventory group of its own, whose group data sets the queues and the
  concurrency; the app configures none of Celery's delivery settings, and the deploy's
  no-task-lost settings are in force in its worker all the same.

Then the same app, built as an sdist, replaces the git deploy.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets as random_secrets
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bench import PROJECT_DIR, Cluster, git
from clients import (
    RequestLoop,
    check_task_end_to_end,
    firing_alerts,
    query,
    scraped_everywhere,
    targets,
    wait_until,
    web_url,
    worker_conf,
)
from faults.harness import SubmissionLoop, lost_tasks
from tasks.app import BUILT_AS

pytestmark = pytest.mark.bench

APP = "acme"
SIGNING_KEY = random_secrets.token_hex(16)
GREETING_NAME = 'Ada "the countess" \\ Lovelace'

FILES = {
    "pyproject.toml": """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "acme-jobs"
version = "1.0"
requires-python = ">=3.11"
dependencies = ["fastapi", "celery[redis]", "sqlalchemy", "psycopg2", "gunicorn", "uvicorn[standard]"]

[tool.setuptools.packages.find]
where = ["src"]
""",
    "src/acme_jobs/__init__.py": "",
    "src/acme_jobs/queueing.py": """\
import os

from celery import Celery

# Nothing of Celery's delivery settings here: the deploy applies its own.
queue = Celery(
    "acme", broker=os.environ["ACME_QUEUE_URL"], backend=os.environ["ACME_RESULTS_DSN"], include=["acme_jobs.work"]
)
queue.conf.task_routes = {"acme.square_sum": {"queue": "acme"}}
""",
    "src/acme_jobs/work.py": """\
from acme_jobs.queueing import queue


@queue.task(name="acme.square_sum")
def square_sum(n):
    return {"n": n, "answer": sum(i * i for i in range(n))}
""",
    "src/acme_jobs/web/__init__.py": "",
    "src/acme_jobs/web/service.py": """\
import hashlib
import os
from pathlib import Path

import psycopg2
from fastapi import FastAPI
from pydantic import BaseModel

from acme_jobs.queueing import queue
from acme_jobs.work import square_sum

api = FastAPI()


class Job(BaseModel):
    n: int


@api.get("/")
def index():
    template = Path("templates/greeting.txt").read_text()
    return {
        "greeting": template.replace("NAME", os.environ["ACME_GREETING_NAME"]),
        "cwd": os.getcwd(),
        "key_sha256": hashlib.sha256(os.environ["ACME_SIGNING_KEY"].encode()).hexdigest(),
        "libpq": psycopg2.__libpq_version__,
    }


@api.post("/tasks", status_code=202)
def submit(job: Job):
    return {"id": square_sum.delay(job.n).id}


@api.get("/tasks/{task_id}")
def status(task_id: str):
    result = queue.AsyncResult(task_id)
    return {"state": result.state, "result": result.result if result.successful() else None}
""",
    "deploy/templates/greeting.txt": "Hello, NAME!\n",
}


def constraints() -> str:
    """The reference app's pins, with psycopg2 (built from source) for psycopg2-binary."""
    pins = (PROJECT_DIR / "files" / "app" / "requirements.txt").read_text().splitlines()
    return "\n".join(["psycopg2==2.9.13", *(pin for pin in pins if not pin.startswith("psycopg2-binary"))]) + "\n"


def generate(root: Path) -> Path:
    """The app's files, committed to a git repository and tagged v1."""
    for name, text in {**FILES, "constraints.txt": constraints()}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for command in (["init", "--quiet"], ["add", "."], ["commit", "--quiet", "-m", "acme"], ["tag", "v1"]):
        git(*command, cwd=root)
    return root


def sdist(root: Path, directory: Path) -> Path:
    """An sdist of the app: its tree under acme_jobs-1.0/, as `python -m build --sdist` lays it out."""
    path = directory / "acme_jobs-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in ["pyproject.toml", "src"]:
            archive.add(root / name, arcname=f"acme_jobs-1.0/{name}")
    return path


SETTINGS = dict(
    app_name=APP,
    app_git_ref="v1",
    app_requirements="pyproject.toml",
    app_constraints="constraints.txt",
    app_python_packages="uvicorn-worker",
    app_system_packages="build-essential,python3-dev,libpq-dev",
    app_workdir="deploy",
    asgi_app="acme_jobs.web.service:api",
    app_health_path="/",  # no /healthz: its index reads a template relative to app_workdir
    app_metrics_path="",  # it exports no metrics
    celery_app="acme_jobs.queueing:queue",
    app_broker_url_variables="ACME_QUEUE_URL",
    app_result_backend_variables="ACME_RESULTS_DSN",
    app_environment=json.dumps({"ACME_GREETING_NAME": GREETING_NAME}),
    app_secret_variables="ACME_SIGNING_KEY",
    celery_broker="redis",
    celery_result_backend="postgresql",
)


@pytest.fixture(scope="module")
def own_app(converge, tmp_path_factory) -> Cluster:
    root = generate(tmp_path_factory.mktemp("acme-repository"))
    group_data = tmp_path_factory.mktemp("acme-group-data")
    (group_data / "acme_workers.py").write_text('celery_queues = "acme,celery"\ncelery_concurrency = 3\n')
    topology = {"acme": ["redis", "postgres", "web", "workers", "beat", "acme_workers", "monitoring"]}
    with converge(
        "own-app",
        topology,
        arguments=["--group-data", str(group_data)],
        secrets={"STACK_APP_ACME_SIGNING_KEY": SIGNING_KEY},
        # No wheelhouse (it holds the reference app's pins only): packages come from PyPI, and
        # psycopg2 is compiled on the host in every run.
        pip_cache=False,
        app_source=f"file://{root}",
        **SETTINGS,
    ) as cluster:
        cluster.root = root
        yield cluster


def test_deploys_and_redeploys_without_changes(own_app: Cluster):
    fresh = own_app.runs[0]
    assert fresh.returncode == 0, fresh.output[-6000:]
    again = own_app.runs[1]
    assert again.returncode == 0 and again.changed == [], again.changed


def test_an_application_without_metrics_is_monitored_without_a_false_alert(own_app: Cluster):
    """The app exports no metrics (``app_metrics_path`` empty): Prometheus does not scrape its
    web host (it used to scrape /metrics, get a 404 and fire InstanceDown for as long as the
    app ran), every other target is up, Flower counts the worker online through the Redis
    broker, and the healthy stack fires nothing but the watchdog."""
    wait_until(lambda: scraped_everywhere(own_app), timeout=90)
    jobs = {target["labels"]["job"] for target in targets(own_app)}
    assert "app" not in jobs and "flower" in jobs, jobs
    wait_until(lambda: query(own_app, "count(flower_worker_online == 1) == 1"), timeout=60)
    wait_until(lambda: firing_alerts(own_app) == [], timeout=90)


def test_a_web_that_hangs_is_told_although_the_application_exports_no_metrics(own_app: Cluster):
    """Gunicorn's master and workers stopped (SIGSTOP): the unit stays active and the socket
    accepts, so systemd sees nothing and there are no metrics to miss; the blackbox probe of
    ``app_health_path`` fails and AppNotAnswering reaches the receiver. Once they run again it
    is resolved."""
    receiver, host, unit = own_app.receiver, own_app.one("web"), f"{APP}-gunicorn.service"
    wait_until(lambda: query(own_app, 'probe_success{job="health"} == 1'), timeout=60)
    stopped = time.monotonic()
    host.exec(f"systemctl kill --signal=SIGSTOP {unit}")
    try:
        fired = wait_until(lambda: receiver.firing("AppNotAnswering", stopped), timeout=120, interval=0.5)
    finally:
        resumed = time.monotonic()
        host.exec(f"systemctl kill --signal=SIGCONT {unit}")
    assert fired[0][1]["labels"]["instance"] == f"http://{host.address}:8000/", fired
    wait_until(lambda: receiver.received("AppNotAnswering", "resolved", resumed), timeout=120, interval=0.5)


def test_task_travels_end_to_end_on_the_apps_own_queue(own_app: Cluster):
    """The task is routed to the queue "acme", which only the group data of acme_workers makes
    the worker consume: the check passes only if the per-group settings apply."""
    check_task_end_to_end(own_app, reference=False)


def test_app_runs_in_its_workdir_with_its_environment_and_secret(own_app: Cluster):
    body = requests.get(web_url(own_app.one("web"), "/"), timeout=15).json()
    assert body["greeting"] == f"Hello, {GREETING_NAME}!\n"
    current = own_app.one("web").exec(f"readlink -f /opt/{APP}/current").strip()
    assert re.fullmatch(rf"/opt/{APP}/releases/[0-9a-f]{{12}}", current), current
    assert body["cwd"] == f"{current}/src/deploy"  # the release's directory: a switch restarts the units
    assert body["key_sha256"] == hashlib.sha256(SIGNING_KEY.encode()).hexdigest()
    host = own_app.one("web")
    assert host.exec(f"stat -c '%a %U:%G' /etc/{APP}/app.env").strip() == f"640 root:{APP}"


def test_dependency_was_compiled_against_the_system_libpq_by_the_build_user(own_app: Cluster):
    host = own_app.one("web")
    venv = f"/opt/{APP}/current/venv"
    assert host.status(f"{venv}/bin/pip show --quiet psycopg2") == 0
    assert host.status(f"{venv}/bin/pip show --quiet psycopg2-binary") != 0  # no prebuilt wheel
    module = host.exec(f"{venv}/bin/python -c 'import psycopg2._psycopg as m; print(m.__file__)'").strip()
    libpq = [line for line in host.exec(f"ldd {module}").splitlines() if "libpq" in line]
    assert libpq and all("=> /lib/" in line or "=> /usr/lib/" in line for line in libpq), libpq  # Debian's libpq5
    # Built, compiler included, by the build user, not root; then root's, and nobody else may write it.
    assert host.exec(f"head -n 1 {venv}/pip-install.log").strip() == f"{BUILT_AS} {APP}-build"
    assert host.exec(f"find {venv}/ ! -user root -print -quit; find {venv}/ -perm /022 ! -type l -print -quit") == ""


def test_worker_uses_the_groups_concurrency_and_the_deploys_delivery_settings(own_app: Cluster):
    host = own_app.one("workers")
    pid = host.exec(f"systemctl show -p MainPID --value {APP}-worker.service").strip()
    assert len(host.exec(f"ps -o pid= --ppid {pid}").split()) == 3
    conf = worker_conf(own_app, app=APP)
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 7200
    assert conf["result_backend_always_retry"] is True
    assert conf.get("task_time_limit") is None  # the app sets none, nor does the deploy (unset: omitted)


#: A pinned package with no wheel for a host Python (major, minor), whose build from source
#: fails on the host whatever its network, and which nothing else of the application pins:
#: lxml 4.9.3 publishes CPython wheels up to 3.12 only, and its build needs libxml2's and
#: libxslt's headers, which the application's system packages do not include.
WITHOUT_WHEEL = {(3, 13): "lxml==4.9.3"}


def test_a_package_without_a_wheel_for_the_hosts_python_fails_the_deploy_naming_it(own_app: Cluster):
    """The deploy fails at the install, saying which package and which Python, how to fix it
    and the build's last words, in a few lines instead of pip's output (which stays in a log on
    the host); the running application keeps working."""
    host = own_app.one("web")
    version = host.exec(f"/opt/{APP}/current/venv/bin/python -c 'import sys; print(*sys.version_info[:2])'")
    major, minor = map(int, version.split())
    if (major, minor) not in WITHOUT_WHEEL:
        pytest.skip(f"no example of a package without a wheel for Python {major}.{minor} (WITHOUT_WHEEL)")
    run = own_app.deploy("--data", f"app_python_packages={WITHOUT_WHEEL[major, minor]}")
    assert run.returncode != 0, "the deploy passed with a package that cannot be installed"
    failure = run.output.split("Install the Python packages of the application into its venv")[-1]
    said = [line for line in failure.splitlines() if f"[{host.address}]" in line]
    assert f"pip found no wheel of lxml for Python {major}.{minor} (python3)" in failure, failure[-3000:]
    assert "set app_python" in failure and "app_system_packages" in failure
    assert "the build said: Error: Please make sure the libxml2 and libxslt development packages" in failure
    log = re.search(rf"(/opt/{APP}/venvs/[0-9a-f]{{12}}/pip-install.log) on this host", failure)
    assert log, failure[-3000:]
    assert len(said) <= 10, said  # a few lines, not pip's
    assert "subprocess-exited-with-error" in host.exec(f"cat {log[1]}")
    assert "Switch the application" not in run.output  # the failed build was beside the running release
    check_task_end_to_end(own_app, reference=False)


def test_a_venv_holds_only_what_its_release_installs(own_app: Cluster):
    """Each package set gets a venv of its own, built empty: a package an earlier deploy
    installed is not in the next release's venv. (pip never removes a package: installed into
    the running venv, Flask 2.0.3 of one deploy stayed beside the Werkzeug 1.0.1 of the next,
    which it refuses, and the application broke.)"""
    host, base = own_app.one("web"), SETTINGS["app_python_packages"]
    venv = f"/opt/{APP}/current/venv"
    try:
        first = own_app.deploy("--data", f"app_python_packages={base},flask==2.0.3")
        assert first.returncode == 0, first.output[-4000:]
        assert host.status(f"{venv}/bin/pip show --quiet flask") == 0
        run = own_app.deploy("--data", f"app_python_packages={base},werkzeug==1.0.1")
        assert run.returncode == 0, run.output[-4000:]
        assert host.status(f"{venv}/bin/pip show --quiet flask") != 0, "the previous release's Flask is in the venv"
        assert host.exec(f"{venv}/bin/pip show werkzeug").splitlines()[1] == "Version: 1.0.1"
        assert host.status(f"{venv}/bin/pip check") == 0
    finally:
        restore = own_app.deploy()
    assert restore.returncode == 0, restore.output[-6000:]
    check_task_end_to_end(own_app, reference=False)


#: Releases that do not work, each a tag of the app's repository: the files changed from v1.
BROKEN = {
    "v2-web-import-error": {
        "src/acme_jobs/web/service.py": FILES["src/acme_jobs/web/service.py"].replace(
            "import psycopg2\n", "import psycopg2\nimport acme_missing_module\n"
        )
    },
    "v2-worker-exits-at-start": {
        "src/acme_jobs/work.py": FILES["src/acme_jobs/work.py"]
        + """

import os
import sys

from celery.signals import worker_init


@worker_init.connect
def require_token(**_):
    if "ACME_WORKER_TOKEN" not in os.environ:
        sys.exit("acme worker: ACME_WORKER_TOKEN is not set")
"""
    },
}
#: The health gate's timeout in these tests (the default, 60 s, only makes them slower).
GATE_TIMEOUT_SECONDS = 20


def tag_broken_release(root: Path, tag: str) -> None:
    """Commit ``BROKEN[tag]`` over v1 on a branch of its own and tag it; the checkout is v1 again."""
    git("checkout", "--quiet", "-b", tag, "v1", cwd=root)
    for name, text in BROKEN[tag].items():
        (root / name).write_text(text)
    git("commit", "--quiet", "-am", tag, cwd=root)
    git("tag", tag, cwd=root)
    git("checkout", "--quiet", "v1", cwd=root)


@dataclass(frozen=True)
class Failure:
    """A release that does not work: its tag and settings, the unit that fails and the cause the
    deploy names, and what catches it: the load check before the switch ("load"), or the health
    gate after it, which switches back when the release is new ("gate, switched back") and
    otherwise has nothing to switch back to ("gate")."""

    tag: str
    data: list[str]
    unit: str
    cause: str
    caught_by: str


FAILURES = [
    Failure(
        "v2-web-import-error", [], "gunicorn", "ModuleNotFoundError: No module named 'acme_missing_module'", "load"
    ),
    Failure(
        "v2-worker-exits-at-start", [], "worker", "acme worker: ACME_WORKER_TOKEN is not set", "gate, switched back"
    ),
    # The release that runs, said to export metrics it does not: nothing to switch back to.
    Failure(
        "v1", ["app_metrics_path=/metrics"], "gunicorn", "/metrics (app_metrics_path) answered 404 Not Found", "gate"
    ),
]


def test_a_release_that_does_not_work_fails_the_deploy_and_the_running_one_keeps_serving(own_app: Cluster):
    """A release whose ASGI module cannot be imported fails its load check before the switch;
    one whose worker exits at start passes it, fails the health gate after the switch, and the
    host is switched back to the release it ran; one whose metrics path (scraped by the
    monitoring host) answers 404 fails the gate. Each deploy fails naming the host, the unit and
    the cause, while a request loop and a task stream run throughout: no request fails, and
    every task accepted meanwhile succeeds."""
    host = own_app.one("web")
    try:
        with RequestLoop([host]) as loop, SubmissionLoop(own_app) as stream:
            for failure in FAILURES:
                if failure.tag in BROKEN:
                    tag_broken_release(own_app.root, failure.tag)
                settings = [
                    f"app_git_ref={failure.tag}",
                    f"app_health_timeout_seconds={GATE_TIMEOUT_SECONDS}",
                    *failure.data,
                ]
                run = own_app.deploy(*[part for setting in settings for part in ("--data", setting)])
                assert run.returncode != 0, f"{failure}: the deploy passed with an application that does not work"
                unit = f"{APP}-{failure.unit}.service"
                if failure.caught_by == "load":
                    said = run.output.rpartition(f"[{host.address}] {host.address}: the release ")[2]
                    assert "does not load on this host" in said, run.output[-4000:]
                    assert f"which {unit} runs, fails to load" in said, said[-4000:]
                else:
                    said = run.gate_failure
                    assert said and f"[{host.address}] {host.address}: the application does not work" in run.output
                    assert f"The exceptions in {unit}'s journal" in said, said[-4000:]
                switched_back = "which this host ran before: it works (its health gate passed)" in said
                assert switched_back == (failure.caught_by == "gate, switched back"), said[-4000:]
                assert failure.cause in said, said[-4000:]
            time.sleep(2)
    finally:
        restore = own_app.deploy()
    assert restore.returncode == 0, restore.output[-6000:]
    assert loop.failures == [], (
        f"{len(loop.failures)} failed requests of {loop.ok + len(loop.failures)}: {loop.failures[:3]}"
    )
    assert stream.refused == 0 and len(stream.answers) > 20, (stream.refused, len(stream.answers))
    lost = lost_tasks(own_app, stream.answers)
    assert lost == [], f"{len(lost)} of {len(stream.answers)} tasks did not succeed: {lost[:3]}"
    check_task_end_to_end(own_app, reference=False)


def test_same_app_from_an_sdist_replaces_the_git_deploy(own_app: Cluster, tmp_path: Path):
    distribution = sdist(own_app.root, tmp_path)
    (tmp_path / "constraints.txt").write_text(constraints())  # beside the sdist, on this machine
    arguments = [
        "--data",
        f"app_source={distribution}",
        "--data",
        "app_workdir=",
        "--data",
        f"app_constraints={tmp_path / 'constraints.txt'}",
        # The sdist holds no templates/, so the index answers 500 (the health gate said so):
        # the API's schema is this deploy's health path.
        "--data",
        "app_health_path=/openapi.json",
    ]
    run = own_app.deploy(*arguments)
    assert run.returncode == 0, run.stderr[-6000:]
    host = own_app.one("web")
    assert host.status(f"test -e /opt/{APP}/current/src") != 0
    assert host.exec(f"ls /opt/{APP}/current/dist").split() == [distribution.name]
    check_task_end_to_end(own_app, reference=False)
    again = own_app.deploy(*arguments)
    assert again.returncode == 0 and again.changed == [], again.changed
