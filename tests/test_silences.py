"""
The deploy's silences without any host (tasks/silences.py): which alerts a restart silences and
for how long. That a deploy restarting a busy worker notifies no one, while a worker stopped by
hand is told within 90 s at the defaults, is tests/faults/test_faults.py's last test.
"""

from __future__ import annotations

import json
import re

import pytest
from test_wiring import SECRETS

from bench.fakes import FakeHost, FakeInventory
from settings.declarations import Settings
from tasks import PROJECT_DIR, registry, render, silences
from tasks.monitoring import rules_context
from tasks.service import Run

HOSTS = {"data": ["redis", "rabbitmq", "postgres", "monitoring"], "app": ["web", "workers", "beat"]}


def run_on(name: str, hosts: dict[str, list[str]] = HOSTS, **data) -> Run:
    inventory = FakeInventory(
        FakeHost(host, groups, private_address=f"10.0.0.{number}", **data)
        for number, (host, groups) in enumerate(hosts.items(), start=2)
    )
    wiring = registry.wiring(inventory)
    return Run(secrets=SECRETS, node=next(node for node in wiring.nodes if node.name == name), wiring=wiring)


def test_a_restart_silences_the_alerts_about_its_host_and_no_other_host():
    (quiet,) = silences.quiets(run_on("data"))
    assert quiet.matchers == (
        'alertname=~"UnitNotActive|InstanceDown|AppNotAnswering|RedisDown|PostgreSQLDown"',
        'host="data"',
    )
    assert quiet.outlasts == 0


def test_a_restart_on_a_web_host_silences_its_request_latency_for_the_rules_window_beyond():
    """CI saw it: a deploy restarting the worker and web units slowed one health probe, and
    AppLatencyHigh (95th percentile of the probes over 5 minutes) fired after the silence ended."""
    about_the_host, requests = silences.quiets(run_on("app"))
    assert about_the_host.matchers[1] == requests.matchers[1] == 'host="app"'
    assert requests.matchers[0] == 'alertname=~"AppLatencyHigh"'
    assert requests.outlasts == silences.REQUESTS_WINDOW_SECONDS
    assert silences.REQUESTS_WINDOW_SECONDS == 300
    rules = render("monitoring/rules.yml.j2", brackets=True, **rules_context(Settings(), 1, ["celery"])).getvalue()
    latency = rules[rules.index("- alert: AppLatencyHigh") :].split("- alert:")[1]
    ranges = set(re.findall(r"\[(\w+)\]", latency))
    assert ranges == {silences.REQUESTS_WINDOW}, ranges


def test_a_worker_or_broker_restart_also_silences_the_alerts_about_the_consumers_wherever_labelled():
    about_the_host, *_, consumers = silences.quiets(run_on("app"), consumers=True)
    assert consumers.matchers == ('alertname=~"CeleryWorkersMissing|QueueWithoutConsumers"',)
    assert about_the_host.matchers[1] == 'host="app"'


def test_node_exporter_restarting_silences_host_rebooted_for_the_restart_window():
    *_, rebooted = silences.quiets(run_on("data", alert_restart_window="15m"), exporter=True)
    assert rebooted.matchers == ('alertname=~"HostRebooted"', 'host="data"')
    assert rebooted.outlasts == 900


def test_every_silenced_alert_is_one_of_the_rules():
    rules = set(re.findall(r"- alert: (\w+)", (PROJECT_DIR / "templates/monitoring/rules.yml.j2").read_text()))
    assert {
        *silences.ABOUT_THE_HOST,
        *silences.ABOUT_THE_REQUESTS,
        *silences.ABOUT_THE_CONSUMERS,
        "HostRebooted",
    } <= rules


def test_at_the_defaults_a_silence_ends_a_minute_after_the_restart_and_at_worst_after_the_longest_stop():
    defaults = Settings()
    assert silences.settle_seconds(defaults) == 60  # two scrapes and two evaluations of 15 s
    assert silences.bound_seconds(defaults) == defaults.worker_stop_timeout + defaults.app_health_timeout_seconds + 300


@pytest.mark.parametrize(
    "output, answering",
    [
        ("sh: 1: amtool: not found", False),
        (
            'amtool: error: Post "http://10.0.0.2:9093/api/v2/silences": dial tcp 10.0.0.2:9093: connect: connection refused',
            False,
        ),
        ("amtool: error: bad matcher format", True),
    ],
)
def test_a_missing_or_unstarted_alertmanager_is_told_apart_from_a_refused_silence(output, answering):
    assert silences._not_answering(output) is not answering


def test_without_a_monitoring_host_nothing_is_silenced():
    run = run_on("app", hosts={"data": ["redis", "rabbitmq", "postgres"], "app": ["web", "workers", "beat"]})
    assert silences._monitoring(run) is None


def test_a_silence_a_failed_deploy_left_is_found_by_its_comment_and_author_only():
    comment = "app restarts the application's units (a deploy)"
    listed = json.dumps(
        [
            {"id": "left", "createdBy": silences.AUTHOR, "comment": comment},
            {"id": "other-host", "createdBy": silences.AUTHOR, "comment": "data restarts Redis (a deploy)"},
            {"id": "an-operator's", "createdBy": "alice", "comment": comment},
        ]
    )
    assert silences.leftovers(listed, comment) == ["left"]
    assert silences.leftovers("", comment) == []


def _alert(alertname: str, **labels: str) -> dict[str, str]:
    return {"alertname": alertname, **labels}


def test_a_silence_leaves_out_the_alerts_notified_already_by_the_label_that_names_them():
    """Alertmanager does not notify an alert again while its last notification says "firing"
    (until repeat_interval): one told, whose end a deploy's silence muted, would fire again
    untold. The bench saw it (tests/test_monitoring.py); so what is told already is spared."""
    about_the_host, *_ = silences.quiets(run_on("app"))
    worker = _alert("UnitNotActive", name="stackapp-worker.service", host="app", instance="app:9100")
    elsewhere = [_alert("UnitNotActive", name="x.service", host="data"), _alert("Watchdog")]
    assert about_the_host.sparing(elsewhere) == [about_the_host.matchers]
    assert about_the_host.sparing([worker, *elsewhere]) == [
        ('alertname=~"InstanceDown|AppNotAnswering|RedisDown|PostgreSQLDown"', 'host="app"'),
        ('alertname=~"UnitNotActive"', 'host="app"', 'name!="stackapp-worker.service"'),
    ]
    beat = _alert("UnitNotActive", name="stackapp-beat.service", host="app")
    assert about_the_host.sparing([worker, beat])[1][2:] == (
        'name!="stackapp-worker.service"',
        'name!="stackapp-beat.service"',
    )


def test_a_notified_alert_no_label_tells_apart_is_not_silenced_at_all():
    *_, consumers = silences.quiets(run_on("app"), consumers=True)
    assert consumers.sparing([_alert("CeleryWorkersMissing", severity="critical")]) == [
        ('alertname=~"QueueWithoutConsumers"',)
    ]
    assert consumers.sparing([_alert("CeleryWorkersMissing"), _alert("QueueWithoutConsumers", queue="celery")]) == [
        ('alertname=~"QueueWithoutConsumers"', 'queue!="celery"')
    ]
