#!/usr/bin/env bash
# System packages the test suite and deploy checks need (Debian/Ubuntu). Idempotent: installs only what is missing.
# Add a package by appending a line to PACKAGES with a comment saying what needs it.
set -euo pipefail

PACKAGES=(
    prometheus  # promtool: tests/test_deploy_prometheus.py (check config/rules, test rules)
    redis-server  # tests/test_limits.py: RedisLimiter against a real Redis (limits shared by replicas)
    chromium  # tests/test_status.py: the /status page rendered headless (--dump-dom, --screenshot)
    podman  # tests/test_container.py, scripts/container-smoke.sh: build and run the gateway image, no Docker engine
    buildah  # podman build's engine (chroot isolation)
    runc  # the OCI runtime container-smoke.sh runs the image with
    debootstrap  # container-smoke.sh: the Debian base image, made locally (no registry needed)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps: all present (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install-system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
# --no-install-recommends: we want the binaries, not the exporters the package recommends.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
