"""
Every knob of the deployment, with its default and one sentence, in one place; and the secrets,
each with the environment variable it comes from. ``settings/validation.py`` checks values and
the whole inventory, ``settings/secrets.py`` reads the secrets, ``settings/docs.py`` renders the
table docs/settings.md shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from settings import checks

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
#: systemd waits this long beyond the longest task before it kills a stopping worker.
STOP_MARGIN_SECONDS = 30

#: The value of the application's secret variable NAME comes from STACK_APP_<NAME>.
APP_SECRET_PREFIX = "STACK_APP_"


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare a setting: its default, the sentence the settings table shows, and an optional check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class Settings:
    """Settings of one host, resolved from its pyinfra host data over these defaults."""

    # Base system
    apt_proxy: str = setting(
        "", "HTTP proxy for apt on every host (e.g. an apt-cacher-ng); empty for none.", checks.url_or_empty
    )
    apt_cache_valid_seconds: int = setting(
        3600, "apt's package lists younger than this are not refreshed on a re-run.", checks.positive
    )
    extra_ca_certificates: list[str] = setting(
        [],
        "Paths, on the machine running pyinfra, of PEM CA certificates every host must trust "
        "(TLS-intercepting proxies, private mirrors).",
        checks.ca_files,
    )

    # Redis
    redis_port: int = setting(6379, "TCP port Redis listens on (private address and loopback).", checks.port)
    redis_save: str = setting(
        "3600 1 300 100 60 10000",
        "RDB snapshot points: pairs of <seconds> <changes> after which Redis snapshots to disk.",
        checks.save_points,
    )
    redis_appendfsync: Literal["everysec", "always"] = setting(
        "everysec",
        "AOF fsync policy: everysec loses at most about one second of writes on a host crash; "
        "always loses none and is slower.",
    )

    redis_maxmemory: str = setting(
        "auto",
        "Redis' memory limit (maxmemory, e.g. 2GB or 512MB); auto is half the host's memory. At the limit "
        "Redis refuses writes instead of evicting a queued task or a result (noeviction), and an alert fires. "
        "Refused when more than the host's memory.",
        checks.size_or_auto,
    )
    redis_broker_db: int = setting(0, "Redis database of the broker's queues (celery_broker = redis).", checks.db_index)
    redis_result_db: int = setting(
        1, "Redis database of task results (celery_result_backend = redis).", checks.db_index
    )
    redis_visibility_timeout_seconds: int = setting(
        7200,
        "With Redis as broker, a task a worker took but did not acknowledge (it crashed) is given to "
        "another worker after this long; must exceed the longest task and any ETA or countdown.",
        checks.positive,
    )

    # RabbitMQ
    rabbitmq_port: int = setting(5672, "AMQP port RabbitMQ listens on (private address and loopback).", checks.port)
    rabbitmq_prometheus_port: int = setting(
        15692, "Port of RabbitMQ's built-in Prometheus endpoint (private address).", checks.port
    )
    rabbitmq_vhost: str = setting("celery", "RabbitMQ virtual host of the application.", checks.identifier)
    rabbitmq_user: str = setting(
        "celery", "RabbitMQ user of the application (all rights on its vhost only).", checks.identifier
    )
    rabbitmq_disk_free_limit: str = setting(
        "1GB", "RabbitMQ blocks publishers when free disk falls below this (disk_free_limit.absolute).", checks.size
    )
    rabbitmq_vm_memory_high_watermark: float = setting(
        0.4, "Fraction of RAM at which RabbitMQ blocks publishers (vm_memory_high_watermark.relative).", checks.fraction
    )
    rabbitmq_consumer_timeout_ms: int = setting(
        3_600_000,
        "A delivery not acknowledged within this many ms closes its channel and is redelivered; "
        "must exceed the longest task, since tasks are acknowledged when they finish.",
        checks.positive,
    )
    rabbitmq_queue_type: Literal["quorum", "classic"] = setting(
        "quorum",
        "Type of the application's queues: quorum (a delivery limit for poison tasks, countdown/ETA tasks "
        "delayed in RabbitMQ, not held by a worker; needs Celery 5.6 in the app, else classic is used and "
        "the deploy says so) or classic. RabbitMQ cannot change a queue's type: queues that exist with the "
        "other one stop the deploy (those of a deployment made before this setting are classic).",
    )
    rabbitmq_delivery_limit: int = setting(
        20,
        "Quorum queues: a task delivered this many times (its process died each time) is moved to the "
        "vhost's dead-letters queue, an alert fires, and <app>-dead-letters replays it.",
        checks.positive,
    )

    # PostgreSQL
    postgresql_version: str = setting(
        "auto",
        "Major version of the distribution's PostgreSQL; \"auto\" picks the release's default.",
        checks.pg_version,
    )
    postgresql_port: int = setting(5432, "TCP port PostgreSQL listens on (private address and loopback).", checks.port)
    postgresql_database: str = setting("celerydb", "Database holding Celery's results.", checks.identifier)
    postgresql_user: str = setting(
        "celeryuser", "Role owning that database, used by the application.", checks.identifier
    )

    # Backups (tasks/backup.py)
    backup_full_calendar: str = setting(
        "Sun *-*-* 01:00:00",
        "When pgBackRest takes a full backup (a systemd OnCalendar expression; a run missed while the "
        "host was down is taken at boot).",
        checks.calendar,
    )
    backup_diff_calendar: str = setting(
        "Mon..Sat *-*-* 01:00:00",
        "When pgBackRest takes a differential backup (changes since the last full one); must not overlap "
        "backup_full_calendar.",
        checks.calendar,
    )
    backup_retention_full: int = setting(
        2,
        "Full backups kept (with their differentials and the WAL to replay them); older ones expire.",
        checks.positive,
    )
    backup_max_age_hours: int = setting(
        26,
        "Alert (BackupTooOld) when the last successful backup, full or differential, is older than this: "
        "a day between backups, and time for one to run.",
        checks.positive,
    )
    backup_archive_timeout_seconds: int = setting(
        60,
        "PostgreSQL switches to a new WAL segment, archived at once, at least this often while it is written: "
        "the most a lost database host loses (RPO).",
        checks.positive,
    )

    # Choices
    celery_broker: Literal["rabbitmq", "redis"] = setting(
        "rabbitmq",
        'Message broker: "rabbitmq" (durable queues, publisher confirms) or "redis" (lists persisted by AOF).',
    )
    celery_result_backend: Literal["postgresql", "redis"] = setting(
        "postgresql", 'Where task results are stored: "postgresql" or "redis".'
    )

    # Application
    app_name: str = setting(
        "stackapp",
        "Name of the application: its system user and group, unit prefix and /opt/<name>.",
        checks.identifier,
    )
    app_dir: str = setting(
        "", "Where the application lives on hosts; empty means /opt/<app_name>.", checks.absolute_or_empty
    )
    app_source: str = setting(
        "files/app",
        "The application: a local directory (relative to deploy.py or absolute), a git repository URL "
        "(fetched on this machine at app_git_ref, then synced like a directory), or a built wheel or "
        "sdist file, installed into the venv.",
        checks.app_source,
    )
    app_git_ref: str = setting(
        "", "Branch, tag or commit of a git app_source; empty for the repository's default branch.", checks.git_ref
    )
    app_git_ssh_key: str = setting(
        "",
        "Private deploy key (path on this machine) for an ssh git app_source; it never leaves this machine.",
        checks.local_file_or_empty,
    )
    app_sync_exclude: list[str] = setting(
        [],
        "File or directory name patterns not synced to hosts, beyond .git, venvs, caches and *.pyc.",
    )
    app_workdir: str = setting(
        "",
        "Directory inside the source tree the services run in (projects read templates and static files "
        "relative to it); empty for the tree's root.",
        checks.relative_path,
    )
    app_requirements: str = setting(
        "requirements.txt",
        'What the venv installs from the source tree: a pinned requirements file, "pyproject.toml" to '
        "install the project itself (with its dependencies), or empty for nothing. Not used for a wheel/sdist.",
        checks.relative_path,
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
    app_writable_paths: list[str] = setting(
        [],
        "Directories the application's processes may write (uploads, caches, reports), shared by its web, "
        "worker and beat processes; created owned by the app user, kept when removed from this list. "
        "Everything else is read-only to them.",
        checks.writable_paths,
    )
    app_python: str = setting(
        "python3", "Python interpreter the venv is made with (a command on the hosts, e.g. python3.11).", checks.command
    )
    app_environment: dict[str, str] = setting(
        {},
        "Extra environment variables of every application process (secrets go in app_secret_variables).",
        checks.environment,
    )
    app_secret_variables: list[str] = setting(
        [],
        "Names of secret environment variables of the application; each value comes from STACK_APP_<NAME> "
        "in the environment or the secrets file.",
        checks.variable_names,
    )
    app_broker_url_variables: list[str] = setting(
        ["CELERY_BROKER_URL"],
        "Environment variables that carry the broker URL to the application.",
        checks.variable_names,
    )
    app_result_backend_variables: list[str] = setting(
        ["CELERY_RESULT_BACKEND"],
        "Environment variables that carry the result backend URL to the application.",
        checks.variable_names,
    )
    celery_enforce_durability: bool = setting(
        True,
        "Apply the deploy's no-task-lost Celery settings (late acks, requeue on worker loss, prefetch 1, "
        "publisher confirms, retries) over the application's own configuration.",
    )
    asgi_app: str = setting(
        "stackapp.api:app", "Import path of the ASGI application Gunicorn serves.", checks.import_path
    )
    celery_app: str = setting(
        "stackapp.celery_app", "Import path of the Celery application (celery -A).", checks.import_path
    )
    app_health_path: str = setting(
        "/healthz",
        "Path every web host must answer with a 2xx, through its own socket, before a deploy succeeds "
        "(the health gate, docs/deploy.md); the reference app's /healthz also checks the broker and results.",
        checks.url_path,
    )
    app_metrics_path: str = setting(
        "/metrics",
        "Path of the application's Prometheus metrics on every web host, scraped by the monitoring host and "
        "checked by the health gate (the reference app's /metrics); empty if the application exports none.",
        checks.metrics_path_or_empty,
    )
    app_health_timeout_seconds: int = setting(
        60,
        "How long the health gate waits for the web hosts to answer app_health_path and the workers to answer "
        "a Celery ping, after a deploy, before it fails the deploy.",
        checks.positive,
    )
    app_release: str = setting(
        "",
        "Which release the application hosts run: empty for the one app_source and the settings build; "
        '"previous" to roll back to the one run before it, or a release id (ls <app_dir>/releases), '
        "without building anything.",
        checks.release,
    )
    app_releases_kept: int = setting(
        3,
        "Releases (code and venv) kept on each application host, the running one included: a failed health "
        "gate or app_release=previous switches back to one of them.",
        checks.releases_kept,
    )
    app_batch_size: int = setting(
        1,
        "How many application hosts replace their release at once (sorted by name); the next batch waits "
        "for their health gates, and a front stops sending them requests meanwhile. The same on every "
        "application host.",
        checks.positive,
    )
    pip_index_url: str = setting(
        "", "Python package index for the venv (a mirror); empty for pip's default.", checks.url_or_empty
    )
    web_port: int = setting(
        8000, "Port Gunicorn listens on (systemd socket on the private address and loopback).", checks.port
    )
    gunicorn_workers: int = setting(2, "Gunicorn worker processes (Uvicorn workers) per web host.", checks.positive)
    celery_concurrency: int = setting(
        2, "Celery worker pool processes per worker host (per worker group: group_data/<group>.py).", checks.positive
    )
    celery_queues: str = setting(
        "celery",
        "Comma-separated queues the workers consume (per worker group: set it in group_data/<group>.py).",
        checks.queue_list,
    )
    celery_loglevel: LogLevel = setting("INFO", "Log level of the Celery worker and beat.")
    celery_longest_task_seconds: int = setting(
        300,
        "The longest a task runs: a worker stop waits this long plus 30 s for running tasks to finish "
        "(TimeoutStopSec), and RabbitMQ's consumer timeout and Redis' visibility timeout must exceed it. "
        "No task is stopped for running longer (that is celery_task_time_limit_seconds).",
        checks.positive,
    )
    celery_task_time_limit_seconds: int = setting(
        0,
        "Celery's hard time limit (worker --time-limit), 0 for none: the application's own limits apply. "
        "A task over it is killed and ends FAILURE (TimeLimitExceeded), acknowledged: it is not run again.",
        checks.zero_or_positive,
    )
    celery_publish_retry_seconds: int = setting(
        600,
        "How long beat and the workers keep retrying to publish a task (a periodic run, a task sent by a "
        "task) while the broker is unreachable, before they log the error and drop it. The API retries "
        "for about 2 s and answers 503.",
        checks.positive,
    )
    celery_chord_timeout_seconds: int = setting(
        86400,
        "With the PostgreSQL result backend, how long a chord waits for its header's tasks before it fails. "
        "Celery's chord_unlock polls their results every second, for ever by default, so a chord whose "
        "publishing failed halfway (the API answers 503 while RabbitMQ blocks publishers) would poll for "
        "ever for tasks never sent. 0: no limit. (Celery 5.7 then fails the chord's callback; an older one "
        "leaves it pending.)",
        checks.zero_or_positive,
    )
    beat_heartbeat_seconds: float = setting(
        60.0,
        "Interval of the heartbeat task beat sends, which shows that beat and a worker are alive.",
        checks.positive,
    )

    # Front (hosts of the front group)
    front_port: int = setting(80, "Port nginx serves the application on, on front hosts (every address).", checks.port)
    front_fail_timeout_seconds: int = setting(
        10, "A web host that failed a request is left out of the balancing for this long.", checks.positive
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
        checks.networks,
    )

    # Monitoring (hosts of the monitoring group; exporters on every host when there is one)
    prometheus_port: int = setting(9090, "Port of Prometheus (private address of the monitoring host).", checks.port)
    prometheus_retention: str = setting("15d", "How long Prometheus keeps samples.", checks.duration)
    prometheus_scrape_interval: str = setting("15s", "How often Prometheus scrapes every target.", checks.duration)
    prometheus_evaluation_interval: str = setting(
        "15s", "How often Prometheus evaluates the alert rules.", checks.duration
    )
    alert_for: str = setting(
        "30s",
        "How long a condition must hold before its alert fires (the rules' `for`). With the default scrape, "
        "evaluation and group_wait, a unit that dies is notified within 75 s; the deploy silences what it "
        "restarts meanwhile.",
        checks.duration,
    )
    alert_latency_seconds: float = setting(
        2.0,
        "The 95th percentile over 5 minutes of the requests' latency through the front, and of the health "
        "probes' duration, above which AppLatencyHigh warns.",
        checks.positive,
    )
    alert_restart_window: str = setting(
        "15m",
        "How long an incident that healed in seconds stays alerted: a unit systemd restarted after its "
        "process died (UnitRestarted, warning; UnitCrashLooping, critical, from the third restart), a host "
        "that rebooted (HostRebooted), a task whose pool process died (TaskProcessDied), a Gunicorn worker "
        "killed or timed out (GunicornWorkerDied), a RabbitMQ memory or disk alarm that cleared. At least 4 scrape and evaluation intervals.",
        checks.duration,
    )
    alertmanager_port: int = setting(
        9093, "Port of Alertmanager (private address of the monitoring host).", checks.port
    )
    alertmanager_group_wait: str = setting(
        "10s", "Alertmanager waits this long to group a new alert's first notification.", checks.duration
    )
    alertmanager_group_interval: str = setting(
        "5m", "Alertmanager waits this long before notifying about changes to a group.", checks.duration
    )
    alertmanager_repeat_interval: str = setting(
        "4h", "A still-firing alert is notified again after this long.", checks.duration
    )
    alert_webhook_url: str = setting(
        "",
        "Generic webhook that receives every alert (JSON, firing and resolved); empty for none.",
        checks.url_or_empty,
    )
    alert_email_to: str = setting(
        "", "Address that receives every alert by e-mail; empty for none.", checks.email_or_empty
    )
    alert_email_from: str = setting(
        "", "Sender address of alert e-mails (needed with alert_email_to).", checks.email_or_empty
    )
    alert_smtp_smarthost: str = setting(
        "", 'SMTP server "host:port" for alert e-mails (needed with alert_email_to).', checks.host_port_or_empty
    )
    alert_smtp_username: str = setting("", "SMTP user for alert e-mails; the password is STACK_ALERT_SMTP_PASSWORD.")
    alert_slack_channel: str = setting(
        "", "Channel of the Slack-compatible webhook in STACK_ALERT_SLACK_WEBHOOK_URL (empty: the webhook's default)."
    )
    alert_watchdog_url: str = setting(
        "",
        "Dead man's switch: receives the always-firing Watchdog alert, so its silence means alerting is down; empty for none.",
        checks.url_or_empty,
    )
    node_exporter_port: int = setting(9100, "Port of node_exporter on every host (private address).", checks.port)
    redis_exporter_port: int = setting(9121, "Port of redis_exporter on the Redis host (private address).", checks.port)
    postgres_exporter_port: int = setting(
        9187, "Port of postgres_exporter on the PostgreSQL host (private address).", checks.port
    )
    front_metrics_port: int = setting(
        3903,
        "Port of mtail on each front host (private address): the requests nginx served, by status, and "
        "their latency, for any application.",
        checks.port,
    )
    blackbox_exporter_port: int = setting(
        9115,
        "Port of the blackbox exporter on the monitoring host (private address), which probes app_health_path "
        "on every web host and through the front.",
        checks.port,
    )
    flower_port: int = setting(
        5555, "Port of Flower (Celery's monitor and metrics) on the beat host (private address).", checks.port
    )
    queue_backlog_threshold: int = setting(
        100, "Tasks waiting in a queue above which a still-growing backlog alerts.", checks.positive
    )
    grafana: Literal["apt", "deb", "none"] = setting(
        "apt",
        'How Grafana is installed on the monitoring host: "apt" (grafana_apt_repository), "deb" (grafana_deb), or "none".',
    )
    grafana_port: int = setting(3000, "Port of Grafana (private address of the monitoring host).", checks.port)
    grafana_apt_repository: str = setting(
        "https://apt.grafana.com",
        "Grafana's APT repository (or a mirror of it); suite stable, component main.",
        checks.url_or_empty,
    )
    grafana_apt_key_url: str = setting(
        "https://apt.grafana.com/gpg.key", "Signing key of that repository (ASCII-armoured).", checks.url_or_empty
    )
    grafana_deb: str = setting("", 'Local path of a grafana .deb to install when grafana is "deb".')

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
        needed.setdefault(
            "postgres" if self.celery_result_backend == "postgresql" else "redis", "celery_result_backend"
        )
        return needed


@dataclass(frozen=True)
class Secrets:
    """Passwords, read from the environment or the untracked secrets file (environment wins).

    ``when`` says when a secret is required: always, with Grafana (a monitoring host whose
    ``grafana`` is not "none"), or never (an optional credential of an external service)."""

    redis_password: str = field(
        metadata={"env": "STACK_REDIS_PASSWORD", "help": "Redis requirepass.", "when": "always"}
    )
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
    backup_cipher_pass: str = field(
        metadata={
            "env": "STACK_BACKUP_CIPHER_PASS",
            "help": "Passphrase of the backup repository's encryption (aes-256-cbc), and the seed of the "
            "backup hosts' SSH keys. Keep a copy off the hosts: no backup can be read without it.",
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
        metadata={
            "env": "STACK_ALERT_SMTP_PASSWORD",
            "help": "Password of alert_smtp_username (optional).",
            "when": "never",
        },
    )
    alert_slack_webhook_url: str = field(
        default="",
        metadata={
            "env": "STACK_ALERT_SLACK_WEBHOOK_URL",
            "help": "Slack-compatible incoming webhook URL that receives every alert (optional).",
            "when": "never",
            "check": checks.url_or_empty,
        },
    )
    #: Values of the application's own secret variables (setting app_secret_variables), by name.
    app_variables: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "Secrets(<hidden>)"
