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
import secrets as random_secrets
import tarfile
import time
from pathlib import Path

import pytest
import requests

from bench import PROJECT_DIR, Cluster, git
from clients import (
    check_task_end_to_end,
    firing_alerts,
    query,
    scraped_everywhere,
    targets,
    wait_until,
    web_url,
    worker_conf,
)

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
    assert body["cwd"] == f"/opt/{APP}/src/deploy"
    assert body["key_sha256"] == hashlib.sha256(SIGNING_KEY.encode()).hexdigest()
    host = own_app.one("web")
    assert host.exec(f"stat -c '%a %U:%G' /etc/{APP}/app.env").strip() == f"640 root:{APP}"


def test_dependency_was_compiled_against_the_system_libpq(own_app: Cluster):
    host = own_app.one("web")
    venv = f"/opt/{APP}/venv"
    assert host.status(f"{venv}/bin/pip show --quiet psycopg2") == 0
    assert host.status(f"{venv}/bin/pip show --quiet psycopg2-binary") != 0  # no prebuilt wheel
    module = host.exec(f"{venv}/bin/python -c 'import psycopg2._psycopg as m; print(m.__file__)'").strip()
    libpq = [line for line in host.exec(f"ldd {module}").splitlines() if "libpq" in line]
    assert libpq and all("=> /lib/" in line or "=> /usr/lib/" in line for line in libpq), libpq  # Debian's libpq5


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
    version = host.exec(f"/opt/{APP}/venv/bin/python -c 'import sys; print(*sys.version_info[:2])'")
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
    assert f"/opt/{APP}/venv/pip-install.log on this host" in failure
    assert len(said) <= 10, said  # a few lines, not pip's
    assert "subprocess-exited-with-error" in host.exec(f"cat /opt/{APP}/venv/pip-install.log")
    check_task_end_to_end(own_app, reference=False)


def test_packages_an_earlier_deploy_left_that_a_new_one_breaks_fail_the_deploy(own_app: Cluster):
    """pip's resolver looks only at what it installs: with Flask installed by one deploy, the
    next one pins a Werkzeug that Flask refuses, and pip exits 0. ``pip check`` after the
    install fails the deploy, naming the unmet requirement and the fix, before any unit
    restarts on the broken venv."""
    host, base = own_app.one("web"), SETTINGS["app_python_packages"]
    venv = f"/opt/{APP}/venv"
    try:
        first = own_app.deploy("--data", f"app_python_packages={base},flask==2.0.3")
        assert first.returncode == 0, first.output[-4000:]
        run = own_app.deploy("--data", f"app_python_packages={base},werkzeug==1.0.1")
        assert run.returncode != 0, "the deploy passed with a venv whose Flask's requirements are not met"
        failure = run.output.split("Install the Python packages of the application into its venv")[-1]
        assert "but pip check found some whose requirements are not met" in failure, failure[-3000:]
        assert "flask 2.0.3 has requirement Werkzeug>=2.0, but you have werkzeug 1.0.1." in failure, failure[-3000:]
        assert f"remove {venv} on this host and deploy again" in failure
        assert "Restart acme-" not in failure.split("pip's whole output")[-1]
    finally:
        host.exec(f"{venv}/bin/pip uninstall --yes --quiet flask werkzeug itsdangerous", check=False)
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


#: Each release that does not work (a tag, with settings), the unit that fails and the cause
#: the gate names: two broken tags, and v1 said to export metrics it does not.
FAILURES = [
    ("v2-web-import-error", [], "gunicorn", "ModuleNotFoundError: No module named 'acme_missing_module'"),
    ("v2-worker-exits-at-start", [], "worker", "acme worker: ACME_WORKER_TOKEN is not set"),
    ("v1", ["app_metrics_path=/metrics"], "gunicorn", "/metrics (app_metrics_path) answered 404 Not Found"),
]


def test_a_release_that_does_not_work_fails_the_deploy_naming_the_host_unit_and_cause(own_app: Cluster):
    """The health gate: a release whose ASGI module cannot be imported, one whose worker exits
    at start, and one whose metrics path (scraped by the monitoring host) answers 404 each
    deploy without an error of their own; the deploy fails all the same, naming the host, what
    failed, the unit and the cause. The next deploy of a good release succeeds and tasks travel
    again."""
    host = own_app.one("web")
    try:
        for tag, data, unit, cause in FAILURES:
            if tag in BROKEN:
                tag_broken_release(own_app.root, tag)
            settings = [f"app_git_ref={tag}", f"app_health_timeout_seconds={GATE_TIMEOUT_SECONDS}", *data]
            run = own_app.deploy(*[part for setting in settings for part in ("--data", setting)])
            assert run.returncode != 0, f"{tag} {data}: the deploy passed with an application that does not work"
            failure = run.gate_failure
            said = f"[{host.address}] {host.address}: the application does not work after this deploy"
            assert failure and said in run.output, run.output[-4000:]
            assert f"The exceptions in {APP}-{unit}.service's journal" in failure, failure[-4000:]
            assert cause in failure, failure[-4000:]
    finally:
        restore = own_app.deploy()
    assert restore.returncode == 0, restore.output[-6000:]
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
    assert host.status(f"test -e /opt/{APP}/src") != 0
    assert host.exec(f"ls /opt/{APP}/dist").split() == [distribution.name]
    check_task_end_to_end(own_app, reference=False)
    again = own_app.deploy(*arguments)
    assert again.returncode == 0 and again.changed == [], again.changed
