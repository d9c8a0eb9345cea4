#!/bin/sh
# Make this machine able to run the bench: Python's venv module, debootstrap, a Docker engine
# that answers, and apt-cacher-ng for the bench's apt cache. On Debian as root, what is missing is installed from Debian's archive
# (docker.io, not Docker's own repository); anywhere else it says what to install and stops.
set -eu

missing=""
python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$missing python3-venv"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$missing debootstrap"
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing="$missing docker.io"
# The bench's apt cache (tests/bench/caches.py), optional. Where systemd runs the machine,
# installing it would also start Debian's own apt-cacher-ng service: that choice is left to you.
if [ ! -x /usr/sbin/apt-cacher-ng ] && [ ! -d /run/systemd/system ] && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
    missing="$missing apt-cacher-ng"
fi

if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
        echo "ensure-host: installing$missing from Debian's archive"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "ensure-host: missing$missing. Install them (Debian: sudo apt-get install$missing) and re-run." >&2
        exit 1
    fi
fi

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-host: no Docker engine answers. Start it (sudo systemctl start docker) or run as root." >&2
    exit 1
fi
if [ -d /run/systemd/system ]; then
    systemctl start docker
else
    # No systemd on this machine (a CI container): run the engine in the background.
    PATH="$PATH:/usr/sbin:/sbin" setsid nohup dockerd >/var/log/dockerd.log 2>&1 < /dev/null &
fi
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "ensure-host: dockerd did not answer within 60 s; see /var/log/dockerd.log" >&2
exit 1
