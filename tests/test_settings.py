"""
Settings, secrets and topology checks, without any host: each bad input gives one clear error
that names the setting (or variable, or host) and the fix. The settings table of docs/settings.md is
generated from the declarations, and this test keeps the two identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import settings
from bench.fakes import GOOD_SECRETS, FakeHost, FakeInventory, all_in_one, validate

pytestmark = pytest.mark.usefixtures("no_secrets_file")


def test_good_input_passes_and_defaults_apply():
    secrets = validate(all_in_one(), **GOOD_SECRETS)
    assert secrets.redis_password == GOOD_SECRETS["STACK_REDIS_PASSWORD"]
    config, problems = settings.resolve({"redis_port": "6380"})
    assert problems == [] and config.redis_port == 6380 and config.postgresql_database == "celerydb"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"redis_prot": 6380}, "unknown setting 'redis_prot'; did you mean redis_port?"),
        ({"redis_port": 70000}, "redis_port must be a TCP port between 1 and 65535 (got 70000)"),
        ({"redis_port": "six"}, "redis_port must be of type int, not str ('six')"),
        ({"redis_port": True}, "redis_port must be of type int, not bool"),
        ({"rabbitmq_vm_memory_high_watermark": 4}, "rabbitmq_vm_memory_high_watermark must be a fraction"),
        ({"redis_save": "3600"}, "redis_save must be pairs of"),
        ({"redis_appendfsync": "no"}, 'redis_appendfsync must be "everysec" or "always"'),
        ({"apt_proxy": "proxy:3142"}, "apt_proxy must be empty or an http(s) URL"),
        (
            {"alert_restart_window": "50s"},
            "alert_restart_window (50s) must be at least 4 times the longer of prometheus_scrape_interval (15s)",
        ),
        (
            {"celery_longest_task_seconds": 4000},
            "rabbitmq_consumer_timeout_ms (3600000) must exceed celery_longest_task_seconds (4000)",
        ),
        (
            {"celery_task_time_limit_seconds": 600},
            "celery_task_time_limit_seconds (600) must not exceed celery_longest_task_seconds (300)",
        ),
        ({"celery_task_time_limit_seconds": -1}, "celery_task_time_limit_seconds must be 0 (none) or greater"),
        (
            {"app_source": "/nonexistent/app"},
            "app_source must be a directory or a wheel/sdist file on this machine, or a git URL; '/nonexistent/app' is none of them",
        ),
        ({"app_source": "dist/acme-1.0-py3-none-any.whl"}, "app_source must be a directory or a wheel/sdist file"),
        ({"app_workdir": "../elsewhere"}, "app_workdir must be a path inside the source tree"),
        ({"app_metrics_path": "metrics"}, "app_metrics_path must be empty or a path on the application's own server"),
        ({"app_metrics_path": "/metrics?x=1"}, "without a query"),
        ({"app_writable_paths": ["uploads"]}, "app_writable_paths holds 'uploads': each must be an absolute path"),
        ({"app_writable_paths": ["/srv"]}, "app_writable_paths holds '/srv': each must be an absolute path below"),
        ({"app_writable_paths": ["/srv/a/../b"]}, "app_writable_paths holds '/srv/a/../b': each must be"),
        ({"app_writable_paths": ["/tmp/shared"]}, "each unit has its own (PrivateTmp)"),
        ({"app_writable_paths": ["/home/me/files"]}, "the sandbox hides home directories (ProtectHome)"),
        (
            {"app_writable_paths": ["/opt/stackapp/uploads"]},
            "app_writable_paths holds ['/opt/stackapp/uploads'], which overlap app_home (/opt/stackapp)",
        ),
        ({"app_writable_paths": ["/opt"]}, "app_writable_paths holds '/opt': each must be"),
        ({"app_workdir": "web"}, "app_workdir 'web' is not a directory in the application's source"),
        (
            {"app_constraints": "constraints.txt"},
            "app_constraints 'constraints.txt' is not a file in the application's source",
        ),
        ({"app_environment": {"SENTRY ENV": "prod"}}, "app_environment holds ['SENTRY ENV']"),
        ({"app_environment": ["A=b"]}, "app_environment must be a mapping of names to strings"),
        (
            {"app_broker_url_variables": ["STACK_BROKER"]},
            "names must be letters, digits and _, and not start with STACK_",
        ),
        (
            {"app_result_backend_variables": ["CELERY_BROKER_URL"]},
            "environment variables ['CELERY_BROKER_URL'] are given more than once",
        ),
        ({"app_python": "python3; rm -rf /"}, "app_python must be a command name or an absolute path"),
        ({"celery_enforce_durability": "maybe"}, "celery_enforce_durability must be of type bool"),
        ({"app_dir": "opt/app"}, "app_dir must be an absolute path"),
        (
            {"app_requirements": "requirements-prod.txt"},
            "app_requirements 'requirements-prod.txt' is not a file in the application's source",
        ),
        ({"asgi_app": "my app"}, "asgi_app must be a Python import path"),
        ({"celery_loglevel": "verbose"}, "celery_loglevel must be one of"),
        ({"celery_queues": "a, b"}, "celery_queues must be comma-separated queue names"),
        ({"celery_broker": "kafka"}, 'celery_broker must be "rabbitmq" or "redis" (got \'kafka\')'),
        ({"redis_result_db": 0}, "redis_broker_db and redis_result_db are both 0"),
        (
            {"redis_visibility_timeout_seconds": 60},
            "redis_visibility_timeout_seconds (60) must exceed celery_longest_task_seconds (300)",
        ),
        ({"postgresql_database": "Celery-DB"}, "postgresql_database must be lower-case letters"),
        ({"extra_ca_certificates": ["/nonexistent/ca.pem"]}, "/nonexistent/ca.pem does not exist"),
        ({"private_address": "127.0.0.1"}, "is not reachable from other hosts"),
        ({"private_address": "db.internal"}, "private_address 'db.internal' is not an IP address"),
        ({"app_batch_size": 0}, "app_batch_size must be"),
    ],
)
def test_bad_setting_is_named_with_its_fix(data, expected):
    with pytest.raises(settings.SettingsError) as error:
        validate(all_in_one(**data), **GOOD_SECRETS)
    assert expected in str(error.value)
    assert "nothing was changed" in str(error.value)


def test_malformed_ca_file_is_refused(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(settings.SettingsError, match="is not a valid PEM certificate"):
        validate(all_in_one(extra_ca_certificates=[str(bad)]), **GOOD_SECRETS)
    (tmp_path / "empty.pem").write_text("hello")
    with pytest.raises(settings.SettingsError, match="holds no PEM certificate"):
        validate(all_in_one(extra_ca_certificates=[str(tmp_path / "empty.pem")]), **GOOD_SECRETS)


@pytest.mark.parametrize(
    "value, problem",
    [
        ("", "is missing or empty"),
        ("guest", "is a default or placeholder value"),
        ("changeme", "is a default or placeholder value"),
        ("x" * 40, "is a default or placeholder value"),
        ("short-pass", "is shorter than 16 characters"),
    ],
)
def test_bad_secret_names_the_variable_and_how_to_set_it(value, problem):
    environment = dict(GOOD_SECRETS, STACK_RABBITMQ_PASSWORD=value)
    with pytest.raises(settings.SettingsError) as error:
        validate(all_in_one(), **environment)
    message = str(error.value)
    assert f"STACK_RABBITMQ_PASSWORD {problem}" in message
    assert "Set each in the environment or in" in message
    assert value not in message.replace("STACK_", "") or value == ""


def test_secrets_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    path = tmp_path / "secrets.env"
    path.write_text("# comment\n" + "\n".join(f"{k}='{v}'" for k, v in GOOD_SECRETS.items()) + "\n")
    monkeypatch.setenv(settings.SECRETS_FILE_VARIABLE, str(path))
    override = "e" + "0123456789abcdef"
    secrets = validate(all_in_one(), STACK_REDIS_PASSWORD=override)
    assert secrets.redis_password == override
    assert secrets.postgresql_password == GOOD_SECRETS["STACK_POSTGRESQL_PASSWORD"]


def test_topology_needs_the_servers_of_the_chosen_broker_and_backend():
    app_only = FakeInventory([FakeHost("10.0.0.6", ["web", "workers", "beat"])])
    with pytest.raises(settings.SettingsError) as error:
        validate(app_only, **GOOD_SECRETS)
    message = str(error.value)
    assert "group rabbitmq is empty but celery_broker = 'rabbitmq' needs it; add a host to rabbitmq" in message
    assert "group postgres is empty but celery_result_backend = 'postgresql' needs it" in message
    assert "group redis" not in message  # the default choices do not need Redis

    settings.validate.cache_clear()
    redis_only = FakeInventory(
        [FakeHost("10.0.0.6", ["web", "workers", "beat"], celery_broker="redis", celery_result_backend="redis")]
    )
    with pytest.raises(settings.SettingsError) as error:
        validate(redis_only, **GOOD_SECRETS)
    assert "group redis is empty but celery_broker = 'redis' needs it" in str(error.value)
    assert "group rabbitmq" not in str(error.value) and "group postgres" not in str(error.value)

    settings.validate.cache_clear()
    validate(
        FakeInventory(
            [
                FakeHost(
                    "10.0.0.6",
                    ["redis", "web", "workers", "beat"],
                    celery_broker="redis",
                    celery_result_backend="redis",
                )
            ]
        ),
        **GOOD_SECRETS,
    )

    two_redis = FakeInventory(all_in_one() + [FakeHost("10.0.0.7", ["redis"])])
    with pytest.raises(settings.SettingsError, match="group redis has 2 hosts"):
        validate(two_redis, **GOOD_SECRETS)


def test_application_hosts_switch_in_one_sequence_of_batches():
    hosts = [FakeHost("10.0.0.5", ["redis", "rabbitmq", "postgres", "web", "beat"])]
    hosts.append(FakeHost("10.0.1.1", ["workers"], app_batch_size=2))
    with pytest.raises(
        settings.SettingsError, match=r"application hosts disagree on app_batch_size \(\[\(1,\), \(2,\)\]\)"
    ):
        validate(FakeInventory(hosts), **GOOD_SECRETS)


def test_a_backup_host_needs_a_database_to_back_up_and_one_is_enough():
    redis_only = dict(celery_broker="redis", celery_result_backend="redis")
    no_database = FakeInventory(
        [FakeHost("10.0.0.5", ["redis", "web", "workers", "beat"], **redis_only), FakeHost("10.0.0.7", ["backup"])]
    )
    with pytest.raises(settings.SettingsError, match="group backup has hosts but group postgres has none"):
        validate(no_database, **GOOD_SECRETS)

    settings.validate.cache_clear()
    two = FakeInventory([*all_in_one(), FakeHost("10.0.0.7", ["backup"]), FakeHost("10.0.0.8", ["backup"])])
    with pytest.raises(settings.SettingsError, match="group backup has 2 hosts; this deploy runs exactly one backup"):
        validate(two, **GOOD_SECRETS)


@pytest.mark.parametrize("beat_hosts", [0, 2])
def test_topology_needs_exactly_one_beat(beat_hosts):
    hosts = [FakeHost("10.0.0.5", ["redis", "rabbitmq", "postgres"])]
    hosts += [FakeHost(f"10.0.1.{i}", ["web", "workers"] + (["beat"] if i < beat_hosts else [])) for i in range(2)]
    with pytest.raises(
        settings.SettingsError, match=f"group beat has {beat_hosts} hosts; exactly one host must run celery beat"
    ):
        validate(FakeInventory(hosts), **GOOD_SECRETS)


def test_the_settings_table_is_current():
    document = (Path(settings.PROJECT_DIR) / "docs" / "settings.md").read_text()
    assert settings.markdown_table() in document, "docs/settings.md's table is stale: run `make settings-table`"


def monitored(**data) -> FakeInventory:
    """All-in-one plus a monitoring host, with Grafana unless ``grafana`` says otherwise."""
    return FakeInventory(all_in_one() + [FakeHost("10.0.0.9", ["monitoring"], **data)])


@pytest.mark.parametrize(
    "data, environment, expected",
    [
        ({"alert_webhook_url": "http://hooks.example/x"}, {}, "STACK_GRAFANA_ADMIN_PASSWORD is missing or empty"),
        (
            {"alert_webhook_url": "http://hooks.example/x"},
            {"STACK_GRAFANA_ADMIN_PASSWORD": "admin"},
            "STACK_GRAFANA_ADMIN_PASSWORD is a default or placeholder value",
        ),
        ({"grafana": "none"}, {}, "the monitoring host would alert nobody: set alert_webhook_url or alert_email_to"),
        (
            {"grafana": "none", "alert_email_to": "ops@example.com"},
            {},
            "alert_email_to is set but alert_email_from or alert_smtp_smarthost is empty",
        ),
        (
            {"grafana": "none", "alert_webhook_url": "hooks.example"},
            {},
            "alert_webhook_url must be empty or an http(s) URL",
        ),
        (
            {"grafana": "none", "alert_webhook_url": "http://h/x", "alert_for": "2 minutes"},
            {},
            "alert_for must be a Prometheus duration such as 15s",
        ),
        (
            {"grafana": "deb", "alert_webhook_url": "http://h/x", "grafana_deb": "/nonexistent/grafana.deb"},
            {"STACK_GRAFANA_ADMIN_PASSWORD": "g0123456789abcdefg"},
            "grafana_deb ('/nonexistent/grafana.deb') is not a file",
        ),
        (
            {"grafana": "none", "alert_webhook_url": "http://h/x"},
            {"STACK_ALERT_SLACK_WEBHOOK_URL": "hooks.slack.com/x"},
            "STACK_ALERT_SLACK_WEBHOOK_URL must be empty or an http(s) URL",
        ),
    ],
)
def test_bad_monitoring_input_is_named_with_its_fix(data, environment, expected):
    with pytest.raises(settings.SettingsError) as error:
        validate(monitored(**data), **GOOD_SECRETS, **environment)
    assert expected in str(error.value)


def test_monitoring_is_optional_and_grafana_secret_only_needed_with_grafana():
    validate(all_in_one(), **GOOD_SECRETS)  # no monitoring host: no receiver, no Grafana password
    settings.validate.cache_clear()
    validate(monitored(grafana="none"), **GOOD_SECRETS, STACK_ALERT_SLACK_WEBHOOK_URL="https://hooks.example/T0")
    settings.validate.cache_clear()
    two = FakeInventory(
        monitored(grafana="none", alert_webhook_url="http://h/x") + [FakeHost("10.0.0.10", ["monitoring"])]
    )
    with pytest.raises(settings.SettingsError, match="group monitoring has 2 hosts"):
        validate(two, **GOOD_SECRETS)
