"""
The application tier: the code in a venv, run as a dedicated system user by systemd units we
own: Gunicorn with Uvicorn workers (socket-activated) on web hosts, the Celery worker on worker
hosts, Celery beat on the one beat host, and Flower (Celery's monitor, whose /metrics Prometheus
scrapes) beside beat when the inventory has a monitoring host.

The code comes from the app_source setting (tasks/source.py): a source tree synced to
<home>/src, or a wheel/sdist installed into the venv; the services run in app_workdir. The
worker, beat and Gunicorn's workers load the project's Celery app through the deploy's
stack_celery.py, which applies the no-task-lost settings over the project's own.

A re-deploy restarts or reloads only what a change concerns: ``UNITS`` below is the table
(which changes restart, and which reload, each unit), and the code reads nothing else. A
project installed as a package (pyproject.toml, wheel, sdist) is reinstalled when its code
changes, which restarts. Nothing restarts when nothing changed; a unit this run started is not
restarted right after. A host that no longer has a role has that role's units stopped,
disabled and removed (so a moved beat never runs twice); so are those of an application the
host ran under another ``app_name`` (``Applications``), before the new one starts. The switch,
the units' (re)starts and the health gate (tasks/gate.py), which fails the deploy unless the
application works on the host, run in the host's batch of the rolling switch (tasks/rollout.py).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from io import StringIO
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents
from pyinfra.operations import files, pip, python, server, systemd
from pyinfra.operations.util import any_changed

import settings
from tasks import (
    FILES_DIR,
    app_releases,
    exporters,
    gate,
    peers,
    rabbitmq,
    releases,
    render,
    rollout,
    shipped_file,
    silences,
)
from tasks import source as app_source
from tasks.app_releases import Layout
from tasks.service import ANYONE, Node, Port, Run, Scrape, Service, Wiring
from tasks.source import Source

#: The deploy's own modules, installed into <home>/lib: file under files/ → what it is.
LIBRARIES = {
    "gunicorn/stack_gunicorn.py": "Gunicorn worker class (Uvicorn, drained at shutdown) and dead-worker count",
    "celery/stack_celery.py": "Celery loader (the app's Celery app with the no-task-lost settings)",
    "celery/stack_dead_letters.py": "dead-letters tool (lists and replays poison tasks)",
    "celery/stack_handover.py": "handover (moves the tasks left in a broker switched away from)",
}
#: The tools installed into /usr/local/sbin/<app>-<tool>: template under templates/app → what it does.
TOOLS = {
    "dead-letters": "lists and replays the tasks RabbitMQ dead-lettered",
    "handover": "moves the tasks left in a broker switched away from into the application's",
}
UNIT_DIR = "/etc/systemd/system"


#: What a change is called in the names of the operations it restarts or reloads.
CHANGES = {
    "release": "release",
    "gunicorn_config": "Gunicorn configuration",
    "environment": "environment",
    "libraries": "deploy's modules",
    "flower_packages": "Flower packages",
    "flower_environment": "Flower environment",
    "socket": "socket unit",
    "unit": "unit",
}


@dataclass(frozen=True)
class Unit:
    """A unit of the application tier: the role whose hosts run it, its name after
    ``<app>-``, its template, and the changes (keys of ``CHANGES``) that restart it and those
    that only reload it (Gunicorn's HUP: new workers, no dropped connection)."""

    role: str
    suffix: str
    template: str
    restart_on: tuple[str, ...]
    reload_on: tuple[str, ...] = ()

    def name(self, app: str) -> str:
        return f"{app}-{self.suffix}"


#: Every unit we own, in the order they are started, and what restarts or reloads each.
UNITS = (
    Unit("web", "gunicorn.socket", "app/gunicorn.socket.j2", restart_on=("unit",)),
    Unit(
        "web",
        "gunicorn.service",
        "app/gunicorn.service.j2",
        # A release switch restarts it (a reload would keep the master's venv and directory).
        restart_on=("release", "environment", "libraries", "socket", "unit"),
        reload_on=("gunicorn_config",),
    ),
    Unit("workers", "worker.service", "app/worker.service.j2", ("release", "environment", "libraries", "unit")),
    Unit("beat", "beat.service", "app/beat.service.j2", ("release", "environment", "libraries", "unit")),
    Unit("flower", "flower.service", "app/flower.service.j2", ("flower_packages", "flower_environment", "unit")),
)


#: The worker's Celery node name in its unit (``%H``: the host name, as systemd and stack_check expand it).
WORKER_NODE = "worker@%H"


def _unit(suffix: str) -> Unit:
    return next(unit for unit in UNITS if unit.suffix == suffix)


def runs(node: Node, role: str) -> bool:
    """Whether ``node`` runs ``role``'s units: Flower, Celery's monitor whose /metrics
    Prometheus scrapes, runs beside beat (one host) when there is a monitoring host."""
    if role == "flower":
        return node.has("beat") and node.monitored
    return node.has(role)


def _server_url(wiring: Wiring, scheme: str, group: str, password: str, user_port_path) -> str:
    """URL of the one server of ``group``: ``user_port_path`` picks the user, port and path
    (vhost, database) from that server's own settings."""
    server = wiring.hosts(group)[0]
    user, port, path = user_port_path(server.config)
    return f"{scheme}://{user}:{quote(password, safe='')}@{server.address}:{port}/{path}"


def broker_url(run: Run) -> str:
    """URL of the chosen broker, with the application's credentials."""
    secrets, wiring = run.secrets, run.wiring
    if run.node.config.celery_broker == "redis":
        return _server_url(
            wiring, "redis", "redis", secrets.redis_password, lambda s: ("", s.redis_port, s.redis_broker_db)
        )
    return _server_url(
        wiring,
        "amqp",
        "rabbitmq",
        secrets.rabbitmq_password,
        lambda s: (s.rabbitmq_user, s.rabbitmq_port, s.rabbitmq_vhost),
    )


def result_backend_url(run: Run) -> str:
    """URL of the chosen result store: Celery's database backend on PostgreSQL, or Redis."""
    secrets, wiring = run.secrets, run.wiring
    if run.node.config.celery_result_backend == "redis":
        return _server_url(
            wiring, "redis", "redis", secrets.redis_password, lambda s: ("", s.redis_port, s.redis_result_db)
        )
    return _server_url(
        wiring,
        "db+postgresql+psycopg2",
        "postgres",
        secrets.postgresql_password,
        lambda s: (s.postgresql_user, s.postgresql_port, s.postgresql_database),
    )


class Applications(FactBase):
    """The names of the applications whose units this host has: the units we own, which say
    so on their first line (our unit templates). The record of what the deploy manages: it is
    what systemd runs, also on a host deployed before this fact existed."""

    def command(self) -> str:
        return (
            f"grep -l '^# Managed by the deploy (templates/app/' {UNIT_DIR}/*.service {UNIT_DIR}/*.socket"
            " 2>/dev/null || true"
        )

    @staticmethod
    def default() -> list[str]:
        return []

    def process(self, output: list[str]) -> list[str]:
        names = set()
        for path in output:
            file = path.rsplit("/", 1)[-1]
            names |= {file.removesuffix(f"-{unit.suffix}") for unit in UNITS if file.endswith(f"-{unit.suffix}")}
        return sorted(names)


def _retire(previous: str, app: str) -> None:
    """The application this host ran as ``previous`` is now ``app`` (``app_name`` changed): stop,
    disable and remove the previous one's units before the new ones start (its socket holds the
    web port, its beat would run a second schedule), and its tools. Its code, venv,
    configuration and data stay where they were: the operator decides when they go."""
    logger.warning(
        f"{host.name}: app_name is now {app!r}: the application {previous!r} is retired (its units stopped and "
        f"removed); kept for you to remove: /etc/{previous}, its app_dir (by default /opt/{previous}), "
        f"/var/lib/{previous}-*, the system user {previous} and its journal"
    )
    removed = []
    for unit in reversed(UNITS):  # the reverse of the start order: the socket after its service
        name = unit.name(previous)
        if host.get_fact(File, path=f"{UNIT_DIR}/{name}"):
            systemd.service(
                name=f"Stop {name}: the application is now {app}", service=name, running=False, enabled=False
            )
            removed.append(files.file(name=f"Remove the unit {name}", path=f"{UNIT_DIR}/{name}", present=False))
    systemd.daemon_reload(name=f"Reload systemd after {previous}'s units were removed", _if=any_changed(*removed))
    for tool in [*(f"/usr/local/sbin/{previous}-{tool}" for tool in TOOLS), gate.tool(previous)]:
        files.file(name=f"Remove {tool}", path=tool, present=False)
    files.link(
        name=f"Remove node_exporter's link to {previous}'s count of dead Gunicorn workers",
        path=f"{exporters.TEXTFILE_DIRECTORY}/{previous}-gunicorn.prom",
        present=False,
    )


def _unchanged(*operations: OperationMeta):
    return lambda: not any(operation.did_change() for operation in operations)


@deploy("Application")
def application(run: Run) -> rollout.Switch:
    config = run.node.config
    app, home = config.app_name, config.app_home

    # <home> is root's (below), so the service cannot rewrite its own code.
    _system_user(app, home, "which runs the application")
    for previous in host.get_fact(Applications):
        if previous != app:
            _retire(previous, app)
    _create_builder(app)
    files.directory(name=f"Create {home}", path=home, user="root", group=app, mode="0755")
    files.directory(name=f"Create /etc/{app}", path=f"/etc/{app}", user="root", group=app, mode="0750")

    for path in config.app_writable_paths:
        # Kept when removed from the setting: it holds the application's data.
        files.directory(
            name=f"Create {path}, which the application may write (app_writable_paths)",
            path=path,
            user=app,
            group=app,
            mode="0750",
        )
    source = app_source.resolve(config)
    layout = Layout(home)
    on_host = host.get_fact(app_releases.Releases, home=home)
    build = _build_of(config, source, layout, python_of(run.node))
    target = _target(config, build, on_host, host.name)
    target_python = f"{layout.release(target)}/venv/bin/python"
    requirements = None
    same_packages = None
    if not on_host.built(target):
        lock = partial(_peer_lock, run, build.venv_id)
        requirements = _build(config, source, layout, replace(build, venv=replace(build.venv, lock=lock)))
        if requirements is not None:
            same_packages = _same_packages(run, build, layout, requirements)
    existing = existing_queue_types(run)
    queues = queue_type(run, existing, target_python)
    if requirements is not None:
        # The venv's Celery before this install was unknown or another: check it again after.
        python.call(
            name="Check the application's Celery, as installed, against the queues RabbitMQ holds",
            function=_check_installed_celery,
            config=config,
            existing=existing,
            python=target_python,
            _if=requirements.did_change,
        )
    flower = flower_environment = None
    if runs(run.node, "flower"):
        flower = _flower_venv(config)
        flower_environment = files.put(
            name="Write Flower's environment file (the broker URL, with credentials)",
            src=render("app/app.env.j2", variables={"CELERY_BROKER_URL": broker_url(run)}),
            dest=f"/etc/{app}/flower.env",
            user="root",
            group=app,
            mode="0640",
        )
    beat = run.node.has("beat")
    pending = beat and host.get_fact(File, path=_handover_file(app)) is not None
    switched = beat and _broker_switched(run)
    if switched:
        _keep_the_old_broker(run, pending)
    environment = files.put(
        name="Write the environment file (broker and result URLs, with credentials, and the app's own)",
        src=render("app/app.env.j2", variables=environment_variables(run, queues)),
        dest=f"/etc/{app}/app.env",
        user="root",
        group=app,
        mode="0640",
    )
    gunicorn_config = files.put(
        name="Write Gunicorn's configuration",
        src=render(
            "app/gunicorn.conf.py.j2",
            app=app,
            workers=config.gunicorn_workers,
            lib=f"{home}/lib",
            deaths=gunicorn_deaths_file(app),
        ),
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
    for tool, what in TOOLS.items():
        files.put(
            name=f"Install {app}-{tool}, which {what}",
            src=render(
                f"app/{tool}.sh.j2",
                app=app,
                home=home,
                venv=layout.current_venv,
                workdir=workdir(config, source),
                broker_variable=config.app_broker_url_variables[0],
                queues=",".join(run.wiring.queues()),
            ),
            dest=f"/usr/local/sbin/{app}-{tool}",
            mode="0755",
        )
    subject = gate_subject(run.node)
    gate.install(run.node, subject, workdir(config, source))
    if on_host.current != target:
        gate.loads(run.node, subject, target, target_python, _workdir_of(config, source, layout.release(target)))
    previous = on_host.current if on_host.current != target and on_host.built(on_host.current or "") else None

    @deploy("Application")
    def operations() -> OperationMeta:
        """In this host's batch of the rolling switch (tasks/rollout.py): switch to the
        release, (re)start the units, run the health gate (its error is held: the front takes
        the host back first) and, once it passed, prune."""
        switch = _switch(layout, target, on_host, build, source)
        changes = {
            "release": [switch] if switch is not None else [],
            "gunicorn_config": [gunicorn_config],
            "environment": [environment],
            "libraries": libraries,
            "flower_packages": [flower] if flower is not None else [],
            "flower_environment": [flower_environment] if flower_environment is not None else [],
        }
        written = _unit_files(run.node, source)
        restarts = any_changed(*chain.from_iterable(changes.values()), *written.values())
        quiet = silences.quiets(run, consumers=run.node.has("workers"))
        with silences.silenced(run, "the application's units", when=restarts, made=quiet):
            started = _start(run.node, changes, written)
            files.link(
                name="Let node_exporter read the count of Gunicorn workers that died (a textfile)",
                path=f"{exporters.TEXTFILE_DIRECTORY}/{app}-gunicorn.prom",
                target=gunicorn_deaths_file(app),
                present=run.node.has("web") and run.node.monitored,
            )
            if switched or pending:
                _hand_over(run)
            verdict = gate.passes(
                name="Check that the application works on this host (the health gate)",
                app=app,
                settle=any_changed(*started),
                back=_switch_back(run.node, layout, previous) if switch is not None and previous else None,
                _ignore_errors=True,
            )
        _prune(config, layout, on_host, target, build.venv_id if target == build.release else None, verdict)
        return verdict

    return rollout.Switch(
        operations, replaces=on_host.current is not None and on_host.current != target, check=same_packages
    )


def gate_subject(node: Node) -> gate.Subject:
    """What the health gate checks on ``node``: the units it runs, by their names."""
    app = node.config.app_name
    web, worker, beat = _unit("gunicorn.service"), _unit("worker.service"), _unit("beat.service")
    celery = next((unit.name(app) for unit in (worker, beat, web) if runs(node, unit.role)), None)
    return gate.Subject(
        units=SERVICE.units(node),
        web_unit=web.name(app) if runs(node, web.role) else None,
        worker_unit=worker.name(app) if runs(node, worker.role) else None,
        worker_node=WORKER_NODE,
        celery_unit=celery,
    )


class BrokerLocation(FactBase):
    """Where the broker URL of an environment file points, ``scheme://host:port/path``, the
    credentials cut on the host (pyinfra prints a fact's output at -vvv); None without one."""

    def command(self, path: str, names: list[str]) -> str:
        pattern = shlex.quote(f"^({'|'.join(names)})=")
        strip = shlex.quote(r's#^[^=]*="([^:]*)://([^@/]*@)?([^/"]*)(/[^"]*)?".*#\1://\3\4#')
        return f"grep -Em1 {pattern} {shlex.quote(path)} 2>/dev/null | sed -E {strip}"

    def process(self, output: list[str]) -> str | None:
        return output[0] if output else None


def broker_location(url: str) -> str:
    """``scheme://host:port/path`` of a broker URL, as BrokerLocation reads it on a host."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _broker_switched(run: Run) -> bool:
    """Whether this run moves the application to another broker (another kind, host, port, vhost
    or database; new credentials alone are not a switch). Facts are read while the operations
    are planned, before any runs, so this compares the environment file as it was."""
    config = run.node.config
    previous = host.get_fact(
        BrokerLocation, path=f"/etc/{config.app_name}/app.env", names=config.app_broker_url_variables
    )
    return previous is not None and previous != broker_location(broker_url(run))


def gunicorn_deaths_file(app: str) -> str:
    """The textfile where Gunicorn's master counts its workers that died (stack_gunicorn.py),
    in the StateDirectory of its unit."""
    return f"/var/lib/{app}-gunicorn/workers.prom"


def _handover_file(app: str) -> str:
    """The environment file naming the broker switched away from, while a handover is due."""
    return f"/etc/{app}/handover.env"


def _keep_the_old_broker(run: Run, pending: bool) -> None:
    """On the beat host, before the environment file changes: keep it, naming the broker
    switched away from, as handover.env (0600) until the handover succeeds. A copy on the host
    (no pyinfra operation copies to another name and mode), so the old URL and its password
    never travel; run only on a switch. A handover still pending from an earlier switch (it
    failed) keeps its file and runs first: what that broker held when the application left it
    outweighs what the one in between holds, whose workers consumed it until now (a warning
    says so)."""
    app = run.node.config.app_name
    if pending:
        logger.warning(
            f"{host.name}: a handover from an earlier switch of broker is still pending ({_handover_file(app)}): "
            "it runs now; the tasks left in the broker switched away from now are not moved (docs/deploy.md, "
            "Switching)"
        )
        return
    server.shell(
        name="Keep the environment file naming the broker switched away from, for the handover",
        commands=[f"install -m 0600 -o root -g root /etc/{app}/app.env {_handover_file(app)}"],
    )


def _hand_over(run: Run) -> None:
    """After a switch of broker, or with a handover pending, once every unit of every host runs
    on the new one (this comes after their restarts in the run's order): move what the old
    broker still holds into the new one (files/celery/stack_handover.py). handover.env stays
    until a handover succeeds, so a failed one is tried again by the next run, whose environment
    file names the new broker."""
    server.shell(
        name="Move the tasks left in the broker switched away from into the new one",
        commands=[f"/usr/local/sbin/{run.node.config.app_name}-handover"],
    )


def environment_variables(run: Run, queues: str = "classic") -> dict[str, str]:
    """Every variable of the application's environment file: the deploy's own (STACK_*, read
    by stack_celery.py; ``queues`` is the type of the RabbitMQ queues, from ``queue_type``),
    the broker and result URLs under each name the project reads them by, the project's own
    variables and its secrets."""
    config, secrets = run.node.config, run.secrets
    variables = {
        "STACK_CELERY_APP": config.celery_app,
        "STACK_CELERY_BROKER": config.celery_broker,
        "STACK_CELERY_DURABILITY": "1" if config.celery_enforce_durability else "0",
        "STACK_VISIBILITY_TIMEOUT": str(config.redis_visibility_timeout_seconds),
        "STACK_HEARTBEAT_SECONDS": str(config.beat_heartbeat_seconds),
        "STACK_PUBLISH_RETRY_SECONDS": str(config.celery_publish_retry_seconds),
        "STACK_CHORD_TIMEOUT_SECONDS": str(config.celery_chord_timeout_seconds),
        "STACK_QUEUE_TYPE": queues,
    }
    variables.update(dict.fromkeys(config.app_broker_url_variables, broker_url(run)))
    variables.update(dict.fromkeys(config.app_result_backend_variables, result_backend_url(run)))
    variables.update(config.app_environment)
    variables.update(secrets.app_variables)
    return variables


def existing_queue_types(run: Run) -> dict[str, str]:
    """The type of each of the application's queues that exists on RabbitMQ (read from the
    RabbitMQ host), or {} with another broker."""
    config = run.node.config
    if config.celery_broker != "rabbitmq":
        return {}
    definitions = peers.fact(run.wiring.hosts("rabbitmq")[0].name, rabbitmq.RabbitmqDefinitions)
    return rabbitmq.existing_queue_types(definitions, config.rabbitmq_vhost, run.wiring.queues())


def queue_type(run: Run, existing: dict[str, str], python: str) -> str:
    """The queue type the application is told (tasks/rabbitmq.py decides, and stops the deploy
    on a clash with the queues that exist); what the Celery of the release's venv (``python``)
    then lacks is printed."""
    config = run.node.config
    celery = host.get_fact(rabbitmq.CeleryQuorumSupport, python=python)
    chosen, why = rabbitmq.queue_type(config, existing, celery)
    if why:
        logger.warning(f"{host.name}: {why}")
    return chosen


def _check_installed_celery(config: settings.Settings, existing: dict[str, str], python: str) -> None:
    """At run time, once the release's venv is installed: ``queue_type`` again with the Celery
    it now holds, which stops the deploy before the switch on a clash with the queues RabbitMQ
    holds, or prints what that Celery lacks."""
    probe = rabbitmq.CeleryQuorumSupport()
    _, output = host.run_shell_command(probe.command(python=python))
    _, why = rabbitmq.queue_type(config, existing, probe.process(output.stdout_lines))
    if why:
        logger.warning(f"{host.name}: {why}")


def workdir(config: settings.Settings, source: Source) -> str:
    """Where the application's processes run: app_workdir in the current release's source
    tree, else <home>."""
    return _workdir_of(config, source, Layout(config.app_home).current)


def _workdir_of(config: settings.Settings, source: Source, release: str) -> str:
    """app_workdir in the source tree of the ``release`` directory, else <home>."""
    return f"{release}/src/{config.app_workdir}".rstrip("/") if source.is_tree else config.app_home


@dataclass(frozen=True)
class Build:
    """The release this deploy's code and settings make: its id, its venv's id and that venv
    (where, and what installs into it)."""

    release: str
    venv_id: str
    venv: Venv


def python_of(node: Node) -> str:
    """What app_python is on ``node``: the default python3 with its release's version (a host
    upgraded to another release gets another venv, and so another release), any other as named."""
    python = node.config.app_python
    if python != "python3":
        return python
    known = releases.known(node.release())
    return f"python3 ({known.python})" if known else f"python3 of {' '.join(map(str, node.release()))}"


def _build_of(config: settings.Settings, source: Source, layout: Layout, python: str) -> Build:
    """The release ``source`` and ``config`` make, named by what it holds: the code's digest
    and its venv's id, itself the digest of what the venv installs (``_packages``, with
    ``python``: ``python_of``) and pip's configuration. Nothing else of a host is read: the same
    inputs make the same ids everywhere."""
    code = (
        app_source.tree_digest(source.path, config)
        if source.is_tree
        else hashlib.sha256(source.path.read_bytes()).hexdigest()
    )
    pip_conf = render("app/pip.conf.j2", index_url=config.pip_index_url).getvalue()
    fingerprint = "\n".join([python, *_packages(config, source, code), pip_conf])
    venv_id = app_releases.digest(fingerprint)
    release = app_releases.digest(code, venv_id)
    return Build(release, venv_id, _venv(config, source, layout.release(release), layout.venv(venv_id), fingerprint))


def _target(config: settings.Settings, build: Build, on_host: app_releases.OnHost, name: str) -> str:
    """The release this host is to run: the one this deploy builds, or the one ``app_release``
    names (``previous``: the one most recently run before the release the settings build, so a
    rollback re-run changes nothing). SettingsError, before anything runs, for a release the
    host (``name``) does not have."""
    wanted = config.app_release
    if not wanted:
        return build.release
    chosen = on_host.previous(excluding=build.release) if wanted == "previous" else wanted
    if chosen is None or not on_host.built(chosen):
        have = ", ".join(sorted(r.id for r in on_host.releases.values() if r.built)) or "none"
        raise settings.SettingsError(
            f"host {name}: app_release={wanted}, but this host has no such release "
            f"(its releases: {have}; the settings build {build.release}); unset app_release to deploy that one"
        )
    return chosen


def _build(config: settings.Settings, source: Source, layout: Layout, build: Build) -> OperationMeta | None:
    """Build the release beside the running one: its code, its venv (unless a release with the
    same packages built it), the link between them and, last, its ``.built`` mark. The venv's
    install operation, or None when the venv was there."""
    app, path = config.app_name, layout.release(build.release)
    files.directory(
        name=f"Create {layout.home}/releases", path=f"{layout.home}/releases", user="root", group=app, mode="0755"
    )
    files.directory(
        name=f"Create {layout.home}/venvs", path=f"{layout.home}/venvs", user="root", group=app, mode="0755"
    )
    files.directory(name=f"Create the release {build.release}", path=path, user="root", group=app, mode="0755")
    _code(config, source, path)
    requirements = python_venv(config, build.venv)
    files.link(
        name=f"Link the release {build.release} to its venv {build.venv_id}",
        path=f"{path}/venv",
        target=build.venv.path,
    )
    files.file(name=f"Mark the release {build.release} complete", path=f"{path}/.built", mode="0644")
    return requirements


#: In each application venv: what its build installed (``pip freeze``, without what came from a
#: path or URL, such as the project itself), which another host's build of that venv installs under.
LOCK = "requirements.lock"
#: In each application venv: the lock its build installed under (another host's), or a comment.
PEER_LOCK = "peer.lock"


def _peer_lock(run: Run, venv_id: str) -> str:
    """The lock of the venv ``venv_id`` on the first other application host (inventory order)
    that has it, for this host's build to install under: the same packages, whenever this host
    builds it (a host added later too). A comment when none has it: this host resolves it."""
    for node in run.wiring.hosts(*settings.APP_GROUPS):
        if node.name == run.node.name:
            continue
        path = f"{Layout(node.config.app_home).venv(venv_id)}/{LOCK}"
        lines = peers.fact(node.name, FileContents, path=path)
        if lines:
            return "\n".join([f"# The packages of the venv {venv_id} on {node.name}.", *lines]) + "\n"
    return f"# No other application host had the venv {venv_id}: this host resolved it.\n"


def lock_difference(locks: dict[str, list[str]], me: str, order: list[str]) -> tuple[str, list[str], list[str]] | None:
    """Compare ``me``'s lock with the lock of the first host of ``locks`` in ``order``: None when
    they hold the same packages (or ``me`` is that host, or built none); else that host, the
    lines only ``me``'s holds and those only its holds."""
    first = min(locks, key=order.index, default=None)
    if first is None or first == me or me not in locks:
        return None
    mine, theirs = set(locks[me]), set(locks[first])
    return None if mine == theirs else (first, sorted(mine - theirs), sorted(theirs - mine))


#: Venv id → host name → the operation that read the lock of the venv it built in this run.
BUILT: dict[str, dict[str, OperationMeta]] = {}


def _same_packages(run: Run, build: Build, layout: Layout, install: OperationMeta) -> Callable[[], str | None]:
    """Read what this host's build of the venv installed, and return the check that, once every
    host has built (the rolling switch's first step), compares it with the first host (inventory
    order) that built the same venv in this run: hosts that build at once resolve at once, so a
    requirement left unpinned may still resolve differently if the index changed meanwhile. On a
    difference: the command that removes this host's release and venv (the next deploy builds
    them under that host's lock) and fails, saying which packages differ."""
    venv = build.venv.path
    BUILT.setdefault(build.venv_id, {})[run.node.name] = server.shell(
        name=f"Read the packages the venv {build.venv_id} installed (its lock)",
        commands=[f"cat {venv}/{LOCK}"],
        _if=install.did_change,
    )
    order = [node.name for node in run.wiring.nodes]

    def differs() -> str | None:
        locks = {name: read.stdout_lines for name, read in BUILT[build.venv_id].items() if read.did_change()}
        difference = lock_difference(locks, run.node.name, order)
        if difference is None:
            return None
        first, mine, theirs = difference
        said = (
            f"{run.node.name} installed other packages for the venv {build.venv_id} than {first}, in the same run "
            f"(a requirement left unpinned resolved differently): here {mine}, there {theirs}. This host's "
            f"release and venv are removed: the next deploy builds them under {first}'s packages; pin them "
            "(app_constraints) to choose."
        )
        return rollout.refusal(said, first=f"rm -rf {layout.release(build.release)} {venv}")

    return differs


def _switch(
    layout: Layout, target: str, on_host: app_releases.OnHost, build: Build, source: Source
) -> OperationMeta | None:
    """Point ``current`` at ``target`` unless it does: the operation, whose change restarts the
    units that run the release."""
    if on_host.current == target:
        return None
    what = f"built from {source.describe()}" if target == build.release else "app_release"
    return server.shell(
        name=f"Switch the application to the release {target} ({what})", commands=[layout.switch_command(target)]
    )


def _switch_back(node: Node, layout: Layout, previous: str) -> gate.SwitchBack:
    """How the gate returns ``node`` to the release it ran before this deploy: the switch, and
    the units a switch restarts."""
    app = node.config.app_name
    units = [unit.name(app) for unit in UNITS if "release" in unit.restart_on and runs(node, unit.role)]
    return gate.SwitchBack(release=previous, command=layout.switch_command(previous), units=units)


def _prune(
    config: settings.Settings,
    layout: Layout,
    on_host: app_releases.OnHost,
    target: str,
    venv: str | None,
    gate_op: OperationMeta,
) -> None:
    """Once the gate (``gate_op``) passed: remove the releases beyond app_releases_kept and the venvs no kept
    release uses (``OnHost.unwanted``), and what a deploy before releases left in <home>."""
    kept = config.app_releases_kept
    target_venv = venv if venv is not None else on_host.releases[target].venv
    releases, venvs = on_host.unwanted(target, target_venv, kept)
    passed = gate_op.did_succeed
    for release in releases:
        files.directory(
            name=f"Remove the release {release} (beyond the {kept} kept, app_releases_kept)",
            path=layout.release(release),
            present=False,
            _if=passed,
        )
    for venv_id in venvs:
        files.directory(
            name=f"Remove the venv {venv_id}, which no kept release uses",
            path=layout.venv(venv_id),
            present=False,
            _if=passed,
        )
    for path in sorted(on_host.legacy):
        files.directory(
            name=f"Remove {layout.home}/{path}, where a deploy before releases put the application",
            path=f"{layout.home}/{path}",
            present=False,
            _if=passed,
        )


def _code(config: settings.Settings, source: Source, release: str) -> OperationMeta:
    """Put the application's code into the ``release`` directory, owned by root and readable by
    the app: a source tree synced to its src/, or a wheel/sdist in its dist/."""
    app = config.app_name
    if source.is_tree:
        exclude, exclude_dir = app_source.exclusions(config)
        return files.sync(
            name=f"Copy the application code from {source.describe()}",
            src=str(source.path),
            dest=f"{release}/src",
            user="root",
            group=app,
            mode="0644",
            dir_mode="0755",
            delete=True,
            exclude=exclude,
            exclude_dir=exclude_dir,
        )
    files.directory(name=f"Create {release}/dist", path=f"{release}/dist", user="root", group=app, mode="0755")
    return files.put(
        name=f"Upload the application's distribution {source.path.name}",
        src=str(source.path),
        dest=f"{release}/dist/{source.path.name}",
        user="root",
        group=app,
        mode="0644",
    )


def _requirements_file(config: settings.Settings, source: Source) -> bool:
    """Whether the venv installs a requirements file (else the project itself, or only
    app_python_packages)."""
    return source.is_tree and bool(config.app_requirements) and not config.app_requirements.endswith("pyproject.toml")


def _packages(config: settings.Settings, source: Source, code: str) -> list[str]:
    """What the application's venv installs, as ``_venv`` installs it (besides the Python):
    the extra packages and constraints, and the requirements file or, for a project installed
    as a package, its code (``code``, its digest)."""
    parts = [*config.app_python_packages]
    if config.app_constraints:
        base = source.path if source.is_tree else settings.PROJECT_DIR
        parts.append((base / Path(config.app_constraints).expanduser()).read_text())
    if _requirements_file(config, source):
        parts += requirements_texts(source.path / config.app_requirements)
    elif not source.is_tree or config.app_requirements:
        parts.append(code)
    return parts


#: A requirements file's line that names another file pip reads with it (-r, -c and their long forms).
INCLUDE = re.compile(r"^\s*(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)")


def requirements_texts(path: Path, seen: frozenset[Path] = frozenset()) -> list[str]:
    """The text of a requirements file and of every file it includes (``-r``, ``-c``, relative
    to it, as pip reads them), so that a change to an included file is a change of packages."""
    path = path.resolve()
    if path in seen or not path.is_file():
        return []  # a loop, or a file pip will not find either (its install then fails, naming it)
    text = path.read_text()
    included = [path.parent / match[1] for line in text.splitlines() if (match := INCLUDE.match(line))]
    return [text, *(part for file in included for part in requirements_texts(file, seen | {path}))]


def _venv(config: settings.Settings, source: Source, release: str, venv: str, fingerprint: str) -> Venv:
    """The application's venv (made with app_python) at ``venv``, installed from the
    ``release`` directory: its requirements file, or the project itself (pyproject.toml, or
    the wheel/sdist) with its dependencies, then app_python_packages, all under
    app_constraints (``fingerprint``: what it installs, from ``_packages``)."""
    pip_path = f"{venv}/bin/pip"
    options, uploads = ["--constraint", f"{venv}/{PEER_LOCK}"], {}
    if config.app_constraints:
        if source.is_tree:  # in the release's source tree
            remote = f"{release}/src/{config.app_constraints}"
        else:  # on this machine, uploaded into the venv
            remote = f"{venv}/constraints.txt"
            uploads[settings.PROJECT_DIR / Path(config.app_constraints).expanduser()] = remote
        options += ["--constraint", remote]
    extras = " ".join(shlex.quote(requirement) for requirement in config.app_python_packages)
    commands = []
    if _requirements_file(config, source):
        commands.append(
            f"{pip_path} install {' '.join(options)} --requirement {release}/src/{config.app_requirements} {extras}"
        )
    elif source.is_tree and config.app_requirements:
        project = str(Path(f"{release}/src/{config.app_requirements}").parent)
        commands += _install_project(pip_path, "$build", options, extras, copy_from=project)
    elif not source.is_tree:
        commands += _install_project(pip_path, f"{release}/dist/{source.path.name}", options, extras)
    elif extras:
        commands.append(f"{pip_path} install {' '.join(options)} {extras}")
    return Venv(
        path=venv,
        what="the application",
        python=config.app_python,
        commands=commands,
        fingerprint=fingerprint,
        uploads=uploads,
    )


def _install_project(pip_path: str, target: str, options: list[str], extras: str, copy_from: str = "") -> list[str]:
    """Install a project with its dependencies, then the project itself again whatever its
    version says (new code often keeps the version). A source tree is built from a copy, since
    pip builds in place and would leave files in the synced tree."""
    install = [
        f"{pip_path} install {' '.join(options)} {target} {extras}",
        f"{pip_path} install --no-deps --force-reinstall {target}",
    ]
    if not copy_from:
        return install
    return [
        f'build=$(mktemp -d) && cp -R {copy_from}/. "$build" && '
        + " && ".join(install)
        + '; status=$?; rm -rf "$build"; exit $status'
    ]


def _flower_venv(config: settings.Settings) -> OperationMeta | None:
    """Flower's own venv, with its pinned requirements."""
    requirements = FILES_DIR / "monitoring" / "flower-requirements.txt"
    venv = f"{config.app_home}/flower"
    return python_venv(
        config,
        Venv(
            path=venv,
            what="Flower",
            python="python3",
            commands=[f"{venv}/bin/pip install --requirement {venv}/requirements.txt"],
            fingerprint=requirements.read_text(),
            uploads={requirements: f"{venv}/requirements.txt"},
        ),
    )


@dataclass(frozen=True)
class Venv:
    """A venv: where, for what, made with which Python, the commands that install into it,
    the fingerprint of what they install, and files to upload first (local → remote)."""

    path: str
    what: str
    python: str
    commands: list[str]
    fingerprint: str
    uploads: dict[Path, str] = field(default_factory=dict)
    #: What its build installs under (``PEER_LOCK``): another host's lock, or a comment without one.
    lock: Callable[[], str] | None = None


def python_venv(config: settings.Settings, venv: Venv) -> OperationMeta | None:
    """Create ``venv`` with its Python, upload its files and run its install commands only
    when its fingerprint (what they install) or pip's configuration changed since the last
    successful install: `pip install` runs, and reports a change, on every call, so a stamp of
    what was installed decides, written after success only. Before an install, the venv's
    ``lock`` (another host's packages) is written where the install reads it as constraints.
    The install operation, or None when there is nothing to install."""
    pip_conf = render("app/pip.conf.j2", index_url=config.pip_index_url)
    what = venv.what
    pip.venv(name=f"Create the venv {venv.path} of {what}", path=venv.path, python=venv.python)
    files.put(
        name=f"Configure the pip of {what} (CA bundle, index)", src=pip_conf, dest=f"{venv.path}/pip.conf", mode="0644"
    )
    for local, remote in venv.uploads.items():
        files.put(name=f"Upload {local.name} of {what}", src=str(local), dest=remote, mode="0644")
    stamp_file = f"{venv.path}/.installed.sha256"
    wanted = hashlib.sha256((venv.fingerprint + pip_conf.getvalue()).encode()).hexdigest()
    if not venv.commands or (host.get_fact(FileContents, path=stamp_file) or [""])[0] == wanted:
        return None
    if venv.lock is not None:
        files.put(
            name=f"Write the packages {what} installs under (another host's lock of the venv)",
            src=StringIO(venv.lock()),
            dest=f"{venv.path}/{PEER_LOCK}",
            mode="0644",
        )
    return server.shell(
        name=f"Install the Python packages of {what} into its venv, as {builder(config.app_name)}",
        commands=[_explained(venv, config.app_name), f"echo {wanted} > {stamp_file}"],
    )


def builder(app: str) -> str:
    """The system user pip runs as: a package's build (an sdist's setup.py, a compiler) runs no
    code as root, and none as the application's user, who could plant code in a release."""
    return f"{app}-build"


def _builder_home(app: str) -> str:
    """The build user's home: pip's cache of downloads and built wheels."""
    return f"/var/cache/{builder(app)}"


def _system_user(user: str, home: str, what: str) -> None:
    """A system user and its group, without a login shell; ``home`` is not created here."""
    server.group(name=f"Create the system group {user}", group=user, system=True)
    server.user(
        name=f"Create the system user {user}, {what}, without a login shell",
        user=user,
        group=user,
        system=True,
        shell="/usr/sbin/nologin",
        home=home,
        create_home=False,
        ensure_home=False,
    )


def _create_builder(app: str) -> None:
    user, home = builder(app), _builder_home(app)
    _system_user(user, home, "which builds the venvs (pip does not run as root)")
    files.directory(name=f"Create {home}, pip's cache", path=home, user=user, group=user, mode="0700")


#: The line before ``pip check``'s output in the install's log (files/pip/pip_failure.py reads it).
PIP_CHECK_MARK = "stack-pip-check:"


def _checked(venv: Venv) -> list[str]:
    """``venv``'s install commands, then ``pip check``: every installed package's requirements
    met (pip's resolver looks only at what one command installs, so a second command can break
    another's requirements with exit status 0); then what was installed, as the venv's ``LOCK``."""
    return [
        *venv.commands,
        f"echo {PIP_CHECK_MARK} && {venv.path}/bin/pip check",
        f"{venv.path}/bin/pip freeze --all --exclude-editable | sed '/ @ /d' > {venv.path}/{LOCK}",
    ]


#: The first line of an install's log: who ran pip.
BUILT_AS = "stack-build: as"


def _explained(venv: Venv, app: str) -> str:
    """``venv``'s install commands, run by the build user in the venv it owns meanwhile, with
    pip's output in a log (0600: an index URL may carry a token); then the venv is root's again
    (group ``app``, writable by nobody else). When they fail, a few lines that name what failed
    instead of pip's wall of compiler output (files/pip/pip_failure.py, run by the venv's
    Python, as the build user, from standard input)."""
    user, home, log = builder(app), _builder_home(app), f"{venv.path}/pip-install.log"
    explain = (FILES_DIR / "pip" / "pip_failure.py").read_text()
    script = " && ".join(f"( {command} )" for command in _checked(venv))
    as_builder = f"runuser -u {user} -- env HOME={home} PIP_CACHE_DIR={home}/pip sh -c {shlex.quote(script)}"
    return (
        f"chown -R {user}:{user} {venv.path} && install -m 0600 -o {user} /dev/null {log} && "
        f"{{ echo '{BUILT_AS} {user}'; {as_builder}; }} >> {log} 2>&1; status=$?; "
        f"if [ $status -ne 0 ]; then runuser -u {user} -- {venv.path}/bin/python - {log} {shlex.quote(venv.python)} "
        f"<<'PIP_FAILURE'\n{explain}PIP_FAILURE\nfi; "
        f"chown -R root:{app} {venv.path} && chmod -R go-w {venv.path} && exit $status"
    )


def _unit_files(node: Node, source: Source) -> dict[Unit, OperationMeta]:
    """Write the units of this host's roles and remove those of roles it no longer has: the
    operation that wrote or removed each."""
    config = node.config
    app, home = config.app_name, config.app_home
    context: dict[str, Any] = dict(
        app=app,
        home=home,
        venv=Layout(home).current_venv,
        workdir=workdir(config, source),
        address=node.address,
        port=config.web_port,
        asgi_app=config.asgi_app,
        concurrency=config.celery_concurrency,
        queues=config.celery_queues,
        loglevel=config.celery_loglevel,
        time_limit=config.celery_task_time_limit_seconds,
        stop_timeout=config.worker_stop_timeout,
        flower_port=config.flower_port,
        worker_node=WORKER_NODE,
        writable_paths=config.app_writable_paths,
    )
    written: dict[Unit, OperationMeta] = {}
    for unit in UNITS:
        path = f"{UNIT_DIR}/{unit.name(app)}"
        if runs(node, unit.role):
            written[unit] = files.put(
                name=f"Write the unit {unit.name(app)}", src=render(unit.template, **context), dest=path, mode="0644"
            )
        elif host.get_fact(File, path=path):
            systemd.service(
                name=f"Stop {unit.name(app)}: this host no longer has that role",
                service=unit.name(app),
                running=False,
                enabled=False,
            )
            written[unit] = files.file(name=f"Remove the unit {unit.name(app)}", path=path, present=False)
    if written:
        systemd.daemon_reload(name="Reload systemd after our units changed", _if=any_changed(*written.values()))
    return written


def _start(
    node: Node, changes: dict[str, list[OperationMeta]], written: dict[Unit, OperationMeta]
) -> list[OperationMeta]:
    """Start, restart or reload each unit of this host's roles as ``UNITS`` says: the
    operations that do (the health gate lets the units settle after any of them changed)."""
    app = node.config.app_name
    sockets = [operation for unit, operation in written.items() if unit.suffix.endswith(".socket")]
    started: list[OperationMeta] = []
    for unit in UNITS:
        if not runs(node, unit.role):
            continue
        own = {**changes, "unit": [written[unit]], "socket": sockets}
        restart = [operation for change in unit.restart_on for operation in own[change]]
        reload = [operation for change in unit.reload_on for operation in own[change]]
        start = _keep_running(unit.name(app))
        started.append(start)
        started.append(
            systemd.service(
                name=f"Restart {unit.name(app)} for its changed {_changes(unit.restart_on)}",
                service=unit.name(app),
                restarted=True,
                _if=[any_changed(*restart), _unchanged(start)],
            )
        )
        if reload:
            started.append(
                systemd.service(
                    name=f"Reload {unit.name(app)} gracefully for its changed {_changes(unit.reload_on)}",
                    service=unit.name(app),
                    reloaded=True,
                    _if=[any_changed(*reload), _unchanged(*restart, start)],
                )
            )
    return started


def _changes(names: tuple[str, ...]) -> str:
    """``("code", "unit")`` → "code or unit", for the operations' names."""
    words = [CHANGES[name] for name in names]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _keep_running(unit: str) -> OperationMeta:
    """Keep ``unit`` enabled, and running: the operation that starts it, which changes only
    when it was not running. A unit this run started runs everything this run installed, so
    its restart is skipped (on a fresh host that spares a start followed by a restart)."""
    systemd.service(name=f"Keep {unit} enabled", service=unit, enabled=True)
    return systemd.service(name=f"Keep {unit} running", service=unit, running=True)


def _ports(node: Node) -> list[Port]:
    config, ports = node.config, []
    if node.has("web"):
        # Clients come through the front when there is one.
        clients = ("front",) if "front" in node.inventory_groups else ANYONE
        # Its liveness is probed from outside (any application); its own metrics, if it has them.
        scrapes: tuple[Scrape, ...] = (Scrape("health", path=config.app_health_path, probe=True),)
        if config.app_metrics_path:
            scrapes += (Scrape("app", path=config.app_metrics_path),)
        ports.append(Port(config.web_port, "the application (Gunicorn)", clients=clients, scrapes=scrapes))
    if runs(node, "flower"):
        ports.append(Port(config.flower_port, "Flower", scrapes=(Scrape("flower"),)))
    return ports


SERVICE = Service(
    name="application",
    groups=settings.APP_GROUPS,
    # psql checks the result database from where it is used.
    packages=lambda node: ["python3-venv", "postgresql-client", *node.config.app_system_packages],
    units=lambda node: [unit.name(node.config.app_name) for unit in UNITS if runs(node, unit.role)],
    ports=_ports,
    deploy=application,
)
