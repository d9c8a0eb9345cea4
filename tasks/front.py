"""
The front: Debian's nginx on the hosts of the ``front`` group, balancing HTTP over every host
of the ``web`` group (upstreams generated from the inventory) with passive health checks: a
web host that refuses connections or answers 502/503/504 is skipped for the next one within the
same request, and left out for ``front_fail_timeout_seconds``.

Debian's layout: our site in sites-available, enabled by a link, Debian's default site
disabled; the upstream's servers in a file of their own, which a rolling switch
(tasks/rollout.py) rewrites to mark the web hosts it switches ``down`` and back. A changed site
is checked with ``nginx -t`` and then reloaded (no dropped connection); a broken one stops the
deploy with nginx's own message.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Collection
from io import StringIO

from pyinfra.api import deploy, operation
from pyinfra.context import state
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from tasks import render
from tasks.service import ANYONE, Port, Run, Scrape, Service

SITE = "/etc/nginx/sites-available/stack.conf"
#: The upstream's servers, which the site includes.
UPSTREAM = "/etc/nginx/stack-upstream.conf"
#: One line per request, "<status> <seconds>", which mtail reads (tasks/exporters.py).
METRICS_LOG = "/var/log/nginx/stack-metrics.log"


def site_file(run: Run) -> StringIO:
    """nginx's site of this front host."""
    config = run.node.config
    return render(
        "nginx/stack.conf.j2",
        app=config.app_name,
        upstream=UPSTREAM,
        tries=len(run.wiring.hosts("web")),
        port=config.front_port,
        metrics_log=METRICS_LOG,
    )


def upstream_file(run: Run, down: Collection[str] = ()) -> StringIO:
    """The upstream's servers: every web host, those named in ``down`` marked so."""
    config = run.node.config
    servers = {f"{node.address}:{node.config.web_port}": node.name in down for node in run.wiring.hosts("web")}
    return render(
        "nginx/upstream.conf.j2",
        servers=sorted(servers.items()),
        max_fails=1,
        fail_timeout=config.front_fail_timeout_seconds,
    )


@operation()
def _balance(run: Run, hosts: Callable[[], set[str]], back: bool):
    """
    While the run runs, when ``hosts()`` names web hosts: write the upstream with them marked
    ``down`` (``back``: as the deploy keeps it, every host in), check nginx's configuration and
    reload it. A reload lets the old workers finish the requests they hold, and the new ones
    send none to a host marked down. Plans nothing: who is drained is known once every host
    is planned (tasks/rollout.py).
    """
    drained = hosts() if state.is_executing else set()
    if not drained:
        return
    text = upstream_file(run, set() if back else drained).getvalue()
    yield f"printf '%s' {shlex.quote(text)} > {UPSTREAM}.next && mv {UPSTREAM}.next {UPSTREAM}"
    yield "nginx -t -q && systemctl reload nginx"


@deploy("Front (nginx)")
def drain(run: Run, hosts: Callable[[], set[str]], label: str, back: bool = False) -> None:
    """Take the web hosts ``hosts()`` names out of this front before ``label`` switches, or
    (``back``) take them back after."""
    _balance(
        name=f"Take the web hosts of {label} {'back into' if back else 'out of'} the front",
        run=run,
        hosts=hosts,
        back=back,
    )


@deploy("Front (nginx)")
def front(run: Run) -> None:
    site = files.put(name="Write the front's site", src=site_file(run), dest=SITE, mode="0644")
    upstream = files.put(
        name="Write the front's upstream (every web host)", src=upstream_file(run), dest=UPSTREAM, mode="0644"
    )
    link = files.link(name="Enable the front's site", path="/etc/nginx/sites-enabled/stack.conf", target=SITE)
    default = files.link(name="Disable Debian's default site", path="/etc/nginx/sites-enabled/default", present=False)
    changed = any_changed(site, upstream, link, default)
    server.shell(name="Check nginx's configuration (nginx -t)", commands=["nginx -t -q"], _if=changed)
    systemd.service(name="Keep nginx enabled and running", service="nginx", running=True, enabled=True)
    systemd.service(name="Reload nginx for the changed site", service="nginx", reloaded=True, _if=changed)


SERVICE = Service(
    name="front",
    groups=("front",),
    packages=lambda node: ["nginx"],
    units=lambda node: ["nginx.service"],
    ports=lambda node: [
        Port(
            node.config.front_port,
            "HTTP (the public entry)",
            clients=ANYONE,
            # The application as its users reach it: through nginx, from any web host that answers.
            scrapes=(Scrape("health", path=node.config.app_health_path, probe=True),),
        )
    ],
    deploy=front,
)
