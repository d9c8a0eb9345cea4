"""
``make demo`` / ``make demo-down``: the split topology in local containers, deployed with
``pyinfra inventory.py deploy.py`` exactly as against real servers; then where to look.

The sandbox lives in ``.sandbox/`` (git-ignored): its hosts file (read by inventory.py through
STACK_HOSTS_FILE), its SSH key and its generated secrets file (mode 0600). A second
``make demo`` reuses running containers and re-deploys, which changes nothing.
"""

from __future__ import annotations

import os
import secrets as random_secrets
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

from . import PROJECT_DIR, Cluster, ensure_base_image, host_ca_certificates
from .topologies import TOPOLOGIES

SANDBOX_DIR = PROJECT_DIR / ".sandbox"
SANDBOX_ID = "stackbench-demo"
TOPOLOGY = TOPOLOGIES["demo"]
#: The demo has no one to alert and cannot install Grafana here: alerts are visible in
#: Alertmanager's page, and notifications go to a port that discards them.
DEMO_SETTINGS = {"alert_webhook_url": "http://127.0.0.1:9/the-demo-has-no-receiver", "grafana": "none"}
SECRET_VARIABLES = ("STACK_REDIS_PASSWORD", "STACK_RABBITMQ_PASSWORD", "STACK_POSTGRESQL_PASSWORD")


def _secrets_file() -> Path:
    """Generate the sandbox's secrets once; later runs keep them, so re-runs change nothing."""
    path = SANDBOX_DIR / "secrets.env"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text("".join(f"{name}={random_secrets.token_hex(16)}\n" for name in SECRET_VARIABLES))
    return path


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


def up() -> None:
    started = time.monotonic()
    SANDBOX_DIR.mkdir(exist_ok=True)
    # Long-lived containers of your own: nothing mounted from, or proxied through, the bench's caches.
    cluster = Cluster(
        TOPOLOGY, ensure_base_image(), SANDBOX_DIR, id=SANDBOX_ID, keep=True, apt_cache=False, pip_cache=False
    )
    if cluster.attach():
        print(f"demo: reusing the running sandbox {SANDBOX_ID}")
    else:
        cluster.destroy()
        print(f"demo: starting {len(TOPOLOGY)} containers that boot systemd ({', '.join(TOPOLOGY)})")
        cluster.create()

    command = [str(Path(sys.executable).parent / "pyinfra"), "-y", "inventory.py", "deploy.py"]
    for key, value in DEMO_SETTINGS.items():
        command += ["--data", f"{key}={value}"]
    certificates = host_ca_certificates()
    if certificates:
        command += ["--data", "extra_ca_certificates=" + ",".join(certificates)]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("STACK_")}
    environment.update(STACK_HOSTS_FILE=str(cluster.hosts_file), STACK_SECRETS_FILE=str(_secrets_file()))
    print(
        f"demo: STACK_HOSTS_FILE={cluster.hosts_file} STACK_SECRETS_FILE={_secrets_file()} {' '.join(command[0:1])} "
        + " ".join(command[1:]),
        flush=True,
    )
    subprocess.run(command, cwd=PROJECT_DIR, env=environment, stdin=subprocess.DEVNULL, check=True)

    data, app = cluster.hosts["data"], cluster.hosts["app"]
    secrets = _read_env(_secrets_file())
    api = f"http://{app.address}:8000"
    task = requests.post(f"{api}/tasks", json={"n": 1000, "sleep": 1}, timeout=15).json()["id"]
    print(f'demo: submitted a task: POST {api}/tasks {{"n": 1000, "sleep": 1}} -> id {task}')
    body = {}
    for _ in range(60):
        body = requests.get(f"{api}/tasks/{task}", timeout=10).json()  # a 503 names what is not ready yet
        if body.get("state") in ("SUCCESS", "FAILURE"):
            break
        time.sleep(0.5)
    print(f"demo: GET {api}/tasks/{task} -> {body}")
    pong = redis.Redis(host=data.address, password=secrets["STACK_REDIS_PASSWORD"], protocol=2).ping()
    print(
        f"""
demo: up in {time.monotonic() - started:.0f}s. Where to look (secrets in {_secrets_file()}):
  API docs    {api}/docs
  Health      {api}/healthz
  Metrics     {api}/metrics
  Redis       redis://{data.address}:6379          PING from here: {"PONG" if pong else "no answer"}
  RabbitMQ    amqp://celery@{data.address}:5672/celery
  RabbitMQ    http://{data.address}:15692/metrics  (Prometheus endpoint)
  PostgreSQL  postgresql://celeryuser@{data.address}:5432/celerydb
  Prometheus  http://{data.address}:9090/alerts  (targets: /targets)
  Alerts      http://{data.address}:9093  (Alertmanager; set alert_webhook_url, alert_email_to or
              STACK_ALERT_SLACK_WEBHOOK_URL to be told; Grafana is off: its package is unobtainable here)
  Celery      http://{app.address}:5555  (Flower)
  Shell       docker exec -it {cluster.hosts["app"].container.name} bash   (or {cluster.hosts["data"].container.name})
  Re-deploy   make demo        Remove      make demo-down
"""
    )


def down() -> None:
    Cluster(TOPOLOGY, "", SANDBOX_DIR, id=SANDBOX_ID, keep=True).destroy()
    for name in ("hosts.json", "id_ed25519", "secrets.env"):
        (SANDBOX_DIR / name).unlink(missing_ok=True)
    print("demo: sandbox removed")


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1]]()
