#!/usr/bin/env bash
# Images from Debian's packages alone, for hosts that reach Debian mirrors and PyPI but no
# image registry (run as root, with a Docker daemon running; about two minutes):
#
#   docker/base-from-debian.sh
#
# builds
#   kvrecall-base:bookworm        debootstrap --variant=minbase bookworm, imported: what
#                                 debian:bookworm-slim is (the CPU images' CPU_IMAGE)
#   kvrecall-local/pause:bookworm       stand-ins for the public images compose.yaml uses,
#   kvrecall-local/nginx:bookworm       from Debian's packages on that base: the namespace
#   kvrecall-local/prometheus:bookworm  holder, the load balancer and Prometheus
# and prints the variables that point compose.yaml at them. An image that exists is kept
# (docker rmi it to rebuild). MIRROR picks the Debian mirror.
set -euo pipefail
mirror=${MIRROR:-http://deb.debian.org/debian}
base=kvrecall-base:bookworm

exists() { docker image inspect "$1" >/dev/null 2>&1; }

if ! exists "$base"; then
  command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
  root=$(mktemp -d /tmp/kvrecall-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$mirror"
  # What the slim images do too: no apt lists, no docs, apt never installs recommends.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/*
  echo 'APT::Install-Recommends "0";' > "$root/etc/apt/apt.conf.d/01norecommends"
  tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$base"
  echo "base-from-debian: built $base"
fi

# $1: image name; stdin: the Dockerfile body after FROM (built without a context).
stand_in() {
  exists "$1" && return 0
  local out
  out=$({ echo "FROM $base"; cat; } | docker build -q -t "$1" - 2>&1) || { echo "$out"; return 1; }
  echo "base-from-debian: built $1"
}

# The pause container holds the shared namespaces: tini as PID 1 reaps orphans and exits on
# SIGTERM, which is what registry.k8s.io/pause does.
stand_in kvrecall-local/pause:bookworm <<'DOCKERFILE'
RUN apt-get update && apt-get install -y tini && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["tini", "--", "sleep", "infinity"]
DOCKERFILE

# nginx reads the configuration compose.yaml mounts (docker/nginx.conf), like the official image.
stand_in kvrecall-local/nginx:bookworm <<'DOCKERFILE'
RUN apt-get update && apt-get install -y nginx-light && rm -rf /var/lib/apt/lists/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
DOCKERFILE

# Prometheus as the official image runs it: the binary as the entrypoint, user nobody, /prometheus.
stand_in kvrecall-local/prometheus:bookworm <<'DOCKERFILE'
RUN apt-get update && apt-get install -y prometheus && rm -rf /var/lib/apt/lists/* \
 && install -d -o 65534 -g 65534 /prometheus
USER 65534:65534
ENTRYPOINT ["/usr/bin/prometheus"]
DOCKERFILE

cat <<VARS
# compose.yaml on these images (add to .env, or export):
KVRECALL_CPU_BASE=$base
KVRECALL_PAUSE_IMAGE=kvrecall-local/pause:bookworm
KVRECALL_LB_IMAGE=kvrecall-local/nginx:bookworm
PROMETHEUS_IMAGE=kvrecall-local/prometheus:bookworm
VARS
