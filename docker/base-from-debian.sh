#!/usr/bin/env bash
# Makes a local Debian bookworm base image from Debian's own packages, for machines that reach
# Debian mirrors and PyPI but no image registry:
#
#   sudo docker/base-from-debian.sh [NAME]          # default NAME: kvrecall-base:bookworm
#   docker build --build-arg CPU_IMAGE=kvrecall-base:bookworm -f docker/Dockerfile.worker ...
#
# The image is what debian:bookworm-slim is (debootstrap --variant=minbase, the same suite),
# so the Dockerfiles' CPU variant builds on either. Needs root, debootstrap and a running
# Docker daemon; takes about a minute. MIRROR picks the Debian mirror.
set -euo pipefail
name=${1:-kvrecall-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$name" >/dev/null 2>&1; then
  echo "base-from-debian: $name exists (docker rmi it to rebuild)"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
root=$(mktemp -d /tmp/kvrecall-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror"
# What the slim images do too: no apt caches, no docs, apt never installs recommends.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/*
echo 'APT::Install-Recommends "0";' > "$root/etc/apt/apt.conf.d/01norecommends"
tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$name"
echo "base-from-debian: built $name"
