"""
Redis from Debian's redis-server package: persistent (RDB + AOF), password-protected, bound to
the private address, with a memory limit. Debian's redis.conf and unit stay as packaged; we own
one included file and one unit drop-in, and restart Redis only when one of them changed.

A background save forks Redis; with the kernel's default overcommit heuristic that fork can
fail on a busy host, and then ``stop-writes-on-bgsave-error`` makes Redis refuse every write.
Redis asks for ``vm.overcommit_memory = 1``, which the deploy sets (persistently, in
/etc/sysctl.d). A container cannot set it (the kernel's setting is its host's): the deploy then
says so and leaves it to the container's host.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FactBase, deploy
from pyinfra.facts.hardware import Memory
from pyinfra.facts.server import Sysctl
from pyinfra.operations import files, server

import settings
from settings import checks
from tasks import packaged_service, render, silences
from tasks.service import Node, Port, Run, Service

UNIT = "redis-server"
OUR_CONFIG = "/etc/redis/stack.conf"
#: Where the deploy persists vm.overcommit_memory.
SYSCTL_FILE = "/etc/sysctl.d/60-stack-redis.conf"
#: The share of the host's memory ``redis_maxmemory = auto`` gives Redis.
AUTO_SHARE = 0.5


class Container(FactBase):
    """The container technology the host runs in (docker, lxc...), or None on a machine."""

    def command(self) -> str:
        return "systemd-detect-virt --container || true"

    def process(self, output: list[str]) -> str | None:
        kind = " ".join(output).strip()
        return None if kind in ("", "none") else kind


def maxmemory_bytes(config: settings.Settings, host_mb: float | None, host_name: str) -> int:
    """Redis' maxmemory in bytes: the setting, or ``AUTO_SHARE`` of the host's memory. Raises
    SettingsError when the setting exceeds the host's memory (or it is unknown for auto)."""
    if host_mb is None:
        raise settings.SettingsError(
            f"host {host_name}: its memory cannot be read (vmstat, from procps, is missing); set redis_maxmemory"
        )
    host_bytes = int(host_mb * 1024 * 1024)
    if config.redis_maxmemory == "auto":
        return int(host_bytes * AUTO_SHARE)
    wanted = checks.size_bytes(config.redis_maxmemory)
    if wanted > host_bytes:
        raise settings.SettingsError(
            f"redis_maxmemory ({config.redis_maxmemory}) is more than the memory of host {host_name} "
            f"({host_mb / 1024:.1f} GiB): lower it, or set it to auto ({AUTO_SHARE:.0%} of the host's memory)"
        )
    return wanted


@deploy("Redis")
def redis_server(run: Run) -> None:
    config, secrets = run.node.config, run.secrets

    maxmemory = maxmemory_bytes(config, host.get_fact(Memory), host.name)
    _overcommit_memory()
    our_config = files.put(
        name="Write our Redis settings (persistence, auth, bind, memory limit, noeviction)",
        src=render(
            "redis.conf.j2",
            address=run.node.address,
            port=config.redis_port,
            password=secrets.redis_password,
            save=config.redis_save,
            appendfsync=config.redis_appendfsync,
            maxmemory=maxmemory,
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
    packaged_service(run, "Redis", UNIT, [our_config, include], silences.quiets(run, consumers=True))


def _overcommit_memory() -> None:
    """vm.overcommit_memory = 1 at every boot (a file we own in /etc/sysctl.d) and now; in a
    container, which cannot change it, a warning while its host's value differs."""
    files.put(
        name="Persist vm.overcommit_memory = 1, so that Redis' background save can always fork",
        src=StringIO(
            "# Managed by the deploy (tasks/redis.py): Redis' background save forks.\nvm.overcommit_memory = 1\n"
        ),
        dest=SYSCTL_FILE,
        mode="0644",
    )
    container = host.get_fact(Container)
    if container is None:
        server.sysctl(name="Let the kernel overcommit memory now", key="vm.overcommit_memory", value=1)
        return
    current = host.get_fact(Sysctl, keys=["vm.overcommit_memory"]).get("vm.overcommit_memory")
    if current != 1:
        logger.warning(
            f"{host.name} is a container ({container}): vm.overcommit_memory is its host's ({current}), "
            "which it cannot change. Set vm.overcommit_memory = 1 on that host, or a background save of "
            "Redis may fail to fork, and Redis then refuses writes until a save succeeds."
        )


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
