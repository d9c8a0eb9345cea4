"""
The application's releases without a host (tasks/app_releases.py): what a release's id depends
on, how the host's releases are read (the fact's command run on a directory here), the atomic
switch, which release is "previous" and which are pruned, the gate's switch-back script, and
``stack_check --load`` on an application that imports and one that does not. The bench proves
releases end to end: test_app_tier.py, test_own_app.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import settings
from tasks import app, app_releases, gate, registry
from tasks.app_releases import Layout, OnHost, Release
from tasks.source import Source

_spec = importlib.util.spec_from_file_location(
    "stack_check", settings.PROJECT_DIR / "files" / "check" / "stack_check.py"
)
assert _spec and _spec.loader
stack_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("stack_check", stack_check)
_spec.loader.exec_module(stack_check)

REFERENCE = settings.PROJECT_DIR / "files" / "app"


def build_of(source: Path, release: tuple[str, int] = ("Debian", 12), **config) -> app.Build:
    """The build of ``source`` with ``config`` on a web host of ``release``."""
    _, node = registry.example(("web",), ("web",), release, **config)
    return app._build_of(node.config, Source("directory", source), Layout("/opt/stackapp"), app.python_of(node))


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    copy = tmp_path / "app"
    shutil.copytree(REFERENCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_same_inputs_make_the_same_release_and_a_code_change_a_new_one_with_the_same_venv(reference: Path):
    first, again = build_of(reference), build_of(reference)
    assert first == again and app_releases.ID_PATTERN.fullmatch(first.release)
    (reference / "stackapp" / "release.py").write_text('RELEASE = "changed"\n')
    changed = build_of(reference)
    assert changed.release != first.release
    assert changed.venv_id == first.venv_id  # a requirements file: the code is not in the venv
    assert changed.venv.path == f"/opt/stackapp/venvs/{first.venv_id}"


@pytest.mark.parametrize(
    "config",
    [
        {"app_python_packages": ["uvicorn-worker"]},
        {"app_python": "python3.12"},
        {"pip_index_url": "http://10.0.0.1/simple"},
    ],
    ids=["a package", "the Python", "the index"],
)
def test_what_the_venv_installs_and_how_makes_a_new_venv(reference: Path, config: dict):
    assert build_of(reference, **config).venv_id != build_of(reference).venv_id


def test_a_host_upgraded_to_another_release_gets_another_venv_for_its_python3(reference: Path):
    """python3 is 3.11 on Debian 12 and 3.13 on Debian 13: the venv of one is no use to the other."""
    bookworm, trixie = build_of(reference), build_of(reference, release=("Debian", 13))
    assert bookworm.venv_id != trixie.venv_id and bookworm.release != trixie.release
    named = build_of(reference, app_python="python3.11")
    assert named == build_of(reference, release=("Debian", 13), app_python="python3.11")


def test_every_build_installs_under_another_hosts_lock_and_records_its_own(reference: Path):
    venv = build_of(reference).venv
    assert f"--constraint {venv.path}/{app.PEER_LOCK}" in venv.commands[0]
    assert app._checked(venv)[-1] == (
        f"{venv.path}/bin/pip freeze --all --exclude-editable | sed '/ @ /d' > {venv.path}/{app.LOCK}"
    )


@pytest.mark.parametrize(
    "locks, me, expected",
    [
        ({"a": ["x==1"], "b": ["x==1"]}, "b", None),
        ({"a": ["x==1", "y==1"], "b": ["x==2", "y==1"]}, "b", ("a", ["x==2"], ["x==1"])),
        ({"a": ["x==1"], "b": ["x==2"]}, "a", None),  # the first host is the reference
        ({"b": ["x==2"], "c": ["x==1"]}, "c", ("b", ["x==1"], ["x==2"])),  # a did not build it
        ({"a": ["x==1"]}, "b", None),  # b built nothing
    ],
)
def test_a_host_is_compared_with_the_first_host_that_built_the_same_venv(locks, me, expected):
    assert app.lock_difference(locks, me, order=["a", "b", "c"]) == expected


def test_a_requirement_change_makes_a_new_venv_and_its_commands_read_the_new_releases_tree(reference: Path):
    before = build_of(reference)
    with (reference / "requirements.txt").open("a") as requirements:
        requirements.write("six\n")
    after = build_of(reference)
    assert after.venv_id != before.venv_id
    assert f"--requirement /opt/stackapp/releases/{after.release}/src/requirements.txt" in after.venv.commands[0]


def test_a_change_to_a_requirements_file_the_requirements_include_makes_a_new_venv(tmp_path: Path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "prod.txt").write_text("-r base.txt\n--constraint=pins.txt\ncelery\n")
    (tmp_path / "requirements" / "base.txt").write_text("fastapi\n-r prod.txt\n")  # a loop pip refuses; we stop
    (tmp_path / "requirements" / "pins.txt").write_text("celery==5.4.0\n")
    texts = app.requirements_texts(tmp_path / "requirements" / "prod.txt")
    assert texts == ["-r base.txt\n--constraint=pins.txt\ncelery\n", "fastapi\n-r prod.txt\n", "celery==5.4.0\n"]
    before = build_of(tmp_path, app_requirements="requirements/prod.txt")
    (tmp_path / "requirements" / "pins.txt").write_text("celery==5.5.0\n")
    assert build_of(tmp_path, app_requirements="requirements/prod.txt").venv_id != before.venv_id


def test_a_project_installed_as_a_package_gets_a_venv_per_code(tmp_path: Path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"\n')
    (tmp_path / "x.py").write_text("A = 1\n")
    before = build_of(tmp_path, app_requirements="pyproject.toml")
    (tmp_path / "x.py").write_text("A = 2\n")
    assert build_of(tmp_path, app_requirements="pyproject.toml").venv_id != before.venv_id


def run_fact(home: Path) -> OnHost:
    fact = app_releases.Releases()
    output = subprocess.run(["sh", "-c", fact.command(home=str(home))], capture_output=True, text=True, check=True)
    return fact.process(output.stdout.splitlines())


def make_release(home: Path, release: str, venv: str, built: bool = True, used: float = 0) -> None:
    path = home / "releases" / release
    path.mkdir(parents=True)
    (home / "venvs" / venv).mkdir(parents=True, exist_ok=True)
    (path / "venv").symlink_to(home / "venvs" / venv)
    if built:
        (path / ".built").touch()
    os.utime(path, (used, used))


def test_the_fact_reads_the_releases_their_venvs_and_the_current_one(tmp_path: Path):
    assert run_fact(tmp_path) == OnHost({}, frozenset(), None)  # before the first release
    make_release(tmp_path, "a" * 12, "v1", used=1000)
    make_release(tmp_path, "b" * 12, "v2", built=False, used=2000)
    (tmp_path / "venvs" / "v3").mkdir()
    (tmp_path / "current").symlink_to("releases/" + "a" * 12)
    (tmp_path / "venv").mkdir()  # what a deploy before releases left
    assert run_fact(tmp_path) == OnHost(
        {"a" * 12: Release("a" * 12, 1000.0, True, "v1"), "b" * 12: Release("b" * 12, 2000.0, False, "v2")},
        frozenset({"v1", "v2", "v3"}),
        "a" * 12,
        frozenset({"venv"}),
    )


def test_a_switch_replaces_the_link_in_one_rename_and_marks_the_release_used(tmp_path: Path):
    for release in ("a" * 12, "b" * 12):
        make_release(tmp_path, release, "v1", used=1000)
    layout = Layout(str(tmp_path))
    for release in ("a" * 12, "b" * 12, "b" * 12):  # the first switch, another, and one to where it is
        subprocess.run(["sh", "-c", layout.switch_command(release)], check=True)
        assert os.readlink(tmp_path / "current") == f"releases/{release}"
        assert (tmp_path / "releases" / release).stat().st_mtime > 1000
    assert sorted(os.listdir(tmp_path)) == ["current", "releases", "venvs"]  # no link left beside it


def host_with(*releases: tuple[str, float, bool, str], current: str | None = None) -> OnHost:
    found = {name: Release(name, used, built, venv) for name, used, built, venv in releases}
    return OnHost(found, frozenset(r[3] for r in releases), current)


def test_previous_is_the_complete_release_most_recently_used_other_than_the_one_the_settings_build():
    on_host = host_with(
        ("old", 1, True, "v1"), ("good", 3, True, "v1"), ("broken", 4, True, "v2"), ("half", 5, False, "v3")
    )
    assert on_host.previous(excluding="broken") == "good"
    assert on_host.previous(excluding="good") == "broken"
    assert host_with(("only", 1, True, "v1")).previous(excluding="only") is None


def test_pruning_keeps_the_target_and_the_most_recent_others_and_their_venvs():
    on_host = host_with(
        ("r1", 1, True, "v1"),
        ("r2", 2, True, "v1"),
        ("r3", 3, True, "v2"),
        ("r4", 4, True, "v3"),
        ("failed", 5, False, "v4"),
    )
    assert on_host.unwanted("new", "v5", kept=3) == (["failed", "r1", "r2"], ["v1", "v4"])
    assert on_host.unwanted("r1", "v1", kept=2) == (["failed", "r2", "r3"], ["v2", "v4"])  # a rollback to r1


@pytest.mark.parametrize("switched", [True, False], ids=["switched", "could not switch"])
def test_the_switch_back_script_switches_then_checks_and_says_so(tmp_path: Path, switched: bool):
    """The script run with a switch that succeeds, or fails, and a restart and a check that
    only print what they were asked: the check runs only after a switch that succeeded. (An
    ``if ! a && b`` once negated only ``a``: the host was never switched back.)"""
    make_release(tmp_path, "a" * 12, "v1")
    make_release(tmp_path, "b" * 12, "v1")
    (tmp_path / "current").symlink_to("releases/" + "b" * 12)
    command = Layout(str(tmp_path)).switch_command("a" * 12) if switched else "false"
    back = gate.SwitchBack(release="a" * 12, command=command, units=["x-worker.service"])
    script = back.script("x").replace("systemctl restart", "echo restarted").replace(gate.tool("x"), "echo checked")
    said = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    if switched:
        assert os.readlink(tmp_path / "current") == "releases/" + "a" * 12
        assert said == (
            "restarted x-worker.service\n"
            f"Switched back to the release {'a' * 12}, which this host ran before: it works (its health gate passed).\n"
        )
    else:
        assert os.readlink(tmp_path / "current") == "releases/" + "b" * 12
        assert said == f"Switching back to the release {'a' * 12} failed.\n"


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """An importable package ``shop`` whose ``good`` module has an ASGI app and ``bad`` does not import."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "good.py").write_text("api = object()\n")
    (tmp_path / "shop" / "bad.py").write_text("import shop_missing_dependency\napi = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_passes_for_an_asgi_app_that_imports(project, capsys):
    status = stack_check.main(["--load", "--asgi", "shop.good:api", "x-gunicorn.service"])
    assert status == 0 and capsys.readouterr().out == "loads: shop.good:api\n"


def test_load_fails_naming_the_setting_the_unit_and_the_error(project, capsys):
    status = stack_check.main(["--load", "--asgi", "shop.bad:api", "x-gunicorn.service"])
    said = capsys.readouterr().out.splitlines()
    assert status == 1
    assert said[0] == "The ASGI app shop.bad:api (asgi_app), which x-gunicorn.service runs, fails to load:"
    assert said[-2] == "ModuleNotFoundError: No module named 'shop_missing_dependency'"
    assert said[-1] == "UNIT=x-gunicorn.service"


def test_a_rollback_goes_to_the_release_before_the_one_the_settings_build(reference: Path):
    build = build_of(reference)
    on_host = host_with(("older", 1, True, "v0"), ("good", 2, True, "v1"), (build.release, 3, True, build.venv_id))
    config = settings.Settings(app_release="previous")
    assert app._target(config, build, on_host, "web-1") == "good"
    assert app._target(settings.Settings(), build, on_host, "web-1") == build.release
    assert app._target(settings.Settings(app_release="older"), build, on_host, "web-1") == "older"


@pytest.mark.parametrize("wanted", ["previous", "0123456789ab"])
def test_a_rollback_to_a_release_the_host_lacks_is_refused_before_anything_runs(reference: Path, wanted: str):
    build = build_of(reference)
    on_host = host_with((build.release, 3, True, build.venv_id), ("half", 4, False, "v9"))
    with pytest.raises(settings.SettingsError) as refused:
        app._target(settings.Settings(app_release=wanted), build, on_host, "web-1")
    assert str(refused.value) == (
        f"host web-1: app_release={wanted}, but this host has no such release (its releases: {build.release}; "
        f"the settings build {build.release}); unset app_release to deploy that one"
    )
