"""
Redis from Debian's redis-server package: persistent (RDB + AOF), password-protected, bound to
the private address. Debian's redis.conf and unit stay as packaged; we own one included file
and one unit drop-in, and restart Redis only when one of them changed.
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

import settings
from tasks import packaged_service, render
from tasks.service import Node, Port, Run, Service

UNIT = "redis-server"
OUR_CONFIG = "/etc/redis/stack.conf"


@deploy("Redis")
def redis_server(run: Run) -> None:
    config, secrets = run.node.config, run.secrets

    our_config = files.put(
        name="Write our Redis settings (persistence, auth, bind, noeviction)",
        src=render(
            "redis.conf.j2",
            address=run.node.address,
            port=config.redis_port,
            password=secrets.redis_password,
            save=config.redis_save,
            appendfsync=config.redis_appendfsync,
        ),
        dest=OUR_CONFIG,
        user="redis",
        group="redis",
        mode="0640",
    )
    include = files.line(
        name="Include our settings at the end of Debian's redis.conf",
        path="/etc/redis/redis.conf",
        line=f"^include {OUR_CONFIG}$",
        ensure_newline=True,
    )
    packaged_service("Redis", UNIT, [our_config, include])


def _ports(node: Node) -> list[Port]:
    # Open to the application hosts whatever the broker and result store: while a deploy
    # switches them, the application still uses the old one until its units restart.
    return [Port(node.config.redis_port, "Redis", clients=settings.APP_GROUPS)]


SERVICE = Service(
    name="redis",
    groups=("redis",),
    single=True,
    packages=lambda node: ["redis-server", "redis-tools"],
    units=lambda node: [f"{UNIT}.service"],
    ports=_ports,
    deploy=redis_server,
)
