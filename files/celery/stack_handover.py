"""
``<app>-handover``: move the tasks left in the broker the deploy switched away from into the
application's broker.

A switch of broker (setting ``celery_broker``, or the broker moved to another host, port, vhost
or database) restarts the API, beat and the workers on the new broker one host after another.
What the old broker still holds then has nobody left to consume it: tasks queued before the
switch and not yet run, a periodic run or a child task published by a unit not yet restarted,
countdown and ETA tasks waiting in RabbitMQ's delay queues. Once every unit runs on the new
broker, the deploy runs this on the beat host: each message of the application's queues on the
old broker (and, from RabbitMQ, of its delay queues; from Redis, those a worker took and never
acknowledged) is published unchanged (same body and headers: the same task id, arguments,
countdown) to the new broker and only then acknowledged to the old one. A run that stops
half-way leaves the rest in the old broker, where the next deploy finds it again; a message
moved but not acknowledged is moved twice (at-least-once, as everywhere).

Reads STACK_HANDOVER_FROM (the old broker's URL) and STACK_HANDOVER_QUEUES (comma-separated),
set by the wrapper (templates/app/handover.sh.j2) from ``/etc/<app>/handover.env``, the
environment file as it was before the switch, which the wrapper removes once done.
Installed by the deploy into ``<app_dir>/lib``, beside stack_celery.py, whose Celery app (and
so the new broker's URL and publish settings) it uses.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from urllib.parse import urlsplit

from celery.utils.time import maybe_make_aware
from kombu import Connection, Queue
from kombu.message import Message
from stack_celery import app

#: RabbitMQ's delay queues (Celery's native delayed delivery, quorum queues): one per bit of the
#: delay, ``celery_delayed_0`` to ``celery_delayed_27`` (kombu 5.5+, no prefix in Celery 5.7).
DELAY_QUEUES = [f"celery_delayed_{level}" for level in range(28)]
#: A routing key through the delay exchanges: one "0." or "1." per level, then the task's own.
DELAY_BITS = re.compile(r"^(?:[01]\.){28}")
#: Message properties that travel with the task (the body and headers carry the rest).
PROPERTIES = ("correlation_id", "reply_to", "priority")
#: Headers the old broker wrote (RabbitMQ's dead-lettering through the delay queues, its count
#: of deliveries): its history, not the task's, left behind.
BROKER_HEADERS = re.compile(r"^x-(death|first-death-.*|last-death-.*|delivery-count)$")


def location(connection: Connection) -> tuple:
    """Where a broker connection points, credentials apart."""
    return connection.transport.driver_type, connection.hostname, connection.port, connection.virtual_host


def restore_taken(old: Connection) -> int:
    """Redis: put back into their queues the tasks a worker took and never acknowledged (it
    crashed; no worker is left on this broker to give them back after the visibility timeout).
    The count restored; 0 with RabbitMQ, which requeues them itself when the worker goes."""
    if old.transport.driver_type != "redis":
        return 0
    channel = old.default_channel
    tags = channel.client.hkeys(channel.unacked_key)
    for tag in tags:
        channel.qos.restore_by_tag(tag)
    return len(tags)


def messages(old: Connection, name: str) -> Iterator[Message]:
    """Every message of the old broker's queue ``name``, taken unacknowledged, until it is empty;
    nothing when the queue does not exist."""
    with old.channel() as channel:
        queue = Queue(name, channel=channel, no_declare=True)
        try:
            queue.queue_declare(passive=True)
        except old.channel_errors:  # no such queue
            return
        while (message := queue.get(no_ack=False)) is not None:
            yield message


def destination(name: str, message: Message, queues: list[str]) -> Queue:
    """The application's queue a message of the old queue ``name`` belongs to: the same queue,
    or for a delay queue the task queue its routing key ends with."""
    if name in DELAY_QUEUES:
        routing_key = DELAY_BITS.sub("", message.delivery_info["routing_key"], count=1)
        name = next((queue for queue in queues if app.amqp.queues[queue].routing_key == routing_key), routing_key)
    return app.amqp.queues[name]


def route(queue: Queue, message: Message, delayed: bool) -> tuple[str, str]:
    """(exchange, routing key) to publish to: the queue's own, or, when the new broker delays
    countdown tasks itself (RabbitMQ with quorum queues) and the task is not yet due, through its
    delay exchanges for the time left, as Celery's ``send_task`` does (celery/app/base.py)."""
    eta = (message.headers or {}).get("eta")
    if delayed and eta and queue.exchange.type != "direct":
        from kombu.transport.native_delayed_delivery import calculate_routing_key

        left = (maybe_make_aware(datetime.fromisoformat(eta)) - app.now()).total_seconds()
        if left > 0:
            return "celery_delayed_27", calculate_routing_key(int(left), queue.routing_key)
    return queue.exchange.name, queue.routing_key


def declare(new: Connection, queue: Queue, delayed: bool) -> None:
    """Declare ``queue`` on the new broker (and, when it delays tasks itself, Celery's delay
    exchanges and queues, with the queue bound to their delivery exchange), as a worker does
    at its start: a publish that finds no binding is dropped without an error (kombu's Redis
    transport, seen when the handover ran before the restarted worker had declared its queue),
    and RabbitMQ would drop a delayed task whose queue is not bound when it falls due. Each
    declaration is idempotent, with the arguments the application's workers use."""
    queue.bind(new.default_channel).declare()
    if delayed:
        from kombu.transport.native_delayed_delivery import (
            bind_queue_to_native_delayed_delivery_exchange,
            declare_native_delayed_delivery_exchanges_and_queues,
        )

        declare_native_delayed_delivery_exchanges_and_queues(new, app.conf.broker_native_delayed_delivery_queue_type)
        bind_queue_to_native_delayed_delivery_exchange(new, queue)


def delays_itself(new: Connection) -> bool:
    """Whether the new broker holds countdown tasks in delay queues (RabbitMQ, quorum queues)."""
    if new.transport.driver_type != "amqp":
        return False
    try:
        from celery.utils.quorum_queues import detect_quorum_queues
    except ImportError:  # Celery older than 5.5: classic queues, no delay queues
        return False
    return detect_quorum_queues(app, "amqp")[0]


def hand_over(old_url: str, queues: list[str]) -> dict[str, int]:
    """Move every task of ``queues`` (and the delay queues) from the broker at ``old_url`` to the
    application's broker; how many from each old queue."""
    moved: dict[str, int] = {}
    # Publisher confirms whatever the application's settings (Redis ignores the option).
    confirmed = {**(app.conf.broker_transport_options or {}), "confirm_publish": True}
    with Connection(old_url) as old, app.connection_for_write(transport_options=confirmed) as new:
        if location(old) == location(new):  # switched away and back before a handover succeeded
            return moved
        moved["restored (taken, not acknowledged)"] = restore_taken(old)
        producer, delayed, declared = new.Producer(), delays_itself(new), set()
        for name in queues + DELAY_QUEUES:
            for message in messages(old, name):
                queue = destination(name, message, queues)
                if queue.name not in declared:
                    declare(new, queue, delayed)
                    declared.add(queue.name)
                exchange, routing_key = route(queue, message, delayed)
                properties = {key: message.properties[key] for key in PROPERTIES if message.properties.get(key)}
                # With RabbitMQ, returns once it confirms it has the message (publisher confirms).
                producer.publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    headers={
                        key: value for key, value in (message.headers or {}).items() if not BROKER_HEADERS.match(key)
                    },
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    delivery_mode="persistent",
                    retry=True,
                    retry_policy=app.conf.task_publish_retry_policy,
                    **properties,
                )
                message.ack()
                moved[name] = moved.get(name, 0) + 1
    return moved


def main() -> int:
    old_url, queues = os.environ["STACK_HANDOVER_FROM"], os.environ["STACK_HANDOVER_QUEUES"].split(",")
    moved = hand_over(old_url, queues)
    parts = urlsplit(old_url)
    counts = ", ".join(f"{name}: {count}" for name, count in moved.items() if count) or "nothing"
    print(
        f"moved from {parts.scheme}://{parts.hostname}:{parts.port}{parts.path} to the application's broker: {counts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
