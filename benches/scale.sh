#!/usr/bin/env bash
# The registry at scale: a fresh three-node cluster filled with N placements (default ten
# million), then what an operator lives with at that size.
#
#   ./benches/scale.sh                    10,000,000 users, release build
#   ./benches/scale.sh --users 1000000    a smaller run
#
# It reports: bulk import rows/s (`residency-bench load`, BatchAssign of 500, 4 in flight, as
# `residencyctl user import` sends); resident memory and disk per node (sled's space
# amplification as bytes on disk per placement, measured); restart to ready of one node
# (SIGTERM, start, until its /readyz answers 200); a new learner caught up by snapshot (a
# fourth node added with `member add-learner`, until its /readyz answers 200); and lookups at
# that size. Results and node logs stay in target/bench/scale-<time>/; the data (gigabytes) is
# deleted after a run that finished, and kept after one that failed, to look at.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
script=scale.sh
# shellcheck source=cluster/common.sh
source "$root/cluster/common.sh"

users=10000000
while [ $# -gt 0 ]; do
    case "$1" in
        --users) users="$2"; shift ;;
        *) die "unknown argument $1 (see the head of $0)" ;;
    esac
    shift
done

out="target/bench/scale-$(date -u +%Y%m%dT%H%M%SZ)"
data="$out/data"
# local.sh makes the cluster's certificates there; the bench and residencyctl present the
# operator's.
export RESIDENCY_CERTS_DIR="$data/certs"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-$root/target}/release"
ready_timeout_s=600

if (exec 3<>/dev/tcp/127.0.0.1/7101) 2>/dev/null; then
    die "something already listens on 127.0.0.1:7101 (the local cluster?): stop it first (./cluster/local.sh down)"
fi
ensure_cargo
cargo build --release --bin residencyd --bin residencyctl --bin residency-bench
learner_pid=""
stop_all() {
    stop_samplers
    RESIDENCY_DATA="$data" RESIDENCY_PROFILE=release ./cluster/local.sh down >/dev/null 2>&1 || true
    [ -n "$learner_pid" ] && kill -TERM "$learner_pid" 2>/dev/null || true
}
trap stop_all EXIT

# Whether the node with metrics port $1 answers /readyz with 200.
ready() {
    local reply
    reply="$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 && cat <&3) 2>/dev/null || true)"
    grep -q '200 OK' <<<"$reply"
}

# Seconds (with ms) until the node with metrics port $1 is ready.
time_until_ready() {
    local started now
    started="$(date +%s.%N)"
    local deadline=$((SECONDS + ready_timeout_s))
    until ready "$1"; do
        [ "$SECONDS" -lt "$deadline" ] || die "the node on metrics port $1 was not ready within ${ready_timeout_s}s"
        sleep 0.05
    done
    now="$(date +%s.%N)"
    printf '%.2f' "$(echo "$now - $started" | bc -l)"
}

rss_mib() { awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
# Samples the resident memory of process $1 every half second and keeps its peak (MiB) in file
# $2, until the process ends or the sampler is killed.
samplers=()
sample_peak() {
    local pid="$1" file="$2" peak=0 now
    echo 0 >"$file"
    while kill -0 "$pid" 2>/dev/null; do
        now="$(rss_mib "$pid" 2>/dev/null || true)"
        if [ "${now:-0}" -gt "$peak" ]; then
            peak="$now"
            echo "$peak" >"$file"
        fi
        sleep 0.5
    done
}
stop_samplers() {
    for sampler in "${samplers[@]}"; do kill "$sampler" 2>/dev/null || true; done
    samplers=()
}
pid_of() { cat "$data/node$1/residencyd.pid"; }
report() { printf '%s\n' "$*" | tee -a "$out/scale.md"; }

command -v bc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }

say "starting a fresh cluster (data in $data)"
RESIDENCY_DATA="$data" RESIDENCY_PROFILE=release ./cluster/local.sh up >"$out/up.log" 2>&1 ||
    { cat "$out/up.log"; die "the cluster did not start"; }

report "# Scale run, $(date -u +%Y-%m-%d), $users users, $(nproc) CPUs"
report ""
for n in 1 2 3; do
    sample_peak "$(pid_of "$n")" "$out/peak-node$n" &
    samplers+=($!)
done
"$bin/residency-bench" load --users "$users" | tee "$out/load.txt"
report "- import: $(tail -1 "$out/load.txt" | sed 's/^load: //')"

# Let a snapshot and log purge settle so the disk figure is the steady state, then measure.
sleep 5
stop_samplers
for n in 1 2 3; do
    pid="$(pid_of "$n")"
    # Blocks in use, not apparent sizes: log segments are preallocated sparse files.
    bytes="$(du -s -B1 "$data/node$n" | cut -f1)"
    report "- node $n: resident memory $(rss_mib "$pid") MiB (peak during the import $(cat "$out/peak-node$n") MiB); disk $((bytes / 1048576)) MiB ($((bytes / users)) bytes per placement)"
done
du -sh "$data"/node1/* | sed 's/^/  node 1: /' | tee -a "$out/scale.md"

# Restart to ready: node 2 stopped with SIGTERM and started again the way local.sh starts it.
pid="$(pid_of 2)"
cmdline="$(tr '\0' '\n' <"/proc/$pid/cmdline")"
kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
mapfile -t argv <<<"$cmdline"
nohup "${argv[@]}" >>"$data/node2/residencyd.log" 2>&1 &
echo $! >"$data/node2/residencyd.pid"
report "- restart to ready, node 2: $(time_until_ready 7302) s"
report "- node 2 resident memory after restart and catch-up: $(rss_mib "$(pid_of 2)") MiB"

# A backup from the leader: it builds a fresh snapshot (and purges its log behind it, so the
# learner below must be sent a snapshot) and streams it whole.
leader="$("$bin/residencyctl" status -o json | grep -o '"leader_id": [0-9]*' | sed -n 1p | grep -o '[0-9]*$')"
started="$(date +%s.%N)"
"$bin/residencyctl" --endpoints "127.0.0.1:710$leader" backup create "$out/backup.rrb" >/dev/null
took="$(echo "$(date +%s.%N) - $started" | bc -l)"
report "- backup from the leader (fresh snapshot, streamed to a file): $(printf '%.1f' "$took") s, $(du -m "$out/backup.rrb" | cut -f1) MiB"
rm -f "$out/backup.rrb"

# A learner: a fourth node, empty, added to the cluster; the leader sends it a snapshot.
mkdir -p "$data/node4"
"$bin/residencyctl" certs issue --dir "$data/certs" --kind node --name 4 >/dev/null
nohup "$bin/residencyd" --config cluster/local/node1.toml --node-id 4 --data-dir "$data/node4" \
    --tls-dir "$data/certs" \
    --listen-client 127.0.0.1:7104 --listen-peer 127.0.0.1:7204 --listen-metrics 127.0.0.1:7304 \
    >>"$data/node4/residencyd.log" 2>&1 &
learner_pid=$!
sample_peak "$learner_pid" "$out/peak-learner" &
samplers+=($!)
until (exec 3<>/dev/tcp/127.0.0.1/7204) 2>/dev/null; do sleep 0.1; done
"$bin/residencyctl" member add-learner 127.0.0.1:7204 >/dev/null
caught_up="$(time_until_ready 7304)"
how="from the log alone"
grep -q "receiving a snapshot" "$data/node4/residencyd.log" && how="by snapshot, then the log"
report "- new learner caught up ($how): $caught_up s"
report "- learner resident memory: $(rss_mib "$learner_pid") MiB when ready, peak $(cat "$out/peak-learner") MiB while catching up"
sleep 20
report "- learner resident memory 20 s later: $(rss_mib "$learner_pid") MiB"
stop_samplers
"$bin/residencyctl" member remove 4 >/dev/null
kill -TERM "$learner_pid"; learner_pid=""

report ""
"$bin/residency-bench" run --users "$users" --workloads lookup-linearizable,lookup-stale,check-access \
    --rounds 3 --pids "$(pid_of 1),$(pid_of 2),$(pid_of 3)" --json "$out/reads.json" | tee "$out/reads.txt"
grep '^|' "$out/reads.txt" >>"$out/scale.md"
stop_all
trap - EXIT
for n in 1 2 3 4; do
    [ -f "$data/node$n/residencyd.log" ] && cp "$data/node$n/residencyd.log" "$out/node$n.log"
done
rm -rf "$data"
say "results in $out/scale.md"
