"""
Deploy speed against the install floor, in one run on fresh identical containers:

  (a) fresh deploy of the all-in-one topology (the tests' one, monitoring included);
  (b) the no-op re-run;
  (c) fresh deploy of the six-host scale-out topology (tests/test_scale_out.py);
  (d) the floor: the Debian packages the all-in-one deploy installed and the Python
      requirements of its two venvs, installed by a bare shell script into a fresh container.

Prints each figure, the ratios and the targets (all-in-one ≤ 1.3 × floor; no-op ≤ 3 s per host;
six hosts ≤ 1.5 × all-in-one) and, for each deploy, the operations that took longest (from the
moments pyinfra starts each one), which is where the time goes when a target is missed.

Then how the cost grows with the fleet: a fresh deploy and a no-op re-run of 1, 3, 6 and 12
hosts (``fleet``: the all-in-one, then a data host beside application hosts added), against the
target of 12 hosts ≤ 1.6 × one host, with the longest operations of the largest fleet.

    make setup && .venv/bin/python bench/deploy_speed.py [--only ratios|fleet] [--sizes 1,3,6,12]

The deploys use the bench's apt cache and wheelhouse (tests/bench/caches.py), as the tests do;
STACK_BENCH_CACHE=off measures them cold. The floor script uses the same (its container is made alike).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT_DIR / "tests"), str(PROJECT_DIR)]

from bench import PROJECT_DIR as _ROOT
from bench import Cluster, ensure_base_image, host_ca_certificates
from bench.topologies import APP, DATA, TOPOLOGIES, bench_settings

OPERATION_START = "--> Starting operation: "
#: The fleets of the growth table, by their number of hosts.
FLEET_SIZES = (1, 3, 6, 12)
#: The growth target: the largest fleet's deploy and re-run at most this many times one host's.
FLEET_TARGET = 1.6


def timed_deploy(cluster: Cluster) -> tuple[float, list[tuple[float, str]]]:
    """Run the deploy, timing each operation from its start to the next one's; (total seconds,
    [(seconds, operation)] longest first)."""
    started = time.monotonic()
    process = subprocess.Popen(
        cluster.command(),
        cwd=_ROOT,
        env=cluster.environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    marks: list[tuple[float, str]] = []
    tail: list[str] = []
    for line in process.stderr:
        tail = (tail + [line])[-40:]
        if line.startswith(OPERATION_START):
            marks.append((time.monotonic(), line[len(OPERATION_START) :].strip()))
    if process.wait() != 0:
        raise SystemExit("deploy failed:\n" + "".join(tail))
    ended = time.monotonic()
    spans = [(later[0] - mark[0], mark[1]) for mark, later in zip(marks, marks[1:] + [(ended, "")], strict=True)]
    if marks:  # connecting, reading facts and preparing every operation, before the first runs
        spans.append((marks[0][0] - started, "(before the first operation: connect, facts, prepare)"))
    return ended - started, sorted(spans, reverse=True)


def new_cluster(topology: dict, name: str, workdir: Path) -> Cluster:
    cluster = Cluster(topology, ensure_base_image(), workdir / name, data=bench_settings())
    cluster.name = name
    cluster.create()
    cluster.data["firewall_admin_sources"] = cluster.gateway
    if any("monitoring" in groups for groups in topology.values()):
        cluster.data["alert_webhook_url"] = f"http://{cluster.gateway}:9/alerts"  # nobody listens: not measured
    return cluster


def floor(workdir: Path, packages: list[str]) -> float:
    """Seconds for a bare shell script to install ``packages`` and the two venvs' requirements
    into a fresh container (after trusting the same extra CAs as the deploy)."""
    cluster = new_cluster({"floor": []}, "floor", workdir)
    try:
        host = cluster.hosts["floor"]
        for path in host_ca_certificates():
            host.container.put_archive("/usr/local/share/ca-certificates", _tar(Path(path)))
        for name in ("app", "monitoring"):
            host.container.put_archive(
                "/root",
                _tar(
                    PROJECT_DIR / "files" / name / ("requirements.txt" if name == "app" else "flower-requirements.txt")
                ),
            )
        proxy = cluster.data.get("apt_proxy")
        script = " && ".join(
            [
                "update-ca-certificates >/dev/null",
                *([f"echo 'Acquire::http::Proxy \"{proxy}\";' > /etc/apt/apt.conf.d/80proxy"] if proxy else []),
                "apt-get update -qq",
                f"DEBIAN_FRONTEND=noninteractive apt-get install -qq -y --no-install-recommends {' '.join(packages)} >/dev/null",
                "python3 -m venv /root/app && /root/app/bin/pip install -q --cert /etc/ssl/certs/ca-certificates.crt -r /root/requirements.txt",
                "python3 -m venv /root/flower && /root/flower/bin/pip install -q --cert /etc/ssl/certs/ca-certificates.crt -r /root/flower-requirements.txt",
            ]
        )
        started = time.monotonic()
        host.exec(script)
        return time.monotonic() - started
    finally:
        cluster.destroy()


def _tar(path: Path) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(path, arcname=path.name)
    return buffer.getvalue()


def installed_packages(cluster: Cluster, baseline: set[str]) -> list[str]:
    host = next(iter(cluster.hosts.values()))
    return sorted(set(host.exec("apt-mark showmanual").split()) - baseline)


def report(title: str, spans: list[tuple[float, str]], count: int = 8) -> None:
    print(f"  longest operations of the {title}:")
    for seconds, operation in spans[:count]:
        print(f"    {seconds:6.1f} s  {operation}")


def fleet(size: int) -> dict[str, list[str]]:
    """``size`` hosts: the all-in-one alone, or a data host (the data services and monitoring)
    and ``size - 1`` application hosts (web and workers; beat on the first), as a fleet grows."""
    if size == 1:
        return TOPOLOGIES["all-in-one"]
    hosts = {"data": [*DATA, "monitoring"]}
    for number in range(1, size):
        hosts[f"app{number}"] = [group for group in APP if group != "beat" or number == 1]
    return hosts


def growth(workdir: Path, sizes: tuple[int, ...] = FLEET_SIZES) -> None:
    """Print the fresh deploy and the no-op re-run of each fleet of ``sizes`` hosts, against
    the first's (one host by default)."""
    rows, largest = [], ([], [])
    for size in sizes:
        cluster = new_cluster(fleet(size), f"fleet-{size}", workdir)
        try:
            fresh, fresh_spans = timed_deploy(cluster)
            noop, noop_spans = timed_deploy(cluster)
        finally:
            cluster.destroy()
        rows.append((size, fresh, noop))
        largest = (fresh_spans, noop_spans)
        print(f"  {size} host(s): fresh {fresh:.1f} s, no-op re-run {noop:.1f} s", flush=True)
    first, one_fresh, one_noop = rows[0]
    print(f"\n| Hosts | Fresh deploy (s) | × {first} | No-op re-run (s) | × {first} |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size, fresh, noop in rows:
        print(f"| {size} | {fresh:.1f} | {fresh / one_fresh:.2f} | {noop:.1f} | {noop / one_noop:.2f} |")
    size, fresh, noop = rows[-1]
    for what, ratio in (("fresh", fresh / one_fresh), ("no-op re-run", noop / one_noop)):
        met = "yes" if ratio <= FLEET_TARGET else "NO"
        print(f"{size} hosts / {first}, {what}: {ratio:.2f} (target ≤ {FLEET_TARGET}): {met}")
    print(f"\nWhere the time goes with {size} hosts:")
    report(f"fresh deploy of {size} hosts", largest[0])
    report(f"no-op re-run of {size} hosts", largest[1], 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("ratios", "fleet"), help="measure only the ratios or only the fleet")
    parser.add_argument(
        "--sizes", type=lambda text: tuple(map(int, text.split(","))), default=FLEET_SIZES, help="the fleets, e.g. 1,12"
    )
    arguments = parser.parse_args()
    only = arguments.only
    workdir = Path(tempfile.mkdtemp(prefix="deploy-speed-"))
    if only != "fleet":
        ratios(workdir)
    if only != "ratios":
        print("\nHow the cost grows with the fleet:", flush=True)
        growth(workdir, arguments.sizes)


def ratios(workdir: Path) -> None:
    """Print the all-in-one's fresh deploy and re-run, the six hosts' and the floor, and their
    ratios against the targets."""
    clusters = []
    try:
        aio = new_cluster(TOPOLOGIES["all-in-one"], "all-in-one", workdir)
        clusters.append(aio)
        baseline = set(aio.hosts["aio"].exec("apt-mark showmanual").split())
        fresh, fresh_spans = timed_deploy(aio)
        noop, noop_spans = timed_deploy(aio)
        packages = installed_packages(aio, baseline)
        aio.destroy()

        scale = new_cluster(TOPOLOGIES["scale-out"], "scale-out", workdir)
        clusters.append(scale)
        six, six_spans = timed_deploy(scale)
        scale.destroy()

        bare = floor(workdir, packages)
    finally:
        for cluster in clusters:
            cluster.destroy()

    rows = [
        ("(a) fresh deploy, all-in-one (1 host)", fresh),
        ("(b) no-op re-run, all-in-one", noop),
        (f"(c) fresh deploy, scale-out ({len(TOPOLOGIES['scale-out'])} hosts)", six),
        (f"(d) floor: bare script, same {len(packages)} packages + 2 venvs", bare),
    ]
    print("\n| What | Seconds |\n| --- | ---: |")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} |")
    checks = [
        ("all-in-one / floor", fresh / bare, 1.3),
        ("no-op re-run per host (s)", noop / 1, 3.0),
        ("scale-out / all-in-one", six / fresh, 1.5),
    ]
    print("\n| Ratio | Measured | Target | Met |\n| --- | ---: | ---: | --- |")
    for label, value, target in checks:
        print(f"| {label} | {value:.2f} | ≤ {target} | {'yes' if value <= target else 'NO'} |")
    print("\nWhere the time goes:")
    report("fresh all-in-one deploy", fresh_spans)
    report("no-op re-run", noop_spans, 5)
    report("scale-out deploy", six_spans)


if __name__ == "__main__":
    main()
