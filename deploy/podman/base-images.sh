#!/usr/bin/env bash
# The images the deployment files start from, made from Debian's own packages when no registry
# can be reached to pull them (this project's machines reach PyPI and Debian, not Docker Hub):
#   python:3.11-slim-bookworm  <- Debian bookworm minbase + python3 (3.11), venv, passwd, CA bundle
#   prom/prometheus:v3.5.0      <- Debian bookworm's prometheus package (2.42), /bin/prometheus
# Each is built only if the tag is missing and a pull fails. Grafana has no Debian package: its
# image is never built here, and its dashboard is validated offline (tests/test_deploy.py).
# Usage: deploy/podman/base-images.sh [python|prometheus ...]   (ENGINE=podman|docker)
set -euo pipefail
ENGINE=${ENGINE:-$(command -v podman || command -v docker)}
CA=/etc/ssl/certs/ca-certificates.crt  # pip inside a build must trust what this machine trusts

have() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

debian_image() {  # tag, packages, the --change that makes it run (as the real image's CMD/ENTRYPOINT)
  local tag=$1 packages=$2 run=$3 work
  work=$(mktemp -d)
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="copy-in $CA /etc/ssl/certs" \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    bookworm "$work/rootfs.tar"
  "$ENGINE" import --change "$run" --change 'ENV LANG=C.UTF-8' "$work/rootfs.tar" "$tag" >/dev/null
  rm -rf "$work"
  echo "built $tag from Debian packages"
}

ensure() {  # fully qualified tag (what a FROM or an image: line resolves to), packages, run
  have "$1" && return 0
  timeout 20 "$ENGINE" pull -q "$1" >/dev/null 2>&1 && return 0
  debian_image "$@"
}

for want in "${@:-python}"; do
  case $want in
    python) ensure docker.io/library/python:3.11-slim-bookworm \
      python3,python3-venv,python-is-python3,passwd,ca-certificates 'CMD ["python3"]' ;;
    prometheus) ensure docker.io/prom/prometheus:v3.5.0 prometheus,ca-certificates,wget 'ENTRYPOINT ["/usr/bin/prometheus"]' ;;
    *) echo "unknown base image: $want (python or prometheus)" >&2; exit 2 ;;
  esac
done
