"""
One module per service, each a ``@deploy``; the helpers here are what they share.

Templates are rendered here, on the machine running pyinfra, and uploaded with ``files.put``:
the values (some of them secrets) then never appear among the operation's arguments, which
pyinfra prints with ``--json`` and in its debug output; only a hash of the content does.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from tasks import silences
from tasks.service import Run

PROJECT_DIR = Path(__file__).resolve().parents[1]
FILES_DIR = PROJECT_DIR / "files"

_jinja = Environment(
    loader=FileSystemLoader(PROJECT_DIR / "templates"),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


#: For templates whose output is itself a template language using {{ }} (Prometheus' alert
#: rules): Jinja's markers become [[ ]] and [% %] there.
_jinja_brackets = _jinja.overlay(
    variable_start_string="[[", variable_end_string="]]", block_start_string="[%", block_end_string="%]"
)


def render(template: str, brackets: bool = False, **context: Any) -> StringIO:
    """Render ``templates/<template>`` with ``context`` (with [[ ]] markers if ``brackets``);
    a missing variable is an error."""
    environment = _jinja_brackets if brackets else _jinja
    return StringIO(environment.get_template(template).render(**context))


def shipped_file(name: str) -> str:
    """Path of a static file shipped under ``files/``."""
    return str(FILES_DIR / name)


def packaged_service(
    run: Run, label: str, unit: str, changes: list[OperationMeta], quiet: list[silences.Quiet] | None = None
) -> OperationMeta:
    """Keep a distribution-packaged service enabled and running, restarted by systemd when it
    dies (our drop-in, whatever the package's unit says), and restarted by us when the drop-in
    or any of ``changes`` (our configuration files) changed, with the alerts that restart raises
    silenced (``quiet``: by default, those about this host). The restart operation."""
    dropin = files.put(
        name=f"Make systemd restart {label} always and start it after the network",
        src=shipped_file("restart-on-failure.conf"),
        dest=f"/etc/systemd/system/{unit}.service.d/50-stack.conf",
        mode="0644",
    )
    systemd.daemon_reload(name=f"Reload systemd after the {label} drop-in changed", _if=dropin.did_change)
    systemd.service(name=f"Keep {label} enabled and running", service=unit, running=True, enabled=True)
    changed = any_changed(*changes, dropin)
    with silences.silenced(run, label, when=changed, made=quiet):
        restart = systemd.service(
            name=f"Restart {label} to apply the changed configuration", service=unit, restarted=True, _if=changed
        )
    return restart
