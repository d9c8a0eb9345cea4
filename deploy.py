"""
The whole stack: ``pyinfra inventory.py deploy.py``.

Each host gets the base system with every package its roles need (one apt transaction), then
the services of the inventory groups it is in. Settings, secrets and the topology are checked
first, for the whole inventory at once: bad input stops the run before any operation runs.
"""

from pyinfra import host, inventory

import settings
from tasks import base, postgresql, rabbitmq, redis

secrets = settings.validate(inventory)

ROLES = {
    "redis": (lambda: redis.PACKAGES, redis.redis_server),
    "rabbitmq": (lambda: rabbitmq.PACKAGES, rabbitmq.rabbitmq_server),
    "postgres": (postgresql.packages, postgresql.postgresql_server),
}
#: Hosts that run application code get psql, to check the result database from where it is used.
APP_PACKAGES = ["postgresql-client"]

roles = [role for role in ROLES if role in host.groups]
packages = sorted(
    {package for role in roles for package in ROLES[role][0]()}
    | (set(APP_PACKAGES) if any(group in host.groups for group in settings.APP_GROUPS) else set())
)

base.base_system(packages=packages)
for role in roles:
    ROLES[role][1](secrets)
