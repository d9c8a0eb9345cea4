"""
Caches of what the bench downloads, so that each package crosses the network once per machine
(for one test session and across sessions), while the deploy stays exactly what users run:

- apt: Debian's apt-cacher-ng, started by the bench on this machine with a configuration and
  cache of its own, listening on Docker's own bridge address only (every bench network reaches
  this machine there; nothing outside it does) and serving Debian's archive only; every
  container's apt goes through it by the deploy's own ``apt_proxy`` setting.
- pip: one pip cache directory on this machine, mounted where the deploy's pip (run as root by
  ``sudo -H``) keeps its cache in every container, ``/root/.cache/pip``: downloaded files and
  the wheels pip builds from source distributions.

Both live under ``CACHE_DIR`` (``STACK_BENCH_CACHE_DIR``, default /var/cache/stackbench);
``make clean-bench-cache`` empties them. ``STACK_BENCH_CACHE=off`` turns both off, for a cold
measurement; ``STACK_BENCH_APT_PROXY`` points apt at a cache of your own instead.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

CACHE_DIR = Path(os.environ.get("STACK_BENCH_CACHE_DIR", "/var/cache/stackbench"))
#: Not apt-cacher-ng's default (3142): a system instance of it may hold that one.
APT_PORT = 3149
APT_CACHER = "/usr/sbin/apt-cacher-ng"
#: apt-cacher-ng fetches Debian's archive from here (its packaged mirror list may be empty).
DEBIAN_ARCHIVE = "http://deb.debian.org/debian/"
#: Where the deploy's pip keeps its cache in a container.
CONTAINER_PIP_CACHE = "/root/.cache/pip"


def enabled() -> bool:
    return os.environ.get("STACK_BENCH_CACHE", "on") != "off"


def _listening(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((address, port)) == 0


def docker_bridge_address() -> str | None:
    """This machine's address on Docker's default bridge (docker0), or None without one."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True)
    match = re.search(r"inet ([\d.]+)/", shown.stdout)
    return match[1] if match else None


def _apt_cacher_config(address: str) -> Path:
    """apt-cacher-ng's configuration directory of the bench (written on every start)."""
    config = CACHE_DIR / "apt-cacher-ng"
    config.mkdir(parents=True, exist_ok=True)
    (config / "acng.conf").write_text(
        f"CacheDir: {CACHE_DIR / 'apt'}\n"
        f"LogDir: {CACHE_DIR / 'apt-log'}\n"
        "SupportDir: /usr/lib/apt-cacher-ng\n"
        f"Port: {APT_PORT}\n"
        f"BindAddress: {address}\n"
        f"Remap-debrep: file:deb_mirror*.gz /debian ; {DEBIAN_ARCHIVE}\n"
        # Only what is remapped above (Debian's archive): no open proxy to anywhere else.
        "ForceManaged: 1\n"
        "ExThreshold: 4\n"
    )
    return config


def apt_proxy() -> str | None:
    """The apt proxy URL for the bench's containers: ``STACK_BENCH_APT_PROXY`` if set, else
    the bench's apt-cacher-ng, started if it is not running; None when caching is off or
    apt-cacher-ng is not installed (ensure-host.sh installs it on machines without systemd)."""
    if os.environ.get("STACK_BENCH_APT_PROXY"):
        return os.environ["STACK_BENCH_APT_PROXY"]
    address = docker_bridge_address()
    if not enabled() or not Path(APT_CACHER).exists() or address is None:
        return None
    if not _listening(address, APT_PORT):
        for directory in ("apt", "apt-log"):
            (CACHE_DIR / directory).mkdir(parents=True, exist_ok=True)
        # foreground=0: it detaches, and serves later sessions on this machine too.
        subprocess.run(
            [
                APT_CACHER,
                "-c",
                str(_apt_cacher_config(address)),
                "foreground=0",
                f"pidfile={CACHE_DIR / 'apt-cacher-ng.pid'}",
                f"SocketPath={CACHE_DIR / 'apt-cacher-ng.socket'}",
            ],
            check=True,
        )
        for _ in range(50):
            if _listening(address, APT_PORT):
                break
            subprocess.run(["sleep", "0.1"], check=True)
        else:
            raise AssertionError(f"apt-cacher-ng did not listen on port {APT_PORT}; see {CACHE_DIR / 'apt-log'}")
    return f"http://{address}:{APT_PORT}"


def pip_cache_volume() -> dict[str, dict[str, str]]:
    """The docker volume that shares this machine's pip cache with a container; none when
    caching is off."""
    if not enabled():
        return {}
    directory = CACHE_DIR / "pip"
    directory.mkdir(parents=True, exist_ok=True)
    return {str(directory): {"bind": CONTAINER_PIP_CACHE, "mode": "rw"}}


def clear() -> None:
    """Stop the bench's apt-cacher-ng and empty every cache."""
    pidfile = CACHE_DIR / "apt-cacher-ng.pid"
    if pidfile.exists():
        subprocess.run(["kill", pidfile.read_text().strip()], check=False)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
