"""
Caches of what the bench downloads, so that each package crosses the network once per machine
(for one test session and across sessions), while the deploy stays exactly what users run:

- apt: Debian's apt-cacher-ng, started by the bench on this machine with a configuration and
  cache of its own, listening on Docker's own bridge address only (every bench network reaches
  this machine there; nothing outside it does) and serving Debian's archive only; every
  container's apt goes through it by the deploy's own ``apt_proxy`` setting.
- pip: a wheelhouse of the reference application's and Flower's pinned requirements for the
  containers' Python (downloaded once per machine by pip in a container of the bench's image),
  mounted read-only into every container and made the only package source there by the
  machine's own pip configuration
  (``/etc/pip.conf``: ``find-links``, ``no-index``; with the index as well, pip prefers the
  index's copy of the same file). A bench deploy that needs anything else fails, naming the
  missing package: a suite that installs other packages goes without it (``pip_cache=False``).
  pip's own HTTP cache is no help here: the TLS-intercepting egress of our machines strips the
  caching headers, so pip caches nothing.

Both live under ``CACHE_DIR`` (``STACK_BENCH_CACHE_DIR``, default /var/cache/stackbench);
``make clean-bench-cache`` empties them. ``STACK_BENCH_CACHE=off`` turns both off, for a cold
measurement; ``STACK_BENCH_APT_PROXY`` points apt at a cache of your own instead.
"""

from __future__ import annotations

import hashlib
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
#: The requirements the wheelhouse holds, relative to the project.
WHEELHOUSE_REQUIREMENTS = ("files/app/requirements.txt", "files/monitoring/flower-requirements.txt")
#: Where a container finds the wheelhouse, and the machine-wide pip configuration naming it.
CONTAINER_WHEELHOUSE = "/var/cache/stackbench-wheels"
CONTAINER_PIP_CONF = f"[global]\nfind-links = {CONTAINER_WHEELHOUSE}\nno-index = true\n"


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


def wheelhouse(project: Path, image: str, client) -> Path | None:
    """The wheelhouse of ``WHEELHOUSE_REQUIREMENTS`` for the containers of ``image``: downloaded
    by pip inside a container of that image (its Python decides environment markers, e.g.
    ``python_full_version < "3.11.3"``), through the apt cache and with this machine's extra
    CAs, again whenever the requirements or the image changed (a stamp); None when caching is
    off."""
    if not enabled():
        return None
    requirements = [project / name for name in WHEELHOUSE_REQUIREMENTS]
    digest = hashlib.sha256(image.encode() + b"".join(path.read_bytes() for path in requirements)).hexdigest()
    directory = CACHE_DIR / "wheels" / digest[:16]
    stamp = directory / ".complete"
    if stamp.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    proxy = apt_proxy()
    apt = f"apt-get -qq -o Acquire::http::Proxy={proxy}" if proxy else "apt-get -qq"
    pip = "/tmp/venv/bin/pip download --quiet --cert /etc/ssl/certs/ca-certificates.crt --dest /wheels"
    script = " && ".join(
        [
            f"{apt} update >/dev/null",
            f"DEBIAN_FRONTEND=noninteractive {apt} install -y --no-install-recommends python3-venv >/dev/null",
            "update-ca-certificates >/dev/null",
            "python3 -m venv /tmp/venv",
            # Each file on its own: the two venvs are resolved apart.
            *(f"{pip} --requirement /requirements/{path.name}" for path in requirements),
        ]
    )
    volumes = {str(directory): {"bind": "/wheels", "mode": "rw"}}
    volumes.update({str(path): {"bind": f"/requirements/{path.name}", "mode": "ro"} for path in requirements})
    volumes["/usr/local/share/ca-certificates"] = {"bind": "/usr/local/share/ca-certificates", "mode": "ro"}
    client.containers.run(image, ["sh", "-c", script], volumes=volumes, remove=True)
    stamp.touch()
    return directory


def clear() -> None:
    """Stop the bench's apt-cacher-ng and empty every cache."""
    pidfile = CACHE_DIR / "apt-cacher-ng.pid"
    if pidfile.exists():
        subprocess.run(["kill", pidfile.read_text().strip()], check=False)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
