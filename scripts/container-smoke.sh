#!/usr/bin/env bash
# Build and run the `gateway` image without a Docker engine or a registry: podman + buildah (chroot isolation) on a
# Debian base made with debootstrap. tests/test_container.py drives it; CI can run it alone.
#
#   scripts/container-smoke.sh build    the base image (cached) and the gateway image; prints the image name
#   scripts/container-smoke.sh run NAME [serve ARGS...]
#                                       start the image detached on the host network as container NAME, on
#                                       127.0.0.1:$PORT, with the caller's TOKENGATE_* variables (passed by name)
#   scripts/container-smoke.sh smoke    (default) build, run against a fake worker on the host, check /healthz,
#                                       /readyz, one completion, the HEALTHCHECK and the user; clean up
#
# Environment (all optional):
#   IMAGE            tag to build/run                     (localhost/tokengate:gateway-ci)
#   BASE_IMAGE       the Dockerfile's BASE_IMAGE          (localhost/debian-base:bookworm, made here by debootstrap;
#                    set python:3.11-slim-bookworm where a registry is reachable)
#   DEBIAN_MIRROR    debootstrap mirror                   (the one apt uses here, else http://deb.debian.org/debian)
#   PIP_CA           CA bundle handed to pip as the build secret `pipca` when it exists
#                    (/etc/ssl/certs/ca-certificates.crt: a TLS-intercepting proxy's CA lives there)
#   TOKENGATE_CI_CACHE  where the base rootfs tarball is kept between runs (~/.cache/tokengate-ci)
#   PORT             smoke: the gateway's port (18080);  WORKER_PORT: the fake worker's (18001)
# The first run costs ~2-3 min (debootstrap ~1 min, pip ~30 s); later runs reuse the cached base and podman's
# layer cache (a few seconds when app/ is unchanged).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${IMAGE:-localhost/tokengate:gateway-ci}"
BASE_IMAGE="${BASE_IMAGE:-localhost/debian-base:bookworm}"
CACHE="${TOKENGATE_CI_CACHE:-$HOME/.cache/tokengate-ci}"
PIP_CA="${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}"
SUITE=bookworm
# runc: podman's default crun is not in bookworm; the ulimits fit an unprivileged CI sandbox
RUN_OPTS=(--runtime runc)
CTR_OPTS=(--network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { echo "container-smoke: $*" >&2; }
die() { log "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found: run scripts/install-system-deps.sh"; }

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' \
        | grep -E '/debian/?$' | head -n1 || true)"
    [ -z "$uri" ] && uri="$(grep -hE '^deb\s+\S+/debian/?\s' /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | head -n1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
    if podman image exists "$BASE_IMAGE"; then return; fi
    [[ "$BASE_IMAGE" == localhost/debian-base:* ]] || return 0  # a registry image: podman build pulls it
    local tarball="$CACHE/debian-$SUITE-minbase.tar"
    if [ ! -s "$tarball" ]; then
        need debootstrap
        local mirror rootfs
        mirror="$(debian_mirror)"
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        log "debootstrap $SUITE from $mirror (about a minute, once)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$mirror" \
            >"$CACHE/debootstrap.log" 2>&1 || { rm -rf "$rootfs"; die "debootstrap failed: $CACHE/debootstrap.log"; }
        # what slim images drop: apt caches and lists, docs (copyrights kept), man pages, translations
        rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
        find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing $tarball as $BASE_IMAGE"
    podman import "$tarball" "$BASE_IMAGE" >/dev/null
}

build() {
    need podman
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    flock 9  # one build at a time per cache
    ensure_base
    local secret=()
    [ -s "$PIP_CA" ] && secret=(--secret "id=pipca,src=$PIP_CA")
    log "building $IMAGE (target gateway, base $BASE_IMAGE)"
    podman build --isolation=chroot --format docker --layers --target gateway \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" "${secret[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >&2
    echo "$IMAGE"
}

run() {
    local name="$1" out var; shift
    # the caller's other TOKENGATE_* variables (an upstream API key...) pass by name: values stay off command lines
    local env=(-e TOKENGATE_HOST=127.0.0.1 -e "TOKENGATE_PORT=${PORT:-18080}")
    for var in $(compgen -e | grep '^TOKENGATE_' | grep -v -x -E 'TOKENGATE_(HOST|PORT|CI_CACHE)'); do
        env+=(-e "$var")
    done
    # without systemd podman logs an error about healthcheck timers: shown only when the start fails
    out="$(podman "${RUN_OPTS[@]}" run -d --name "$name" "${CTR_OPTS[@]}" "${env[@]}" "$IMAGE" "$@" 2>&1)" \
        || { echo "$out" >&2; die "could not start $name"; }
}

SMOKE_NAME="tokengate-smoke-$$"
WORKER_PID=""
cleanup() {
    podman rm -f "$SMOKE_NAME" >/dev/null 2>&1 || true
    if [ -n "$WORKER_PID" ]; then kill "$WORKER_PID" 2>/dev/null || true; fi
}

smoke() {
    local python="${PYTHON:-$ROOT/.venv/bin/python}" port="${PORT:-18080}" wport="${WORKER_PORT:-18001}"
    local name="$SMOKE_NAME"
    build >/dev/null
    (cd "$ROOT" && exec "$python" -m bench.fakeworker --port "$wport" --model tiny) >/dev/null 2>&1 &
    WORKER_PID=$!
    trap cleanup EXIT
    PORT="$port" run "$name" serve --upstream "http://127.0.0.1:$wport"
    "$python" - "$port" <<'EOF' || { podman logs "$name" >&2; die "smoke checks failed"; }
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.status, r.read()
deadline = time.monotonic() + 60
while True:
    try:
        if get("/readyz")[0] == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("gateway not ready in 60 s")
    time.sleep(0.5)
assert get("/healthz") == (200, b'{"status":"ok"}'), get("/healthz")
req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"content-type": "application/json"},
                             data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": False}).encode())
with urllib.request.urlopen(req, timeout=30) as r:
    body = json.load(r)
assert r.status == 200 and body["usage"]["completion_tokens"] == 4, body
print("ok: healthz, readyz, one completion through the container")
EOF
    podman "${RUN_OPTS[@]}" healthcheck run "$name" >/dev/null || die "the image's HEALTHCHECK failed"
    [ "$(podman exec "$name" id -u)" != 0 ] || die "the gateway runs as root"
    log "ok: HEALTHCHECK passes, runs as uid $(podman exec "$name" id -u)"
}

case "${1:-smoke}" in
    build) build ;;
    run) shift; [ $# -ge 1 ] || die "usage: $0 run NAME [serve ARGS...]"; run "$@" ;;
    smoke) smoke ;;
    *) die "usage: $0 [build|run NAME ARGS...|smoke]" ;;
esac
