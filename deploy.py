"""
The whole stack: ``pyinfra inventory.py deploy.py``.

Settings, secrets and the topology are checked first, for the whole inventory at once: bad
input stops the run before any operation runs. Then each host deploys the services its groups
run, in the order of ``tasks/registry.py``: the base system with every package of those
services (one apt transaction), its firewall table, the data services, the application, the
front, the exporters and, on the monitoring host, Prometheus, Alertmanager and Grafana.
"""

from pyinfra import host, inventory

import settings
from tasks import registry
from tasks.service import Run

secrets = settings.validate(inventory, single_server_groups=registry.SINGLE_SERVER_GROUPS)
wiring = registry.wiring(inventory)
node = next(node for node in wiring.nodes if node.name == host.name)
run = Run(secrets=secrets, node=node, wiring=wiring)

for service in wiring.on(node):
    service.deploy(run)
