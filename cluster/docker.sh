#!/usr/bin/env bash
# The three-node US deployment in containers (cluster/docker-compose.yml).
#
#   ./cluster/docker.sh up                build the image, start us-east, us-central and us-west,
#                                         initialise the cluster with the demo catalog (first
#                                         time only), wait until every node is ready
#   ./cluster/docker.sh down [--volumes]  stop and remove the containers; --volumes also drops
#                                         the data
#   ./cluster/docker.sh status            the containers, and the cluster's status
#   ./cluster/docker.sh rolling-restart   restart one node at a time, each back and ready
#                                         before the next goes
#   ./cluster/docker.sh build             only build the image
#   ./cluster/docker.sh ctl ARGS...       residencyctl against this deployment
#
# The image holds residencyd and residencyctl built static and nothing else (FROM scratch);
# nothing is pulled. Every node speaks mutual TLS: `up` makes a development CA and certificates in
# cluster/docker/certs once, and `ctl` presents its operator certificate. Clients reach the nodes on 127.0.0.1:17101-17103, metrics and health on
# 127.0.0.1:17301-17303. RESIDENCY_PROFILE=debug builds unoptimised binaries (quicker).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
profile="${RESIDENCY_PROFILE:-release}"
image="${RESIDENCY_IMAGE:-residency-registry:dev}"
project="${RESIDENCY_PROJECT:-residency}"
# The first three octets of the deployment's network (the configs name its addresses).
subnet="${RESIDENCY_SUBNET:-172.29.50}"
target_triple="x86_64-unknown-linux-gnu"
# A target directory of its own: the static flags would otherwise rebuild the normal one.
build_dir="$root/target/static"
services=(us-east us-central us-west)
up_timeout_s=120
# The deployment's CA and certificates (made by `up` once; see certs below).
certs_dir="${RESIDENCY_DOCKER_CERTS_DIR:-$root/cluster/docker/certs}"

script=docker.sh
# shellcheck source=cluster/common.sh
source "$root/cluster/common.sh"

ensure_tools() {
    ensure_cargo
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (is it running, may this user use it?)"
}

# `docker compose` (v2) where present, else `docker-compose` (v1, Debian's package).
compose() {
    if docker compose version >/dev/null 2>&1; then
        RESIDENCY_CERTS_DIR="$certs_dir" docker compose -p "$project" -f "$root/cluster/docker-compose.yml" "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        RESIDENCY_CERTS_DIR="$certs_dir" docker-compose -p "$project" -f "$root/cluster/docker-compose.yml" "$@"
    else
        die "neither 'docker compose' nor 'docker-compose' is installed"
    fi
}

bin_dir() { printf '%s/%s/%s' "$build_dir" "$target_triple" "$profile"; }

# residencyctl as built for the image (static: it runs on the host as well), of this profile if
# built, else of the other one.
ctl_bin() {
    local other=debug
    [ "$profile" = "debug" ] && other=release
    local candidate
    for candidate in "$(bin_dir)/residencyctl" "$build_dir/$target_triple/$other/residencyctl"; do
        [ -x "$candidate" ] && { printf '%s' "$candidate"; return 0; }
    done
    die "residencyctl is not built yet: run $0 build (or up) first"
}

ctl() {
    "$(ctl_bin)" --certs-dir "$certs_dir" --endpoints "${RESIDENCY_ENDPOINTS:-127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103}" "$@"
}

build() {
    ensure_tools
    local flags=(--target "$target_triple")
    [ "$profile" = "release" ] && flags+=(--release)
    say "building residencyd and residencyctl, static ($profile)..."
    # The explicit --target is what lets crt-static build: proc macros stay dynamic for the host.
    RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$build_dir" \
        cargo build "${flags[@]}" --bin residencyd --bin residencyctl
    local stage="$root/target/image"
    rm -rf "$stage"
    mkdir -p "$stage/data" "$stage/rootfs/tmp" "$stage/rootfs/etc/residency"
    cp "$(bin_dir)/residencyd" "$(bin_dir)/residencyctl" "$stage/rootfs/"
    strip "$stage/rootfs/residencyd" "$stage/rootfs/residencyctl" 2>/dev/null || true
    chmod 1777 "$stage/rootfs/tmp"
    printf 'residency:x:65532:65532::/data:/residencyd\n' >"$stage/rootfs/etc/passwd"
    printf 'residency:x:65532:\n' >"$stage/rootfs/etc/group"
    cp "$root/cluster/docker/Dockerfile" "$stage/Dockerfile"
    say "building the image $image..."
    docker build -q -t "$image" "$stage" >/dev/null
    say "image $image: $(docker image inspect -f '{{.Size}}' "$image") bytes"
}

# Whether the node published on metrics port $1 answers /readyz with 200.
ready() {
    local reply
    reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 && cat <&3) 2>/dev/null || true)"
    grep -q '200 OK' <<<"$reply"
}

wait_ready() {
    local port="$1" deadline=$((SECONDS + up_timeout_s))
    until ready "$port"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# shellcheck source=cluster/demo-catalog.sh
source "$root/cluster/demo-catalog.sh"

# The CA and the nodes', an operator's and a service's certificates, made once. The nodes run as
# uid 65532 in their containers, so their keys are handed to that user (the files stay 0600).
certs() {
    "$(ctl_bin)" certs init --dir "$certs_dir" --service payments --service onboarding >/dev/null \
        || die "cannot create the certificates in $certs_dir"
    if ! chown 65532:65532 "$certs_dir"/node*.key 2>/dev/null; then
        say "not root: making the node keys readable by every user so the containers can read them"
        chmod 0644 "$certs_dir"/node*.key
    fi
}

up() {
    build
    certs
    compose up -d --no-build
    # The published ports accept connections before the nodes do (docker's proxy holds them),
    # so init is tried until a node answers it.
    local init_output fresh=0 deadline=$((SECONDS + up_timeout_s))
    until init_output="$(ctl cluster init --peers "$subnet.11:7201,$subnet.12:7201,$subnet.13:7201" 2>&1)"; do
        if grep -q ALREADY_INITIALIZED <<<"$init_output"; then
            break
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "cluster init failed: $init_output; see: $0 logs"
        sleep 0.5
    done
    if grep -q ALREADY_INITIALIZED <<<"$init_output"; then
        say "cluster already initialised: restarted on its volumes"
    else
        say "cluster initialised"
        fresh=1
    fi
    deadline=$((SECONDS + up_timeout_s))
    until ctl status -o json 2>/dev/null | grep '"leader_id": [0-9]' >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "no leader elected within ${up_timeout_s}s; see: $0 logs"
        sleep 0.3
    done
    if [ "$fresh" -eq 1 ] || ! ctl location list -o json | grep '"location_id"' >/dev/null; then
        seed_demo_catalog
    fi
    for n in 1 2 3; do
        wait_ready "1730$n" || die "node $n is not ready after ${up_timeout_s}s; see: $0 logs"
    done
    ctl status
    cat <<EOT

The registry runs in containers. Try:
  ./cluster/docker.sh ctl location list
  ./cluster/docker.sh ctl user assign alice --residency US --location us-east-1/oci-ashburn/pg-042
  ./cluster/docker.sh ctl check alice --service payments --jurisdiction US
Or any residencyctl with --endpoints 127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103.
Metrics and health: http://127.0.0.1:17301/metrics  /healthz  /readyz
Stop with: ./cluster/docker.sh down   (add --volumes to drop the data)
EOT
}

down() {
    case "${1:-}" in
        --volumes) compose down --volumes ;;
        "") compose down ;;
        *) die "down takes --volumes or nothing" ;;
    esac
}

rolling_restart() {
    local n=0 service
    for service in "${services[@]}"; do
        n=$((n + 1))
        say "restarting $service..."
        compose restart "$service" >/dev/null
        wait_ready "1730$n" || die "$service is not ready after its restart"
        say "$service is back and ready"
    done
    ctl status
}

case "${1:-}" in
    up) up ;;
    down) shift; down "$@" ;;
    status) compose ps; ctl status || true ;;
    rolling-restart) rolling_restart ;;
    build) build ;;
    logs) shift; compose logs "$@" ;;
    ctl) shift; ctl "$@" ;;
    *) say "usage: $0 up|down [--volumes]|status|rolling-restart|build|logs|ctl ARGS..."; exit 2 ;;
esac
