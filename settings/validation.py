"""
Resolution and validation: each host's data read as settings (types, values, settings that
contradict each other), the secrets, and the whole inventory (addresses, roles, the servers the
choices need), all checked when the deploy starts; one error lists every problem, with its fix,
before any host is touched. Each host's settings are resolved once per run.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from settings import checks
from settings.common import APP_GROUPS, GROUPS, PROJECT_DIR, SettingsError
from settings.declarations import Secrets, Settings
from settings.secrets import load_secrets

#: Settings every application host must share: one broker, one result store, one code base.
SAME_ON_APP_HOSTS = (("celery_broker", "celery_result_backend"), ("app_source", "app_git_ref"), ("app_batch_size",))
#: Per-host data that is not a setting: the address other hosts reach this one on.
HOST_KEYS = ("private_address",)
#: Host data that belongs to pyinfra and its connectors, not to us.
PYINFRA_KEY_PREFIXES = ("_", "ssh_", "winrm_", "docker_", "podman_", "chroot_", "local_", "terraform_")


def _type_error(name: str, expected: Any, value: Any) -> str | None:
    """Check ``value`` against the annotation; bool is not accepted where int is expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    origin = get_origin(expected)
    if origin is Literal:
        choices = [f'"{choice}"' for choice in get_args(expected)]
        if value in get_args(expected):
            return None
        listed = " or ".join(choices) if len(choices) <= 3 else "one of " + ", ".join(choices)
        return f"{name} must be {listed} (got {value!r})"
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return None
        return (
            f'{name} must be a mapping of names to strings, e.g. {{"SENTRY_ENVIRONMENT": "production"}}, not {value!r}'
        )
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return None
        return f"{name} must be a list of strings, not {value!r}"
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return None
    return f"{name} must be of type {expected.__name__}, not {type(value).__name__} ({value!r})"


def _coerce(expected: Any, value: Any) -> Any:
    """``--data name=value`` arrives as a string: read it as the setting's type when it parses."""
    if not isinstance(value, str) or expected is str or get_origin(expected) is Literal:
        return value
    try:
        if expected is int:
            return int(value)
        if expected is float:
            return float(value)
        if get_origin(expected) is list:
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
        hint = f"; did you mean {close[0]}?" if close else "; see the settings table in docs/settings.md"
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
    return resolved, problems + cross_problems(resolved)


#: Each distinct host data's resolution, once per run: resolving reads CA files and source
#: trees, and the deploy asks for every host's settings from every host's deploy.
_resolutions: dict[str, tuple[Settings, list[str]]] = {}


def resolution(data: dict[str, Any]) -> tuple[Settings, list[str]]:
    """``resolve(data)``, computed once for the same data."""
    key = json.dumps(data, sort_keys=True, default=repr)
    if key not in _resolutions:
        _resolutions[key] = resolve(data)
    return _resolutions[key]


def for_host(host: Any) -> Settings:
    """Resolved settings of ``host`` (``validate`` reports their problems)."""
    return resolution(host.data.dict())[0]


def private_address(host: Any) -> str:
    """The address other hosts reach ``host`` on: its ``private_address`` data, else its name."""
    return str(host.data.get("private_address") or host.name)


def _topology_problems(inventory: Any, single_server_groups: tuple[str, ...]) -> list[str]:
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
            problems.append(f"host {host.name} is in no group; add it to one of {', '.join(GROUPS)} in inventory.py")
    app_hosts = [for_host(h) for h in inventory if any(g in h.groups for g in APP_GROUPS)]
    for names in SAME_ON_APP_HOSTS:
        choices = {tuple(getattr(config, name) for name in names) for config in app_hosts}
        if len(choices) > 1:
            problems.append(
                f"application hosts disagree on {' / '.join(names)} ({sorted(choices)}); "
                "set them once, in group_data/all.py"
            )
    needed = {group: setting for config in app_hosts for group, setting in config.servers_needed.items()}
    for group in single_server_groups:
        servers = inventory.get_group(group, [])
        if len(servers) > 1:
            problems.append(
                f"group {group} has {len(servers)} hosts; this deploy runs exactly one {group} "
                "server: keep one host in it"
            )
    for group, setting in needed.items():
        if not inventory.get_group(group, []):
            value = getattr(app_hosts[0], setting)
            problems.append(
                f"group {group} is empty but {setting} = {value!r} needs it; add a host to {group} "
                f"or choose another {setting}"
            )
    if inventory.get_group("backup", []) and not inventory.get_group("postgres", []):
        problems.append(
            "group backup has hosts but group postgres has none: the backup host holds PostgreSQL's backups; "
            "add a postgres host or empty backup"
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
def validate(inventory: Any, single_server_groups: tuple[str, ...] = ()) -> Secrets:
    """Check the whole run once: every host's settings, the secrets and the topology, where
    each of ``single_server_groups`` (tasks/registry.py) may hold one host at most."""
    hosts_with: dict[str, list[str]] = {}
    for host in inventory:
        for problem in resolution(host.data.dict())[1]:
            hosts_with.setdefault(problem, []).append(host.name)
    problems = [
        f"{'host' if len(names) == 1 else 'hosts'} {', '.join(names)}: {problem}"
        for problem, names in hosts_with.items()
    ]
    problems += _topology_problems(inventory, single_server_groups)
    monitors = [for_host(h) for h in inventory.get_group("monitoring", [])]
    app_hosts = [for_host(h) for h in inventory if any(g in h.groups for g in APP_GROUPS)]
    app_variables = tuple(sorted({name for config in app_hosts for name in config.app_secret_variables}))
    try:
        secrets = load_secrets(
            grafana=any(config.grafana != "none" for config in monitors), app_variables=app_variables
        )
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
    assert secrets is not None  # load_secrets raised otherwise, which is a problem above
    return secrets


def cross_problems(config: Settings) -> list[str]:
    """Problems between settings that are each valid alone."""
    problems = []
    if config.rabbitmq_consumer_timeout_ms <= config.celery_longest_task_seconds * 1000:
        problems.append(
            f"rabbitmq_consumer_timeout_ms ({config.rabbitmq_consumer_timeout_ms}) must exceed "
            f"celery_longest_task_seconds ({config.celery_longest_task_seconds}) in ms, or RabbitMQ takes "
            "back tasks that are still running; raise it or lower celery_longest_task_seconds"
        )
    if config.redis_visibility_timeout_seconds <= config.celery_longest_task_seconds:
        problems.append(
            f"redis_visibility_timeout_seconds ({config.redis_visibility_timeout_seconds}) must exceed "
            f"celery_longest_task_seconds ({config.celery_longest_task_seconds}), or Redis hands running "
            "tasks to a second worker; raise it"
        )
    if config.celery_task_time_limit_seconds > config.celery_longest_task_seconds:
        problems.append(
            f"celery_task_time_limit_seconds ({config.celery_task_time_limit_seconds}) must not exceed "
            f"celery_longest_task_seconds ({config.celery_longest_task_seconds}): the timeouts that hand a "
            "running task to another worker are derived from the latter; raise celery_longest_task_seconds"
        )
    sampled_every = max(
        map(checks.duration_seconds, (config.prometheus_scrape_interval, config.prometheus_evaluation_interval))
    )
    if checks.duration_seconds(config.alert_restart_window) < 4 * sampled_every:
        problems.append(
            f"alert_restart_window ({config.alert_restart_window}) must be at least 4 times the longer of "
            f"prometheus_scrape_interval ({config.prometheus_scrape_interval}) and prometheus_evaluation_interval "
            f"({config.prometheus_evaluation_interval}): the restart alerts count the restarts between two samples "
            "of that window and are evaluated within it, with a missed scrape spared; raise it"
        )
    kind = checks.source_kind(config.app_source)
    if kind != "distribution" and checks.relative_path(config.app_constraints):
        problems.append(
            f"app_constraints {checks.relative_path(config.app_constraints)} (got {config.app_constraints!r})"
        )
    elif kind == "directory":
        problems += source_tree_problems(config, PROJECT_DIR / Path(config.app_source).expanduser())
    elif kind == "distribution":
        if config.app_workdir:
            problems.append(
                "app_workdir is set but app_source is a wheel/sdist, which has no source tree to run in; "
                "clear app_workdir, or deploy from the project's directory or git repository"
            )
        if config.app_constraints and not (PROJECT_DIR / Path(config.app_constraints).expanduser()).is_file():
            problems.append(f"app_constraints {config.app_constraints!r} is not a file on this machine")
    home = config.app_home
    overlapping = [
        path for path in config.app_writable_paths if f"{path}/".startswith(f"{home}/") or home.startswith(f"{path}/")
    ]
    if overlapping:
        problems.append(
            f"app_writable_paths holds {overlapping}, which overlap app_home ({home}): the application's code "
            "and venv live there and its processes must not rewrite them; use e.g. /srv/uploads"
        )
    named = [*config.app_broker_url_variables, *config.app_result_backend_variables, *config.app_secret_variables]
    repeated = sorted({name for name in named if named.count(name) > 1} | (set(named) & set(config.app_environment)))
    if repeated:
        problems.append(
            f"environment variables {repeated} are given more than once by app_broker_url_variables, "
            "app_result_backend_variables, app_secret_variables and app_environment; name each once"
        )
    if config.alert_email_to and not (config.alert_email_from and config.alert_smtp_smarthost):
        problems.append(
            "alert_email_to is set but alert_email_from or alert_smtp_smarthost is empty; "
            "set both, or clear alert_email_to"
        )
    if config.grafana == "apt" and not (config.grafana_apt_repository and config.grafana_apt_key_url):
        problems.append(
            'grafana is "apt" but grafana_apt_repository or grafana_apt_key_url is empty; set both '
            '(e.g. to a mirror), or set grafana to "deb" or "none"'
        )
    if config.grafana == "deb" and not Path(config.grafana_deb).expanduser().is_file():
        problems.append(
            f'grafana is "deb" but grafana_deb ({config.grafana_deb!r}) is not a file on this machine; '
            'point grafana_deb at a grafana .deb, or set grafana to "apt" or "none"'
        )
    if config.redis_broker_db == config.redis_result_db:
        problems.append(
            f"redis_broker_db and redis_result_db are both {config.redis_broker_db}; give each use its own database"
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
