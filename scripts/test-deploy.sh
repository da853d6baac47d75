#!/usr/bin/env bash
# The deployment test: builds the CPU images, brings up compose.yaml's CPU stack, checks it from
# the outside (scripts/deploy_check.py), takes it down and checks nothing is left.
#
#   sudo scripts/test-deploy.sh [--fresh]     # --fresh: from no image and no build cache
#
# Needs root (it installs docker.io + docker-compose from apt when Docker is missing and
# starts dockerd when none runs), network access to Debian mirrors and PyPI, and a Python with
# kvrecall and the `openai` client (PYTHON, default .venv/bin/python: scripts/setup.sh).
# Without an image registry it builds the base images from Debian packages
# (docker/base-from-debian.sh). Everything it prints goes to bench/results/deploy-DATE.log.
#
# Settings: KVRECALL_PIP_CA (a CA bundle for pip inside the builds, for HTTPS-intercepting
# proxies; default: pip's own cert setting, $PIP_CERT or global.cert, if any); the pool sizes below are small
# on purpose (a shared machine); override them in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PROJECT=kvrecall
mkdir -p bench/results
LOG=${LOG:-bench/results/deploy-$(date -u +%F).log}
exec > >(tee "$LOG") 2>&1
t0=$(date +%s)
phase() { echo; echo "== [$(date -u +%T)] +$(( $(date +%s) - t0 ))s: $*"; }

echo "# scripts/test-deploy.sh $*"
echo "# $(date -u +%FT%TZ) on $(uname -srm), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB;" \
     "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results' || echo '+changes')"

phase "container runtime"
if ! command -v dockerd >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io docker-compose
fi
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /var/log/kvrecall-dockerd.log)"
  nohup dockerd >/var/log/kvrecall-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
# The Dockerfiles need BuildKit (RUN --mount): buildx, or a Docker 20-22 CLI with DOCKER_BUILDKIT=1
# (a newer CLI without the buildx plugin refuses).
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  BUILD=()
  for cli in docker /usr/bin/docker; do
    version=$("$cli" version -f '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$version" ] && [ "${version%%.*}" -lt 23 ]; then BUILD=(env DOCKER_BUILDKIT=1 "$cli" build); break; fi
  done
  [ ${#BUILD[@]} -gt 0 ] || { echo "no BuildKit-capable docker CLI (install docker-buildx)"; exit 1; }
fi
echo "docker $(docker version -f '{{.Server.Version}}'), compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)), build: ${BUILD[*]}"

if [ "${1:-}" = --fresh ]; then
  phase "removing the kvrecall images, the Debian-made ones and the build cache (--fresh)"
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  docker rmi -f kvrecall-daemon:latest-cpu kvrecall-worker:latest-cpu kvrecall-local/pause:bookworm \
    kvrecall-local/nginx:bookworm kvrecall-local/prometheus:bookworm kvrecall-base:bookworm 2>/dev/null || true
  docker builder prune -af >/dev/null
fi

phase "base images"
if timeout 30 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
  echo "a registry answers: public base images"
else
  echo "no image registry: base images from Debian packages"
  # its last lines are VAR=value settings for compose.yaml
  while IFS='=' read -r name value; do export "$name=$value"; echo "  $name=$value"; done \
    < <(bash docker/base-from-debian.sh | tee /dev/stderr | grep -E '^[A-Z_]+=')
fi
base=${KVRECALL_CPU_BASE:-debian:bookworm-slim}

phase "torch wheel"
if ! ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
  # Where this host's pip resolves torch to its CPU build (a local wheel), the images get
  # that wheel; otherwise they install from the PyTorch CPU index.
  tmp=$(mktemp -d)
  "$PYTHON" -m pip download -q "torch==2.13.0" --no-deps -d "$tmp" 2>/dev/null || true
  cp "$tmp"/torch-*+cpu-*.whl docker/wheels/ 2>/dev/null || true
  rm -rf "$tmp"
fi
ls docker/wheels/torch-*.whl 2>/dev/null || echo "none: the images install torch from the CPU index"

phase "building the CPU images on $base"
pip_ca=${KVRECALL_PIP_CA:-${PIP_CERT:-$("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -1)}}
secret=()
if [ -n "$pip_ca" ] && [ -f "$pip_ca" ]; then secret=(--secret "id=pip-ca,src=$pip_ca"); echo "pip CA bundle: $pip_ca"; fi
for image in daemon worker; do
  started=$(date +%s)
  build_log=$(mktemp /tmp/kvrecall-build-$image.XXXXXX.log)
  "${BUILD[@]}" --progress=plain "${secret[@]}" --build-arg VARIANT=cpu --build-arg "CPU_IMAGE=$base" \
    -f "docker/Dockerfile.$image" -t "kvrecall-$image:latest-cpu" . >"$build_log" 2>&1 \
    || { tail -40 "$build_log"; echo "FAIL: building kvrecall-$image (log: $build_log)"; exit 1; }
  echo "kvrecall-$image:latest-cpu built in $(( $(date +%s) - started )) s," \
       "$(docker image inspect -f '{{.Size}}' "kvrecall-$image:latest-cpu" | awk '{printf "%.2f GB", $1/1e9}')"
done

phase "docker compose up (CPU stack)"
export KVRECALL_SHM_SIZE=${KVRECALL_SHM_SIZE:-4gb} KVRECALL_HOST_POOL_GB=${KVRECALL_HOST_POOL_GB:-1} \
       KVRECALL_CPU_DEVICE_POOL_GB=${KVRECALL_CPU_DEVICE_POOL_GB:-0.5}
echo "pools: host ${KVRECALL_HOST_POOL_GB} GB, working sets ${KVRECALL_CPU_DEVICE_POOL_GB} GB, /dev/shm ${KVRECALL_SHM_SIZE}"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
up_started=$(date +%s)
"${COMPOSE[@]}" up -d --no-build
until curl -sf -m 120 http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "Hello", "max_tokens": 1}' >/dev/null; do
  [ $(( $(date +%s) - up_started )) -lt 600 ] || { "${COMPOSE[@]}" ps; "${COMPOSE[@]}" logs --tail 50; exit 1; }
  sleep 2
done
echo "first completion answered through the load balancer $(( $(date +%s) - up_started )) s after 'up'" \
     "($(( $(date +%s) - t0 )) s after this script started)"
"${COMPOSE[@]}" ps

phase "checks from outside (scripts/deploy_check.py)"
checks=0
"$PYTHON" scripts/deploy_check.py --project "$PROJECT" 2> >(grep -v -i warning >&2) || checks=$?
"${COMPOSE[@]}" ps
[ "$checks" -eq 0 ] || { "${COMPOSE[@]}" logs --tail 80; }

phase "docker compose down"
"${COMPOSE[@]}" down -v --remove-orphans
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; \
       docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"; \
       docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
if [ -n "$left" ]; then echo "FAIL: left behind: $left"; exit 1; fi
echo "OK nothing left: no container, network or volume of project $PROJECT"

phase "done"
[ "$checks" -eq 0 ] && echo "PASS in $(( $(date +%s) - t0 )) s" || { echo "FAIL (deploy_check exit $checks)"; exit "$checks"; }
