"""
The application's releases (the operating system's are tasks/releases.py): the code and the
venv the services run, built beside the running ones and switched to at once, so a deploy
never changes what the running services see, and a release that fails the health gate is
switched back from.

On each application host, under app_home:

- ``releases/<id>/src`` (a source tree) or ``releases/<id>/dist/<file>`` (a wheel or sdist): the
  code, root's, readable by the application;
- ``releases/<id>/venv`` → ``venvs/<venv id>``: its venv, shared by the releases that install the
  same packages (a code change of an application installed from a requirements file builds
  no venv), built fresh for its package set, so what an earlier deploy installed is never in
  it and every host of one release installs the same requirements into an empty venv;
- ``releases/<id>/.built``: written last, once the release is complete;
- ``current`` → ``releases/<id>``: what the units run (their paths go through it), replaced
  atomically (``mv -T``) by a switch, which also touches the release's directory: the releases
  most recently switched to come first (pruning, ``app_release=previous``).

A release's id is a digest of what it holds (the code and its venv's), so the same settings
and code are the same release: a re-run finds it built and current and changes nothing, and a
deploy of code that ran before switches back to that release without building it.

Every host of a venv installs the same packages: the first application host (in inventory
order) that makes a venv resolves its requirements, and what pip installed (``pip freeze``) is
kept as that venv's lock on the machine running pyinfra (``.stack-cache/locks``, git-ignored);
the other hosts' builds of it, in the same run (after the first host's, which pyinfra orders by
``record_lock``) or in a later one (a host added since), install under that lock as a
constraints file. A requirement left unpinned thus resolves once, not once per host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host, logger
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.context import state

import settings

#: Characters of a digest in a release's or a venv's id.
ID_LENGTH = 12
#: A release's id, as ``app_release`` may name one.
ID_PATTERN = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")


def digest(*parts: str) -> str:
    """The id of what ``parts`` describe: the first characters of their SHA-256."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True)
class Layout:
    """Where the releases of the application at ``home`` are."""

    home: str

    @property
    def current(self) -> str:
        """The link the units run through."""
        return f"{self.home}/current"

    @property
    def current_venv(self) -> str:
        return f"{self.current}/venv"

    def release(self, release: str) -> str:
        return f"{self.home}/releases/{release}"

    def venv(self, venv: str) -> str:
        return f"{self.home}/venvs/{venv}"

    def switch_command(self, release: str) -> str:
        """Point ``current`` at ``release`` in one rename (a unit that starts meanwhile finds
        one or the other, never none), and mark it the most recently used."""
        link = f"{self.current}.next"
        return f"ln -sfn releases/{release} {link} && mv -T {link} {self.current} && touch {self.release(release)}"


@dataclass(frozen=True)
class Release:
    """A release on a host: its id, when it was last switched to (or built), whether it is
    complete, and the id of its venv."""

    id: str
    used: float
    built: bool
    venv: str


@dataclass(frozen=True)
class OnHost:
    """The releases and venvs on a host, and the release ``current`` points at (None before the
    first release, e.g. on a host deployed before releases existed)."""

    releases: dict[str, Release]
    venvs: frozenset[str]
    current: str | None

    def built(self, release: str) -> bool:
        return release in self.releases and self.releases[release].built

    def previous(self, excluding: str) -> str | None:
        """The complete release most recently switched to, other than ``excluding``."""
        others = [r for r in self.releases.values() if r.built and r.id != excluding]
        return max(others, key=lambda r: r.used).id if others else None

    def unwanted(self, target: str, target_venv: str, kept: int) -> tuple[list[str], list[str]]:
        """The releases and venvs to remove once ``target`` runs and passed its gate: all but
        ``target`` and the ``kept - 1`` complete releases most recently used before it (the
        one switched back to on a failure, or by ``app_release=previous``), and the venvs no
        kept release links to. An incomplete release (its build failed) is removed too."""
        others = sorted(
            (r for r in self.releases.values() if r.built and r.id != target), key=lambda r: r.used, reverse=True
        )
        keep = {target, *(r.id for r in others[: kept - 1])}
        releases = sorted(set(self.releases) - keep)
        venvs = {target_venv, *(self.releases[r].venv for r in keep if r in self.releases)}
        return releases, sorted(self.venvs - venvs)


class Releases(FactBase):
    """The application's releases and venvs on this host, and the current one (``OnHost``)."""

    def command(self, home: str) -> str:
        releases, venvs = f"{home}/releases", f"{home}/venvs"
        return (
            f"find {releases} -mindepth 1 -maxdepth 1 -type d -printf 'release %f %T@\\n' 2>/dev/null; "
            f"find {releases} -mindepth 2 -maxdepth 2 -name .built -printf 'built %h\\n' 2>/dev/null; "
            f"find {releases} -mindepth 2 -maxdepth 2 -name venv -type l -printf 'venv %h %l\\n' 2>/dev/null; "
            f"find {venvs} -mindepth 1 -maxdepth 1 -type d -printf 'venvs %f\\n' 2>/dev/null; "
            f"printf 'current %s\\n' \"$(readlink {home}/current)\""
        )

    @staticmethod
    def default() -> OnHost:
        return OnHost({}, frozenset(), None)

    def process(self, output: list[str]) -> OnHost:
        used: dict[str, float] = {}
        built: set[str] = set()
        venv_of: dict[str, str] = {}
        venvs: set[str] = set()
        current = None
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "release":
                name, _, moment = rest.partition(" ")
                used[name] = float(moment)
            elif kind == "built":
                built.add(rest.rsplit("/", 1)[-1])
            elif kind == "venv":
                path, _, target = rest.partition(" ")
                venv_of[path.rsplit("/", 1)[-1]] = target.rstrip("/").rsplit("/", 1)[-1]
            elif kind == "venvs":
                venvs.add(rest)
            elif kind == "current" and rest.startswith("releases/"):
                current = rest.removeprefix("releases/")
        releases = {name: Release(name, moment, name in built, venv_of.get(name, "")) for name, moment in used.items()}
        return OnHost(releases, frozenset(venvs), current)


#: Where the machine running pyinfra keeps each venv's lock (git-ignored).
LOCK_DIR = settings.PROJECT_DIR / ".stack-cache" / "locks"
#: The lock's name in a venv, which its build reads as a constraints file.
LOCK_FILE = "requirements.lock"


def local_lock(venv: str) -> Path:
    """The lock of the venv ``venv`` (its id) on the machine running pyinfra."""
    return LOCK_DIR / f"{venv}.txt"


def lock_lines(freeze: list[str]) -> list[str]:
    """The pins of ``pip freeze --all`` that a constraints file can hold: not what was
    installed from a path or URL (the project itself, ``name @ url``, ``-e``), which the
    requirements name anyway."""
    return [line for line in freeze if line and not line.startswith(("-e", "#")) and " @ " not in line]


@operation()
def record_lock(venv: str, path: str, leader: bool, user: str):
    """
    On the first host that makes the venv ``venv`` (``leader``; at ``path``), once it is built:
    keep what pip installed (``pip freeze``, run as ``user``: no package's code runs as root) as
    the venv's lock on the machine running pyinfra. Every application host that makes the venv
    runs this operation (a no-op but on the first), so that pyinfra orders the other hosts'
    builds, which read the lock (``receive_lock``), after it. Yields no command.
    """
    if state.is_executing and leader:
        status, output = host.run_shell_command(f"runuser -u {user} -- {path}/bin/pip freeze --all")
        if status:
            lock = local_lock(venv)
            lock.parent.mkdir(parents=True, exist_ok=True)
            pins = "\n".join(lock_lines(output.stdout_lines))
            written = lock.with_name(f"{lock.name}.{os.getpid()}")  # renamed: a reader sees all or nothing
            written.write_text(f"# The packages of the venv {venv}, as pip resolved them on {host.name}.\n{pins}\n")
            written.replace(lock)
        else:
            logger.warning(f"{host.name}: could not read the packages of the venv {venv}: {output.stderr}")
    yield from ()


@operation()
def receive_lock(venv: str, path: str):
    """
    Before this host builds the venv ``venv`` at ``path``: write the lock the first host recorded
    (``record_lock``) where the build reads it. Without one (that host's build failed, or it is
    not in this run), an empty lock and a warning: this host resolves the packages itself.
    """
    if not state.is_executing:
        return
    lock = local_lock(venv)
    text = lock.read_text() if lock.exists() else ""
    if not text:
        logger.warning(f"{host.name}: no lock of the venv {venv} was recorded by the first host: this host resolves it")
    yield StringCommand("mkdir", "-p", path, "&&", "printf", "'%s'", shlex.quote(text), ">", f"{path}/{LOCK_FILE}")
