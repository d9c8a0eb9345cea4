"""
Converge and idempotence of the whole deploy, on every topology: the fresh deploy succeeds, the
second run changes nothing (naming any operation that did), and bad input stops a run before
any operation runs.
"""

from __future__ import annotations

import pytest

from bench import Cluster

pytestmark = pytest.mark.bench


def test_converge_succeeds(deployed: Cluster):
    run = deployed.runs[0]
    assert run.returncode == 0, f"fresh deploy failed:\n{run.stderr[-6000:]}"


def test_second_run_changes_nothing(deployed: Cluster):
    assert len(deployed.runs) >= 2, "the idempotence run did not happen (the fresh deploy failed)"
    rerun = deployed.runs[1]
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    assert rerun.changed == [], "operations that changed on the re-run:\n" + "\n".join(rerun.changed)
    assert rerun.results["totals"]["no_change"] > 0


def test_missing_secret_stops_the_deploy_before_anything_runs(deployed: Cluster):
    run = deployed.deploy(env=deployed.environment(STACK_RABBITMQ_PASSWORD=""))
    assert run.returncode != 0
    assert "STACK_RABBITMQ_PASSWORD is missing or empty" in run.stderr
    assert "nothing was changed" in run.stderr
    assert "Starting operation" not in run.stderr
