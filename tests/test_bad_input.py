"""
Bad input, against a real host: each case runs the real ``pyinfra inventory.py deploy.py`` at a
fresh container and must stop with one clear error that names the setting (or variable, group,
host) and the fix, and must change nothing on the host: no file under / is newer than the
moment the cases began (logs, /run and /tmp aside), no package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import Cluster, git
from bench.topologies import bench_settings

pytestmark = pytest.mark.bench

GROUPS = ["redis", "rabbitmq", "postgres", "web", "workers", "beat"]
MARKER = "/root/.stack-bad-input-marker"
#: Files the host writes by itself, or that SSH and sudo touch at login: not the deploy's.
UNTOUCHED_BY_US = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/log", "/var/tmp", "/var/lib/systemd", "/home/deploy"]


@pytest.fixture(scope="module")
def pristine(base_image, tmp_path_factory) -> Cluster:
    """One container as the base image leaves it: nothing deployed, ever."""
    # Nothing of this machine's is mounted into it: every file of its own is compared.
    cluster = Cluster(
        {"pristine": GROUPS}, base_image, tmp_path_factory.mktemp("bad-input"), data=bench_settings(), pip_cache=False
    )
    cluster.name = "bad-input"
    try:
        cluster.create()
        cluster.one("web").exec(f"touch {MARKER}")
        yield cluster
    finally:
        cluster.destroy()


def changed_files(host) -> list[str]:
    prune = " -o ".join(f"-path {path}" for path in UNTOUCHED_BY_US)
    return host.exec(f"find / -xdev \\( {prune} \\) -prune -o -newer {MARKER} -print").split()


def bad_repository(tmp_path: Path) -> str:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "requirements.txt").write_text("celery\n")
    for command in (["init", "--quiet"], ["add", "."], ["commit", "--quiet", "-m", "x"]):
        git(*command, cwd=tmp_path / "repo")
    return f"file://{tmp_path / 'repo'}"


def first_entry(inventory: dict) -> tuple[str, list]:
    return next(iter(inventory.items()))


def regrouped(groups: list[str]):
    def change(inventory: dict, cluster: Cluster) -> dict:
        name, (_, data) = first_entry(inventory)
        return {name: [groups, data]}

    return change


def with_second_host(groups: list[str], reachable: bool):
    """The pristine host plus another entry: the same container under a second name, or an
    address of the bench's own network where no container runs."""

    def change(inventory: dict, cluster: Cluster) -> dict:
        name, (_, data) = first_entry(inventory)
        free = ".".join(name.split(".")[:3] + ["250"])
        second = dict(data, private_address=free)
        if reachable:
            second["ssh_hostname"] = name
        inventory["twin" if reachable else free] = [groups, second]
        return inventory

    return change


# (id, --data, environment, inventory change, expected words of the error)
CASES = [
    ("missing secret", {}, {"STACK_REDIS_PASSWORD": ""}, None, "STACK_REDIS_PASSWORD is missing or empty"),
    (
        "default password",
        {},
        {"STACK_RABBITMQ_PASSWORD": "guest"},
        None,
        "STACK_RABBITMQ_PASSWORD is a default or placeholder value",
    ),
    (
        "weak password",
        {},
        {"STACK_POSTGRESQL_PASSWORD": "hunter2"},
        None,
        "STACK_POSTGRESQL_PASSWORD is shorter than 16 characters",
    ),
    (
        "typo in a setting's name",
        {"redis_prot": "6380"},
        {},
        None,
        "unknown setting 'redis_prot'; did you mean redis_port?",
    ),
    ("invalid port", {"web_port": "80000"}, {}, None, "web_port must be a TCP port between 1 and 65535 (got 80000)"),
    (
        "setting of the wrong type",
        {"celery_concurrency": "many"},
        {},
        None,
        "celery_concurrency must be of type int, not str ('many')",
    ),
    (
        "longest task beyond the broker's consumer timeout",
        {"celery_longest_task_seconds": "4000"},
        {},
        None,
        "rabbitmq_consumer_timeout_ms (3600000) must exceed celery_longest_task_seconds (4000) in ms",
    ),
    (
        "application path that does not exist",
        {"app_source": "/nonexistent/app"},
        {},
        None,
        "app_source must be a directory or a wheel/sdist file on this machine, or a git URL",
    ),
    (
        "Redis memory limit beyond the host's memory",
        {"redis_maxmemory": "100000GB"},
        {},
        None,
        "redis_maxmemory (100000GB) is more than the memory of host",
    ),
    ("malformed CA file", {"extra_ca_certificates": "MALFORMED_CA"}, {}, None, "is not a valid PEM certificate"),
    (
        "git ref that does not exist",
        {"app_source": "BAD_REPOSITORY", "app_git_ref": "release-9"},
        {},
        None,
        "app_git_ref 'release-9' is neither a branch, a tag nor a commit",
    ),
    (
        "firewall source that is no network",
        {"firewall_admin_sources": "10.0.0.0/33"},
        {},
        None,
        "firewall_admin_sources holds '10.0.0.0/33', which is not an IP address or network",
    ),
    ("host in no group", {}, {}, regrouped([]), "is in no role group; give it at least one of"),
    (
        "group name that does not exist",
        {},
        {},
        regrouped(["redis", "rabbitmq", "postgres", "web", "worker", "beat"]),
        "is in group 'worker', which is not a role; did you mean 'workers'?",
    ),
    (
        "beat on zero hosts",
        {},
        {},
        regrouped(["redis", "rabbitmq", "postgres", "web", "workers"]),
        "group beat has 0 hosts; exactly one host must run celery beat",
    ),
    (
        "beat on two hosts",
        {},
        {},
        with_second_host(["beat"], reachable=True),
        "group beat has 2 hosts; exactly one host must run celery beat",
    ),
    ("unreachable host", {}, {}, with_second_host(["workers"], reachable=False), "Over 0% of hosts failed"),
]


@pytest.mark.parametrize(
    "data, environment, change, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_input_stops_with_one_clear_error_and_changes_nothing(
    pristine: Cluster, tmp_path, data, environment, change, expected
):
    malformed = tmp_path / "ca.pem"
    malformed.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    replacements = {"MALFORMED_CA": str(malformed), "BAD_REPOSITORY": ""}
    if data.get("app_source") == "BAD_REPOSITORY":
        replacements["BAD_REPOSITORY"] = bad_repository(tmp_path)
    arguments = []
    for key, value in data.items():
        arguments += ["--data", f"{key}={replacements.get(value, value)}"]
    hosts_file = tmp_path / "hosts.json"
    inventory = pristine.inventory()
    hosts_file.write_text(json.dumps(change(inventory, pristine) if change else inventory))

    run = pristine.deploy(
        *arguments, env=pristine.environment(STACK_HOSTS_FILE=str(hosts_file), **environment), timeout=180
    )

    assert run.returncode != 0
    assert expected in run.stderr, run.stderr[-3000:]
    assert "Starting operation" not in run.stderr
    host = pristine.one("web")
    assert changed_files(host) == []
    assert host.status("test -e /etc/apt/apt.conf.d/80stack-lock-timeout || dpkg -s redis-server >/dev/null 2>&1") != 0
