#!/usr/bin/env bash
# setup-podman.sh - make `./pants package ::` able to build the images on a machine without
# Docker: installs Debian's podman and runc when missing, serves podman's Docker-compatible API
# on the socket the docker CLI (which Pants drives) uses by default, and builds the base image
# from Debian packages when no registry base is given. Idempotent; a machine with a working
# Docker engine is left alone.
#
# Usage: images/setup-podman.sh            (root; DOCKER_HOST, if set, names the socket)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="$HERE/containers.conf"
SOCKET="${DOCKER_HOST:-unix:///var/run/docker.sock}"
BASE_IMAGE="localhost/ibutsu-python-base:3.11-debian12"
log() { echo "[podman] $*" >&2; }

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman and runc (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman runc >/dev/null
fi
command -v docker >/dev/null || { log "the docker CLI is missing (Pants builds images with it)"; exit 1; }

if DOCKER_HOST="$SOCKET" docker version >/dev/null 2>&1; then
  log "an engine answers on $SOCKET"
else
  [[ "$SOCKET" == unix://* ]] || { log "cannot serve podman on $SOCKET: not a unix socket"; exit 1; }
  path="${SOCKET#unix://}"
  mkdir -p "$(dirname "$path")" && rm -f "$path"
  log "serving podman's Docker API on $SOCKET"
  nohup podman system service --time=0 "$SOCKET" >/var/log/podman-service.log 2>&1 &
  for _ in $(seq 100); do DOCKER_HOST="$SOCKET" docker version >/dev/null 2>&1 && break; sleep 0.1; done
  DOCKER_HOST="$SOCKET" docker version >/dev/null 2>&1 || { log "podman service did not answer"; exit 1; }
fi

if podman image exists "$BASE_IMAGE"; then
  log "base image present: $BASE_IMAGE"
else
  "$HERE/base/build-base.sh" "$BASE_IMAGE"
fi
