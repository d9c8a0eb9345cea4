"""
The front: Debian's nginx on the hosts of the ``front`` group, balancing HTTP over every host
of the ``web`` group (upstreams generated from the inventory) with passive health checks: a
web host that refuses connections or answers 502/503/504 is skipped for the next one within the
same request, and left out for ``front_fail_timeout_seconds``.

Debian's layout: our site in sites-available, enabled by a link, Debian's default site
disabled. A changed site is checked with ``nginx -t`` and then reloaded (no dropped
connection); a broken one stops the deploy with nginx's own message.
"""

from __future__ import annotations

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from tasks import render
from tasks.service import ANYONE, Port, Run, Scrape, Service, Wiring

SITE = "/etc/nginx/sites-available/stack.conf"


def upstream_servers(wiring: Wiring) -> list[str]:
    """``address:port`` of every web host, sorted."""
    return sorted(f"{node.address}:{node.config.web_port}" for node in wiring.hosts("web"))


def site_file(run: Run) -> StringIO:
    """nginx's site of this front host."""
    config = run.node.config
    return render(
        "nginx/stack.conf.j2",
        app=config.app_name,
        servers=upstream_servers(run.wiring),
        port=config.front_port,
        max_fails=1,
        fail_timeout=config.front_fail_timeout_seconds,
    )


@deploy("Front (nginx)")
def front(run: Run) -> None:
    site = files.put(
        name="Write the front's site (upstreams: every web host)",
        src=site_file(run),
        dest=SITE,
        mode="0644",
    )
    link = files.link(name="Enable the front's site", path="/etc/nginx/sites-enabled/stack.conf", target=SITE)
    default = files.link(name="Disable Debian's default site", path="/etc/nginx/sites-enabled/default", present=False)
    changed = any_changed(site, link, default)
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
