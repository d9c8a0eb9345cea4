"""
The test bench: throwaway Debian containers that boot systemd, reached over SSH by the real
``pyinfra`` CLI exactly as a user reaches real servers.

- ``ensure_base_image()`` builds the base image of a Debian release (``STACK_BENCH_DEBIAN``:
  trixie by default, or bookworm) with debootstrap (no registry is reachable) and reuses it
  while its build script is unchanged.
- ``Cluster`` starts one container per host on a private docker network, writes the hosts file
  that ``inventory.py`` reads (``STACK_HOSTS_FILE``), runs pyinfra, and removes everything on
  ``destroy()`` (also at interpreter exit, so a crashed session leaves nothing behind).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import secrets as random_secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
import testinfra
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tasks.releases import RELEASES

from . import caches

PROJECT_DIR = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
IMAGE_SCRIPT = BENCH_DIR / "base-image.sh"
LABEL = "stackbench"
SSH_USER = "deploy"

#: The Debian releases the bench boots, the tested ones of tasks/releases.py: debootstrap's
#: suite name → (name, major) as the deploy's facts report it. The first, the newest, is the
#: default of a bench session.
DEBIAN_RELEASES = {release.codename: release.key for release in RELEASES if release.tested}
#: The environment variable that picks the release of a bench session (``make test-core``).
DEBIAN_VARIABLE = "STACK_BENCH_DEBIAN"

#: Flags that boot systemd as PID 1 on our machines (see shared/ENVIRONMENT.md): --privileged
#: fails here, and Debian's sandboxed units need every capability but SYS_RESOURCE.
SYSTEMD_RUN_OPTIONS = dict(
    cap_add=["ALL"],
    cap_drop=["SYS_RESOURCE"],
    security_opt=["seccomp=unconfined", "apparmor=unconfined"],
    cgroupns="host",
    volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
    tmpfs={"/run": "", "/run/lock": ""},
    stop_signal="SIGRTMIN+3",
)


def wait_until(check, timeout: float = 60, interval: float = 0.5):
    """Call ``check`` until it returns a true value; its value, or the last error at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} still false after {timeout}s")
        time.sleep(interval)


def docker_client() -> docker.DockerClient:
    return docker.from_env(timeout=300)


def debian_release() -> str:
    """The Debian release of this bench session: ``STACK_BENCH_DEBIAN``, or the newest we test."""
    release = os.environ.get(DEBIAN_VARIABLE) or next(iter(DEBIAN_RELEASES))
    if release not in DEBIAN_RELEASES:
        raise SystemExit(f"{DEBIAN_VARIABLE}={release!r}: the bench boots one of {', '.join(DEBIAN_RELEASES)}")
    return release


def base_image_tag(release: str) -> str:
    """The image of ``release`` built by the current build script (its inputs: both)."""
    digest = hashlib.sha256(IMAGE_SCRIPT.read_bytes()).hexdigest()[:12]
    return f"{LABEL}-{release}:{digest}"


def ensure_base_image(release: str | None = None) -> str:
    """The base image of ``release`` (default: the session's), built unless an image of the
    same build script and release exists already."""
    release = release or debian_release()
    tag = base_image_tag(release)
    client = docker_client()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        mirror = os.environ.get("STACK_BENCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        started = time.monotonic()
        subprocess.run(["sh", str(IMAGE_SCRIPT), tag, release, mirror], check=True, stdout=subprocess.DEVNULL)
        print(f"bench: built {tag} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return tag


def generate_ssh_key(directory: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair for this bench: the private key file and the public key line."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / "id_ed25519"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " stackbench"


def test_secrets() -> dict[str, str]:
    """Random secrets for one bench, in the environment variables the deploy reads."""
    return {
        "STACK_REDIS_PASSWORD": random_secrets.token_hex(16),
        "STACK_RABBITMQ_PASSWORD": random_secrets.token_hex(16),
        "STACK_POSTGRESQL_PASSWORD": random_secrets.token_hex(16),
        "STACK_BACKUP_CIPHER_PASS": random_secrets.token_hex(16),
    }


def git(*args: str, cwd: Path) -> str:
    """Run git in ``cwd`` as the bench's committer (no global git identity needed); its output."""
    identity = ["-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    command = ["git", *identity, *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def host_ca_certificates() -> list[str]:
    """The CA certificates this machine trusts beyond Debian's (TLS-intercepting egress)."""
    return sorted(str(path) for path in Path("/usr/local/share/ca-certificates").glob("*.crt"))


@dataclass
class PyinfraRun:
    """One ``pyinfra`` invocation: exit code, timing, and the per-operation JSON results."""

    returncode: int
    seconds: float
    stdout: str
    stderr: str

    @property
    def results(self) -> dict:
        return json.loads(self.stdout)["results"]

    @property
    def changed(self) -> list[str]:
        """``operation name @ host`` for every operation that changed something."""
        return [
            f"{operation['name']} @ {host}" for operation in self.results["operations"] for host in operation["success"]
        ]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def changed_in_text(self) -> list[str]:
        """The names of the operations that changed something, read from pyinfra's text output:
        a failed run prints no JSON, so ``changed`` cannot tell."""
        blocks = self.output.split("--> Starting operation: ")[1:]
        return [block.splitlines()[0].strip() for block in blocks if "] Success" in block]

    @property
    def gate_failure(self) -> str:
        """What a failed health gate (tasks/gate.py) said: the output after its last mention,
        empty when it did not fail."""
        said = "the application does not work after this deploy (the health gate)"
        return self.output.rpartition(said)[2] if said in self.output else ""


#: What ends the stream of a Host.exec whose output arrived whole.
EXEC_END = "[stack-bench exec end]"


@dataclass
class Host:
    name: str
    groups: list[str]
    container: object = None
    address: str = ""

    def exec(self, command: str, check: bool = True, user: str = "root") -> str:
        """Run ``command`` with sh inside the container; the output, or AssertionError if it fails.

        Docker's exec sometimes hands back an empty stream for a command that printed and
        exited 0 (moby/moby#27289, docker/docker-py#2042; seen here under load: ``readlink`` of a
        link answered ""). So the command's output also goes to a file, the stream ends with a
        mark, and without the mark the file is read again (a read can be repeated, the command
        cannot). Files older than 10 min are removed on the way."""
        saved = f"/tmp/stack-bench-exec.{uuid.uuid4().hex}"
        wrapped = (
            "find /tmp -maxdepth 1 -name 'stack-bench-exec.*' -mmin +10 -delete 2>/dev/null; "
            f'({command}\n) >{saved} 2>&1; status=$?; cat {saved}; printf %s "{EXEC_END}"; exit $status'
        )
        code, output = self.container.exec_run(["sh", "-c", wrapped], user=user)
        text = output.decode(errors="replace")
        for _ in range(10):
            if EXEC_END in text:
                break
            time.sleep(0.2)
            text = self.container.exec_run(["sh", "-c", f'cat {saved} && printf %s "{EXEC_END}"'], user=user)[1].decode(
                errors="replace"
            )
        else:
            raise AssertionError(
                f"{self.name}: `{command}` exited {code}; its output did not arrive in 11 reads of {saved}"
            )
        text = text.rpartition(EXEC_END)[0]
        if check and code != 0:
            raise AssertionError(f"{self.name}: `{command}` exited {code}:\n{text}")
        return text

    def status(self, command: str) -> int:
        return self.container.exec_run(["sh", "-c", command])[0]

    @property
    def node(self) -> testinfra.host.Host:
        """testinfra's view of this host (``service``, ``file``, ``socket``...), over docker exec."""
        return testinfra.get_host(f"docker://{self.container.name}")


@dataclass
class Cluster:
    """Containers that play the hosts of one topology (``{host name: [groups]}``)."""

    topology: dict[str, list[str]]
    image: str
    workdir: Path
    data: dict[str, object] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=test_secrets)
    hosts: dict[str, Host] = field(default_factory=dict)
    runs: list[PyinfraRun] = field(default_factory=list)
    #: Fixed for the long-lived sandbox; random for a test session.
    id: str = field(default_factory=lambda: f"{LABEL}-{uuid.uuid4().hex[:8]}")
    #: Keep the containers when the interpreter exits (the sandbox); a test bench never does.
    keep: bool = False
    #: What the reports call it (the topology's name).
    name: str = "bench"
    #: The webhook receiver of its Alertmanager, when it has a monitoring host.
    receiver: object = None
    #: Extra arguments of every ``pyinfra`` run (e.g. ``--group-data DIR``).
    arguments: list[str] = field(default_factory=list)
    #: Whether its containers use this machine's apt cache and wheelhouse (tests/bench/caches.py).
    apt_cache: bool = True
    pip_cache: bool = True

    def __post_init__(self) -> None:
        self.client = docker_client()
        if not self.keep:
            atexit.register(self.destroy)

    # -- lifecycle -----------------------------------------------------------------------------

    def create(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key, public_key = generate_ssh_key(self.workdir)
        self.client.networks.create(self.id, driver="bridge", labels={LABEL: self.id})
        proxy = caches.apt_proxy() if self.apt_cache else None
        if proxy:
            self.data.setdefault("apt_proxy", proxy)
        options = dict(SYSTEMD_RUN_OPTIONS)
        wheels = caches.wheelhouse(PROJECT_DIR, self.image, self.client) if self.pip_cache else None
        if wheels:
            wheelhouse = {str(wheels): {"bind": caches.CONTAINER_WHEELHOUSE, "mode": "ro"}}
            options["volumes"] = {**SYSTEMD_RUN_OPTIONS["volumes"], **wheelhouse}
        self._run_options, self._public_key, self._wheels = options, public_key, wheels
        for name, groups in self.topology.items():
            self.hosts[name] = Host(name, groups, self._start_container(name))
        for host in self.hosts.values():
            self._prepare(host)
        self.write_hosts_file()
        return self

    def _start_container(self, name: str) -> docker.models.containers.Container:
        return self.client.containers.run(
            self.image,
            name=f"{self.id}-{name}",
            hostname=name,
            detach=True,
            network=self.id,
            labels={LABEL: self.id, f"{LABEL}.host": name},
            **self._run_options,
        )

    def _prepare(self, host: Host) -> None:
        """Wait for ``host`` to boot, read its address and let the deploy's SSH key in."""
        self._wait_for_boot(host)
        self._read_address(host)
        host.exec(
            f"install -d -m 700 -o {SSH_USER} -g {SSH_USER} /home/{SSH_USER}/.ssh && "
            f"echo '{self._public_key}' > /home/{SSH_USER}/.ssh/authorized_keys && "
            f"chown {SSH_USER}: /home/{SSH_USER}/.ssh/authorized_keys"
        )
        if self._wheels:
            host.exec(f"printf '{caches.CONTAINER_PIP_CONF}' > /etc/pip.conf")

    def replace(self, host: Host) -> Host:
        """Lose ``host`` for good (its container and disk removed) and put a new, empty machine
        of the same name and groups in its place; its address may differ (the hosts file says
        the new one). The deploy has not run on it."""
        host.container.remove(force=True, v=True)
        new = Host(host.name, host.groups, self._start_container(host.name))
        self.hosts[host.name] = new
        self._prepare(new)
        self.write_hosts_file()
        return new

    def attach(self) -> bool:
        """Adopt this cluster's running containers (the sandbox's warm start); False if any is
        missing or runs another image (another release), in which case ``destroy()`` then
        ``create()`` start afresh."""
        running = {
            container.labels.get(f"{LABEL}.host"): container
            for container in self.client.containers.list(filters={"label": f"{LABEL}={self.id}"})
        }
        self.key = self.workdir / "id_ed25519"
        if set(running) != set(self.topology) or not self.key.exists():
            return False
        if any(self.image not in container.image.tags for container in running.values()):
            return False
        for name, groups in self.topology.items():
            self.hosts[name] = Host(name, groups, running[name])
            self._read_address(self.hosts[name])
        self.write_hosts_file()
        return True

    @property
    def gateway(self) -> str:
        """This machine's address on the cluster's network (where the containers reach it)."""
        network = self.client.networks.get(self.id)
        return network.attrs["IPAM"]["Config"][0]["Gateway"]

    def _read_address(self, host: Host) -> None:
        host.container.reload()
        host.address = host.container.attrs["NetworkSettings"]["Networks"][self.id]["IPAddress"]

    def _wait_for_boot(self, host: Host, timeout: float = 120) -> None:
        def booted() -> bool:
            state = host.exec("systemctl is-system-running || true").strip()
            return state in ("running", "degraded") and host.status("systemctl is-active -q ssh") == 0

        wait_until(booted, timeout=timeout)

    def reboot(self, host: Host, timeout: float = 90) -> None:
        """Reboot ``host`` as a machine reboots: systemd shuts every unit down in order (Docker
        kills what is left after ``timeout`` s), then the container boots again. Its address
        must not change, since the deploy configured the others with it."""
        address = host.address
        host.container.restart(timeout=timeout)
        self._wait_for_boot(host)
        self._read_address(host)
        assert host.address == address, f"{host.name} came back on {host.address}, not {address}"

    def destroy(self) -> None:
        """Remove every container and the network of this cluster; safe to call twice."""
        for container in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.id}"}):
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters={"label": f"{LABEL}={self.id}"}):
            network.remove()
        self.hosts.clear()

    # -- pyinfra -------------------------------------------------------------------------------

    @property
    def hosts_file(self) -> Path:
        return self.workdir / "hosts.json"

    def ssh_data(self) -> dict[str, object]:
        """pyinfra's connection data for the bench's containers."""
        return {
            "ssh_user": SSH_USER,
            "ssh_key": str(self.key),
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "off",
            "_sudo": True,
        }

    def inventory(self) -> dict[str, list]:
        """The inventory of this cluster, as ``inventory.py`` reads it from STACK_HOSTS_FILE."""
        return {
            host.address: [host.groups, {"private_address": host.address, **self.ssh_data()}]
            for host in self.hosts.values()
        }

    def write_hosts_file(self) -> None:
        self.hosts_file.write_text(json.dumps(self.inventory(), indent=2))

    def environment(self, **overrides: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("STACK_")}
        env.update(self.secrets, STACK_HOSTS_FILE=str(self.hosts_file), PYINFRA_PROGRESS="off")
        env["STACK_SECRETS_FILE"] = str(self.workdir / "no-secrets-file")
        env.update(overrides)
        return env

    def command(self, *extra: str) -> list[str]:
        """``pyinfra -y --json inventory.py deploy.py`` with this cluster's settings and arguments."""
        command = [str(Path(sys.executable).parent / "pyinfra"), "-y", "--json", "inventory.py", "deploy.py"]
        for key, value in self.data.items():
            command += ["--data", f"{key}={value}"]
        return [*command, *self.arguments, *extra]

    def deploy(self, *extra: str, env: dict[str, str] | None = None, timeout: float = 1200) -> PyinfraRun:
        """Run ``pyinfra -y --json inventory.py deploy.py`` from the project directory."""
        started = time.monotonic()
        process = subprocess.run(
            self.command(*extra),
            cwd=PROJECT_DIR,
            env=env or self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        run = PyinfraRun(process.returncode, time.monotonic() - started, process.stdout, process.stderr)
        self.runs.append(run)
        leaked = [name for name, value in self.secrets.items() if value in run.output]
        assert not leaked, f"pyinfra printed the value of {leaked}"  # never print which value
        return run

    # -- diagnostics ---------------------------------------------------------------------------

    def diagnostics(self) -> str:
        """``systemctl --failed`` and the journal of every failed unit, and of every service
        systemd had to restart (a crash it healed is still worth reading), on every host."""
        report = []
        for host in self.hosts.values():
            failed = host.exec("systemctl --failed --no-legend --plain | awk '{print $1}'", check=False).split()
            restarted = restarted_services(host)
            report.append(
                f"===== {host.name} ({host.address}) failed units: {failed or 'none'}; "
                f"restarted by systemd: {restarted or 'none'}"
            )
            for unit in failed + restarted:
                report.append(f"----- journal of {unit}")
                report.append(host.exec(f"journalctl -u {unit} -n 60 --no-pager", check=False))
        return "\n".join(report)

    def active(self, units_by_group: dict[str, list[str]]) -> bool:
        """Whether every unit of every host of each group is active."""
        return all(
            host.status(f"systemctl is-active -q {' '.join(units)}") == 0
            for group, units in units_by_group.items()
            for host in self.by_group(group)
        )

    def by_group(self, group: str) -> list[Host]:
        return [host for host in self.hosts.values() if group in host.groups]

    def one(self, group: str) -> Host:
        return self.by_group(group)[0]


def restarted_services(host: Host) -> list[str]:
    """Services that systemd restarted after they died (NRestarts > 0)."""
    output = host.exec("systemctl show --property Id --property NRestarts '*.service'", check=False)
    restarted, properties = [], {}
    for line in output.splitlines() + [""]:
        if line.strip():
            key, _, value = line.partition("=")
            properties[key] = value
        elif properties:
            if properties.get("NRestarts", "0") not in ("", "0"):
                restarted.append(properties.get("Id", "?"))
            properties = {}
    return restarted


def remove_all_bench_resources() -> None:
    """Remove every container and network any bench ever created on this machine."""
    client = docker_client()
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        container.remove(force=True, v=True)
    for network in client.networks.list(filters={"label": LABEL}):
        network.remove()
