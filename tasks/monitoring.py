"""
Prometheus and Alertmanager (Debian's packages) on the monitoring host, so that an operator is
told when anything dies. The exporters are in tasks/exporters.py; what Prometheus scrapes is
every port that a service declares with a scrape job (tasks/service.py), on every host.

Prometheus' configuration and alert rules are staged, checked with ``promtool check config``,
``promtool check rules`` and ``promtool test rules`` (the rules' unit tests), and only then
installed; Alertmanager's configuration is checked with ``amtool check-config`` the same way.
A check that fails stops the deploy with the running configuration untouched, and the next run
checks again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import FindInFile, Sha256File
from pyinfra.operations import files, server, systemd

import settings
from settings import checks
from tasks import packaged_service, rabbitmq, render, silences
from tasks.exporters import defaults_file
from tasks.service import Port, Run, Scrape, Service

STAGE = "/etc/prometheus/stack-staged"
#: The first line of every configuration file the deploy writes.
MANAGED = "Managed by the deploy"


def rules_context(config: settings.Settings, workers: int, queues: list[str]) -> dict:
    """What the alert rules and their unit tests are rendered with."""
    alert_for = int(checks.duration_seconds(config.alert_for))
    eval_seconds = alert_for + 900  # past `for` and the 10-minute deriv window
    old_backup = eval_seconds - config.backup_max_age_hours * 3600 - alert_for - 60
    return dict(
        alert_for=config.alert_for,
        restart_window=config.alert_restart_window,
        restart_range=f"[{config.alert_restart_window}]",
        backlog=config.queue_backlog_threshold,
        latency=config.alert_latency_seconds,
        backup_max_age_seconds=config.backup_max_age_hours * 3600,
        requests_range=f"[{silences.REQUESTS_WINDOW}]",
        # Queue names are [\w.-]+ (settings); a dot is the only character to quote, and "[.]"
        # needs no backslash inside the rules' double-quoted YAML strings.
        queues="|".join(queue.replace(".", "[.]") for queue in queues),
        workers=workers,
        dead_letters=rabbitmq.DEAD_LETTERS,
        app=config.app_name,
        eval_time=f"{eval_seconds}s",
        eval_seconds=eval_seconds,
        samples=eval_seconds // 15 + 20,
        # The sample, in the rules' unit tests, at which every alert is evaluated.
        eval_sample=eval_seconds // 15,
        backlog_at_eval=150 + 10 * (eval_seconds // 15),
        # The unit tests' too old backup: past the limit a minute before the alert's `for` began;
        # its age as the alert says it, from the last rule evaluation (every 15 s) at eval_time.
        backup_too_old_at=old_backup,
        backup_age_at_eval=humanize_duration(eval_seconds // 15 * 15 - old_backup),
    )


def humanize_duration(seconds: int) -> str:
    """Whole ``seconds`` as Prometheus' humanizeDuration writes them (its templates' "1d 2h 0m 11s")."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


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
        (path, target)
        for path, target in live.items()
        if host.get_fact(Sha256File, path=target) != _sha256(staged[path])
    ]
    if not differs:
        return None
    installs = [f"install -D -o root -g prometheus -m {mode} {path} {target}" for path, target in differs]
    tools = " and ".join(sorted({check.split()[0] for check in checks}))
    return server.shell(name=f"Check {label} with {tools}, then install it", commands=checks + installs)


def _checked_server(
    run: Run,
    label: str,
    unit: str,
    args: str,
    *,
    staged: dict[str, StringIO],
    live: dict[str, str],
    checks: list[str],
    mode: str,
    first_install: Callable[[OperationMeta], None] | None = None,
) -> None:
    """One server of the monitoring host: its flags in Debian's defaults file, its checked
    configuration (``_checked_install``), kept running, restarted when its flags changed and
    otherwise reloaded when its configuration was installed. ``first_install(installed)``,
    if given, runs between the install and the restart."""
    flags = defaults_file(label, unit, args)
    installed = _checked_install(f"the configuration of {label}", staged, live, checks, mode)
    if first_install is not None and installed is not None:
        first_install(installed)
    restarted = packaged_service(run, label, unit, [flags])
    if installed is not None:
        systemd.service(
            name=f"Reload {label} to apply the installed configuration",
            service=unit,
            reloaded=True,
            _if=lambda: installed.did_change() and not restarted.did_change(),
        )


def _discard_example_series(installed: OperationMeta) -> None:
    """The package started Prometheus with Debian's example configuration, whose series (no
    host label, every systemd unit) would linger five minutes and fire bogus alerts: on the
    first install of ours, throw them away."""
    if not host.get_fact(FindInFile, path="/etc/prometheus/prometheus.yml", pattern=MANAGED):
        server.shell(
            name="Discard what Prometheus gathered under Debian's example configuration (first deploy)",
            commands=["systemctl stop prometheus", "rm -rf /var/lib/prometheus/metrics2"],
            _if=installed.did_change,
        )


def prometheus_file(run: Run) -> StringIO:
    """Prometheus' configuration: every declared scrape job of the inventory, and this host's
    Alertmanager."""
    config = run.node.config
    return render(
        "monitoring/prometheus.yml.j2",
        scrape_interval=config.prometheus_scrape_interval,
        evaluation_interval=config.prometheus_evaluation_interval,
        alertmanager=f"{run.node.address}:{config.alertmanager_port}",
        blackbox=f"{run.node.address}:{config.blackbox_exporter_port}",
        jobs=run.wiring.scrape_jobs(),
    )


@deploy("Monitoring")
def monitoring_server(run: Run) -> None:
    """Prometheus, Alertmanager and the blackbox exporter on this (monitoring) host."""
    config, secrets, address = run.node.config, run.secrets, run.node.address
    prometheus, alertmanager = f"{address}:{config.prometheus_port}", f"{address}:{config.alertmanager_port}"
    context = rules_context(config, workers=len(run.wiring.hosts("workers")), queues=run.wiring.queues())
    _checked_server(
        run,
        "Prometheus",
        "prometheus",
        f'ARGS="--web.listen-address={prometheus} --storage.tsdb.retention.time={config.prometheus_retention}"\n',
        staged={
            f"{STAGE}/prometheus.yml": prometheus_file(run),
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
        first_install=_discard_example_series,
    )
    _checked_server(
        run,
        "Alertmanager",
        "prometheus-alertmanager",
        # An empty cluster address turns off Alertmanager's gossip, which would listen on every
        # interface (one Alertmanager here).
        f'ARGS="--web.listen-address={alertmanager} --cluster.listen-address="\n',
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
    # Debian's blackbox.yml (its http_2xx module) as it is: only where it listens is ours.
    flags = defaults_file(
        "the blackbox exporter",
        "prometheus-blackbox-exporter",
        'ARGS="--config.file /etc/prometheus/blackbox.yml '
        f'--web.listen-address={address}:{config.blackbox_exporter_port}"\n',
    )
    packaged_service(run, "the blackbox exporter", "prometheus-blackbox-exporter", [flags])


SERVICE = Service(
    name="monitoring",
    groups=("monitoring",),
    single=True,
    packages=lambda node: ["prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"],
    units=lambda node: [
        "prometheus.service",
        "prometheus-alertmanager.service",
        "prometheus-blackbox-exporter.service",
    ],
    ports=lambda node: [
        Port(node.config.prometheus_port, "Prometheus", scrapes=(Scrape("prometheus"),)),
        Port(node.config.alertmanager_port, "Alertmanager", scrapes=(Scrape("alertmanager"),)),
        Port(node.config.blackbox_exporter_port, "the blackbox exporter", scrapes=(Scrape("blackbox"),)),
    ],
    deploy=monitoring_server,
)
