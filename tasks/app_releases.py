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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pyinfra.api import FactBase

#: Where a deploy before releases put the code and the venv, under app_home.
LEGACY = ("src", "dist", "venv")
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
    """The releases and venvs on a host, the release ``current`` points at (None before the
    first release, e.g. on a host deployed before releases existed), and what a deploy before
    releases left in app_home (``LEGACY``)."""

    releases: dict[str, Release]
    venvs: frozenset[str]
    current: str | None
    legacy: frozenset[str] = frozenset()

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
            f"for path in {' '.join(LEGACY)}; do [ -e {home}/$path ] && echo legacy $path; done; "
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
        legacy: set[str] = set()
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
            elif kind == "legacy":
                legacy.add(rest)
            elif kind == "current" and rest.startswith("releases/"):
                current = rest.removeprefix("releases/")
        releases = {name: Release(name, moment, name in built, venv_of.get(name, "")) for name, moment in used.items()}
        return OnHost(releases, frozenset(venvs), current, frozenset(legacy))
