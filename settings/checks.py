"""
Value checks of single settings: each returns the sentence that says what is wrong (completed
with the setting's name and value by the caller), or None when the value is good.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path

from settings.common import PROJECT_DIR


def port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port between 1 and 65535"


def positive(value: int | float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def zero_or_positive(value: int | float) -> str | None:
    return None if value >= 0 else "must be 0 (none) or greater"


def fraction(value: float) -> str | None:
    return None if 0 < value < 1 else "must be a fraction between 0 and 1, e.g. 0.6"


def identifier(value: str) -> str | None:
    if re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        return None
    return "must be lower-case letters, digits and underscores, starting with a letter"


def size(value: str) -> str | None:
    if re.fullmatch(r"\d+(\.\d+)?(kB|MB|GB|KiB|MiB|GiB)?", value):
        return None
    return "must be a size such as 1GB or 500MB"


def size_or_auto(value: str) -> str | None:
    return None if value == "auto" else size(value) and 'must be "auto" or a size such as 2GB or 512MB'


def size_bytes(value: str) -> int:
    """Bytes of a size that ``size`` accepts; kB, MB and GB count in 1024s, as Redis reads its
    kb, mb and gb."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([kKMG]i?B)?", value).groups()  # type: ignore[union-attr]
    return int(float(number) * 1024 ** {None: 0, "k": 1, "K": 1, "M": 2, "G": 3}[unit[0] if unit else None])


def save_points(value: str) -> str | None:
    numbers = value.split()
    if numbers and len(numbers) % 2 == 0 and all(n.isdigit() for n in numbers):
        return None
    return 'must be pairs of "<seconds> <changes>", e.g. "3600 1 300 100 60 10000"'


def url_or_empty(value: str) -> str | None:
    if value == "" or re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        return None
    return 'must be empty or an http(s) URL such as "http://10.0.0.1:3142"'


def pg_version(value: str) -> str | None:
    return None if value == "auto" or value.isdigit() else 'must be "auto" or a major version like "15"'


def db_index(value: int) -> str | None:
    return None if 0 <= value <= 15 else "must be a Redis database index from 0 to 15"


def absolute_or_empty(value: str) -> str | None:
    return None if value == "" or value.startswith("/") else "must be an absolute path, or empty for the default"


GIT_URL = re.compile(r"(git\+)?(https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+|\S+\.git/?")
DISTRIBUTION_SUFFIXES = (".whl", ".tar.gz", ".zip")


#: Where a writable path may not be, and why (the units' sandbox, templates/app/sandbox.j2).
UNWRITABLE = {
    ("/tmp", "/var/tmp"): "each unit has its own (PrivateTmp), so the API and the worker would not share it",
    ("/home", "/root", "/run/user"): "the sandbox hides home directories (ProtectHome)",
    ("/boot", "/dev", "/etc", "/proc", "/run", "/sys", "/usr", "/bin", "/sbin", "/lib", "/lib64"): (
        "it is the system's, not the application's"
    ),
}


def writable_paths(values: list[str]) -> str | None:
    for value in values:
        if not re.fullmatch(r"(/[\w.-]+){2,}", value) or ".." in value.split("/") or "." in value.split("/"):
            return (
                f"holds {value!r}: each must be an absolute path below a top-level directory, without "
                '"..", spaces or a trailing "/", e.g. /srv/uploads'
            )
        for roots, why in UNWRITABLE.items():
            if any(value == root or value.startswith(f"{root}/") for root in roots):
                return f"holds {value!r}, where the application may not write: {why}; use e.g. /srv/uploads"
    return None


def release(value: str) -> str | None:
    if value in ("", "previous") or re.fullmatch(r"[0-9a-f]{12}", value):
        return None
    return 'must be empty (the release app_source builds), "previous" or a release id such as 3f2a9c1b7d04'


def releases_kept(value: int) -> str | None:
    return None if value >= 2 else "must be 2 or more: the running release and the one a failed gate switches back to"


def source_kind(value: str) -> str:
    """What ``app_source`` names: "git", "distribution" (wheel or sdist) or "directory"."""
    if GIT_URL.fullmatch(value) and not (PROJECT_DIR / Path(value).expanduser()).is_dir():
        return "git"
    if value.endswith(DISTRIBUTION_SUFFIXES):
        return "distribution"
    return "directory"


def app_source(value: str) -> str | None:
    kind = source_kind(value)
    local = PROJECT_DIR / Path(value).expanduser()
    if kind == "git" or (kind == "directory" and local.is_dir()) or (kind == "distribution" and local.is_file()):
        return None
    return (
        f"must be a directory or a wheel/sdist file on this machine, or a git URL; {value!r} is none of them "
        "(a relative path is relative to deploy.py)"
    )


def git_ref(value: str) -> str | None:
    return None if re.fullmatch(r"[\w./@+-]*", value) and ".." not in value else "must be a branch, tag or commit"


def local_file_or_empty(value: str) -> str | None:
    return None if value == "" or Path(value).expanduser().is_file() else f"{value!r} is not a file on this machine"


def relative_path(value: str) -> str | None:
    if value.startswith("/") or ".." in Path(value).parts:
        return "must be a path inside the source tree: relative, without .."
    return None


def command(value: str) -> str | None:
    return None if re.fullmatch(r"[\w./+-]+", value) else "must be a command name or an absolute path, e.g. python3.11"


VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Environment variables the deploy itself sets in the application's environment file.
RESERVED_PREFIX = "STACK_"


def variable_names(names: list[str]) -> str | None:
    bad = [name for name in names if not VARIABLE_NAME.fullmatch(name) or name.startswith(RESERVED_PREFIX)]
    if bad:
        return f"holds {bad}: names must be letters, digits and _, and not start with {RESERVED_PREFIX}"
    return None


def environment(variables: dict[str, str]) -> str | None:
    bad = [name for name, value in variables.items() if not isinstance(value, str) or "\n" in value]
    if bad:
        return f"values of {bad} must be strings on one line"
    return variable_names(list(variables))


def import_path(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", value):
        return None
    return 'must be a Python import path such as "package.module:attribute"'


def url_path(value: str) -> str | None:
    if re.fullmatch(r"/[\w./~%!$&'()*+,;=:@?-]*", value):
        return None
    return 'must be a path on the application\'s own server starting with "/", e.g. "/healthz"'


def metrics_path_or_empty(value: str) -> str | None:
    if value == "" or re.fullmatch(r"/[\w./~%!$&'()*+,;=:@-]*", value):
        return None
    return (
        'must be empty or a path on the application\'s own server starting with "/", without a query, e.g. "/metrics"'
    )


def queue_list(value: str) -> str | None:
    if re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value):
        return None
    return 'must be comma-separated queue names, e.g. "celery,emails"'


def networks(values: list[str]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"holds {value!r}, which is not an IP address or network such as 10.8.0.0/24"
    return None


def duration(value: str) -> str | None:
    if re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", value):
        return None
    return "must be a Prometheus duration such as 15s, 5m, 4h or 15d"


#: Seconds in each unit of a Prometheus duration (a year is 365 days, as Prometheus counts it).
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def duration_seconds(value: str) -> float:
    """Seconds in a Prometheus duration that ``duration`` accepted, e.g. 1h30m is 5400."""
    return sum(int(number) * DURATION_UNITS[unit] for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", value))


def email_or_empty(value: str) -> str | None:
    return None if value == "" or re.fullmatch(r"[^@\s]+@[^@\s]+", value) else "must be empty or an e-mail address"


def host_port_or_empty(value: str) -> str | None:
    return None if value == "" or re.fullmatch(r"[\w.-]+:\d+", value) else 'must be empty or "host:port"'


def ca_files(paths: list[str]) -> str | None:
    for path in paths:
        error = ca_file_error(path)
        if error:
            return error
    return None


def ca_file_error(path: str) -> str | None:
    """Why ``path`` is not a readable PEM file of CA certificates, or None if it is one."""
    file = Path(path).expanduser()
    if not file.is_file():
        return f"{path} does not exist on this machine"
    text = file.read_text(errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        ssl.create_default_context(cadata=text)
    except ssl.SSLError as error:
        return f"{path} is not a valid PEM certificate: {error}"
    return None


def calendar(value: str) -> str | None:
    """A systemd calendar expression, as far as it can be told here (systemd-analyze may not
    be on the machine running pyinfra): non-empty, one line, no shell or unit-file syntax."""
    if not value.strip() or any(character in value for character in "\n=;$`\\"):
        return 'must be a systemd OnCalendar expression, e.g. "Sun *-*-* 01:00:00" or "daily"'
    return None
