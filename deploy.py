"""
The whole stack: ``pyinfra inventory.py deploy.py``.

Each host gets the base system with every package its roles need (one apt transaction), its
firewall table (when the firewall setting is on), then the services of the inventory groups it
is in, data services before the application, then the exporters and, on the monitoring host,
Prometheus, Alertmanager and Grafana. Settings, secrets and the topology are checked first, for
the whole inventory at once: bad input stops the run before any operation runs.
"""

from pyinfra import host, inventory

import settings
from tasks import app, base, firewall, front, grafana, monitoring, postgresql, rabbitmq, redis

secrets = settings.validate(inventory)

#: Service → (its Debian packages, its deploy), in the order they are deployed.
SERVICES = {
    "redis": (lambda: redis.PACKAGES, redis.redis_server),
    "rabbitmq": (lambda: rabbitmq.PACKAGES, rabbitmq.rabbitmq_server),
    "postgres": (postgresql.packages, postgresql.postgresql_server),
}
#: Application hosts also get psql, to check the result database from where it is used.
APP_PACKAGES = [*app.PACKAGES, "postgresql-client"]

config = settings.for_host(host)
services = [service for service in SERVICES if service in host.groups]
runs_app = any(group in host.groups for group in settings.APP_GROUPS)
packages = {package for service in services for package in SERVICES[service][0]()}
if runs_app:
    packages.update(APP_PACKAGES, config.app_system_packages)
packages.update(monitoring.packages(host.groups))
if config.firewall:
    packages.update(firewall.PACKAGES)
if "front" in host.groups:
    packages.update(front.PACKAGES)

base.base_system(packages=sorted(packages))
firewall.firewall()
for service in services:
    SERVICES[service][1](secrets)
if runs_app:
    app.application(secrets)
if "front" in host.groups:
    front.front()
monitoring.exporters(secrets)
if "monitoring" in host.groups:
    monitoring.monitoring_server(secrets)
    grafana.grafana_server(secrets)
