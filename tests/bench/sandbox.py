"""
``make demo`` / ``make demo-down``: the split topology in local containers, deployed with
``pyinfra inventory.py deploy.py`` exactly as against real servers; then where to look.

The sandbox lives in ``.sandbox/`` (git-ignored): its hosts file (read by inventory.py through
STACK_HOSTS_FILE), its SSH key and its generated secrets file (mode 0600). A second
``make demo`` reuses running containers and re-deploys, which changes nothing.
"""

from __future__ import annotations

import json
import os
import secrets as random_secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import requests

from settings import Settings
from tasks import registry

from . import PROJECT_DIR, Cluster, ensure_base_image, host_ca_certificates
from .topologies import TOPOLOGIES

SANDBOX_DIR = PROJECT_DIR / ".sandbox"
SANDBOX_ID = "stackbench-demo"
TOPOLOGY = TOPOLOGIES["demo"]
#: The demo has no one to alert and cannot install Grafana here: alerts are visible in
#: Alertmanager's page, and notifications go to a port that discards them.
DEMO_SETTINGS = {"alert_webhook_url": "http://127.0.0.1:9/the-demo-has-no-receiver", "grafana": "none"}
#: The reference app's settings (files/app): the demo submits its task only when it is the one deployed.
REFERENCE = Settings()
SECRET_VARIABLES = (
    "STACK_REDIS_PASSWORD",
    "STACK_RABBITMQ_PASSWORD",
    "STACK_POSTGRESQL_PASSWORD",
    "STACK_BACKUP_CIPHER_PASS",
)


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

    hosts = _deployed(cluster.hosts_file, command)
    web = _in(hosts, "web")[0]
    config = web.config
    api = f"http://{web.address}:{config.web_port}"
    health = _health(f"{api}{config.app_health_path}")
    print(f"demo: GET {api}{config.app_health_path} -> {health}")
    if _is_reference_app(config):
        _submit_a_task(api)
    print(f"\ndemo: up in {time.monotonic() - started:.0f}s. {_where_to_look(hosts, cluster, api)}")


@dataclass(frozen=True)
class Deployed:
    """A host of the sandbox as the deploy saw it: its address, groups and settings."""

    address: str
    groups: list[str]
    config: Settings


def _deployed(hosts_file: Path, command: list[str]) -> list[Deployed]:
    """The hosts and each one's settings as the deploy read them: inventory.py on the sandbox's
    hosts file, group_data/ and the command's --data. Read by ``settings`` in a process of its
    own: pyinfra's CLI package, which loads group data, patches the interpreter (gevent) when
    imported."""
    data = dict(argument.split("=", 1) for argument in command[command.index("deploy.py") + 2 :: 2])
    reader = [sys.executable, "-m", "tests.bench.sandbox", "settings", str(hosts_file), json.dumps(data)]
    environment = {key: value for key, value in os.environ.items() if key != "STACK_HOSTS_FILE"}
    output = subprocess.run(reader, cwd=PROJECT_DIR, env=environment, capture_output=True, text=True, check=True)
    hosts = json.loads(output.stdout)
    return [Deployed(address, groups, Settings(**values)) for address, (groups, values) in hosts.items()]


def settings(hosts_file: str, data: str) -> None:
    """Print ``{address: [groups, settings]}`` of every host of ``hosts_file`` (``_deployed``)."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    os.environ["STACK_HOSTS_FILE"] = hosts_file
    with ctx_state.use(State()):
        wiring = registry.wiring(make_inventory("inventory.py", override_data=json.loads(data), cwd=str(PROJECT_DIR)))
    print(json.dumps({node.address: [sorted(node.groups), asdict(node.config)] for node in wiring.nodes}))


def _in(hosts: list[Deployed], group: str) -> list[Deployed]:
    return [host for host in hosts if group in host.groups]


def _health(url: str) -> str:
    """What the application's health path answers (the deploy's health gate already required a 2xx)."""
    try:
        response = requests.get(url, timeout=10)
    except requests.RequestException as error:
        return f"no answer ({error.__class__.__name__})"
    return f"{response.status_code} {response.reason}"


def _is_reference_app(config: Settings) -> bool:
    """Whether the deployed application is this project's reference app (files/app), whose
    task the demo knows how to submit."""
    return (config.asgi_app, config.celery_app) == (REFERENCE.asgi_app, REFERENCE.celery_app)


def _submit_a_task(api: str) -> None:
    task = requests.post(f"{api}/tasks", json={"n": 1000, "sleep": 1}, timeout=15).json()["id"]
    print(f'demo: submitted a task: POST {api}/tasks {{"n": 1000, "sleep": 1}} -> id {task}')
    body = {}
    for _ in range(60):
        body = requests.get(f"{api}/tasks/{task}", timeout=10).json()  # a 503 names what is not ready yet
        if body.get("state") in ("SUCCESS", "FAILURE"):
            break
        time.sleep(0.5)
    print(f"demo: GET {api}/tasks/{task} -> {body}")


def _where_to_look(hosts: list[Deployed], cluster: Cluster, api: str) -> str:
    """The demo's closing words: every service's address, from the settings the deploy used."""
    config = _in(hosts, "web")[0].config
    lines = [
        f"Where to look (secrets in {_secrets_file()}):",
        f"  Application {api}/  (health: {api}{config.app_health_path}; FastAPI's docs: {api}/docs)",
    ]
    if config.app_metrics_path:
        lines.append(f"  Metrics     {api}{config.app_metrics_path}")
    for node in _in(hosts, "redis"):
        password = _read_env(_secrets_file())["STACK_REDIS_PASSWORD"]
        pong = redis.Redis(host=node.address, port=node.config.redis_port, password=password, protocol=2).ping()
        lines.append(
            f"  Redis       redis://{node.address}:{node.config.redis_port}  PING from here: {'PONG' if pong else 'no answer'}"
        )
    for node in _in(hosts, "rabbitmq"):
        c = node.config
        lines.append(f"  RabbitMQ    amqp://{c.rabbitmq_user}@{node.address}:{c.rabbitmq_port}/{c.rabbitmq_vhost}")
        lines.append(f"  RabbitMQ    http://{node.address}:{c.rabbitmq_prometheus_port}/metrics  (Prometheus endpoint)")
    for node in _in(hosts, "postgres"):
        c = node.config
        lines.append(
            f"  PostgreSQL  postgresql://{c.postgresql_user}@{node.address}:{c.postgresql_port}/{c.postgresql_database}"
        )
    for node in _in(hosts, "monitoring"):
        c = node.config
        lines.append(f"  Prometheus  http://{node.address}:{c.prometheus_port}/alerts  (targets: /targets)")
        lines.append(
            f"  Alerts      http://{node.address}:{c.alertmanager_port}  (Alertmanager; set alert_webhook_url, "
            "alert_email_to or\n              STACK_ALERT_SLACK_WEBHOOK_URL to be told; Grafana is off: its "
            "package is unobtainable here)"
        )
        for beat in _in(hosts, "beat"):
            lines.append(f"  Celery      http://{beat.address}:{beat.config.flower_port}  (Flower)")
    containers = " or ".join(host.container.name for host in cluster.hosts.values())
    lines.append(f"  Shell       docker exec -it <container> bash  ({containers})")
    lines.append("  Re-deploy   make demo        Remove      make demo-down")
    return "\n".join(lines) + "\n"


def down() -> None:
    Cluster(TOPOLOGY, "", SANDBOX_DIR, id=SANDBOX_ID, keep=True).destroy()
    for name in ("hosts.json", "id_ed25519", "secrets.env"):
        (SANDBOX_DIR / name).unlink(missing_ok=True)
    print("demo: sandbox removed")


if __name__ == "__main__":
    {"up": up, "down": down, "settings": settings}[sys.argv[1]](*sys.argv[2:])
