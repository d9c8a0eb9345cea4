"""
The operating system releases the deploy knows, and what differs between them for it, in one
place: the service declarations read their versions here (``tasks/postgresql.py``), the bench
boots the tested ones (``tests/bench``), and the README's table of supported systems says the
same (``tests/test_docs.py`` compares them).

What differs and how the deploy copes, so no task module branches on a release:
- PostgreSQL's major version, hence its package, cluster directory and unit
  (``postgresql@<major>-main``): read from ``postgresql`` below.
- python3, the default ``app_python``: the application's pinned packages need wheels for it, or
  pip builds them from source; a failed build names the package and this Python
  (``files/pip/pip_failure.py``).
- RabbitMQ 4.0 on Debian 13: its CLI runs Erlang with ``-noinput`` and waits forever for
  definitions on standard input, so they are imported from a file on every release
  (``tasks/rabbitmq.py``); Celery 5.7's queues and QoS use no feature RabbitMQ 4 deprecates
  (``test_the_stack_uses_no_deprecated_rabbitmq_feature``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    """One release: how pyinfra's ``LinuxDistribution`` fact names it, and its versions."""

    distribution: str
    major: int
    codename: str
    #: Whether the test suite runs on it (the bench boots Debian only: Ubuntu's archive is out
    #: of our machines' reach).
    tested: bool
    #: The major version its ``postgresql`` package installs.
    postgresql: str
    #: Its python3: what the application's wheels must be built for.
    python: str

    @property
    def key(self) -> tuple[str, int]:
        return self.distribution, self.major

    @property
    def title(self) -> str:
        version = f"{self.major}" if self.distribution == "Debian" else f"{self.major}.04"
        return f"{self.distribution} {version} ({self.codename})"


#: Newest first; the first tested one is the bench's default.
RELEASES = (
    Release("Debian", 13, "trixie", tested=True, postgresql="17", python="3.13"),
    Release("Debian", 12, "bookworm", tested=True, postgresql="15", python="3.11"),
    Release("Ubuntu", 24, "noble", tested=False, postgresql="16", python="3.12"),
    Release("Ubuntu", 22, "jammy", tested=False, postgresql="14", python="3.10"),
)
BY_KEY = {release.key: release for release in RELEASES}


def known(key: tuple[str, int]) -> Release | None:
    """The release pyinfra's fact calls ``key`` (name, major), or None if the deploy knows it not."""
    return BY_KEY.get(key)


def names() -> str:
    """The known releases, for error messages."""
    return ", ".join(release.title for release in RELEASES)
