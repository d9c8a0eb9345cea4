"""
Redis from Debian's redis-server package: persistent (RDB + AOF), password-protected, bound to
the private address. Debian's redis.conf and unit stay as packaged; we own one included file
and one unit drop-in, and restart Redis only when one of them changed.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

import settings
from tasks import address, packaged_service, render

PACKAGES = ["redis-server", "redis-tools"]
SERVICE = "redis-server"
OUR_CONFIG = "/etc/redis/stack.conf"


@deploy("Redis")
def redis_server(secrets: settings.Secrets) -> None:
    config = settings.for_host(host)

    our_config = files.put(
        name="Write our Redis settings (persistence, auth, bind, noeviction)",
        src=render(
            "redis.conf.j2",
            address=address(),
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
    packaged_service("Redis", SERVICE, [our_config, include])
