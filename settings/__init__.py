"""
Every knob of the deployment, its checks, the secrets and the validation of the whole inventory.

Settings are pyinfra host data: set them for all hosts in ``group_data/all.py``, for a group in
``group_data/<group>.py``, or for one run with ``pyinfra ... --data name=value``. Secrets are
never settings: they come from environment variables or an untracked secrets file, so nothing
secret is committed with the inventory. Everything is validated when the deploy starts, before
any operation runs: an unknown name, a wrong type, a bad value, a missing or weak secret or an
impossible topology stops the run with one message that names the setting and how to fix it.

Each module has one job:

- ``declarations``: every setting with its default and one sentence, and every secret;
- ``checks``: the value checks of single settings;
- ``secrets``: reading and checking the secrets;
- ``validation``: a host's data resolved into settings (once per run), and the whole inventory checked;
- ``docs``: the settings table of docs/settings.md (``python -m settings --write``).
"""

from settings.checks import ca_file_error, source_kind
from settings.common import APP_GROUPS, GROUPS, PROJECT_DIR, SettingsError
from settings.declarations import APP_SECRET_PREFIX, Secrets, Settings
from settings.docs import markdown_table
from settings.secrets import SECRETS_FILE_VARIABLE, load_secrets, secret_problem
from settings.validation import for_host, private_address, resolve, source_tree_problems, validate

__all__ = [
    "APP_GROUPS",
    "APP_SECRET_PREFIX",
    "GROUPS",
    "PROJECT_DIR",
    "SECRETS_FILE_VARIABLE",
    "Secrets",
    "Settings",
    "SettingsError",
    "ca_file_error",
    "for_host",
    "load_secrets",
    "markdown_table",
    "private_address",
    "resolve",
    "secret_problem",
    "source_kind",
    "source_tree_problems",
    "validate",
]
