"""
The exporters, from Debian's packages, on the hosts they watch when the inventory has a
monitoring host; every listener on the host's private address, scraped by Prometheus
(tasks/monitoring.py) from the ports declared here.

- node_exporter on every host, its systemd collector limited to the units of the services the
  host runs (each of which then alerts when it is not active);
- redis_exporter (with Redis' password, from a 0640 file) on the Redis host; it also reads the
  length of the Redis task queues;
- postgres_exporter on the PostgreSQL host, connecting over the local socket as its own role
  ``prometheus`` (peer authentication, no password; member of pg_monitor only);
- mtail on each front host, counting the requests nginx served by status and their latency
  (``files/monitoring/front.mtail``), so any application has request metrics, with or without
  its own (Gunicorn's statsd counts no request under Uvicorn's workers, and nginx's
  stub_status counts no status: docs/deploy.md).

RabbitMQ's built-in prometheus plugin (tasks/rabbitmq.py), Flower for Celery and the
application's own /metrics (tasks/app.py) declare their scrapes where they are deployed.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, postgres, server

from tasks import front, packaged_service, shipped_file, silences
from tasks.postgresql import PostgresValue
from tasks.service import Node, Port, Run, Scrape, Service

#: The Debian packages' system user, and so postgres_exporter's peer-authenticated role.
EXPORTER_ROLE = "prometheus"
#: Where Debian's node_exporter reads textfiles (its default --collector.textfile.directory):
#: services count there what no exporter sees (tasks/app.py: Gunicorn's dead workers).
TEXTFILE_DIRECTORY = "/var/lib/prometheus/node-exporter"


def monitored(node: Node) -> bool:
    return node.monitored


def defaults_file(label: str, package: str, content: str, mode: str = "0644") -> OperationMeta:
    """Debian's /etc/default file of ``package`` (its unit reads ARGS and variables there)."""
    return files.put(
        name=f"Configure {label} (private address{', secret' if mode == '0640' else ''})",
        src=StringIO(content),
        dest=f"/etc/default/{package}",
        user="root",
        group="prometheus",
        mode=mode,
    )


def unit_pattern(units: list[str]) -> str:
    """node_exporter's --collector.systemd.unit-include for exactly ``units`` (it anchors the
    expression itself). No backslash: it would need escaping twice over in Debian's ARGS file."""
    return "(" + "|".join(unit.replace(".", "[.]") for unit in units) + ")"


@deploy("Monitoring exporters")
def node_exporter(run: Run) -> None:
    config, node = run.node.config, run.node
    args = defaults_file(
        "node_exporter",
        "prometheus-node-exporter",
        f'ARGS="--web.listen-address={node.address}:{config.node_exporter_port} --collector.systemd '
        f"--collector.systemd.enable-restarts-metrics "
        f'--collector.systemd.unit-include={unit_pattern(run.wiring.units(node))}"\n',
    )
    packaged_service(run, "node_exporter", "prometheus-node-exporter", [args], silences.quiets(run, exporter=True))


@deploy("Monitoring exporters")
def redis_exporter(run: Run) -> None:
    config, node = run.node.config, run.node
    keys = ",".join(f"db{config.redis_broker_db}={queue}" for queue in run.wiring.queues())
    args = defaults_file(
        "redis_exporter",
        "prometheus-redis-exporter",
        f"REDIS_ADDR=redis://127.0.0.1:{config.redis_port}\n"
        f"REDIS_PASSWORD={run.secrets.redis_password}\n"
        f'ARGS="-web.listen-address {node.address}:{config.redis_exporter_port} -check-single-keys {keys}"\n',
        mode="0640",
    )
    packaged_service(run, "redis_exporter", "prometheus-redis-exporter", [args])


@deploy("Monitoring exporters")
def postgres_exporter(run: Run) -> None:
    """postgres_exporter as its own least-privilege role, over the local socket: Debian's unit
    fails until it has a data source."""
    config, node = run.node.config, run.node
    psql: dict[str, Any] = dict(psql_port=config.postgresql_port, _sudo_user="postgres")
    postgres.role(name=f"Create role {EXPORTER_ROLE} for postgres_exporter", role=EXPORTER_ROLE, login=True, **psql)
    member = host.get_fact(
        PostgresValue,
        sql=f"SELECT pg_has_role('{EXPORTER_ROLE}', 'pg_monitor', 'member')",
        port=config.postgresql_port,
        _sudo_user="postgres",
    )
    if member != "t":  # not a member, or the role does not exist yet
        postgres.sql(
            name=f"Let role {EXPORTER_ROLE} read statistics (pg_monitor) and nothing else",
            sql=f"GRANT pg_monitor TO {EXPORTER_ROLE}",
            **psql,
        )
    data_source = (
        f"user={EXPORTER_ROLE} host=/run/postgresql port={config.postgresql_port} dbname=postgres sslmode=disable"
    )
    args = defaults_file(
        "postgres_exporter",
        "prometheus-postgres-exporter",
        f"DATA_SOURCE_NAME='{data_source}'\n"
        f'ARGS="--web.listen-address={node.address}:{config.postgres_exporter_port}"\n',
    )
    packaged_service(run, "postgres_exporter", "prometheus-postgres-exporter", [args])


@deploy("Monitoring exporters")
def front_metrics(run: Run) -> None:
    """mtail (Debian's package and unit) on a front host: its program, the log it reads and
    where it listens in Debian's defaults file; a member of ``adm``, which owns nginx's logs
    once logrotate recreated them."""
    config, node = run.node.config, run.node
    program = files.put(
        name="Install mtail's program for the front's requests",
        src=shipped_file("monitoring/front.mtail"),
        dest="/etc/mtail/stack-front.mtail",
        mode="0644",
    )
    args = files.put(
        name="Configure mtail (the front's request log, private address)",
        src=StringIO(
            f"LOGS={front.METRICS_LOG}\nHOST={node.address}\nPORT={config.front_metrics_port}\n"
            'EXTRA_ARGS="--emit_prog_label=false"\n'
        ),
        dest="/etc/default/mtail",
        mode="0644",
    )
    reader = server.user(name="Let mtail read nginx's logs (group adm)", user="mtail", groups=["adm"], append=True)
    packaged_service(run, "mtail", "mtail", [program, args, reader])


NODE_EXPORTER = Service(
    name="node_exporter",
    when=monitored,
    # Its systemd collector talks to systemd over D-Bus.
    packages=lambda node: ["prometheus-node-exporter", "dbus"],
    units=lambda node: ["prometheus-node-exporter.service"],
    ports=lambda node: [Port(node.config.node_exporter_port, "node_exporter", scrapes=(Scrape("node"),))],
    deploy=node_exporter,
)
REDIS_EXPORTER = Service(
    name="redis_exporter",
    groups=("redis",),
    when=monitored,
    packages=lambda node: ["prometheus-redis-exporter"],
    units=lambda node: ["prometheus-redis-exporter.service"],
    ports=lambda node: [Port(node.config.redis_exporter_port, "redis_exporter", scrapes=(Scrape("redis"),))],
    deploy=redis_exporter,
)
POSTGRES_EXPORTER = Service(
    name="postgres_exporter",
    groups=("postgres",),
    when=monitored,
    packages=lambda node: ["prometheus-postgres-exporter"],
    units=lambda node: ["prometheus-postgres-exporter.service"],
    ports=lambda node: [Port(node.config.postgres_exporter_port, "postgres_exporter", scrapes=(Scrape("postgres"),))],
    deploy=postgres_exporter,
)
FRONT_METRICS = Service(
    name="mtail",
    groups=("front",),
    when=monitored,
    packages=lambda node: ["mtail"],
    units=lambda node: ["mtail.service"],
    ports=lambda node: [
        Port(node.config.front_metrics_port, "mtail (the front's request metrics)", scrapes=(Scrape("front"),))
    ],
    deploy=front_metrics,
)
