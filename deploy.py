"""
The whole stack: ``pyinfra inventory.py deploy.py``.

Settings, secrets and the topology are checked first, for the whole inventory at once: bad
input stops the run before any operation runs. Then each host deploys the services its groups
run, in the order of ``tasks/registry.py``: the base system with every package of those
services (one apt transaction), its firewall table, the data services, the application (its
release built and load-checked), the front, the exporters and, on the monitoring host,
Prometheus, Alertmanager and Grafana. Last, the application hosts switch to their release in
batches, drained from the front meanwhile, each batch gated before the next (tasks/rollout.py).
"""

from pyinfra import host, inventory

import settings
from tasks import registry, rollout
from tasks.service import Run

secrets = settings.validate(inventory, single_server_groups=registry.SINGLE_SERVER_GROUPS)
wiring = registry.wiring(inventory)
node = next(node for node in wiring.nodes if node.name == host.name)
run = Run(secrets=secrets, node=node, wiring=wiring)

switch = None
# pyinfra tells operations apart by the line numbers of their calls, and shares one between the
# hosts that call it from the same lines. host.loop adds the service's place in the registry, so
# two services whose operations sit on the same lines of their modules stay apart (once merged,
# they ordered one host's services against another's, in a cycle).
for service in host.loop(wiring.services):
    if service.runs_on(node):
        deployed = service.deploy(run)
        if isinstance(deployed, rollout.Switch):
            switch = deployed
rollout.roll(run, switch)
