"""
Monitoring, when the inventory has a monitoring host: Debian's exporters on the hosts they
watch, and Prometheus and Alertmanager (Debian's packages) on the monitoring host, so that an
operator is told when anything dies.

- node_exporter on every host, its systemd collector limited to the units of the stack;
- redis_exporter (with Redis' password, from a 0640 file) on the Redis host; it also reads the
  length of the Redis task queues;
- postgres_exporter on the PostgreSQL host, connecting over the local socket as its own role
  ``prometheus`` (peer authentication, no password; member of pg_monitor only);
- RabbitMQ's built-in prometheus plugin (tasks/rabbitmq.py), Flower for Celery (tasks/app.py)
  and the application's own /metrics are scraped where they run.

Every listener is on the host's private address. Prometheus' configuration (scrape targets from
the inventory) and alert rules are staged, checked with ``promtool check config``, ``promtool
check rules`` and ``promtool test rules`` (the rules' unit tests), and only then installed;
Alertmanager's configuration is checked with ``amtool check-config`` the same way. A check
that fails stops the deploy with the running configuration untouched, and the next run checks
again.
"""

from __future__ import annotations

import hashlib
import re
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FindInFile, Sha256File
from pyinfra.operations import files, postgresql, server, systemd

import settings
from tasks import address, group_hosts, packaged_service, render
from tasks.postgresql import PostgresValue

STAGE = "/etc/prometheus/stack-staged"
#: The first line of every configuration file the deploy writes.
MANAGED = "Managed by the deploy"
EXPORTER_ROLE = "prometheus"  # the Debian packages' system user, and so its peer-authenticated role


def enabled() -> bool:
    """Whether this inventory is monitored (it has a monitoring host)."""
    return bool(group_hosts("monitoring"))


def packages(groups: list[str]) -> list[str]:
    """Debian packages of the monitoring parts a host with ``groups`` runs."""
    if not enabled():
        return []
    # node_exporter's systemd collector talks to systemd over D-Bus.
    wanted = ["prometheus-node-exporter", "dbus"]
    if "redis" in groups:
        wanted.append("prometheus-redis-exporter")
    if "postgres" in groups:
        wanted.append("prometheus-postgres-exporter")
    if "monitoring" in groups:
        wanted += ["prometheus", "prometheus-alertmanager"]
        if settings.for_host(host).grafana == "apt":
            wanted.append("curl")  # fetches the repository's signing key (files.download)
    return wanted


def watched_units(app: str) -> str:
    """Regular expression of the units node_exporter reports (no backslash: it would need
    escaping twice over in Debian's ARGS file)."""
    return f"(redis-server|rabbitmq-server|postgresql@.+|nginx|{app}-.+|prometheus.*)[.](service|socket)"


def _listen(port: int) -> str:
    return f"{address()}:{port}"


def _defaults_file(label: str, package: str, content: str, mode: str = "0644") -> OperationMeta:
    """Debian's /etc/default file of ``package`` (its unit reads ARGS and variables there)."""
    return files.put(
        name=f"Configure {label} (private address{', secret' if mode == '0640' else ''})",
        src=StringIO(content),
        dest=f"/etc/default/{package}",
        user="root",
        group="prometheus",
        mode=mode,
    )


@deploy("Monitoring exporters")
def exporters(secrets: settings.Secrets) -> None:
    """The exporters of this host's roles; nothing if the inventory has no monitoring host."""
    if not enabled():
        return
    config = settings.for_host(host)
    node = _defaults_file(
        "node_exporter",
        "prometheus-node-exporter",
        f'ARGS="--web.listen-address={_listen(config.node_exporter_port)} --collector.systemd '
        f'--collector.systemd.unit-include={watched_units(config.app_name)}"\n',
    )
    packaged_service("node_exporter", "prometheus-node-exporter", [node])

    if "redis" in host.groups:
        keys = ",".join(f"db{config.redis_broker_db}={queue}" for queue in config.celery_queues.split(","))
        redis = _defaults_file(
            "redis_exporter",
            "prometheus-redis-exporter",
            f"REDIS_ADDR=redis://127.0.0.1:{config.redis_port}\n"
            f"REDIS_PASSWORD={secrets.redis_password}\n"
            f'ARGS="-web.listen-address {_listen(config.redis_exporter_port)} -check-single-keys {keys}"\n',
            mode="0640",
        )
        packaged_service("redis_exporter", "prometheus-redis-exporter", [redis])

    if "postgres" in host.groups:
        _postgres_exporter(config)


def _postgres_exporter(config: settings.Settings) -> None:
    """postgres_exporter as its own least-privilege role, over the local socket: Debian's unit
    fails until it has a data source."""
    psql = dict(psql_port=config.postgresql_port, _sudo_user="postgres")
    postgresql.role(name=f"Create role {EXPORTER_ROLE} for postgres_exporter", role=EXPORTER_ROLE, login=True, **psql)
    member = host.get_fact(
        PostgresValue,
        sql=f"SELECT pg_has_role('{EXPORTER_ROLE}', 'pg_monitor', 'member')",
        port=config.postgresql_port,
        _sudo_user="postgres",
    )
    if member != "t":  # not a member, or the role does not exist yet
        postgresql.sql(
            name=f"Let role {EXPORTER_ROLE} read statistics (pg_monitor) and nothing else",
            sql=f"GRANT pg_monitor TO {EXPORTER_ROLE}",
            **psql,
        )
    data_source = f"user={EXPORTER_ROLE} host=/run/postgresql port={config.postgresql_port} dbname=postgres sslmode=disable"
    exporter = _defaults_file(
        "postgres_exporter",
        "prometheus-postgres-exporter",
        f"DATA_SOURCE_NAME='{data_source}'\n"
        f'ARGS="--web.listen-address={_listen(config.postgres_exporter_port)}"\n',
    )
    packaged_service("postgres_exporter", "prometheus-postgres-exporter", [exporter])


# --------------------------------------------------------------------------------------------
# The monitoring host.
# --------------------------------------------------------------------------------------------


def _target(server, port: int) -> tuple[str, str]:
    return f"{settings.private_address(server)}:{port}", server.name


def scrape_jobs() -> list[dict]:
    """Prometheus' scrape jobs besides its own and Alertmanager's, from the inventory: each
    target with the port its own host's settings give."""
    every_host = {h.name: h for g in settings.GROUPS for h in group_hosts(g)}.values()
    jobs = [dict(name="node", targets=[_target(h, settings.for_host(h).node_exporter_port) for h in every_host])]
    for group, name, port in (
        ("redis", "redis", "redis_exporter_port"),
        ("postgres", "postgres", "postgres_exporter_port"),
        ("rabbitmq", "rabbitmq", "rabbitmq_prometheus_port"),
        ("beat", "flower", "flower_port"),
        ("web", "app", "web_port"),
    ):
        servers = group_hosts(group)
        if servers:
            jobs.append(dict(name=name, targets=[_target(h, getattr(settings.for_host(h), port)) for h in servers]))
    for broker in group_hosts("rabbitmq"):
        rabbit = settings.for_host(broker)
        jobs.append(
            dict(
                name="rabbitmq-queues",
                path="/metrics/detailed",
                params={"family": ["queue_coarse_metrics", "queue_consumer_count"], "vhost": [rabbit.rabbitmq_vhost]},
                targets=[_target(broker, rabbit.rabbitmq_prometheus_port)],
            )
        )
    return [{"path": None, "params": None, **job} for job in jobs]


def duration_seconds(value: str) -> int:
    """Seconds of a Prometheus duration such as 1m30s (validated by settings)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return int(sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", value)))


def rules_context(config: settings.Settings) -> dict:
    """What the alert rules and their unit tests are rendered with."""
    eval_seconds = duration_seconds(config.alert_for) + 900  # past `for` and the 10-minute deriv window
    return dict(
        alert_for=config.alert_for,
        backlog=config.queue_backlog_threshold,
        # Queue names are [\w.-]+ (settings); a dot is the only character to quote, and "[.]"
        # needs no backslash inside the rules' double-quoted YAML strings.
        queues="|".join(queue.replace(".", "[.]") for queue in config.celery_queues.split(",")),
        workers=len(group_hosts("workers")),
        eval_time=f"{eval_seconds}s",
        samples=eval_seconds // 15 + 20,
        backlog_at_eval=150 + 10 * (eval_seconds // 15),
    )


def _sha256(content: StringIO) -> str:
    return hashlib.sha256(content.getvalue().encode()).hexdigest()


def _checked_install(
    label: str, staged: dict[str, StringIO], live: dict[str, str], checks: list[str], mode: str
) -> OperationMeta | None:
    """Upload ``staged`` (path → content) to the staging directory; when a live file differs
    from its staged content, run ``checks``, then install the staged files over the live ones.
    The install operation, or None if every live file is already right."""
    for path, content in staged.items():
        files.put(
            name=f"Stage {label}: {path.removeprefix(STAGE + '/')}",
            src=content,
            dest=path,
            user="root",
            group="prometheus",
            mode=mode,
            create_remote_dir=True,
        )
    differs = [
        (path, target) for path, target in live.items() if host.get_fact(Sha256File, path=target) != _sha256(staged[path])
    ]
    if not differs:
        return None
    installs = [f"install -D -o root -g prometheus -m {mode} {path} {target}" for path, target in differs]
    tools = " and ".join(sorted({check.split()[0] for check in checks}))
    return server.shell(name=f"Check {label} with {tools}, then install it", commands=checks + installs)


@deploy("Monitoring")
def monitoring_server(secrets: settings.Secrets) -> None:
    """Prometheus and Alertmanager on this (monitoring) host."""
    config = settings.for_host(host)
    prometheus, alertmanager = _listen(config.prometheus_port), _listen(config.alertmanager_port)

    flags = _defaults_file(
        "Prometheus",
        "prometheus",
        f'ARGS="--web.listen-address={prometheus} --storage.tsdb.retention.time={config.prometheus_retention}"\n',
    )
    context = rules_context(config)
    installed = _checked_install(
        "Prometheus' configuration and alert rules",
        staged={
            f"{STAGE}/prometheus.yml": render(
                "monitoring/prometheus.yml.j2",
                scrape_interval=config.prometheus_scrape_interval,
                evaluation_interval=config.prometheus_evaluation_interval,
                prometheus=prometheus,
                alertmanager=alertmanager,
                jobs=scrape_jobs(),
            ),
            f"{STAGE}/rules/stack.yml": render("monitoring/rules.yml.j2", brackets=True, **context),
            f"{STAGE}/tests/stack.test.yml": render("monitoring/rules.test.yml.j2", brackets=True, **context),
        },
        live={
            f"{STAGE}/prometheus.yml": "/etc/prometheus/prometheus.yml",
            f"{STAGE}/rules/stack.yml": "/etc/prometheus/rules/stack.yml",
        },
        checks=[
            f"promtool check config {STAGE}/prometheus.yml",
            f"promtool check rules {STAGE}/rules/stack.yml",
            f"promtool test rules {STAGE}/tests/stack.test.yml",
        ],
        mode="0644",
    )
    if installed is not None and not host.get_fact(FindInFile, path="/etc/prometheus/prometheus.yml", pattern=MANAGED):
        # The package started Prometheus with Debian's example configuration, whose series (no
        # host label, every systemd unit) would linger five minutes and fire bogus alerts.
        server.shell(
            name="Discard what Prometheus gathered under Debian's example configuration (first deploy)",
            commands=["systemctl stop prometheus", "rm -rf /var/lib/prometheus/metrics2"],
            _if=installed.did_change,
        )
    restarted = packaged_service("Prometheus", "prometheus", [flags])
    _reload_unless_restarted("Prometheus", "prometheus", installed, restarted)

    am_flags = _defaults_file(
        "Alertmanager",
        "prometheus-alertmanager",
        # An empty cluster address turns off Alertmanager's gossip, which would listen on every
        # interface (one Alertmanager here).
        f'ARGS="--web.listen-address={alertmanager} --cluster.listen-address="\n',
    )
    am_installed = _checked_install(
        "Alertmanager's configuration",
        staged={
            f"{STAGE}/alertmanager.yml": render(
                "monitoring/alertmanager.yml.j2",
                group_wait=config.alertmanager_group_wait,
                group_interval=config.alertmanager_group_interval,
                repeat_interval=config.alertmanager_repeat_interval,
                webhook_url=config.alert_webhook_url,
                email_to=config.alert_email_to,
                email_from=config.alert_email_from,
                smarthost=config.alert_smtp_smarthost,
                smtp_username=config.alert_smtp_username,
                smtp_password=secrets.alert_smtp_password,
                slack_url=secrets.alert_slack_webhook_url,
                slack_channel=config.alert_slack_channel,
                watchdog_url=config.alert_watchdog_url,
            )
        },
        live={f"{STAGE}/alertmanager.yml": "/etc/prometheus/alertmanager.yml"},
        checks=[f"amtool check-config {STAGE}/alertmanager.yml"],
        mode="0640",
    )
    am_restarted = packaged_service("Alertmanager", "prometheus-alertmanager", [am_flags])
    _reload_unless_restarted("Alertmanager", "prometheus-alertmanager", am_installed, am_restarted)


def _reload_unless_restarted(label: str, unit: str, installed: OperationMeta | None, restarted: OperationMeta) -> None:
    if installed is None:
        return
    systemd.service(
        name=f"Reload {label} to apply the installed configuration",
        service=unit,
        reloaded=True,
        _if=lambda: installed.did_change() and not restarted.did_change(),
    )
