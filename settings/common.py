"""
What every part of the settings shares: where the project is, the inventory's groups (roles)
and the error that bad input raises.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

PROJECT_DIR = Path(__file__).resolve().parents[1]

#: Inventory groups, each a role. A host may be in several.
GROUPS = ("redis", "rabbitmq", "postgres", "backup", "web", "workers", "beat", "monitoring", "front")
#: Groups whose hosts run application code and so need the broker and the result database.
APP_GROUPS = ("web", "workers", "beat")


class SettingsError(PyinfraError):
    """Bad input: raised before any operation runs, so no host is changed."""
