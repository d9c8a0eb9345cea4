"""
The secrets: read from the environment or the untracked secrets file (the environment wins),
and refused when missing, weak or placeholders. Nothing secret is ever a setting, so nothing
secret is committed with the inventory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from settings.common import PROJECT_DIR, SettingsError
from settings.declarations import APP_SECRET_PREFIX, Secrets

#: Environment variable naming the secrets file; by default ``secrets.env`` beside deploy.py.
SECRETS_FILE_VARIABLE = "STACK_SECRETS_FILE"
MIN_SECRET_LENGTH = 16
#: Values that are defaults somewhere, or placeholders: refused whatever their length.
WEAK_SECRETS = {"guest", "password", "changeme", "secret", "admin", "celery", "redis", "postgres", "rabbitmq"}


def secrets_file() -> Path:
    return Path(os.environ.get(SECRETS_FILE_VARIABLE) or PROJECT_DIR / "secrets.env")


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; optional single or double quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(f"{path} line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip().removeprefix("export ").strip()] = value
    return values


def secret_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable as a password, or None."""
    if not value:
        return "is missing or empty"
    if value.lower() in WEAK_SECRETS or re.fullmatch(r"(.)\1*", value):
        return "is a default or placeholder value"
    if len(value) < MIN_SECRET_LENGTH:
        return f"is shorter than {MIN_SECRET_LENGTH} characters"
    return None


def load_secrets(
    environ: Mapping[str, str] | None = None, grafana: bool = False, app_variables: tuple[str, ...] = ()
) -> Secrets:
    """Read and check every secret (those of Grafana only if ``grafana``, and the application's
    ``app_variables``); one error lists all that are wrong and how to set them."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    path = secrets_file()
    from_file = _read_env_file(path)
    values, problems = {}, []
    application = {}
    for name in app_variables:
        variable = APP_SECRET_PREFIX + name
        application[name] = variables.get(variable) or from_file.get(variable, "")
        if not application[name]:
            problems.append(f"{variable} is missing or empty (app_secret_variables names {name})")
    for item in fields(Secrets):
        if "env" not in item.metadata:
            continue
        variable, when = item.metadata["env"], item.metadata["when"]
        value = variables.get(variable) or from_file.get(variable, "")
        if when == "always" or (when == "grafana" and grafana):
            problem = secret_problem(value)
        else:
            check = item.metadata.get("check")
            problem = check(value) if check else None
        if problem:
            problems.append(f"{variable} {problem}")
        values[item.name] = value
    if problems:
        raise SettingsError(
            "; ".join(problems) + f". Set each in the environment or in {path} (KEY=VALUE, never committed), "
            f"e.g. {fields(Secrets)[0].metadata['env']}=$(openssl rand -hex 24)."
        )
    return Secrets(**values, app_variables=application)
