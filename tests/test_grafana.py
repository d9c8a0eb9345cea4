"""
Grafana. Its package cannot be obtained on our machines (apt.grafana.com is out of reach), so:
- every provisioning file is checked here: the datasource has the uid every dashboard refers
  to, no dashboard is left with a ``${DS_...}`` input, and every metric a dashboard queries is
  really exported, asked of the live Prometheus of the all-in-one topology;
- the APT repository setup runs for real against a signed repository this test serves on the
  bench network (a mirror, as ``grafana_apt_repository`` allows): the key lands where the
  source's signed-by points, apt accepts the repository's signature, and the install then
  fails only because that repository has no grafana package;
- the test of a running Grafana needs a grafana .deb (``STACK_BENCH_GRAFANA_DEB``) and is
  skipped without one, saying so.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from bench import PROJECT_DIR, Cluster
from clients import prometheus_api, query, wait_until
from tasks import silences

DASHBOARDS = sorted((PROJECT_DIR / "files" / "grafana" / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
#: Exported by a front host only (mtail): the all-in-one topology has none, so the dashboards'
#: queries of these are run on the scale-out topology's front (tests/test_scale_out.py).
FRONT_METRICS = {
    "stack_front_requests_total",
    "stack_front_server_errors_total",
    "stack_front_request_seconds_count",
    "stack_front_request_seconds_bucket",
}
#: PromQL words that are not metric names.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def expressions(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    "("), label names (inside {} or by/without (...)), durations, numbers or keywords."""
    stripped = re.sub(r'"[^"]*"', "", expression)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", stripped)
    names = {
        match.group()
        for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", stripped)
        if not stripped[match.end() :].lstrip().startswith("(")
    }
    return names - PROMQL_WORDS


def test_metric_name_extraction_sees_through_promql():
    expression = (
        'histogram_quantile(0.95, sum by (le, route) (rate(app_seconds_bucket{route!="/x"}[5m]))) / on(host) up'
    )
    assert metric_names(expression) == {"app_seconds_bucket", "up"}


def test_dashboards_for_every_component_use_the_provisioned_datasource_only():
    assert [path.stem for path in DASHBOARDS] == ["app", "celery", "hosts", "postgresql", "rabbitmq", "redis"]
    uids = set()
    for path in DASHBOARDS:
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text, f"{path.name} has an unresolved datasource input"
        dashboard = json.loads(text)
        uids.add(dashboard["uid"])
        assert dashboard["title"] and dashboard["panels"], path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"] == DATASOURCE, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE and target["expr"], (path.name, panel["title"])
    assert len(uids) == len(DASHBOARDS), "dashboard uids must be unique"


def test_provisioning_files_point_grafana_at_the_monitoring_hosts_prometheus():
    from tasks import render

    datasource = yaml.safe_load(render("grafana/datasource.yaml.j2", prometheus="10.0.0.7:9090").getvalue())
    [entry] = datasource["datasources"]
    assert (entry["uid"], entry["type"], entry["url"]) == ("prometheus", "prometheus", "http://10.0.0.7:9090")
    provider = yaml.safe_load(render("grafana/dashboards.yaml.j2", path="/etc/grafana/dashboards/stack").getvalue())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/stack"


@pytest.mark.bench
@pytest.mark.parametrize("deployed", ["all-in-one"], indirect=True)
def test_every_metric_a_dashboard_queries_is_exported_and_every_query_runs(deployed: Cluster):
    # Give every exporter (and Flower's task histograms) time to report at least once.
    wait_until(lambda: query(deployed, "flower_task_runtime_seconds_bucket"), timeout=90)
    exported = set(prometheus_api(deployed, "label/__name__/values"))
    for path in DASHBOARDS:
        for expression in expressions(json.loads(path.read_text())):
            missing = metric_names(expression) - exported - FRONT_METRICS
            assert not missing, f"{path.name}: {expression} queries metrics nobody exports: {missing}"
            prometheus_api(deployed, "query", query=expression)  # valid PromQL, or the API says why


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Repository:
    """A signed APT repository (suite stable, component main, no packages) served over HTTP on
    the bench network, with the ASCII-armoured key that signs it."""

    def __init__(self, root: Path, address: str) -> None:
        gnupg = root / "gnupg"
        gnupg.mkdir(mode=0o700)
        gpg = ["gpg", "--homedir", str(gnupg), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
        subprocess.run(
            gpg + ["--quick-gen-key", "stack bench repository", "ed25519", "sign", "never"],
            check=True,
            capture_output=True,
        )
        (root / "gpg.key").write_bytes(
            subprocess.run(gpg + ["--armor", "--export"], check=True, capture_output=True).stdout
        )
        packages = root / "dists/stable/main/binary-amd64/Packages"
        packages.parent.mkdir(parents=True)
        packages.write_bytes(b"")
        digest = hashlib.sha256(b"").hexdigest()
        release = root / "dists/stable/Release"
        release.write_text(
            "Origin: stack-bench\nSuite: stable\nCodename: stable\nComponents: main\nArchitectures: amd64\n"
            f"SHA256:\n {digest} 0 main/binary-amd64/Packages\n"
        )
        subprocess.run(
            gpg + ["--clearsign", "--output", str(root / "dists/stable/InRelease"), str(release)], check=True
        )
        self.server = ThreadingHTTPServer((address, 0), functools.partial(_QuietHandler, directory=str(root)))
        self.url = f"http://{address}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.bench
@pytest.mark.parametrize("deployed", ["split"], indirect=True)
def test_grafana_apt_repository_is_set_up_with_its_signing_key(deployed: Cluster, tmp_path: Path):
    monitor = deployed.one("monitoring")
    repository = _Repository(tmp_path, deployed.gateway)
    # The bench's apt cache serves Debian's archive only: the monitoring host reaches this
    # test's repository, on this machine, directly.
    direct = "/etc/apt/apt.conf.d/79stackbench-direct"
    monitor.exec(f"echo 'Acquire::http::Proxy::{deployed.gateway} \"DIRECT\";' > {direct}")
    try:
        run = deployed.deploy(
            "--data",
            "grafana=apt",
            "--data",
            f"grafana_apt_repository={repository.url}",
            "--data",
            f"grafana_apt_key_url={repository.url}/gpg.key",
            env=deployed.environment(STACK_GRAFANA_ADMIN_PASSWORD="g" + "0123456789abcdef"),
        )
        installed_key = monitor.exec("cat /etc/apt/keyrings/grafana.asc 2>&1 || true")
        assert installed_key == (tmp_path / "gpg.key").read_text(), run.stderr[-4000:]
        sources = monitor.exec("cat /etc/apt/sources.list.d/grafana.list").strip()
        assert sources == f"deb [signed-by=/etc/apt/keyrings/grafana.asc] {repository.url} stable main"
        # apt verified the repository's signature with that key (a wrong key: NO_PUBKEY, and the
        # repository would be ignored).
        # (apt numbers its fetches in the order they start: Debian's archive may come first.)
        update = monitor.exec("apt-get update 2>&1")
        assert re.search(rf"^(Get|Hit):\d+ {re.escape(repository.url)} stable InRelease", update, re.MULTILINE), update
        assert "NO_PUBKEY" not in update and "not signed" not in update, update
        # The only failure: that repository has no grafana package, as none is obtainable here.
        assert run.returncode != 0
        assert "Install Grafana" in run.stderr and "grafana" in run.stderr
    finally:
        repository.close()
        monitor.exec(f"rm -f /etc/apt/sources.list.d/grafana.list /etc/apt/keyrings/grafana.asc {direct}")
        monitor.exec("apt-get update -qq")
        # Grafana off again, even when the test failed, so the shared topology is steady for
        # the tests after this one.
        restore = deployed.deploy()
    # What Grafana's declaration adds to the monitoring host's wiring (its port in the
    # firewall, its unit among node_exporter's watched ones) is taken back, and only that.
    assert restore.returncode == 0, restore.stderr[-4000:]
    wiring = {
        "Firewall | Write the firewall's table (each service port open to the groups that use it)",
        "Firewall | Replace the firewall's table atomically with the changed one",
        "Monitoring exporters | Configure node_exporter (private address)",
        "Monitoring exporters | Restart node_exporter to apply the changed configuration",
        *(f"Monitoring exporters | {name}" for name in silences.operation_names("node_exporter")),
    }
    assert set(restore.changed) <= {f"{operation} @ {monitor.address}" for operation in wiring}, restore.changed
    again = deployed.deploy()
    assert again.returncode == 0 and again.changed == [], again.changed


@pytest.mark.bench
@pytest.mark.skipif(
    not os.environ.get("STACK_BENCH_GRAFANA_DEB"),
    reason="Grafana's package cannot be obtained on this machine (apt.grafana.com is out of reach); "
    "set STACK_BENCH_GRAFANA_DEB to a grafana .deb to run this test",
)
@pytest.mark.parametrize("deployed", ["split"], indirect=True)
def test_running_grafana_serves_the_provisioned_datasource_and_dashboards(deployed: Cluster):
    password = "g" + "0123456789abcdef"
    run = deployed.deploy(
        "--data",
        "grafana=deb",
        "--data",
        f"grafana_deb={os.environ['STACK_BENCH_GRAFANA_DEB']}",
        env=deployed.environment(STACK_GRAFANA_ADMIN_PASSWORD=password),
    )
    assert run.returncode == 0, run.stderr[-6000:]
    grafana = f"http://{deployed.one('monitoring').address}:3000"
    wait_until(lambda: requests.get(f"{grafana}/api/health", timeout=5).ok, timeout=60)
    assert requests.get(f"{grafana}/api/datasources", auth=("admin", "admin"), timeout=10).status_code == 401
    health = requests.get(f"{grafana}/api/datasources/uid/prometheus/health", auth=("admin", password), timeout=10)
    assert health.ok and health.json()["status"] == "OK", health.text
    found = requests.get(f"{grafana}/api/search", params={"tag": "stack"}, auth=("admin", password), timeout=10).json()
    assert sorted(board["uid"] for board in found) == sorted(json.loads(p.read_text())["uid"] for p in DASHBOARDS)
