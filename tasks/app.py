"""
The application tier: the code in a venv, run as a dedicated system user by systemd units we
own: Gunicorn with Uvicorn workers (socket-activated) on web hosts, the Celery worker on worker
hosts, Celery beat on the one beat host, and Flower (Celery's monitor, whose /metrics Prometheus
scrapes) beside beat when the inventory has a monitoring host.

A re-deploy restarts or reloads only what a change concerns:

| what changed                            | web (Gunicorn) | worker  | beat    |
| --------------------------------------- | -------------- | ------- | ------- |
| application code                        | reload (HUP)   | restart | restart |
| Gunicorn's config file                  | reload (HUP)   | -       | -       |
| requirements, environment file          | restart        | restart | restart |
| the deploy's Gunicorn worker class      | restart        | -       | -       |
| the unit itself                         | restart        | restart | restart |

Flower restarts like beat, and when its own pinned requirements changed; nothing restarts when
nothing changed. A host that no longer has a role has that role's units stopped, disabled and
removed (so a moved beat never runs twice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents
from pyinfra.operations import files, pip, server, systemd
from pyinfra.operations.util import any_changed

import settings
from tasks import FILES_DIR, PROJECT_DIR, address, group_hosts, render, server_of, shipped_file

PACKAGES = ["python3-venv"]
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

    code = _code(config)
    requirements = _venv(config)
    flower = None
    if _runs("flower"):
        flower = venv_with_requirements(config, f"{home}/flower", FILES_DIR / "monitoring" / "flower-requirements.txt", "Flower")
    environment = files.put(
        name="Write the environment file (broker and result URLs, with credentials)",
        src=render(
            "app/app.env.j2",
            app=app,
            broker_url=broker_url(config, secrets),
            result_backend=result_backend_url(config, secrets),
            task_time_limit=config.celery_longest_task_seconds,
            visibility_timeout=config.redis_visibility_timeout_seconds,
            heartbeat_seconds=config.beat_heartbeat_seconds,
        ),
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
    gunicorn_worker = files.put(
        name="Install the deploy's Gunicorn worker class (Uvicorn, drained at shutdown)",
        src=shipped_file("gunicorn/stack_gunicorn.py"),
        dest=f"{home}/lib/stack_gunicorn.py",
        user="root",
        group=app,
        mode="0644",
    )
    _units(config, code, requirements, environment, gunicorn_config, gunicorn_worker, flower)


def _code(config: settings.Settings) -> OperationMeta:
    """Sync the application's source to <home>/src, owned by root and readable by the app."""
    source = (PROJECT_DIR / Path(config.app_source).expanduser()).resolve()
    return files.sync(
        name=f"Sync the application code from {config.app_source}",
        src=str(source),
        dest=f"{config.app_home}/src",
        user="root",
        group=config.app_name,
        mode="0644",
        dir_mode="0755",
        delete=True,
        exclude=["*.pyc", "*.pyo"],
        exclude_dir=["__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache"],
    )


def _venv(config: settings.Settings) -> OperationMeta | None:
    """The application's venv with its pinned requirements."""
    requirements = (PROJECT_DIR / Path(config.app_source).expanduser() / config.app_requirements).resolve()
    return venv_with_requirements(config, f"{config.app_home}/venv", requirements, "the application")


def venv_with_requirements(config: settings.Settings, venv: str, requirements_file: Path, what: str) -> OperationMeta | None:
    """Create ``venv`` and install ``requirements_file`` (pinned) into it, only when they (or
    pip's own configuration) changed since the last successful install: pip's own
    `pip install -r` runs on every deploy, so a stamp of what was installed decides, written
    after success only. The install operation, or None when there is nothing to install."""
    pip_conf = render("app/pip.conf.j2", index_url=config.pip_index_url)
    pip.venv(name=f"Create the venv {venv} of {what}", path=venv, python="python3")
    files.put(name=f"Configure the pip of {what} (CA bundle, index)", src=pip_conf, dest=f"{venv}/pip.conf", mode="0644")
    files.put(
        name=f"Upload the pinned requirements of {what}",
        src=str(requirements_file),
        dest=f"{venv}/requirements.txt",
        mode="0644",
    )
    stamp_file = f"{venv}/.installed-requirements.sha256"
    wanted = hashlib.sha256(requirements_file.read_bytes() + pip_conf.getvalue().encode()).hexdigest()
    if (host.get_fact(FileContents, path=stamp_file) or [""])[0] == wanted:
        return None
    return server.shell(
        name=f"Install the pinned requirements of {what} into its venv",
        commands=[
            f"{venv}/bin/pip install --quiet --requirement {venv}/requirements.txt",
            f"echo {wanted} > {stamp_file}",
        ],
    )


def _units(config, code, requirements, environment, gunicorn_config, gunicorn_worker, flower) -> None:
    """Write the units of this host's roles, remove those of roles it no longer has, then
    start, restart or reload each as its table in the module docstring says."""
    app, home = config.app_name, config.app_home
    context = dict(
        app=app,
        home=home,
        address=address(),
        port=config.web_port,
        asgi_app=config.asgi_app,
        celery_app=config.celery_app,
        concurrency=config.celery_concurrency,
        queues=config.celery_queues,
        loglevel=config.celery_loglevel,
        stop_timeout=config.worker_stop_timeout,
        flower_port=config.flower_port,
    )
    everyone = [op for op in (code, requirements, environment) if op is not None]
    restart_all = [op for op in (requirements, environment) if op is not None]

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
            systemd.service(name=f"Keep {unit} enabled and running", service=unit, running=True, enabled=True)
            systemd.service(
                name=f"Restart {unit} for the changed code, requirements, environment or unit",
                service=unit,
                restarted=True,
                _if=any_changed(*everyone, written[role], *([flower] if role == "flower" and flower else [])),
            )

    if "web" in host.groups:
        socket, service = units(app)["web-socket"][0], units(app)["web"][0]
        systemd.service(name=f"Keep {socket} enabled and listening", service=socket, running=True, enabled=True)
        systemd.service(
            name=f"Restart {socket} for its changed unit", service=socket, restarted=True, _if=written["web-socket"].did_change
        )
        systemd.service(name=f"Keep {service} enabled and running", service=service, running=True, enabled=True)
        restart = [*restart_all, written["web"], written["web-socket"], gunicorn_worker]
        systemd.service(
            name=f"Restart {service} for changed requirements, environment, units or worker class",
            service=service,
            restarted=True,
            _if=any_changed(*restart),
        )
        systemd.service(
            name=f"Reload {service} gracefully for the changed code or Gunicorn configuration",
            service=service,
            reloaded=True,
            _if=[any_changed(code, gunicorn_config), _unchanged(*restart)],
        )
