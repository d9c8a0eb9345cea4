"""
The application's source, resolved on this machine before any host is touched: a git
repository fetched at a branch, tag or commit; bad URLs and refs named with their fix; the
project's own inventory groups; the project's secret variables. No host needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import inventory
import settings
from bench import git
from bench.fakes import GOOD_SECRETS, all_in_one, validate
from tasks import source as app_source

pytestmark = pytest.mark.usefixtures("no_secrets_file")


@pytest.fixture
def repository(tmp_path, monkeypatch) -> Path:
    """A repository with a commit on main (tagged v1) and a second one on a branch."""
    monkeypatch.setattr(app_source, "GIT_CACHE", tmp_path / "cache")
    app_source._fetch.cache_clear()
    work = tmp_path / "work"
    work.mkdir()
    git("init", "--quiet", "--initial-branch", "main", cwd=work)
    (work / "requirements.txt").write_text("celery==5.7.0\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "one", cwd=work)
    git("tag", "v1", cwd=work)
    git("checkout", "--quiet", "-b", "next", cwd=work)
    (work / "web").mkdir()
    (work / "web" / "page.html").write_text("next\n")
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "two", cwd=work)
    git("checkout", "--quiet", "main", cwd=work)
    return work


def resolved(url: str, **data) -> app_source.Source:
    config, problems = settings.resolve({"app_source": url, **data})
    assert problems == []
    return app_source.resolve(config)


def test_git_source_is_fetched_at_the_ref(repository):
    url = f"file://{repository}"
    main = resolved(url)
    assert main.kind == "git" and main.revision == git("rev-parse", "main", cwd=repository)
    assert not (main.path / "web").exists()
    app_source._fetch.cache_clear()
    branch = resolved(url, app_git_ref="next", app_workdir="web")
    assert (branch.path / "web" / "page.html").read_text() == "next\n"
    app_source._fetch.cache_clear()
    commit = git("rev-parse", "main", cwd=repository)
    assert resolved(url, app_git_ref="v1").revision == commit == resolved(url, app_git_ref=commit).revision
    assert not (resolved(url, app_git_ref="v1").path / "web").exists()


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"app_git_ref": "no-such-branch"}, "app_git_ref 'no-such-branch' is neither a branch, a tag nor a commit"),
        ({"app_workdir": "web"}, "app_workdir 'web' is not a directory in the application's source"),
        ({"app_requirements": "requirements/prod.txt"}, "app_requirements 'requirements/prod.txt' is not a file"),
    ],
)
def test_bad_git_ref_or_tree_is_named_with_its_fix(repository, data, expected):
    config, _ = settings.resolve({"app_source": f"file://{repository}", **data})
    with pytest.raises(settings.SettingsError, match=expected):
        app_source.resolve(config)


def test_unreachable_repository_is_named_with_its_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(app_source, "GIT_CACHE", tmp_path / "cache")
    config, _ = settings.resolve({"app_source": f"file://{tmp_path}/absent.git"})
    with pytest.raises(settings.SettingsError, match=r"app_source: git could not fetch file://.*absent\.git"):
        app_source.resolve(config)


def test_tree_digest_follows_synced_files_only(tmp_path):
    config, _ = settings.resolve({"app_sync_exclude": ["node_modules"]})
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "app.py").write_text("A = 1\n")
    before = app_source.tree_digest(tmp_path, config)
    (tmp_path / "pkg" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / "node_modules").mkdir()
    (tmp_path / "pkg" / "node_modules" / "x.js").write_text("x")
    assert app_source.tree_digest(tmp_path, config) == before
    (tmp_path / "pkg" / "app.py").write_text("A = 2\n")
    assert app_source.tree_digest(tmp_path, config) != before


def test_own_groups_carry_settings_and_near_misses_of_roles_are_refused():
    inventory._check({"10.0.0.5": [["workers", "mail_workers"], {}]})
    with pytest.raises(settings.SettingsError, match="group 'worker', which is not a role; did you mean 'workers'"):
        inventory._check({"10.0.0.5": [["web", "worker"], {}]})
    with pytest.raises(settings.SettingsError, match="is in no role group"):
        inventory._check({"10.0.0.5": [["mail_workers"], {}]})


def test_app_secret_variables_come_from_the_environment_and_are_never_shown():
    with pytest.raises(settings.SettingsError, match="STACK_APP_SENTRY_DSN is missing or empty"):
        validate(all_in_one(app_secret_variables=["SENTRY_DSN"]), **GOOD_SECRETS)
    settings.validate.cache_clear()
    value = "https://key@sentry.example/1"
    secrets = validate(all_in_one(app_secret_variables=["SENTRY_DSN"]), **GOOD_SECRETS, STACK_APP_SENTRY_DSN=value)
    assert secrets.app_variables == {"SENTRY_DSN": value}
    assert value not in repr(secrets)
