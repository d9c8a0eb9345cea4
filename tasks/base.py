"""
Base system of every host: apt's proxy, the extra CA certificates to trust, fresh package lists
once per run, and every Debian package this host's roles need, installed in one transaction.
"""

from __future__ import annotations

import hashlib
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import FindFiles
from pyinfra.operations import apt, files, server
from pyinfra.operations.util import any_changed

from tasks.service import Run, Service

APT_PROXY_FILE = "/etc/apt/apt.conf.d/80stack-proxy"
APT_LOCK_FILE = "/etc/apt/apt.conf.d/80stack-lock-timeout"
#: dpkg keeps the packages of an interrupted run here until `dpkg --configure -a` finishes them.
DPKG_UPDATES = "/var/lib/dpkg/updates"
CA_DIR = "/usr/local/share/ca-certificates"
#: Our certificates are named so; others in CA_DIR belong to someone else and are left alone.
CA_PREFIX = "stack-"


def ca_certificate_name(path: str) -> str:
    """Remote file name of a local CA file: stable for the same content, unique across files."""
    digest = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:12]
    return f"{CA_PREFIX}{Path(path).stem}-{digest}.crt"


@deploy("Base system")
def base_system(run: Run) -> None:
    """Configure apt and certificates, then install every package of this host's services in
    one apt transaction."""
    config = run.node.config
    packages = run.wiring.packages(run.node)

    if config.apt_proxy:
        files.put(
            name="Point apt at the configured proxy",
            src=StringIO(f'Acquire::http::Proxy "{config.apt_proxy}";\n'),
            dest=APT_PROXY_FILE,
            mode="0644",
        )
    else:
        files.file(name="Remove any apt proxy we configured before", path=APT_PROXY_FILE, present=False)

    _trust_ca_certificates(config.extra_ca_certificates)
    _recover_interrupted_apt()

    apt.update(
        name="Refresh apt's package lists when older than apt_cache_valid_seconds",
        cache_time=config.apt_cache_valid_seconds,
    )
    apt.packages(
        name=f"Install the packages of this host's roles ({len(packages)})",
        packages=packages,
        no_recommends=True,
    )


def _trust_ca_certificates(paths: list[str]) -> None:
    """Install each CA file under a stable name, drop the ones no longer configured, rebuild
    the system bundle (which apt, curl, Python's ssl and pip with truststore read) if any changed."""
    wanted = {ca_certificate_name(path): path for path in paths}
    changes = [
        files.put(name=f"Trust the CA certificates in {path}", src=path, dest=f"{CA_DIR}/{name}", mode="0644")
        for name, path in sorted(wanted.items())
    ]
    for stale in host.get_fact(FindFiles, path=CA_DIR, quote_path=True, fname=f"{CA_PREFIX}*.crt", maxdepth=1) or []:
        if Path(stale).name not in wanted:
            changes.append(files.file(name=f"Stop trusting {stale}", path=stale, present=False))
    if changes:
        server.shell(
            name="Rebuild the system CA bundle",
            commands=["update-ca-certificates --fresh >/dev/null"],
            _if=any_changed(*changes),
        )


def _recover_interrupted_apt() -> None:
    """A deploy killed in the middle of apt leaves either an apt still running on the host
    (it holds the lock: wait for it, up to 10 minutes, instead of failing at once) or a dpkg
    run cut short (finish it with ``dpkg --configure -a``, which apt itself asks for and which
    does nothing when nothing is pending; run only when dpkg left pending work behind)."""
    files.put(
        name="Make apt wait for a running apt's lock instead of failing",
        src=StringIO('DPkg::Lock::Timeout "600";\n'),
        dest=APT_LOCK_FILE,
        mode="0644",
    )
    if host.get_fact(FindFiles, path=DPKG_UPDATES, quote_path=True, maxdepth=1, fname="[0-9]*"):
        server.shell(
            name="Finish the package configuration an interrupted run left pending",
            # dpkg has no lock timeout: retry while an apt left running holds the lock.
            commands=[
                "for attempt in $(seq 300); do "
                "DEBIAN_FRONTEND=noninteractive dpkg --configure -a --force-confold && exit 0; sleep 2; "
                "done; exit 1"
            ],
        )


SERVICE = Service(name="base", deploy=base_system)
