#!/usr/bin/env bash
# The local three-node cluster on loopback.
#
#   ./cluster/local.sh up       build, start the three nodes, initialise the cluster (first time
#                               only), wait for a leader, and print how to talk to it
#   ./cluster/local.sh down     stop exactly the processes `up` started (by pid, never by name)
#   ./cluster/local.sh status   which nodes run, and the cluster's status
#   ./cluster/local.sh clean    down, then delete ./data
#
# Every node speaks mutual TLS: `up` makes a development CA and certificates in ./data/certs
# once (residencyctl finds them there by itself when run from the repository root).
# Data lives in ./data/node{1,2,3} (logs in ./data/nodeN/residencyd.log); `up` after `down`
# restarts the nodes on their existing data. Ports: clients 7101-7103, peers 7201-7203,
# metrics and health 7301-7303. RESIDENCY_PROFILE=release builds optimised binaries;
# RESIDENCY_DATA=DIR keeps the data in DIR/node{1,2,3} instead (the benchmark's own cluster).
# RESIDENCY_BIN_DIR=DIR runs the residencyd and residencyctl already built in DIR and builds
# nothing (to measure one build against another).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
profile="${RESIDENCY_PROFILE:-debug}"
data="${RESIDENCY_DATA:-data}"
nodes=(1 2 3)
up_timeout_s=60

script=local.sh
# shellcheck source=cluster/common.sh
source "$root/cluster/common.sh"

bin_dir() {
    if [ -n "${RESIDENCY_BIN_DIR:-}" ]; then
        printf '%s' "$RESIDENCY_BIN_DIR"
        return
    fi
    local target="${CARGO_TARGET_DIR:-$root/target}"
    printf '%s/%s' "$target" "$profile"
}

build() {
    if [ -n "${RESIDENCY_BIN_DIR:-}" ]; then
        [ -x "$RESIDENCY_BIN_DIR/residencyd" ] && [ -x "$RESIDENCY_BIN_DIR/residencyctl" ] ||
            die "RESIDENCY_BIN_DIR=$RESIDENCY_BIN_DIR holds no residencyd and residencyctl"
        return
    fi
    ensure_cargo
    local flags=()
    [ "$profile" = "release" ] && flags+=(--release)
    say "building residencyd and residencyctl ($profile)..."
    cargo build "${flags[@]}" --bin residencyd --bin residencyctl
}

pid_file() { printf '%s/node%s/residencyd.pid' "$data" "$1"; }

# The pid of node $1 if the process recorded for it is alive and runs a residencyd binary
# with that node's config (a reused pid, or `tail -f .../residencyd.log`, does not count).
running_pid() {
    local file pid exe
    file="$(pid_file "$1")"
    [ -f "$file" ] || return 1
    pid="$(cat "$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
    [ "$(basename "${exe% (deleted)}")" = "residencyd" ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -- "cluster/local/node$1.toml" >/dev/null || return 1
    printf '%s' "$pid"
}

wait_port() {
    local port="$1" deadline=$((SECONDS + up_timeout_s))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# RESIDENCY_TLS=off runs the nodes in plaintext (residencyd --insecure-no-tls): for measuring
# what TLS costs, never otherwise.
if [ "${RESIDENCY_TLS:-on}" = "off" ]; then
    tls_flags=(--insecure-no-tls)
    ctl() { "$(bin_dir)/residencyctl" --plaintext "$@"; }
else
    tls_flags=(--tls-dir "$data/certs")
    ctl() { RESIDENCY_CERTS_DIR="$data/certs" "$(bin_dir)/residencyctl" "$@"; }
fi

# Whether node $1's /readyz answers 200 (leader known, caught up to the leader's commit index).
ready() {
    local reply
    reply="$( (exec 3<>"/dev/tcp/127.0.0.1/730$1" && printf 'GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 && cat <&3) 2>/dev/null || true)"
    grep -q '200 OK' <<<"$reply"
}

# shellcheck source=cluster/demo-catalog.sh
source "$root/cluster/demo-catalog.sh"

# The development CA and the nodes', an operator's and two services' certificates, made once
# per data directory (residencyctl certs init keeps an existing CA).
certs() {
    ctl certs init --dir "$data/certs" --service payments --service onboarding >/dev/null \
        || die "cannot create the certificates in $data/certs"
}

up() {
    build
    certs
    local bin
    bin="$(bin_dir)/residencyd"
    for n in "${nodes[@]}"; do
        mkdir -p "$data/node$n"
        if pid="$(running_pid "$n")"; then
            say "node $n already running (pid $pid)"
            continue
        fi
        nohup "$bin" --config "cluster/local/node$n.toml" --data-dir "$data/node$n" "${tls_flags[@]}" \
            >>"$data/node$n/residencyd.log" 2>&1 &
        echo $! >"$(pid_file "$n")"
        say "node $n started (pid $!), log: $data/node$n/residencyd.log"
    done
    for n in "${nodes[@]}"; do
        wait_port "710$n" || die "node $n did not open its client port; see $data/node$n/residencyd.log"
    done
    local init_output fresh=0
    if init_output="$(ctl --endpoints 127.0.0.1:7101 cluster init --peers 127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203 2>&1)"; then
        say "cluster initialised"
        fresh=1
    elif grep -q ALREADY_INITIALIZED <<<"$init_output"; then
        say "cluster already initialised: restarted on existing data"
    else
        die "cluster init failed: $init_output"
    fi
    local deadline=$((SECONDS + up_timeout_s))
    until ctl status -o json 2>/dev/null | grep '"leader_id": [0-9]' >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "no leader elected within ${up_timeout_s}s; see $data/node*/residencyd.log"
        sleep 0.3
    done
    # Seed a new cluster, and one whose first `up` stopped before seeding finished (the catalog
    # is then still empty; the fixed request ids apply what did land only once).
    if [ "$fresh" -eq 1 ] || ! ctl location list -o json | grep '"location_id"' >/dev/null; then
        seed_demo_catalog
    fi
    for n in "${nodes[@]}"; do
        until ready "$n"; do
            [ "$SECONDS" -lt "$deadline" ] || die "node $n is not ready after ${up_timeout_s}s; see $data/node$n/residencyd.log"
            sleep 0.3
        done
    done
    ctl status
    cat <<EOT

The registry is up. Try (see README.md for the tour):
  $(bin_dir)/residencyctl location list
  $(bin_dir)/residencyctl user assign alice --residency US --location us-east-1/oci-ashburn/pg-042
  $(bin_dir)/residencyctl user assign bob --residency US --location eu-central-1/oci-frankfurt/pg-001   # refused
  $(bin_dir)/residencyctl check alice --service payments --jurisdiction US
  $(bin_dir)/residencyctl status
Metrics and health: http://127.0.0.1:7301/metrics  /healthz  /readyz
Stop with: ./cluster/local.sh down
EOT
}

down() {
    local stopped=0
    for n in "${nodes[@]}"; do
        if pid="$(running_pid "$n")"; then
            kill -TERM "$pid"
            local deadline=$((SECONDS + 15))
            while kill -0 "$pid" 2>/dev/null; do
                if [ "$SECONDS" -ge "$deadline" ]; then
                    say "node $n (pid $pid) ignored SIGTERM for 15s; sending SIGKILL"
                    kill -KILL "$pid" 2>/dev/null || true
                fi
                sleep 0.2
            done
            say "node $n stopped (pid $pid)"
            stopped=$((stopped + 1))
        fi
        rm -f "$(pid_file "$n")"
    done
    [ "$stopped" -gt 0 ] || say "no node was running"
}

status() {
    for n in "${nodes[@]}"; do
        if pid="$(running_pid "$n")"; then say "node $n: running (pid $pid)"; else say "node $n: stopped"; fi
    done
    [ -x "$(bin_dir)/residencyctl" ] && ctl status || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    clean) down; rm -rf "$data"; say "removed $data" ;;
    *) say "usage: $0 up|down|status|clean"; exit 2 ;;
esac
