"""
The application tier: the code in a venv, run as a dedicated system user by systemd units we
own: Gunicorn with Uvicorn workers (socket-activated) on web hosts, the Celery worker on worker
hosts, Celery beat on the one beat host, and Flower (Celery's monitor, whose /metrics Prometheus
scrapes) beside beat when the inventory has a monitoring host.

The code comes from the app_source setting (tasks/source.py): a source tree synced to
<home>/src, or a wheel/sdist installed into the venv; the services run in app_workdir. The
worker, beat and Gunicorn's workers load the project's Celery app through the deploy's
stack_celery.py, which applies the no-task-lost settings over the project's own.

A re-deploy restarts or reloads only what a change concerns:

| what changed                                   | web (Gunicorn) | worker  | beat    |
| ---------------------------------------------- | -------------- | ------- | ------- |
| application code (a synced tree)               | reload (HUP)   | restart | restart |
| Gunicorn's config file                         | reload (HUP)   | -       | -       |
| installed packages, environment file           | restart        | restart | restart |
| the deploy's modules (worker class, Celery's)  | restart        | restart | restart |
| the unit itself                                | restart        | restart | restart |

A project installed as a package (pyproject.toml, wheel, sdist) is reinstalled when its code
changes, which restarts. Flower restarts when its own venv, environment file or unit changed.
Nothing restarts when nothing changed. A host that no longer has a role has that role's units
stopped, disabled and removed (so a moved beat never runs twice).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents, FindFiles
from pyinfra.operations import files, pip, server, systemd
from pyinfra.operations.util import any_changed

import settings
from tasks import FILES_DIR, address, group_hosts, render, server_of, shipped_file
from tasks import source as app_source
from tasks.source import Source

PACKAGES = ["python3-venv"]
#: The deploy's own modules, installed into <home>/lib: file under files/ → what it is.
LIBRARIES = {
    "gunicorn/stack_gunicorn.py": "Gunicorn worker class (Uvicorn, drained at shutdown)",
    "celery/stack_celery.py": "Celery loader (the app's Celery app with the no-task-lost settings)",
}
UNIT_DIR = "/etc/systemd/system"


def _server_url(scheme: str, group: str, password: str, user_port_path) -> str:
    """URL of the one server of ``group``: ``user_port_path`` picks the user, port and path
    (vhost, database) from that server's own settings."""
    server = server_of(group)
    user, port, path = user_port_path(settings.for_host(server))
    return f"{scheme}://{user}:{quote(password, safe='')}@{settings.private_address(server)}:{port}/{path}"


def broker_url(config: settings.Settings, secrets: settings.Secrets) -> str:
    """URL of the chosen broker, with the application's credentials."""
    if config.celery_broker == "redis":
        return _server_url("redis", "redis", secrets.redis_password, lambda s: ("", s.redis_port, s.redis_broker_db))
    return _server_url(
        "amqp", "rabbitmq", secrets.rabbitmq_password, lambda s: (s.rabbitmq_user, s.rabbitmq_port, s.rabbitmq_vhost)
    )


def result_backend_url(config: settings.Settings, secrets: settings.Secrets) -> str:
    """URL of the chosen result store: Celery's database backend on PostgreSQL, or Redis."""
    if config.celery_result_backend == "redis":
        return _server_url("redis", "redis", secrets.redis_password, lambda s: ("", s.redis_port, s.redis_result_db))
    return _server_url(
        "db+postgresql+psycopg2",
        "postgres",
        secrets.postgresql_password,
        lambda s: (s.postgresql_user, s.postgresql_port, s.postgresql_database),
    )


def units(app: str) -> dict[str, tuple[str, str]]:
    """Role → (unit file, template) of every unit the application tier owns."""
    return {
        "web-socket": (f"{app}-gunicorn.socket", "app/gunicorn.socket.j2"),
        "web": (f"{app}-gunicorn.service", "app/gunicorn.service.j2"),
        "workers": (f"{app}-worker.service", "app/worker.service.j2"),
        "beat": (f"{app}-beat.service", "app/beat.service.j2"),
        "flower": (f"{app}-flower.service", "app/flower.service.j2"),
    }


def _runs(role: str) -> bool:
    """Whether this host runs ``role``'s unit: Flower, Celery's monitor whose /metrics
    Prometheus scrapes, runs beside beat (one host) when there is a monitoring host."""
    if role == "flower":
        return "beat" in host.groups and bool(group_hosts("monitoring"))
    return ("web" if role == "web-socket" else role) in host.groups


def _unchanged(*operations: OperationMeta):
    return lambda: not any(operation.did_change() for operation in operations)


@deploy("Application")
def application(secrets: settings.Secrets) -> None:
    config = settings.for_host(host)
    app, home = config.app_name, config.app_home

    server.group(name=f"Create the system group {app}", group=app, system=True)
    server.user(
        name=f"Create the system user {app}, without a login shell",
        user=app,
        group=app,
        system=True,
        shell="/usr/sbin/nologin",
        home=home,
        create_home=False,
        ensure_home=False,  # <home> is root's (below), so the service cannot rewrite its own code
    )
    files.directory(name=f"Create {home}", path=home, user="root", group=app, mode="0755")
    files.directory(name=f"Create /etc/{app}", path=f"/etc/{app}", user="root", group=app, mode="0750")

    source = app_source.resolve(config)
    code = _code(config, source)
    requirements = _venv(config, source)
    flower = flower_environment = None
    if _runs("flower"):
        flower = _flower_venv(config)
        flower_environment = files.put(
            name="Write Flower's environment file (the broker URL, with credentials)",
            src=render("app/app.env.j2", variables={"CELERY_BROKER_URL": broker_url(config, secrets)}),
            dest=f"/etc/{app}/flower.env",
            user="root",
            group=app,
            mode="0640",
        )
    environment = files.put(
        name="Write the environment file (broker and result URLs, with credentials, and the app's own)",
        src=render("app/app.env.j2", variables=environment_variables(config, secrets)),
        dest=f"/etc/{app}/app.env",
        user="root",
        group=app,
        mode="0640",
    )
    gunicorn_config = files.put(
        name="Write Gunicorn's configuration",
        src=render("app/gunicorn.conf.py.j2", app=app, workers=config.gunicorn_workers, lib=f"{home}/lib"),
        dest=f"/etc/{app}/gunicorn.conf.py",
        user="root",
        group=app,
        mode="0640",
    )
    libraries = [
        files.put(
            name=f"Install the deploy's {what}",
            src=shipped_file(module),
            dest=f"{home}/lib/{Path(module).name}",
            user="root",
            group=app,
            mode="0644",
        )
        for module, what in LIBRARIES.items()
    ]
    changes = Changes(
        code=code,
        requirements=requirements,
        environment=environment,
        gunicorn_config=gunicorn_config,
        libraries=libraries,
        flower=[op for op in (flower, flower_environment) if op is not None],
    )
    _units(config, source, changes)


def environment_variables(config: settings.Settings, secrets: settings.Secrets) -> dict[str, str]:
    """Every variable of the application's environment file: the deploy's own (STACK_*, read
    by stack_celery.py), the broker and result URLs under each name the project reads them by,
    the project's own variables and its secrets."""
    variables = {
        "STACK_CELERY_APP": config.celery_app,
        "STACK_CELERY_BROKER": config.celery_broker,
        "STACK_CELERY_DURABILITY": "1" if config.celery_enforce_durability else "0",
        "STACK_TASK_TIME_LIMIT": str(config.celery_longest_task_seconds),
        "STACK_VISIBILITY_TIMEOUT": str(config.redis_visibility_timeout_seconds),
        "STACK_HEARTBEAT_SECONDS": str(config.beat_heartbeat_seconds),
    }
    variables.update(dict.fromkeys(config.app_broker_url_variables, broker_url(config, secrets)))
    variables.update(dict.fromkeys(config.app_result_backend_variables, result_backend_url(config, secrets)))
    variables.update(config.app_environment)
    variables.update(secrets.app_variables)
    return variables


def _code(config: settings.Settings, source: Source) -> OperationMeta:
    """Put the application's code on the host, owned by root and readable by the app: a source
    tree synced to <home>/src, or a wheel/sdist in <home>/dist (the other one removed)."""
    home, app = config.app_home, config.app_name
    if source.is_tree:
        files.directory(name="Remove the wheel/sdist of an earlier deploy", path=f"{home}/dist", present=False)
        exclude, exclude_dir = app_source.exclusions(config)
        return files.sync(
            name=f"Sync the application code from {source.describe()}",
            src=str(source.path),
            dest=f"{home}/src",
            user="root",
            group=app,
            mode="0644",
            dir_mode="0755",
            delete=True,
            exclude=exclude,
            exclude_dir=exclude_dir,
        )
    files.directory(name="Remove the source tree of an earlier deploy", path=f"{home}/src", present=False)
    files.directory(name=f"Create {home}/dist", path=f"{home}/dist", user="root", group=app, mode="0755")
    for stale in host.get_fact(FindFiles, path=f"{home}/dist", quote_path=True, maxdepth=1) or []:
        if Path(stale).name != source.path.name:
            files.file(name=f"Remove the earlier distribution {stale}", path=stale, present=False)
    return files.put(
        name=f"Upload the application's distribution {source.path.name}",
        src=str(source.path),
        dest=f"{home}/dist/{source.path.name}",
        user="root",
        group=app,
        mode="0644",
    )


def _venv(config: settings.Settings, source: Source) -> OperationMeta | None:
    """The application's venv (made with app_python): its requirements file, or the project
    itself (pyproject.toml, or the wheel/sdist) with its dependencies, then app_python_packages,
    all under app_constraints. Reinstalled only when what it installs changed."""
    home, venv = config.app_home, f"{config.app_home}/venv"
    pip_path = f"{venv}/bin/pip"
    options, fingerprint, uploads = [], [config.app_python, *config.app_python_packages], {}
    if config.app_constraints:
        if source.is_tree:  # in the synced tree
            local, remote = source.path / config.app_constraints, f"{home}/src/{config.app_constraints}"
        else:  # on this machine, uploaded into the venv
            local, remote = settings.PROJECT_DIR / Path(config.app_constraints).expanduser(), f"{venv}/constraints.txt"
            uploads[local] = remote
        options += ["--constraint", remote]
        fingerprint.append(local.read_text())
    extras = " ".join(shlex.quote(requirement) for requirement in config.app_python_packages)
    commands = []
    if source.is_tree and config.app_requirements and not config.app_requirements.endswith("pyproject.toml"):
        commands.append(f"{pip_path} install --quiet {' '.join(options)} --requirement {home}/src/{config.app_requirements} {extras}")
        fingerprint.append((source.path / config.app_requirements).read_text())
    elif source.is_tree and config.app_requirements:
        project = str(Path(f"{home}/src/{config.app_requirements}").parent)
        commands += _install_project(pip_path, "$build", options, extras, copy_from=project)
        fingerprint.append(app_source.tree_digest(source.path, config))
    elif not source.is_tree:
        commands += _install_project(pip_path, f"{home}/dist/{source.path.name}", options, extras)
        fingerprint.append(hashlib.sha256(source.path.read_bytes()).hexdigest())
    elif extras:
        commands.append(f"{pip_path} install --quiet {' '.join(options)} {extras}")
    return python_venv(config, venv, "the application", config.app_python, commands, "\n".join(fingerprint), uploads)


def _install_project(pip_path: str, target: str, options: list[str], extras: str, copy_from: str = "") -> list[str]:
    """Install a project with its dependencies, then the project itself again whatever its
    version says (new code often keeps the version). A source tree is built from a copy, since
    pip builds in place and would leave files in the synced tree."""
    install = [
        f"{pip_path} install --quiet {' '.join(options)} {target} {extras}",
        f"{pip_path} install --quiet --no-deps --force-reinstall {target}",
    ]
    if not copy_from:
        return install
    return [
        f'build=$(mktemp -d) && cp -a {copy_from}/. "$build" && '
        + " && ".join(install)
        + '; status=$?; rm -rf "$build"; exit $status'
    ]


def _flower_venv(config: settings.Settings) -> OperationMeta | None:
    """Flower's own venv, with its pinned requirements."""
    requirements = FILES_DIR / "monitoring" / "flower-requirements.txt"
    venv = f"{config.app_home}/flower"
    return python_venv(
        config,
        venv,
        "Flower",
        "python3",
        [f"{venv}/bin/pip install --quiet --requirement {venv}/requirements.txt"],
        requirements.read_text(),
        {requirements: f"{venv}/requirements.txt"},
    )


def python_venv(
    config: settings.Settings,
    venv: str,
    what: str,
    python: str,
    commands: list[str],
    fingerprint: str,
    uploads: dict[Path, str],
) -> OperationMeta | None:
    """Create ``venv`` with ``python``, upload ``uploads`` (local → remote) and run the install
    ``commands`` only when ``fingerprint`` (what they install) or pip's configuration changed
    since the last successful install: `pip install` runs, and reports a change, on every call,
    so a stamp of what was installed decides, written after success only. The install
    operation, or None when there is nothing to install."""
    pip_conf = render("app/pip.conf.j2", index_url=config.pip_index_url)
    pip.venv(name=f"Create the venv {venv} of {what}", path=venv, python=python)
    files.put(name=f"Configure the pip of {what} (CA bundle, index)", src=pip_conf, dest=f"{venv}/pip.conf", mode="0644")
    for local, remote in uploads.items():
        files.put(name=f"Upload {local.name} of {what}", src=str(local), dest=remote, mode="0644")
    stamp_file = f"{venv}/.installed.sha256"
    wanted = hashlib.sha256((fingerprint + pip_conf.getvalue()).encode()).hexdigest()
    if not commands or (host.get_fact(FileContents, path=stamp_file) or [""])[0] == wanted:
        return None
    return server.shell(
        name=f"Install the Python packages of {what} into its venv",
        commands=[*commands, f"echo {wanted} > {stamp_file}"],
    )


@dataclass
class Changes:
    """The operations whose changes restart or reload the application's units."""

    code: OperationMeta
    requirements: OperationMeta | None
    environment: OperationMeta
    gunicorn_config: OperationMeta
    libraries: list[OperationMeta]  # the deploy's own modules in <home>/lib
    flower: list[OperationMeta]


def _units(config: settings.Settings, source: Source, changes: Changes) -> None:
    """Write the units of this host's roles, remove those of roles it no longer has, then
    start, restart or reload each as its table in the module docstring says."""
    app, home = config.app_name, config.app_home
    context = dict(
        app=app,
        home=home,
        workdir=f"{home}/src/{config.app_workdir}".rstrip("/") if source.is_tree else home,
        address=address(),
        port=config.web_port,
        asgi_app=config.asgi_app,
        concurrency=config.celery_concurrency,
        queues=config.celery_queues,
        loglevel=config.celery_loglevel,
        stop_timeout=config.worker_stop_timeout,
        flower_port=config.flower_port,
    )
    installed = [op for op in (changes.requirements, changes.environment) if op is not None]

    written: dict[str, OperationMeta] = {}
    for role, (unit, template) in units(app).items():
        if _runs(role):
            written[role] = files.put(
                name=f"Write the unit {unit}",
                src=render(template, **context),
                dest=f"{UNIT_DIR}/{unit}",
                mode="0644",
            )
        elif host.get_fact(File, path=f"{UNIT_DIR}/{unit}"):
            systemd.service(name=f"Stop {unit}: this host no longer has that role", service=unit, running=False, enabled=False)
            written[role] = files.file(name=f"Remove the unit {unit}", path=f"{UNIT_DIR}/{unit}", present=False)
    if not written:
        return
    systemd.daemon_reload(name="Reload systemd after our units changed", _if=any_changed(*written.values()))

    for role in ("workers", "beat", "flower"):
        if _runs(role):
            unit = units(app)[role][0]
            own = changes.flower if role == "flower" else [changes.code, *installed, *changes.libraries]
            started = _keep_running(unit)
            systemd.service(
                name=f"Restart {unit} for its changed code, packages, environment or unit",
                service=unit,
                restarted=True,
                _if=[any_changed(*own, written[role]), _unchanged(started)],
            )

    if "web" in host.groups:
        socket, service = units(app)["web-socket"][0], units(app)["web"][0]
        listening = _keep_running(socket)
        systemd.service(
            name=f"Restart {socket} for its changed unit",
            service=socket,
            restarted=True,
            _if=[written["web-socket"].did_change, _unchanged(listening)],
        )
        started = _keep_running(service)
        restart = [*installed, written["web"], written["web-socket"], *changes.libraries]
        systemd.service(
            name=f"Restart {service} for changed packages, environment, units or the deploy's modules",
            service=service,
            restarted=True,
            _if=[any_changed(*restart), _unchanged(started)],
        )
        systemd.service(
            name=f"Reload {service} gracefully for the changed code or Gunicorn configuration",
            service=service,
            reloaded=True,
            _if=[any_changed(changes.code, changes.gunicorn_config), _unchanged(*restart, started)],
        )


def _keep_running(unit: str) -> OperationMeta:
    """Keep ``unit`` enabled, and running: the operation that starts it, which changes only
    when it was not running. A unit this run started runs everything this run installed, so
    its restart is skipped (on a fresh host that spares a start followed by a restart)."""
    systemd.service(name=f"Keep {unit} enabled", service=unit, enabled=True)
    return systemd.service(name=f"Keep {unit} running", service=unit, running=True)
