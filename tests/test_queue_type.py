"""
How the deploy decides the type of the application's RabbitMQ queues (tasks/rabbitmq.py), and
that the dead-letters definitions are imported only while RabbitMQ lacks them (a re-run
changes nothing). No containers: the inputs are what the facts read.
"""

from __future__ import annotations

import dataclasses

import pytest

import settings
from settings.declarations import Settings
from tasks import rabbitmq

DEFAULTS = Settings()
CAPABLE, OLD = ("5.7.0", True), ("5.4.0", False)
#: The queues of two worker groups (the policy covers both).
QUEUES = ["acme", "celery"]


CLASSIC = dataclasses.replace(DEFAULTS, rabbitmq_queue_type="classic")
NOT_ENFORCED = dataclasses.replace(DEFAULTS, celery_enforce_durability=False)


@pytest.mark.parametrize(
    "config, existing, celery, said",
    [
        (DEFAULTS, {}, CAPABLE, ""),
        (DEFAULTS, {"celery": "quorum"}, CAPABLE, ""),
        # Before the venv exists, nothing to say: it is checked again once installed.
        (DEFAULTS, {}, None, ""),
        # Too old: its worker falls back to classic queues, and the deploy says what it lacks.
        (DEFAULTS, {}, OLD, "Celery 5.4.0 cannot run every queue as a quorum queue"),
        (DEFAULTS, {"celery": "classic"}, OLD, "Celery 5.6 brings them"),
        (CLASSIC, {"celery": "classic"}, CAPABLE, ""),
        (CLASSIC, {}, OLD, ""),
    ],
    ids=[
        "new vhost",
        "quorum queues exist",
        "venv not yet built",
        "Celery 5.4 on a new vhost",
        "Celery 5.4 on its classic queues",
        "classic chosen",
        "classic chosen, Celery 5.4",
    ],
)
def test_the_application_is_told_the_setting_and_an_old_celery_is_named(config, existing, celery, said):
    told, why = rabbitmq.queue_type(config, existing, celery)
    assert told == config.rabbitmq_queue_type
    assert said in why and bool(why) == bool(said), why


@pytest.mark.parametrize(
    "config, existing, celery, fix",
    [
        (DEFAULTS, {"celery": "classic"}, CAPABLE, "set rabbitmq_queue_type = classic to keep them"),
        (DEFAULTS, {"celery": "classic"}, None, "set rabbitmq_queue_type = classic to keep them"),
        (CLASSIC, {"celery": "quorum"}, CAPABLE, "set rabbitmq_queue_type = quorum to keep them"),
        (DEFAULTS, {"celery": "quorum"}, OLD, "use Celery 5.6 or later"),
        (NOT_ENFORCED, {"celery": "quorum"}, CAPABLE, "set celery_enforce_durability = true"),
    ],
    ids=[
        "classic queues exist",
        "classic queues exist, venv not yet built",
        "quorum queues exist",
        "Celery 5.4",
        "durability settings off",
    ],
)
def test_queues_of_another_type_than_the_app_would_declare_stop_the_deploy_naming_the_fix(
    config, existing, celery, fix
):
    """RabbitMQ refuses such a declaration: the application would crash-loop."""
    with pytest.raises(settings.SettingsError, match=f"holds the .* queue.s. celery, which the application.*{fix}"):
        rabbitmq.queue_type(config, existing, celery)


def test_existing_queue_types_read_both_export_formats():
    definitions = {
        "queues": [
            {"name": "celery", "vhost": "celery", "type": "quorum", "arguments": {"x-queue-type": "quorum"}},
            {"name": "celery", "vhost": "other", "arguments": {}},
            {"name": "celery_delayed_3", "vhost": "celery", "arguments": {"x-queue-type": "quorum"}},
        ]
    }
    assert rabbitmq.existing_queue_types(definitions, "celery", ["celery"]) == {"celery": "quorum"}
    legacy = {"queues": [{"name": "celery", "vhost": "celery", "arguments": {}}]}
    assert rabbitmq.existing_queue_types(legacy, "celery", ["celery"]) == {"celery": "classic"}


#: What RabbitMQ 4.0's ``export_definitions`` gave back for them (Debian 13, trimmed to these).
EXPORTED = {
    "queues": [
        {
            "arguments": {"x-queue-type": "classic"},
            "auto_delete": False,
            "durable": True,
            "name": "dead-letters",
            "type": "classic",
            "vhost": "celery",
        }
    ],
    "exchanges": [
        {
            "arguments": {},
            "auto_delete": False,
            "durable": True,
            "name": "dead-letters",
            "type": "fanout",
            "vhost": "celery",
        }
    ],
    "bindings": [
        {
            "arguments": {},
            "destination": "dead-letters",
            "destination_type": "queue",
            "routing_key": "",
            "source": "dead-letters",
            "vhost": "celery",
        }
    ],
    "policies": [
        {
            "apply-to": "queues",
            "definition": {
                "dead-letter-exchange": "dead-letters",
                "dead-letter-strategy": "at-least-once",
                "delivery-limit": 20,
                "overflow": "reject-publish",
            },
            "name": "stack-poison-tasks",
            "pattern": "^(acme|celery)$",
            "priority": 0,
            "vhost": "celery",
        }
    ],
}


def test_dead_letter_definitions_are_imported_until_the_node_has_them():
    wanted = rabbitmq.dead_letter_definitions(DEFAULTS, QUEUES)
    assert wanted["policies"][0]["pattern"] == "^(acme|celery)$"
    assert rabbitmq.missing_dead_letter_definitions(None, DEFAULTS, QUEUES) == wanted
    # Once imported, RabbitMQ's export holds them all: a re-run imports nothing.
    assert rabbitmq.missing_dead_letter_definitions(EXPORTED, DEFAULTS, QUEUES) == {}
    # A changed limit re-imports the policy only.
    changed = dataclasses.replace(DEFAULTS, rabbitmq_delivery_limit=5)
    assert list(rabbitmq.missing_dead_letter_definitions(EXPORTED, changed, QUEUES)) == ["policies"]
