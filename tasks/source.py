"""
Where the application comes from, resolved on the machine running pyinfra before any host is
touched: a local directory as it is, a git repository fetched into an untracked cache at the
configured ref (so hosts need neither git nor access to the repository, the deploy key never
leaves this machine, and every host gets the same commit), or a built wheel/sdist file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

import settings

#: Fetched repositories, one per URL; ignored by git (.gitignore).
GIT_CACHE = settings.PROJECT_DIR / ".stack-cache" / "git"
#: Never synced to hosts, whatever the project holds.
EXCLUDED_FILES = ["*.pyc", "*.pyo"]
EXCLUDED_DIRS = [".git", ".venv", "venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".tox", "*.egg-info"]


@dataclass(frozen=True)
class Source:
    """The application's code on this machine."""

    kind: str  # "directory", "git" or "distribution"
    path: Path  # the source tree (directory, git checkout) or the distribution file
    revision: str = ""  # the git commit

    @property
    def is_tree(self) -> bool:
        return self.kind != "distribution"

    def describe(self) -> str:
        return f"{self.path} at {self.revision[:12]}" if self.revision else str(self.path)


def exclusions(config: settings.Settings) -> tuple[list[str], list[str]]:
    """(file patterns, directory patterns) not synced: ours and the app_sync_exclude setting's.
    Directory patterns match at any depth."""
    names = [*EXCLUDED_DIRS, *config.app_sync_exclude]
    return [*EXCLUDED_FILES, *config.app_sync_exclude], [*names, *(f"*/{name}" for name in names)]


def resolve(config: settings.Settings) -> Source:
    """The application's source for ``config``; SettingsError (nothing changed yet) when a git
    repository cannot be fetched, the ref does not exist or the tree lacks a configured file."""
    kind = settings.source_kind(config.app_source)
    if kind != "git":
        return Source(kind, (settings.PROJECT_DIR / Path(config.app_source).expanduser()).resolve())
    checkout, revision = _fetch(config.app_source, config.app_git_ref, config.app_git_ssh_key)
    problems = settings.source_tree_problems(config, checkout)
    if problems:
        raise settings.SettingsError(f"app_source {config.app_source} at {revision[:12]}: " + "; ".join(problems))
    return Source("git", checkout, revision)


def _git(*args: str, cwd: Path, key: str = "") -> str:
    environment = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    if key:
        # Only this key, and a host key learnt on first contact (as ssh does by default).
        environment["GIT_SSH_COMMAND"] = (
            f"ssh -i {Path(key).expanduser()} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
        )
    process = subprocess.run(["git", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, args, process.stdout, process.stderr)
    return process.stdout.strip()


@cache
def _fetch(url: str, ref: str, key: str) -> tuple[Path, str]:
    """Fetch ``url`` into the cache and check out ``ref`` (or the default branch); the checkout
    and its commit."""
    checkout = GIT_CACHE / hashlib.sha256(url.encode()).hexdigest()[:16]
    checkout.mkdir(parents=True, exist_ok=True)
    try:
        _git("init", "--quiet", cwd=checkout)
        _git(
            "fetch",
            "--quiet",
            "--force",
            "--tags",
            "--prune",
            url,
            "+refs/heads/*:refs/remotes/origin/*",
            "+HEAD:refs/remotes/origin/HEAD",
            cwd=checkout,
            key=key,
        )
    except subprocess.CalledProcessError as error:
        raise settings.SettingsError(
            f"app_source: git could not fetch {url}: {error.stderr.strip().splitlines()[-1:] or error}; "
            "check the URL and that app_git_ssh_key (for ssh URLs) may read it"
        ) from None
    candidates = [f"refs/remotes/origin/{ref}", f"refs/tags/{ref}", ref] if ref else ["refs/remotes/origin/HEAD"]
    for candidate in candidates:
        try:
            revision = _git("rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}", cwd=checkout)
            break
        except subprocess.CalledProcessError:
            continue
    else:
        raise settings.SettingsError(
            f"app_git_ref {ref!r} is neither a branch, a tag nor a commit of {url}; set app_git_ref to one that is"
        )
    _git("checkout", "--quiet", "--force", "--detach", revision, cwd=checkout)
    _git("clean", "--quiet", "-ffdx", cwd=checkout)
    return checkout, revision


def tree_digest(root: Path, config: settings.Settings) -> str:
    """SHA-256 over the relative path and content of every file that is synced, so that a
    project installed as a package is reinstalled exactly when its code changed."""
    file_patterns, dir_patterns = exclusions(config)
    digest = hashlib.sha256()
    for directory, subdirectories, names in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = sorted(
            d for d in subdirectories if not any(fnmatch((relative / d).as_posix(), p) for p in dir_patterns)
        )
        for name in sorted(names):
            if any(fnmatch(name, pattern) for pattern in file_patterns):
                continue
            digest.update((relative / name).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256((Path(directory) / name).read_bytes()).digest())
    return digest.hexdigest()
