"""
``<app>-dead-letters``: list, or replay, the tasks RabbitMQ dead-lettered.

A task over ``rabbitmq_delivery_limit`` (its process died at every delivery: a poison task) is
moved by RabbitMQ into the vhost's ``dead-letters`` queue (tasks/rabbitmq.py), where an alert
sees it. Once the cause is fixed and deployed, ``replay`` publishes each one again, unchanged
(same task id, arguments and headers), into the queue it died in, then removes it from
dead-letters, so it runs once more. A message whose publish RabbitMQ did not confirm stays in
dead-letters: nothing is lost, a replay that fails half-way can be run again.

Usage (as root, on an application host; the wrapper reads the application's environment):
    <app>-dead-letters list
    <app>-dead-letters replay [TASK_ID ...]     (every task when no id is given)

Installed by the deploy into ``<app_dir>/lib``, beside stack_celery.py, whose Celery app (and
so broker URL) it uses.
"""

from __future__ import annotations

import sys

from amqp import Message
from stack_celery import app

QUEUE = "dead-letters"


def describe(message: Message) -> str:
    """One line: task id, task name, the queue it died in, how often, why."""
    headers = message.properties.get("application_headers") or {}
    death = (headers.get("x-death") or [{}])[0]
    return (
        f"{headers.get('id', '?')}  {headers.get('task', '?')}  queue={death.get('queue', '?')}  "
        f"dead-lettered={death.get('count', '?')}x  reason={death.get('reason', '?')}"
    )


def origin(message: Message) -> str:
    """The queue the message was dead-lettered from."""
    headers = message.properties.get("application_headers") or {}
    return (headers.get("x-death") or [{}])[0]["queue"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("list", "replay"):
        print(__doc__.split("Usage", 1)[1].split("Installed", 1)[0].strip(), file=sys.stderr)
        return 2
    command, wanted = argv[0], set(argv[1:])
    with app.connection_for_write() as connection:
        if connection.transport.driver_type != "amqp":
            print("dead-letters exist with RabbitMQ as the broker only", file=sys.stderr)
            return 2
        channel = connection.default_channel
        # Every message, unacknowledged: those not replayed return to the queue when the
        # channel closes (a classic queue: no delivery is counted).
        messages = []
        while (message := channel.basic_get(QUEUE, no_ack=False)) is not None:
            messages.append(message)
        replayed = 0
        for message in messages:
            task_id = (message.properties.get("application_headers") or {}).get("id")
            if command == "list":
                print(describe(message))
            elif not wanted or task_id in wanted:
                # Returns once RabbitMQ confirms it has the message (raises if it refuses it).
                channel.basic_publish_confirm(
                    Message(message.body, **message.properties), exchange="", routing_key=origin(message)
                )
                channel.basic_ack(message.delivery_tag)
                print(f"replayed {describe(message)}")
                replayed += 1
    if command == "list":
        print(f"{len(messages)} task(s) in {QUEUE}")
    else:
        print(f"{replayed} of {len(messages)} task(s) replayed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
