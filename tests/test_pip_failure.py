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
