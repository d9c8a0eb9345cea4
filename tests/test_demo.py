"""
``make demo`` with any application (tests/bench/sandbox.py), without containers: it reads the
settings the deploy used (inventory.py on the sandbox's hosts file, group_data/, --data), so
it prints the application's own ports and health path, and submits the reference app's task
only when the reference app is the one deployed.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import sandbox

HOSTS = {
    "10.9.0.2": [["redis", "rabbitmq", "postgres", "monitoring"], {"private_address": "10.9.0.2"}],
    "10.9.0.3": [["web", "workers", "beat"], {"private_address": "10.9.0.3"}],
}
COMMAND = ["pyinfra", "-y", "inventory.py", "deploy.py", "--data", "grafana=none"]


def web_of(tmp_path: Path, *data: str) -> sandbox.Deployed:
    hosts_file = tmp_path / "hosts.json"
    hosts_file.write_text(json.dumps(HOSTS))
    command = COMMAND + [part for item in data for part in ("--data", item)]
    return sandbox._in(sandbox._deployed(hosts_file, command), "web")[0]


def test_the_demo_reads_the_deployed_applications_settings(tmp_path):
    web = web_of(tmp_path, "app_name=acme", "web_port=8080", "app_health_path=/ready", "asgi_app=acme.web:api")
    assert (web.address, web.config.app_name, web.config.web_port) == ("10.9.0.3", "acme", 8080)
    assert web.config.app_health_path == "/ready"
    assert not sandbox._is_reference_app(web.config)


def test_the_demo_submits_its_task_only_to_the_reference_app(tmp_path):
    assert sandbox._is_reference_app(web_of(tmp_path).config)
