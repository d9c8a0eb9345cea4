"""
Every knob of the deployment, with its default and one sentence, in one place.

Settings are pyinfra host data: set them for all hosts in ``group_data/all.py``, for a group in
``group_data/<group>.py``, or for one run with ``pyinfra ... --data name=value``. Secrets are
never settings: they come from environment variables or an untracked secrets file (see
``Secrets``), so nothing secret is committed with the inventory.

Everything is validated when the deploy starts, before any operation runs: an unknown name, a
wrong type, a bad value, a missing or weak secret or an impossible topology stops the run with
one message that names the setting and how to fix it.

``python settings.py`` prints the settings table that README.md shows.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
import sys
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Callable, get_type_hints

from pyinfra.api.exceptions import PyinfraError

PROJECT_DIR = Path(__file__).resolve().parent

#: Inventory groups, each a role. A host may be in several.
GROUPS = ("redis", "rabbitmq", "postgres", "web", "workers", "beat", "monitoring", "front")
#: Groups whose hosts run application code and so need the broker and the result database.
APP_GROUPS = ("web", "workers", "beat")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: systemd waits this long beyond the longest task before it kills a stopping worker.
STOP_MARGIN_SECONDS = 30

#: Settings every application host must share: one broker, one result store, one code base.
SAME_ON_APP_HOSTS = (("celery_broker", "celery_result_backend"), ("app_source", "app_git_ref"))

#: Per-host data that is not a setting: the address other hosts reach this one on.
HOST_KEYS = ("private_address",)
#: Host data that belongs to pyinfra and its connectors, not to us.
PYINFRA_KEY_PREFIXES = ("_", "ssh_", "winrm_", "docker_", "podman_", "chroot_", "local_", "terraform_")


class SettingsError(PyinfraError):
    """Bad input: raised before any operation runs, so no host is changed."""


# --------------------------------------------------------------------------------------------
# Value checks: each returns an error sentence or None.
# --------------------------------------------------------------------------------------------


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def _positive(value: int | float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "must be a fraction between 0 and 1, e.g. 0.6"


def _identifier(value: str) -> str | None:
    if re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        return None
    return "must be lower-case letters, digits and underscores, starting with a letter"


def _size(value: str) -> str | None:
    if re.fullmatch(r"\d+(\.\d+)?(kB|MB|GB|KiB|MiB|GiB)?", value):
        return None
    return "must be a size such as 1GB or 500MB"


def _save_points(value: str) -> str | None:
    numbers = value.split()
    if numbers and len(numbers) % 2 == 0 and all(n.isdigit() for n in numbers):
        return None
    return 'must be pairs of "<seconds> <changes>", e.g. "3600 1 300 100 60 10000"'


def _url_or_empty(value: str) -> str | None:
    if value == "" or re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        return None
    return 'must be empty or an http(s) URL such as "http://10.0.0.1:3142"'


def _pg_version(value: str) -> str | None:
    return None if value == "auto" or value.isdigit() else 'must be "auto" or a major version like "15"'


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else "must be " + " or ".join(f'"{c}"' for c in choices)


def _db_index(value: int) -> str | None:
    return None if 0 <= value <= 15 else "must be a Redis database index from 0 to 15"


def _absolute_or_empty(value: str) -> str | None:
    return None if value == "" or value.startswith("/") else "must be an absolute path, or empty for the default"


GIT_URL = re.compile(r"(git\+)?(https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+|\S+\.git/?")
DISTRIBUTION_SUFFIXES = (".whl", ".tar.gz", ".zip")


def source_kind(value: str) -> str:
    """What ``app_source`` names: "git", "distribution" (wheel or sdist) or "directory"."""
    if GIT_URL.fullmatch(value) and not (PROJECT_DIR / Path(value).expanduser()).is_dir():
        return "git"
    if value.endswith(DISTRIBUTION_SUFFIXES):
        return "distribution"
    return "directory"


def _app_source(value: str) -> str | None:
    kind = source_kind(value)
    local = PROJECT_DIR / Path(value).expanduser()
    if kind == "git" or (kind == "directory" and local.is_dir()) or (kind == "distribution" and local.is_file()):
        return None
    return (
        f"must be a directory or a wheel/sdist file on this machine, or a git URL; {value!r} is none of them "
        "(a relative path is relative to deploy.py)"
    )


def _git_ref(value: str) -> str | None:
    return None if re.fullmatch(r"[\w./@+-]*", value) and ".." not in value else "must be a branch, tag or commit"


def _local_file_or_empty(value: str) -> str | None:
    return None if value == "" or Path(value).expanduser().is_file() else f"{value!r} is not a file on this machine"


def _relative_path(value: str) -> str | None:
    if value.startswith("/") or ".." in Path(value).parts:
        return "must be a path inside the source tree: relative, without .."
    return None


def _command(value: str) -> str | None:
    return None if re.fullmatch(r"[\w./+-]+", value) else "must be a command name or an absolute path, e.g. python3.11"


VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Environment variables the deploy itself sets in the application's environment file.
RESERVED_PREFIX = "STACK_"


def _variable_names(names: list[str]) -> str | None:
    bad = [name for name in names if not VARIABLE_NAME.fullmatch(name) or name.startswith(RESERVED_PREFIX)]
    if bad:
        return f"holds {bad}: names must be letters, digits and _, and not start with {RESERVED_PREFIX}"
    return None


def _environment(variables: dict[str, str]) -> str | None:
    bad = [name for name, value in variables.items() if not isinstance(value, str) or "\n" in value]
    if bad:
        return f"values of {bad} must be strings on one line"
    return _variable_names(list(variables))


def _import_path(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", value):
        return None
    return 'must be a Python import path such as "package.module:attribute"'


def _queue_list(value: str) -> str | None:
    if re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value):
        return None
    return 'must be comma-separated queue names, e.g. "celery,emails"'


def _networks(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"holds {value!r}, which is not an IP address or network such as 10.8.0.0/24"
    return None


def _duration(value: str) -> str | None:
    if re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", value):
        return None
    return "must be a Prometheus duration such as 15s, 5m, 4h or 15d"


def _email_or_empty(value: str) -> str | None:
    return None if value == "" or re.fullmatch(r"[^@\s]+@[^@\s]+", value) else "must be empty or an e-mail address"


def _host_port_or_empty(value: str) -> str | None:
    return None if value == "" or re.fullmatch(r"[\w.-]+:\d+", value) else 'must be empty or "host:port"'


def _ca_files(paths: list[str]) -> str | None:
    for path in paths:
        error = ca_file_error(path)
        if error:
            return error
    return None


def ca_file_error(path: str) -> str | None:
    """Why ``path`` is not a readable PEM file of CA certificates, or None if it is one."""
    file = Path(path).expanduser()
    if not file.is_file():
        return f"{path} does not exist on this machine"
    text = file.read_text(errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        ssl.create_default_context(cadata=text)
    except ssl.SSLError as error:
        return f"{path} is not a valid PEM certificate: {error}"
    return None


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare a setting: its default, the sentence the README shows, and an optional check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


# --------------------------------------------------------------------------------------------
# The settings.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Settings of one host, resolved from its pyinfra host data over these defaults."""

    # Base system
    apt_proxy: str = setting(
        "", "HTTP proxy for apt on every host (e.g. an apt-cacher-ng); empty for none.", _url_or_empty
    )
    apt_cache_valid_seconds: int = setting(
        3600, "apt's package lists younger than this are not refreshed on a re-run.", _positive
    )
    extra_ca_certificates: list[str] = setting(
        [],
        "Paths, on the machine running pyinfra, of PEM CA certificates every host must trust "
        "(TLS-intercepting proxies, private mirrors).",
        _ca_files,
    )

    # Redis
    redis_port: int = setting(6379, "TCP port Redis listens on (private address and loopback).", _port)
    redis_save: str = setting(
        "3600 1 300 100 60 10000",
        "RDB snapshot points: pairs of <seconds> <changes> after which Redis snapshots to disk.",
        _save_points,
    )
    redis_appendfsync: str = setting(
        "everysec",
        "AOF fsync policy: everysec loses at most about one second of writes on a host crash; "
        "always loses none and is slower.",
        lambda v: None if v in ("everysec", "always") else 'must be "everysec" or "always"',
    )

    redis_broker_db: int = setting(0, "Redis database of the broker's queues (celery_broker = redis).", _db_index)
    redis_result_db: int = setting(1, "Redis database of task results (celery_result_backend = redis).", _db_index)
    redis_visibility_timeout_seconds: int = setting(
        7200,
        "With Redis as broker, a task a worker took but did not acknowledge (it crashed) is given to "
        "another worker after this long; must exceed the longest task and any ETA or countdown.",
        _positive,
    )

    # RabbitMQ
    rabbitmq_port: int = setting(5672, "AMQP port RabbitMQ listens on (private address and loopback).", _port)
    rabbitmq_prometheus_port: int = setting(
        15692, "Port of RabbitMQ's built-in Prometheus endpoint (private address).", _port
    )
    rabbitmq_vhost: str = setting("celery", "RabbitMQ virtual host of the application.", _identifier)
    rabbitmq_user: str = setting("celery", "RabbitMQ user of the application (all rights on its vhost only).", _identifier)
    rabbitmq_disk_free_limit: str = setting(
        "1GB", "RabbitMQ blocks publishers when free disk falls below this (disk_free_limit.absolute).", _size
    )
    rabbitmq_vm_memory_high_watermark: float = setting(
        0.4, "Fraction of RAM at which RabbitMQ blocks publishers (vm_memory_high_watermark.relative).", _fraction
    )
    rabbitmq_consumer_timeout_ms: int = setting(
        3_600_000,
        "A delivery not acknowledged within this many ms closes its channel and is redelivered; "
        "must exceed the longest task, since tasks are acknowledged when they finish.",
        _positive,
    )

    # PostgreSQL
    postgresql_version: str = setting(
        "auto", 'Major version of the distribution\'s PostgreSQL; "auto" picks the release\'s default.', _pg_version
    )
    postgresql_port: int = setting(5432, "TCP port PostgreSQL listens on (private address and loopback).", _port)
    postgresql_database: str = setting("celerydb", "Database holding Celery's results.", _identifier)
    postgresql_user: str = setting("celeryuser", "Role owning that database, used by the application.", _identifier)

    # Choices
    celery_broker: str = setting(
        "rabbitmq",
        'Message broker: "rabbitmq" (durable queues, publisher confirms) or "redis" (lists persisted by AOF).',
        _one_of("rabbitmq", "redis"),
    )
    celery_result_backend: str = setting(
        "postgresql", 'Where task results are stored: "postgresql" or "redis".', _one_of("postgresql", "redis")
    )

    # Application
    app_name: str = setting(
        "stackapp", "Name of the application: its system user and group, unit prefix and /opt/<name>.", _identifier
    )
    app_dir: str = setting("", "Where the application lives on hosts; empty means /opt/<app_name>.", _absolute_or_empty)
    app_source: str = setting(
        "files/app",
        "The application: a local directory (relative to deploy.py or absolute), a git repository URL "
        "(fetched on this machine at app_git_ref, then synced like a directory), or a built wheel or "
        "sdist file, installed into the venv.",
        _app_source,
    )
    app_git_ref: str = setting(
        "", "Branch, tag or commit of a git app_source; empty for the repository's default branch.", _git_ref
    )
    app_git_ssh_key: str = setting(
        "", "Private deploy key (path on this machine) for an ssh git app_source; it never leaves this machine.",
        _local_file_or_empty,
    )
    app_sync_exclude: list[str] = setting(
        [],
        "File or directory name patterns not synced to hosts, beyond .git, venvs, caches and *.pyc.",
    )
    app_workdir: str = setting(
        "",
        "Directory inside the source tree the services run in (projects read templates and static files "
        "relative to it); empty for the tree's root.",
        _relative_path,
    )
    app_requirements: str = setting(
        "requirements.txt",
        "What the venv installs from the source tree: a pinned requirements file, \"pyproject.toml\" to "
        "install the project itself (with its dependencies), or empty for nothing. Not used for a wheel/sdist.",
        _relative_path,
    )
    app_constraints: str = setting(
        "", "Constraints file (pip -c) inside the source tree, or on this machine for a wheel/sdist; empty for none."
    )
    app_python_packages: list[str] = setting(
        [], "Extra or overriding Python requirements (pip specifiers), installed with the application's."
    )
    app_system_packages: list[str] = setting(
        [], "Extra Debian packages on application hosts, e.g. build-essential, python3-dev, libpq-dev."
    )
    app_python: str = setting(
        "python3", "Python interpreter the venv is made with (a command on the hosts, e.g. python3.11).", _command
    )
    app_environment: dict[str, str] = setting(
        {}, "Extra environment variables of every application process (secrets go in app_secret_variables).",
        _environment,
    )
    app_secret_variables: list[str] = setting(
        [],
        "Names of secret environment variables of the application; each value comes from STACK_APP_<NAME> "
        "in the environment or the secrets file.",
        _variable_names,
    )
    app_broker_url_variables: list[str] = setting(
        ["CELERY_BROKER_URL"], "Environment variables that carry the broker URL to the application.", _variable_names
    )
    app_result_backend_variables: list[str] = setting(
        ["CELERY_RESULT_BACKEND"],
        "Environment variables that carry the result backend URL to the application.",
        _variable_names,
    )
    celery_enforce_durability: bool = setting(
        True,
        "Apply the deploy's no-task-lost Celery settings (late acks, requeue on worker loss, prefetch 1, "
        "publisher confirms, retries) over the application's own configuration.",
    )
    asgi_app: str = setting("stackapp.api:app", "Import path of the ASGI application Gunicorn serves.", _import_path)
    celery_app: str = setting("stackapp.celery_app", "Import path of the Celery application (celery -A).", _import_path)
    pip_index_url: str = setting("", "Python package index for the venv (a mirror); empty for pip's default.", _url_or_empty)
    web_port: int = setting(8000, "Port Gunicorn listens on (systemd socket on the private address and loopback).", _port)
    gunicorn_workers: int = setting(2, "Gunicorn worker processes (Uvicorn workers) per web host.", _positive)
    celery_concurrency: int = setting(
        2, "Celery worker pool processes per worker host (per worker group: group_data/<group>.py).", _positive
    )
    celery_queues: str = setting(
        "celery", "Comma-separated queues the workers consume (per worker group: set it in group_data/<group>.py).",
        _queue_list,
    )
    celery_loglevel: str = setting(
        "INFO", "Log level of the Celery worker and beat.", lambda v: None if v in LOG_LEVELS else f"must be one of {LOG_LEVELS}"
    )
    celery_longest_task_seconds: int = setting(
        300,
        "The longest a task may run: its hard time limit; a worker stop waits this long plus 30 s for "
        "running tasks to finish (TimeoutStopSec).",
        _positive,
    )
    beat_heartbeat_seconds: float = setting(
        60.0, "Interval of the heartbeat task beat sends, which shows that beat and a worker are alive.", _positive
    )

    # Front (hosts of the front group)
    front_port: int = setting(80, "Port nginx serves the application on, on front hosts (every address).", _port)
    front_fail_timeout_seconds: int = setting(
        10, "A web host that failed a request is left out of the balancing for this long.", _positive
    )

    # Host firewall
    firewall: bool = setting(
        False,
        "Load an nftables table (Debian's nftables) that opens each service port only to the inventory "
        "groups that use it, the admin sources and the host itself; other ports are left alone.",
    )
    firewall_admin_sources: list[str] = setting(
        [],
        "Addresses or networks (CIDR) of operators, allowed to every service port (Prometheus, "
        "Alertmanager, Grafana, Flower, the databases), e.g. a VPN's range.",
        _networks,
    )

    # Monitoring (hosts of the monitoring group; exporters on every host when there is one)
    prometheus_port: int = setting(9090, "Port of Prometheus (private address of the monitoring host).", _port)
    prometheus_retention: str = setting("15d", "How long Prometheus keeps samples.", _duration)
    prometheus_scrape_interval: str = setting("15s", "How often Prometheus scrapes every target.", _duration)
    prometheus_evaluation_interval: str = setting("15s", "How often Prometheus evaluates the alert rules.", _duration)
    alert_for: str = setting(
        "2m", "How long a condition must hold before its alert fires (the rules' `for`).", _duration
    )
    alertmanager_port: int = setting(9093, "Port of Alertmanager (private address of the monitoring host).", _port)
    alertmanager_group_wait: str = setting("30s", "Alertmanager waits this long to group a new alert's first notification.", _duration)
    alertmanager_group_interval: str = setting("5m", "Alertmanager waits this long before notifying about changes to a group.", _duration)
    alertmanager_repeat_interval: str = setting("4h", "A still-firing alert is notified again after this long.", _duration)
    alert_webhook_url: str = setting("", "Generic webhook that receives every alert (JSON, firing and resolved); empty for none.", _url_or_empty)
    alert_email_to: str = setting("", "Address that receives every alert by e-mail; empty for none.", _email_or_empty)
    alert_email_from: str = setting("", "Sender address of alert e-mails (needed with alert_email_to).", _email_or_empty)
    alert_smtp_smarthost: str = setting("", 'SMTP server "host:port" for alert e-mails (needed with alert_email_to).', _host_port_or_empty)
    alert_smtp_username: str = setting("", "SMTP user for alert e-mails; the password is STACK_ALERT_SMTP_PASSWORD.")
    alert_slack_channel: str = setting(
        "", "Channel of the Slack-compatible webhook in STACK_ALERT_SLACK_WEBHOOK_URL (empty: the webhook's default)."
    )
    alert_watchdog_url: str = setting(
        "", "Dead man's switch: receives the always-firing Watchdog alert, so its silence means alerting is down; empty for none.", _url_or_empty
    )
    node_exporter_port: int = setting(9100, "Port of node_exporter on every host (private address).", _port)
    redis_exporter_port: int = setting(9121, "Port of redis_exporter on the Redis host (private address).", _port)
    postgres_exporter_port: int = setting(9187, "Port of postgres_exporter on the PostgreSQL host (private address).", _port)
    flower_port: int = setting(5555, "Port of Flower (Celery's monitor and metrics) on the beat host (private address).", _port)
    queue_backlog_threshold: int = setting(
        100, "Tasks waiting in a queue above which a still-growing backlog alerts.", _positive
    )
    grafana: str = setting(
        "apt",
        'How Grafana is installed on the monitoring host: "apt" (grafana_apt_repository), "deb" (grafana_deb), or "none".',
        _one_of("apt", "deb", "none"),
    )
    grafana_port: int = setting(3000, "Port of Grafana (private address of the monitoring host).", _port)
    grafana_apt_repository: str = setting(
        "https://apt.grafana.com", "Grafana's APT repository (or a mirror of it); suite stable, component main.", _url_or_empty
    )
    grafana_apt_key_url: str = setting(
        "https://apt.grafana.com/gpg.key", "Signing key of that repository (ASCII-armoured).", _url_or_empty
    )
    grafana_deb: str = setting("", "Local path of a grafana .deb to install when grafana is \"deb\".")

    @property
    def app_home(self) -> str:
        """Directory of the application on hosts."""
        return self.app_dir or f"/opt/{self.app_name}"

    @property
    def worker_stop_timeout(self) -> int:
        """Seconds systemd lets a stopping worker finish its running tasks."""
        return self.celery_longest_task_seconds + STOP_MARGIN_SECONDS

    @property
    def servers_needed(self) -> dict[str, str]:
        """Server group → the setting that needs it, for the application's broker and results."""
        needed = {"rabbitmq" if self.celery_broker == "rabbitmq" else "redis": "celery_broker"}
        needed.setdefault("postgres" if self.celery_result_backend == "postgresql" else "redis", "celery_result_backend")
        return needed

    def cross_problems(self) -> list[str]:
        """Problems between settings that are each valid alone."""
        problems = []
        if self.rabbitmq_consumer_timeout_ms <= self.celery_longest_task_seconds * 1000:
            problems.append(
                f"rabbitmq_consumer_timeout_ms ({self.rabbitmq_consumer_timeout_ms}) must exceed "
                f"celery_longest_task_seconds ({self.celery_longest_task_seconds}) in ms, or RabbitMQ takes "
                "back tasks that are still running; raise it or lower celery_longest_task_seconds"
            )
        if self.redis_visibility_timeout_seconds <= self.celery_longest_task_seconds:
            problems.append(
                f"redis_visibility_timeout_seconds ({self.redis_visibility_timeout_seconds}) must exceed "
                f"celery_longest_task_seconds ({self.celery_longest_task_seconds}), or Redis hands running "
                "tasks to a second worker; raise it"
            )
        kind = source_kind(self.app_source)
        if kind != "distribution" and _relative_path(self.app_constraints):
            problems.append(f"app_constraints {_relative_path(self.app_constraints)} (got {self.app_constraints!r})")
        elif kind == "directory":
            problems += source_tree_problems(self, PROJECT_DIR / Path(self.app_source).expanduser())
        elif kind == "distribution":
            if self.app_workdir:
                problems.append(
                    "app_workdir is set but app_source is a wheel/sdist, which has no source tree to run in; "
                    "clear app_workdir, or deploy from the project's directory or git repository"
                )
            if self.app_constraints and not (PROJECT_DIR / Path(self.app_constraints).expanduser()).is_file():
                problems.append(f"app_constraints {self.app_constraints!r} is not a file on this machine")
        named = [*self.app_broker_url_variables, *self.app_result_backend_variables, *self.app_secret_variables]
        repeated = sorted({name for name in named if named.count(name) > 1} | (set(named) & set(self.app_environment)))
        if repeated:
            problems.append(
                f"environment variables {repeated} are given more than once by app_broker_url_variables, "
                "app_result_backend_variables, app_secret_variables and app_environment; name each once"
            )
        if self.alert_email_to and not (self.alert_email_from and self.alert_smtp_smarthost):
            problems.append(
                "alert_email_to is set but alert_email_from or alert_smtp_smarthost is empty; "
                "set both, or clear alert_email_to"
            )
        if self.grafana == "apt" and not (self.grafana_apt_repository and self.grafana_apt_key_url):
            problems.append(
                'grafana is "apt" but grafana_apt_repository or grafana_apt_key_url is empty; set both '
                '(e.g. to a mirror), or set grafana to "deb" or "none"'
            )
        if self.grafana == "deb" and not Path(self.grafana_deb).expanduser().is_file():
            problems.append(
                f"grafana is \"deb\" but grafana_deb ({self.grafana_deb!r}) is not a file on this machine; "
                "point grafana_deb at a grafana .deb, or set grafana to \"apt\" or \"none\""
            )
        if self.redis_broker_db == self.redis_result_db:
            problems.append(
                f"redis_broker_db and redis_result_db are both {self.redis_broker_db}; give each use its own database"
            )
        return problems


def source_tree_problems(config: Settings, tree: Path) -> list[str]:
    """What is missing from the application's source tree (a directory, or a git checkout)."""
    problems = []
    for name in ("app_requirements", "app_constraints"):
        value = getattr(config, name)
        if value and not (tree / value).is_file():
            problems.append(
                f"{name} {value!r} is not a file in the application's source ({tree}); point it at a file "
                "there, relative to the tree's root, or clear it"
            )
    if config.app_workdir and not (tree / config.app_workdir).is_dir():
        problems.append(
            f"app_workdir {config.app_workdir!r} is not a directory in the application's source ({tree}); "
            "give a directory relative to the tree's root, or clear it"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Secrets.
# --------------------------------------------------------------------------------------------

#: Environment variable naming the secrets file; by default ``secrets.env`` beside deploy.py.
SECRETS_FILE_VARIABLE = "STACK_SECRETS_FILE"
#: The value of the application's secret variable NAME comes from STACK_APP_<NAME>.
APP_SECRET_PREFIX = "STACK_APP_"
MIN_SECRET_LENGTH = 16
#: Values that are defaults somewhere, or placeholders: refused whatever their length.
WEAK_SECRETS = {"guest", "password", "changeme", "secret", "admin", "celery", "redis", "postgres", "rabbitmq"}


@dataclass(frozen=True)
class Secrets:
    """Passwords, read from the environment or the untracked secrets file (environment wins).

    ``when`` says when a secret is required: always, with Grafana (a monitoring host whose
    ``grafana`` is not "none"), or never (an optional credential of an external service)."""

    redis_password: str = field(metadata={"env": "STACK_REDIS_PASSWORD", "help": "Redis requirepass.", "when": "always"})
    rabbitmq_password: str = field(
        metadata={"env": "STACK_RABBITMQ_PASSWORD", "help": "Password of the RabbitMQ user.", "when": "always"}
    )
    postgresql_password: str = field(
        metadata={
            "env": "STACK_POSTGRESQL_PASSWORD",
            "help": "Password of the PostgreSQL role (stored as SCRAM-SHA-256).",
            "when": "always",
        }
    )
    grafana_admin_password: str = field(
        default="",
        metadata={
            "env": "STACK_GRAFANA_ADMIN_PASSWORD",
            "help": "Password of Grafana's admin user; required with Grafana (its default is refused).",
            "when": "grafana",
        },
    )
    alert_smtp_password: str = field(
        default="",
        metadata={"env": "STACK_ALERT_SMTP_PASSWORD", "help": "Password of alert_smtp_username (optional).", "when": "never"},
    )
    alert_slack_webhook_url: str = field(
        default="",
        metadata={
            "env": "STACK_ALERT_SLACK_WEBHOOK_URL",
            "help": "Slack-compatible incoming webhook URL that receives every alert (optional).",
            "when": "never",
            "check": _url_or_empty,
        },
    )
    #: Values of the application's own secret variables (setting app_secret_variables), by name.
    app_variables: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "Secrets(<hidden>)"


def secrets_file() -> Path:
    return Path(os.environ.get(SECRETS_FILE_VARIABLE) or PROJECT_DIR / "secrets.env")


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; optional single or double quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(f"{path} line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip().removeprefix("export ").strip()] = value
    return values


def secret_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable as a password, or None."""
    if not value:
        return "is missing or empty"
    if value.lower() in WEAK_SECRETS or re.fullmatch(r"(.)\1*", value):
        return "is a default or placeholder value"
    if len(value) < MIN_SECRET_LENGTH:
        return f"is shorter than {MIN_SECRET_LENGTH} characters"
    return None


def load_secrets(
    environ: dict[str, str] | None = None, grafana: bool = False, app_variables: tuple[str, ...] = ()
) -> Secrets:
    """Read and check every secret (those of Grafana only if ``grafana``, and the application's
    ``app_variables``); one error lists all that are wrong and how to set them."""
    environ = os.environ if environ is None else environ
    path = secrets_file()
    from_file = _read_env_file(path)
    values, problems = {}, []
    application = {}
    for name in app_variables:
        variable = APP_SECRET_PREFIX + name
        application[name] = environ.get(variable) or from_file.get(variable, "")
        if not application[name]:
            problems.append(f"{variable} is missing or empty (app_secret_variables names {name})")
    for item in fields(Secrets):
        if "env" not in item.metadata:
            continue
        variable, when = item.metadata["env"], item.metadata["when"]
        value = environ.get(variable) or from_file.get(variable, "")
        if when == "always" or (when == "grafana" and grafana):
            problem = secret_problem(value)
        else:
            check = item.metadata.get("check")
            problem = check(value) if check else None
        if problem:
            problems.append(f"{variable} {problem}")
        values[item.name] = value
    if problems:
        raise SettingsError(
            "; ".join(problems)
            + f". Set each in the environment or in {path} (KEY=VALUE, never committed), "
            f"e.g. {fields(Secrets)[0].metadata['env']}=$(openssl rand -hex 24)."
        )
    return Secrets(**values, app_variables=application)


# --------------------------------------------------------------------------------------------
# Resolution and validation.
# --------------------------------------------------------------------------------------------


def _type_error(name: str, expected: Any, value: Any) -> str | None:
    """Check ``value`` against the annotation; bool is not accepted where int is expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    origin = getattr(expected, "__origin__", None)
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return None
        return f"{name} must be a mapping of names to strings, e.g. {{\"SENTRY_ENVIRONMENT\": \"production\"}}, not {value!r}"
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return None
        return f"{name} must be a list of strings, not {value!r}"
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return None
    return f"{name} must be of type {expected.__name__}, not {type(value).__name__} ({value!r})"


def _coerce(expected: Any, value: Any) -> Any:
    """``--data name=value`` arrives as a string: read it as the setting's type when it parses."""
    if not isinstance(value, str) or expected is str:
        return value
    try:
        if expected is int:
            return int(value)
        if expected is float:
            return float(value)
        if getattr(expected, "__origin__", None) is list:
            return [part for part in value.split(",") if part]
        if expected is bool and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    except ValueError:
        pass
    return value


def resolve(data: dict[str, Any]) -> tuple[Settings, list[str]]:
    """Settings from one host's data, and every problem found (unknown names, types, values)."""
    hints = get_type_hints(Settings)
    known = {item.name for item in fields(Settings)}
    problems: list[str] = []
    values: dict[str, Any] = {}

    for key in data:
        if key in known or key in HOST_KEYS or key.startswith(PYINFRA_KEY_PREFIXES):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see the settings table in README.md"
        problems.append(f"unknown setting {key!r}{hint}")

    for item in fields(Settings):
        if item.name not in data:
            continue
        value = _coerce(hints[item.name], data[item.name])
        error = _type_error(item.name, hints[item.name], value)
        if not error and item.metadata["check"]:
            check_error = item.metadata["check"](value)
            error = check_error and f"{item.name} {check_error} (got {value!r})"
        if error:
            problems.append(error)
        else:
            values[item.name] = value

    resolved = Settings(**values)
    return resolved, problems + resolved.cross_problems()


def private_address(host: Any) -> str:
    """The address other hosts reach ``host`` on: its ``private_address`` data, else its name."""
    return str(host.data.get("private_address") or host.name)


def _topology_problems(inventory: Any) -> list[str]:
    problems = []
    for host in inventory:
        address = private_address(host)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            problems.append(
                f"host {host.name}: private_address {address!r} is not an IP address; "
                "set private_address in inventory.py to the address other hosts reach it on"
            )
            continue
        if ip.is_loopback or ip.is_unspecified:
            problems.append(
                f"host {host.name}: private_address {address} is not reachable from other hosts; "
                "set it to the host's private network address"
            )
        if not any(group in host.groups for group in GROUPS):
            problems.append(
                f"host {host.name} is in no group; add it to one of {', '.join(GROUPS)} in inventory.py"
            )
    app_hosts = [resolve(h.data.dict())[0] for h in inventory if any(g in h.groups for g in APP_GROUPS)]
    for names in SAME_ON_APP_HOSTS:
        choices = {tuple(getattr(config, name) for name in names) for config in app_hosts}
        if len(choices) > 1:
            problems.append(
                f"application hosts disagree on {' / '.join(names)} ({sorted(choices)}); "
                "set them once, in group_data/all.py"
            )
    needed = {group: setting for config in app_hosts for group, setting in config.servers_needed.items()}
    for group in ("redis", "rabbitmq", "postgres", "monitoring"):
        servers = inventory.get_group(group, [])
        if len(servers) > 1:
            problems.append(
                f"group {group} has {len(servers)} hosts; this deploy runs exactly one {group} "
                "server: keep one host in it"
            )
        if not servers and group in needed:
            value = getattr(app_hosts[0], needed[group])
            problems.append(
                f"group {group} is empty but {needed[group]} = {value!r} needs it; add a host to {group} "
                f"or choose another {needed[group]}"
            )
    if inventory.get_group("front", []) and not inventory.get_group("web", []):
        problems.append("group front has hosts but group web has none to balance over; add a web host or empty front")
    beat = inventory.get_group("beat", [])
    if len(beat) != 1 and any(inventory.get_group(g, []) for g in ("web", "workers")):
        problems.append(
            f"group beat has {len(beat)} hosts; exactly one host must run celery beat, or scheduled tasks "
            "are sent twice or never: put one host in beat"
        )
    return problems


@cache
def validate(inventory: Any) -> Secrets:
    """Check the whole run once: every host's settings, the secrets and the topology."""
    hosts_with: dict[str, list[str]] = {}
    for host in inventory:
        for problem in resolve(host.data.dict())[1]:
            hosts_with.setdefault(problem, []).append(host.name)
    problems = [
        f"{'host' if len(names) == 1 else 'hosts'} {', '.join(names)}: {problem}"
        for problem, names in hosts_with.items()
    ]
    problems += _topology_problems(inventory)
    monitors = [resolve(h.data.dict())[0] for h in inventory.get_group("monitoring", [])]
    app_hosts = [resolve(h.data.dict())[0] for h in inventory if any(g in h.groups for g in APP_GROUPS)]
    app_variables = tuple(sorted({name for config in app_hosts for name in config.app_secret_variables}))
    try:
        secrets = load_secrets(grafana=any(config.grafana != "none" for config in monitors), app_variables=app_variables)
    except SettingsError as error:
        problems.append(str(error))
        secrets = None
    for config in monitors:
        if not (config.alert_webhook_url or config.alert_email_to or (secrets and secrets.alert_slack_webhook_url)):
            problems.append(
                "the monitoring host would alert nobody: set alert_webhook_url or alert_email_to, "
                "or STACK_ALERT_SLACK_WEBHOOK_URL in the environment or the secrets file"
            )
    if problems:
        raise SettingsError("invalid configuration, nothing was changed:\n  - " + "\n  - ".join(problems))
    return secrets


_resolved: dict[str, Settings] = {}


def for_host(host: Any) -> Settings:
    """Resolved settings of ``host`` (run ``validate`` first: problems are not reported here)."""
    if host.name not in _resolved:
        _resolved[host.name] = resolve(host.data.dict())[0]
    return _resolved[host.name]


# --------------------------------------------------------------------------------------------
# Documentation.
# --------------------------------------------------------------------------------------------


def markdown_table() -> str:
    """The settings and secrets tables exactly as README.md shows them."""
    lines = ["| Setting | Default | What it does |", "| --- | --- | --- |"]
    for item in fields(Settings):
        default = item.default_factory() if item.default is MISSING else item.default
        lines.append(f"| `{item.name}` | `{default!r}` | {item.metadata['help']} |")
    lines += ["", "| Secret (environment variable) | What it is |", "| --- | --- |"]
    for item in fields(Secrets):
        if "env" in item.metadata:
            lines.append(f"| `{item.metadata['env']}` | {item.metadata['help']} |")
    lines.append(f"| `{APP_SECRET_PREFIX}<NAME>` | Value of the application's secret variable NAME (setting app_secret_variables). |")
    return "\n".join(lines)


README_START, README_END = "<!-- settings table: generated by `python settings.py --readme` -->", "<!-- end of settings table -->"


def update_readme(path: Path = PROJECT_DIR / "README.md") -> None:
    """Replace the settings table between README.md's markers with the current one."""
    text = path.read_text()
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    path.write_text(f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        update_readme()
    else:
        sys.stdout.write(markdown_table() + "\n")
