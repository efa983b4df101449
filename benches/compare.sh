#!/usr/bin/env bash
# The registry and etcd, back to back on this machine, with the same workloads, and the ratio
# per workload: the one command behind docs/performance.md.
#
#   ./benches/compare.sh                  release build, 3 rounds of 5 s per workload
#   ./benches/compare.sh --smoke          debug build, 1 short round per workload (CI)
#   ./benches/compare.sh --plaintext      the registry without TLS too, as etcd runs here: the
#                                         two systems on the same footing (not how it ships)
#   ./benches/compare.sh -- --rounds 5    anything after -- goes to both `residency-bench run`
#
# It builds what it needs, starts a fresh three-node registry (./cluster/local.sh with its
# data under target/bench/), runs `residency-bench`, stops it; then installs etcd if missing
# (Debian's etcd-server), starts three etcd members on loopback with their default
# durability (every commit fsynced), runs the same workloads, stops them; and prints the
# comparison. Results (JSON, the tables, both systems' logs) stay in target/bench/<time>/; the
# data directories are deleted once measured (they run to gigabytes).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
script=compare.sh
# shellcheck source=cluster/common.sh
source "$root/cluster/common.sh"

profile=release
bench_args=()
registry_tls=on
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) profile=debug; bench_args+=(--rounds 1 --seconds 0.5 --warmup 0.2 --users 2000) ;;
        --plaintext) registry_tls=off ;;
        --) shift; bench_args+=("$@"); break ;;
        *) die "unknown argument $1 (see the head of $0)" ;;
    esac
    shift
done

etcd_client_ports=(12379 12479 12579)
etcd_peer_ports=(12380 12480 12580)
up_timeout_s=60

out="target/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
target="${CARGO_TARGET_DIR:-$root/target}/$profile"
bench="$target/residency-bench"

if (exec 3<>/dev/tcp/127.0.0.1/7101) 2>/dev/null; then
    die "something already listens on 127.0.0.1:7101 (the local cluster?): stop it first (./cluster/local.sh down)"
fi

ensure_cargo
flags=()
[ "$profile" = release ] && flags+=(--release)
say "building residencyd, residencyctl and residency-bench ($profile)..."
cargo build "${flags[@]}" --bin residencyd --bin residencyctl --bin residency-bench

registry_data="$out/registry-data"
if [ "$registry_tls" = on ]; then
    # local.sh makes the cluster's certificates there; the bench presents the operator's.
    export RESIDENCY_CERTS_DIR="$registry_data/certs"
else
    # No certificates anywhere the bench looks: it speaks plaintext.
    unset RESIDENCY_CERTS_DIR
    [ ! -e data/certs/ca.pem ] || die "data/certs exists, so the bench would speak TLS: move it aside for --plaintext"
fi
export RESIDENCY_TLS="$registry_tls"
say "the registry runs with TLS $registry_tls; etcd without TLS"
etcd_pids=()
stop_all() {
    RESIDENCY_DATA="$registry_data" RESIDENCY_PROFILE="$profile" ./cluster/local.sh down >/dev/null 2>&1 || true
    for pid in "${etcd_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${etcd_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    etcd_pids=()
}
trap stop_all EXIT

# --- the registry -------------------------------------------------------------------------
say "starting a fresh registry cluster (data in $registry_data)"
RESIDENCY_DATA="$registry_data" RESIDENCY_PROFILE="$profile" ./cluster/local.sh up >"$out/registry-up.log" 2>&1 ||
    { cat "$out/registry-up.log"; die "the registry cluster did not start"; }
registry_pids="$(cat "$registry_data"/node{1,2,3}/residencyd.pid | paste -sd, -)"
"$bench" run --system registry --pids "$registry_pids" --metrics 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 \
    --json "$out/registry.json" "${bench_args[@]}" |
    tee "$out/registry.txt"
du -sh "$registry_data"/node1 | sed 's/^/registry disk, node 1: /' | tee -a "$out/registry.txt"
RESIDENCY_DATA="$registry_data" RESIDENCY_PROFILE="$profile" ./cluster/local.sh down >/dev/null
for n in 1 2 3; do cp "$registry_data/node$n/residencyd.log" "$out/registry-node$n.log"; done
rm -rf "$registry_data"

# --- etcd ---------------------------------------------------------------------------------
if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
    say "installing Debian's etcd-server and etcd-client"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null
fi
etcd --version | sed -n 1p | sed 's/^/etcd: /' | tee "$out/etcd-version.txt"
initial=""
for i in 0 1 2; do
    initial+="${initial:+,}e$i=http://127.0.0.1:${etcd_peer_ports[$i]}"
done
for i in 0 1 2; do
    mkdir -p "$out/etcd-data"
    etcd --name "e$i" --data-dir "$out/etcd-data/e$i" \
        --listen-client-urls "http://127.0.0.1:${etcd_client_ports[$i]}" \
        --advertise-client-urls "http://127.0.0.1:${etcd_client_ports[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${etcd_peer_ports[$i]}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer_ports[$i]}" \
        --initial-cluster "$initial" --initial-cluster-state new \
        --initial-cluster-token residency-bench >"$out/etcd-e$i.log" 2>&1 &
    etcd_pids+=($!)
done
etcd_endpoints="$(printf '127.0.0.1:%s\n' "${etcd_client_ports[@]}" | paste -sd, -)"
say "waiting for etcd ($etcd_endpoints) to elect a leader"
deadline=$((SECONDS + up_timeout_s))
until ETCDCTL_API=3 etcdctl --endpoints "$etcd_endpoints" endpoint status -w json 2>/dev/null |
    grep -q '"leader":[1-9]'; do
    [ "$SECONDS" -lt "$deadline" ] || die "etcd did not elect a leader; see $out/etcd-e*.log"
    for pid in "${etcd_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || die "an etcd member exited; see $out/etcd-e*.log"
    done
    sleep 0.3
done
value_bytes="$(grep -o '"value_bytes": [0-9]*' "$out/registry.json" | grep -o '[0-9]*$')"
"$bench" run --system etcd --endpoints "$etcd_endpoints" \
    --pids "$(IFS=,; echo "${etcd_pids[*]}")" --value-bytes "$value_bytes" \
    --json "$out/etcd.json" "${bench_args[@]}" | tee "$out/etcd.txt"
du -sh "$out/etcd-data/e0" | sed 's/^/etcd disk, member 0: /' | tee -a "$out/etcd.txt"
stop_all
rm -rf "$out/etcd-data"

# --- side by side -------------------------------------------------------------------------
echo
"$bench" compare "$out/registry.json" "$out/etcd.json" | tee "$out/compare.md"
echo
say "results in $out"
