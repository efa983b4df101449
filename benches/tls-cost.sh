#!/usr/bin/env bash
# What mutual TLS costs: the same workloads against the local cluster with TLS (as shipped) and
# in plaintext (RESIDENCY_TLS=off, residencyd --insecure-no-tls), alternating, twice each, one
# fresh cluster per run. Prints each run; the JSON reports go to target/bench/tls-cost-<time>/.
#
#   ./benches/tls-cost.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
workloads="lookup-linearizable,lookup-stale,check-access,assign-1,assign-256"
out="$root/target/bench/tls-cost-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
cargo build -q --release --bin residencyd --bin residencyctl --bin residency-bench
for run in 1 2; do
    for mode in on off; do
        data="$out/data-$mode-$run"
        RESIDENCY_DATA="$data" RESIDENCY_PROFILE=release RESIDENCY_TLS=$mode ./cluster/local.sh up >"$out/up-$mode-$run.log" 2>&1
        pids="$(cat "$data"/node*/residencyd.pid | paste -sd,)"
        if [ "$mode" = on ]; then
            export RESIDENCY_CERTS_DIR="$data/certs"
        else
            # No certificates anywhere the bench looks: it speaks plaintext.
            export RESIDENCY_CERTS_DIR=""
            [ ! -e data/certs/ca.pem ] || { echo "data/certs exists: the bench would use TLS" >&2; exit 1; }
        fi
        echo "== TLS $mode, run $run, load $(cut -d' ' -f1-3 /proc/loadavg)"
        target/release/residency-bench run --pids "$pids" --workloads "$workloads" \
            --users 20000 --rounds 3 --seconds 4 --json "$out/$mode-$run.json" | grep 'ops/s' || true
        RESIDENCY_DATA="$data" RESIDENCY_PROFILE=release RESIDENCY_TLS=$mode ./cluster/local.sh down >/dev/null 2>&1
        rm -rf "$data"
    done
done
echo "reports: $out"
