"""
The bench's topologies (host name → inventory groups: the same code, one host or several) and
the settings every bench deploy passes on the command line, in one place for the tests, the
demo and the benchmarks.
"""

from __future__ import annotations

import datetime
import tempfile
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import host_ca_certificates

DATA = ["redis", "rabbitmq", "postgres"]
APP = ["web", "workers", "beat"]

TOPOLOGIES: dict[str, dict[str, list[str]]] = {
    # Shared by the read-only tests, once per session (tests/conftest.py, ``deployed``).
    "all-in-one": {"aio": [*DATA, *APP, "monitoring"]},
    "split": {"data": [*DATA, "monitoring"], "app": APP},
    # Six hosts: nginx on a front over two web hosts, two worker hosts, beat on one of them,
    # and the monitoring host beside the data services, all behind the firewall.
    "scale-out": {
        "front": ["front"],
        "data": [*DATA, "monitoring"],
        "web1": ["web"],
        "web2": ["web"],
        "worker1": ["workers", "beat"],
        "worker2": ["workers"],
    },
    # Destructive: the fault suite's own hosts (tests/faults), and a monitoring host apart, which
    # tells of the reboot of either.
    "faults": {"data": DATA, "app": APP, "monitor": ["monitoring"]},
    # The demo (``make demo``): the split topology.
    "demo": {"data": [*DATA, "monitoring"], "app": APP},
}
#: The bench's app_writable_paths.
WRITABLE_PATH = "/srv/app-files"
#: Topologies the read-only tests share.
SHARED = ("all-in-one", "split")


def bench_settings(**overrides: str) -> dict[str, str]:
    """Settings the bench passes with --data, as a user would on the command line."""
    data = {
        # Beat's heartbeat every 5 s instead of 60, so its test need not wait a minute.
        "beat_heartbeat_seconds": "5",
        # Alerts within seconds rather than minutes, so the alert tests wait little.
        "prometheus_scrape_interval": "5s",
        "prometheus_evaluation_interval": "5s",
        "alert_for": "10s",
        # A restart is alerted for a minute, not 15: the tests that kill processes must not
        # leave the next test's healthy stack firing.
        "alert_restart_window": "1m",
        "alertmanager_group_wait": "5s",
        "alertmanager_group_interval": "10s",
        # A directory the application may write (tests/test_security.py writes into it).
        "app_writable_paths": WRITABLE_PATH,
        # Grafana's package cannot be obtained on our machines (see tests/test_grafana.py).
        "grafana": "none",
        # The host firewall on, with this machine (the network's gateway) as the admin source
        # from which the tests reach every service (set once the network exists).
        "firewall": "true",
    }
    # The CAs this machine trusts beyond Debian's (egress to PyPI needs them here), and one of
    # the bench's own, so the extra CA setting is exercised on any machine.
    data["extra_ca_certificates"] = ",".join([*host_ca_certificates(), str(bench_ca())])
    return {**data, **overrides}


@cache
def bench_ca() -> Path:
    """A self-signed CA certificate made for this process (its key is thrown away)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stackbench test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = Path(tempfile.mkdtemp(prefix="stackbench-ca-")) / "stackbench-ca.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path
