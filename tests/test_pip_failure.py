"""
The few lines a failed venv install prints (files/pip/pip_failure.py), read from pip's output
as it writes it to a file (not a terminal), without a host: the package, the Python, the
build's last words; pip's own errors otherwise. The bench proves it end to end
(test_own_app.py).
"""

from __future__ import annotations

import importlib.util
import sys

import settings
from tasks import app

SAMPLES = settings.PROJECT_DIR / "tests" / "samples"
_spec = importlib.util.spec_from_file_location("pip_failure", settings.PROJECT_DIR / "files" / "pip" / "pip_failure.py")
assert _spec and _spec.loader
pip_failure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_failure)


def explain(tmp_path, capsys, text: str) -> str:
    log = tmp_path / "pip-install.log"
    log.write_text(text)
    pip_failure.main(str(log), "python3")
    return capsys.readouterr().err


def test_a_source_build_that_fails_names_the_package_the_python_and_the_cause(tmp_path, capsys):
    said = explain(tmp_path, capsys, (SAMPLES / "pip-25-lxml-no-wheel.log").read_text())
    python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    assert said.startswith(f"pip found no wheel of lxml for {python} (python3) and could not build it")
    assert "the build said: Error: Please make sure the libxml2 and libxslt development packages" in said
    assert "subprocess-exited-with-error" not in said and len(said.splitlines()) <= 8


def test_a_failed_wheel_build_names_every_package_pip_names():
    lines = [
        "Building wheel for psycopg2 (pyproject.toml): finished with status 'error'",
        "Failed to build psycopg2 uwsgi",  # pip 23: names separated by spaces
        "ERROR: Failed to build installable wheels for some pyproject.toml based projects (psycopg2, uwsgi)",
    ]
    assert pip_failure.failed_builds(lines) == ["psycopg2", "uwsgi"]
    assert pip_failure.failed_builds(lines[1:2]) == ["psycopg2", "uwsgi"]
    assert pip_failure.failed_builds(lines[2:]) == ["psycopg2", "uwsgi"]


def test_any_other_failure_shows_pips_own_errors(tmp_path, capsys):
    said = explain(
        tmp_path,
        capsys,
        "Collecting nosuchpackage==1.0\nERROR: Could not find a version that satisfies the requirement nosuchpackage==1.0\n"
        "ERROR: No matching distribution found for nosuchpackage==1.0\n",
    )
    assert said.splitlines()[0].startswith("pip could not install the packages with Python")
    assert "ERROR: No matching distribution found for nosuchpackage==1.0" in said
    assert "no wheel" not in said


def test_unmet_requirements_found_by_pip_check_are_named_with_the_fix(tmp_path, capsys):
    """pip's resolver looks only at what one command installs: a package another command (or,
    in a venv not built empty, an earlier deploy) installed keeps requirements the new packages
    break, and pip exits 0 after a warning; ``pip check`` (run after the install) fails, and
    only its lines are shown."""
    said = explain(
        tmp_path,
        capsys,
        "Successfully installed werkzeug-1.0.1\n"
        "ERROR: pip's dependency resolver does not currently take into account all the packages that are installed.\n"
        "flask 2.0.3 requires Werkzeug>=2.0, but you have werkzeug 1.0.1 which is incompatible.\n"
        f"{pip_failure.PIP_CHECK_MARK}\n"
        "flask 2.0.3 has requirement Werkzeug>=2.0, but you have werkzeug 1.0.1.\n"
        "acme 1.0 requires redis, which is not installed.\n",
    )
    lines = said.splitlines()
    assert lines[0].startswith("pip installed the packages with Python") and "pip check found" in lines[0]
    assert lines[1:3] == [
        "  flask 2.0.3 has requirement Werkzeug>=2.0, but you have werkzeug 1.0.1.",
        "  acme 1.0 requires redis, which is not installed.",
    ]
    assert "Pin versions that fit together (the requirements, app_python_packages, app_constraints)" in said
    assert "dependency resolver" not in said and "which is incompatible" not in said


def test_the_marker_before_pip_checks_output_is_the_deploys():
    assert pip_failure.PIP_CHECK_MARK == app.PIP_CHECK_MARK


def test_a_resolution_conflict_names_the_requirements_that_conflict(tmp_path, capsys):
    """As with another host's lock (a constraint) that pins a version the index lacks."""
    said = explain(tmp_path, capsys, (SAMPLES / "pip-23-constraint-conflict.log").read_text())
    assert "ERROR: Cannot install humanize because these package versions have conflicting dependencies." in said
    assert "the conflict: The user requested humanize" in said
    assert "the conflict: The user requested (constraint) humanize==0.0.1" in said
