#!/bin/sh
# Build the bench's base image: a Debian release (bookworm, trixie) that boots systemd, with sshd
# and a sudo user "deploy" whose key is installed when a container starts. Registries are
# unreachable on our machines, so the root filesystem comes from debootstrap and is imported,
# not pulled.
# Usage: base-image.sh IMAGE_TAG RELEASE [MIRROR]
set -eu
tag=$1
release=$2
mirror=${3:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/stackbench-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,ca-certificates,openssh-server,sudo,iproute2,procps \
    "$release" "$rootfs" "$mirror"

chroot "$rootfs" /bin/sh -eu <<'CHROOT'
useradd --create-home --shell /bin/bash deploy
echo 'deploy ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/deploy
chmod 0440 /etc/sudoers.d/deploy
# Each container gets its own machine id and SSH host keys at first boot.
: > /etc/machine-id
rm -f /etc/ssh/ssh_host_*
mkdir -p /etc/systemd/system/ssh.service.d
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    > /etc/systemd/system/ssh.service.d/keygen.conf
printf 'PasswordAuthentication no\nUseDNS no\n' > /etc/ssh/sshd_config.d/bench.conf
systemctl enable ssh
# Units that have no work in a container and only slow its boot.
systemctl mask systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
apt-get clean
rm -rf /var/lib/apt/lists/*
CHROOT

tar -C "$rootfs" -c . | docker import -c 'CMD ["/lib/systemd/systemd"]' - "$tag"
