#!/usr/bin/env bash
# Compares nodekeeper's /metrics endpoint with Debian's prometheus-node-exporter in the same run:
# idle RSS, scrape latency, bytes and samples per scrape, CPU per scrape and idle CPU. Prints a
# markdown table per comparison with ratios (nodekeeper / node_exporter). No timed assertions:
# the numbers are reported, never checked.
#
# Peers, all on loopback ports picked at run time:
#   nodekeeper      the release agent, standalone, default config except metrics.maxSnapshotAge: 0s
#                   (every scrape collects, as at Prometheus' 15 s interval; the 1 s default cache
#                   would otherwise answer most of the back-to-back latency scrapes from memory)
#   node_exporter   default collectors (exports far more than the agent: see samples per scrape)
#   node_exporter   only the collectors comparable to the agent's snapshot (apples to apples)
# With 2+ CPUs the peers are pinned to CPU 1 and the scraper (this shell, curl) to CPU 0.
#
# Usage: tests/bench/metrics_vs_node_exporter.sh [--write-docs]
#   --write-docs  replace the section between the metrics-bench markers in docs/benchmarks.md
# Environment:
#   BENCH_IDLE_SECONDS  idle CPU window (default 60; scraped 4 times, every window/4 seconds)
#   BENCH_SCRAPES       sequential scrapes per peer for latency (default 200)
#   BENCH_NO_BUILD=1    skip `cargo build --release` and use $NODEKEEPER_BIN
#   NODEKEEPER_BIN      agent binary (required with BENCH_NO_BUILD=1)
#   NODE_EXPORTER_BIN   node_exporter binary (default prometheus-node-exporter)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

WRITE_DOCS=0
for arg in "$@"; do
    case "$arg" in
        --write-docs) WRITE_DOCS=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 64 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-60}
SCRAPES=${BENCH_SCRAPES:-200}
WARMUP_SCRAPES=5
SETTLE_SECONDS=5
NE_BIN=${NODE_EXPORTER_BIN:-prometheus-node-exporter}
NE_COMPARABLE_FLAGS=(--collector.disable-defaults --collector.cpu --collector.loadavg
    --collector.meminfo --collector.pressure --collector.netdev --collector.filesystem
    --collector.filefd --collector.sockstat --collector.conntrack)
CMD="bash tests/bench/metrics_vs_node_exporter.sh --write-docs"

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

[[ "$IDLE_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_IDLE_SECONDS must be a positive integer"
[[ "$SCRAPES" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCRAPES must be a positive integer"
for tool in curl python3 getconf "$NE_BIN"; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
if [[ $WRITE_DOCS == 1 ]]; then
    # Docs carry the real figures only: full windows and the release build.
    [[ "$IDLE_SECONDS" == 60 && "$SCRAPES" == 200 && "${BENCH_NO_BUILD:-0}" != 1 ]] ||
        die "--write-docs needs the full run (no BENCH_IDLE_SECONDS, BENCH_SCRAPES, BENCH_NO_BUILD)"
    grep -q '<!-- metrics-bench:start -->' "$ROOT/docs/benchmarks.md" ||
        die "docs/benchmarks.md has no <!-- metrics-bench:start --> marker"
fi

# shellcheck source=tests/bench/lib.sh
source "$ROOT/tests/bench/lib.sh"
resolve_agent_bin

# --- processes: every PID we start is tracked and killed on any exit -----------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nk-bench.XXXXXX")
declare -A PID=()

cleanup() {
    local rc=$? pid i
    trap - EXIT
    for pid in "${PID[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PID[@]}"; do
        for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

CPUS=$(nproc)
PEER_PIN=()
if [[ $CPUS -ge 2 ]] && command -v taskset >/dev/null; then
    PEER_PIN=(taskset -c 1)
    taskset -pc 0 $$ >/dev/null # the scraper: this shell and every curl it starts
    PINNING="peers on CPU 1, scraper on CPU 0"
else
    PINNING="no pinning ($CPUS CPU)"
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME CMD... : runs CMD pinned, logs to $WORK/NAME.log, records its PID.
start() {
    local name=$1
    shift
    "${PEER_PIN[@]}" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
}

declare -A URL=()
NK_METRICS=127.0.0.1:$(free_port)
NK_API=127.0.0.1:$(free_port)
printf 'metrics:\n  maxSnapshotAge: 0s\n' >"$WORK/nodekeeper.yaml"
start nk env -u KUBECONFIG NODEKEEPER_LOG=warn "$AGENT_BIN" run --standalone \
    --config "$WORK/nodekeeper.yaml" --state-dir "$WORK/state" \
    --metrics-listen "$NK_METRICS" --api-listen "$NK_API"
URL[nk]=http://$NK_METRICS/metrics

NEF_ADDR=127.0.0.1:$(free_port)
start nef "$NE_BIN" "--web.listen-address=$NEF_ADDR"
URL[nef]=http://$NEF_ADDR/metrics

NEC_ADDR=127.0.0.1:$(free_port)
start nec "$NE_BIN" "--web.listen-address=$NEC_ADDR" "${NE_COMPARABLE_FLAGS[@]}"
URL[nec]=http://$NEC_ADDR/metrics

PEERS=(nk nef nec)

wait_ready() {
    local p=$1 i
    for ((i = 0; i < 200; i++)); do
        if ! kill -0 "${PID[$p]}" 2>/dev/null; then
            cat "$WORK/$p.log" >&2
            die "$p exited during startup"
        fi
        curl -sf -o /dev/null "${URL[$p]}" && return 0
        sleep 0.1
    done
    cat "$WORK/$p.log" >&2
    die "$p did not answer ${URL[$p]} within 20 s"
}
for p in "${PEERS[@]}"; do wait_ready "$p"; done
log "peers up: nodekeeper pid ${PID[nk]}, node_exporter pids ${PID[nef]} (default) ${PID[nec]} (comparable); $PINNING"

# --- measurements ----------------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# Jiffies "busy idle" of the whole machine: how much else ran during the measurements.
machine_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat; }
read -r MACHINE_BUSY0 MACHINE_IDLE0 < <(machine_jiffies)

# scrape P [OUT]: one GET of /metrics; appends "time_total size_download" to OUT (or prints it).
scrape() {
    local p=$1 out=${2:-/dev/stdout} line code
    line=$(curl -s -o /dev/null -w '%{time_total} %{size_download} %{http_code}' "${URL[$p]}") ||
        die "scraping $p failed"
    code=${line##* }
    [[ $code == 200 ]] || die "$p /metrics answered HTTP $code"
    echo "${line% *}" >>"$out"
}

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/${PID[$1]}/status"; }

# utime + stime in clock ticks (fields 14 and 15; the comm field may contain spaces).
cpu_ticks() {
    local stat
    stat=$(<"/proc/${PID[$1]}/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}

now_ns() { date +%s%N; }

declare -A RSS_IDLE=() RSS_PEAK=() BYTES=() SAMPLES=() CPU_SCRAPE_MS=() CPU_IDLE=()

log "warm-up: $WARMUP_SCRAPES scrapes each, then ${SETTLE_SECONDS}s idle"
for ((i = 0; i < WARMUP_SCRAPES; i++)); do
    for p in "${PEERS[@]}"; do scrape "$p" /dev/null; done
done
sleep "$SETTLE_SECONDS"
for p in "${PEERS[@]}"; do RSS_IDLE[$p]=$(status_kib "$p" VmRSS); done

for p in "${PEERS[@]}"; do
    curl -s -o "$WORK/$p.body" "${URL[$p]}"
    BYTES[$p]=$(wc -c <"$WORK/$p.body")
    SAMPLES[$p]=$(grep -cv -e '^#' -e '^[[:space:]]*$' "$WORK/$p.body" || true)
done

log "latency: $SCRAPES sequential scrapes per peer (interleaved)"
declare -A T0=()
for p in "${PEERS[@]}"; do T0[$p]=$(cpu_ticks "$p"); : >"$WORK/$p.lat"; done
for ((i = 0; i < SCRAPES; i++)); do
    for p in "${PEERS[@]}"; do scrape "$p" "$WORK/$p.lat"; done
done
for p in "${PEERS[@]}"; do
    CPU_SCRAPE_MS[$p]=$(awk -v a="${T0[$p]}" -v b="$(cpu_ticks "$p")" -v hz="$CLK_TCK" -v n="$SCRAPES" \
        'BEGIN { printf "%.2f", (b - a) * 1000 / hz / n }')
    RSS_PEAK[$p]=$(status_kib "$p" VmHWM)
done

# latency_stats P: "mean p50 p99" in milliseconds (nearest-rank percentiles).
latency_stats() {
    python3 - "$WORK/$1.lat" <<'EOF'
import math, sys
t = sorted(float(l.split()[0]) * 1000 for l in open(sys.argv[1]) if l.strip())
rank = lambda q: t[max(0, math.ceil(q * len(t)) - 1)]
print(f"{sum(t) / len(t):.3f} {rank(0.50):.3f} {rank(0.99):.3f}")
EOF
}
declare -A LAT_MEAN=() LAT_P50=() LAT_P99=()
for p in "${PEERS[@]}"; do
    read -r LAT_MEAN[$p] LAT_P50[$p] LAT_P99[$p] < <(latency_stats "$p")
done

INTERVAL_NS=$((IDLE_SECONDS * 1000000000 / 4))
log "idle CPU: ${IDLE_SECONDS}s window, all peers concurrently, each scraped every $((IDLE_SECONDS * 1000 / 4))ms"
for p in "${PEERS[@]}"; do T0[$p]=$(cpu_ticks "$p"); done
START_NS=$(now_ns)
for ((k = 1; k <= 4; k++)); do
    for p in "${PEERS[@]}"; do scrape "$p" /dev/null; done
    LEFT_NS=$((START_NS + k * INTERVAL_NS - $(now_ns)))
    if ((LEFT_NS > 0)); then sleep "$(awk -v n="$LEFT_NS" 'BEGIN { printf "%.3f", n / 1e9 }')"; fi
done
for p in "${PEERS[@]}"; do
    CPU_IDLE[$p]=$(awk -v a="${T0[$p]}" -v b="$(cpu_ticks "$p")" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.2f", (b - a) / hz }')
done

for p in "${PEERS[@]}"; do
    kill -0 "${PID[$p]}" 2>/dev/null || die "$p died during the run"
done

read -r MACHINE_BUSY1 MACHINE_IDLE1 < <(machine_jiffies)
MACHINE_BUSY=$(awk -v b="$((MACHINE_BUSY1 - MACHINE_BUSY0))" -v i="$((MACHINE_IDLE1 - MACHINE_IDLE0))" \
    'BEGIN { printf "%.0f%%", 100 * b / (b + i) }')

# --- report ----------------------------------------------------------------------------------------

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# ratio A B [WHY_NA]: A/B, or "n/a" (with WHY_NA) when B is 0.
ratio() {
    awk -v a="$1" -v b="$2" -v why="${3:+ ($3)}" 'BEGIN { if (b == 0) print "n/a" why; else printf "%.2f", a / b }'
}

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$(ratio "$2" "$3" "${4:-}")"; }

# table OTHER: the comparison rows for nodekeeper vs peer OTHER.
table() {
    local o=$1
    echo "| metric | nodekeeper | node_exporter | ratio (nodekeeper/node_exporter) |"
    echo "|---|---:|---:|---:|"
    row "idle RSS, MiB (VmRSS after $WARMUP_SCRAPES scrapes + ${SETTLE_SECONDS}s idle)" \
        "$(mib "${RSS_IDLE[nk]}")" "$(mib "${RSS_IDLE[$o]}")"
    row "peak RSS, MiB (VmHWM after the latency scrapes)" \
        "$(mib "${RSS_PEAK[nk]}")" "$(mib "${RSS_PEAK[$o]}")"
    row "scrape latency mean, ms ($SCRAPES scrapes)" "${LAT_MEAN[nk]}" "${LAT_MEAN[$o]}"
    row "scrape latency p50, ms" "${LAT_P50[nk]}" "${LAT_P50[$o]}"
    row "scrape latency p99, ms" "${LAT_P99[nk]}" "${LAT_P99[$o]}"
    row "bytes per scrape" "${BYTES[nk]}" "${BYTES[$o]}"
    row "samples per scrape" "${SAMPLES[nk]}" "${SAMPLES[$o]}"
    row "CPU per scrape, ms (utime+stime over the latency scrapes)" \
        "${CPU_SCRAPE_MS[nk]}" "${CPU_SCRAPE_MS[$o]}" \
        "node_exporter used less than one 1/${CLK_TCK} s tick"
    row "CPU over a ${IDLE_SECONDS}s idle window with 4 scrapes, s" "${CPU_IDLE[nk]}" "${CPU_IDLE[$o]}" \
        "node_exporter used less than one 1/${CLK_TCK} s tick"
}

REPORT=$WORK/report.md
{
    echo "**nodekeeper vs node_exporter, default collectors** (node_exporter exports far more: compare samples per scrape)"
    echo
    table nef
    echo
    echo "**nodekeeper vs node_exporter, comparable collectors only** (\`${NE_COMPARABLE_FLAGS[*]}\`)"
    echo
    table nec
    echo
    echo "Machine: $CPUS CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r); $PINNING."
    echo "Whole-machine CPU busy during the measurements (all processes, peers and scraper included): $MACHINE_BUSY."
    echo "Peers: $("$AGENT_BIN" version) ($AGENT_BUILD, standalone, \`metrics.maxSnapshotAge: 0s\`);"
    echo "$("$NE_BIN" --version 2>&1 | head -n 1)."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). CPU time resolution: 1/${CLK_TCK} s."
} >"$REPORT"

echo
cat "$REPORT"

if [[ $WRITE_DOCS == 1 ]]; then
    python3 - "$ROOT/docs/benchmarks.md" "$REPORT" "$CMD" <<'EOF'
import re, sys
doc_path, report_path, cmd = sys.argv[1:]
doc = open(doc_path).read()
report = open(report_path).read().rstrip("\n")
body = f"<!-- metrics-bench:start -->\n<!-- generated by: {cmd} -->\n\n{report}\n\n<!-- metrics-bench:end -->"
new, n = re.subn(r"<!-- metrics-bench:start -->.*?<!-- metrics-bench:end -->", lambda _: body, doc, flags=re.S)
if n != 1:
    sys.exit(f"{doc_path}: expected one metrics-bench:start ... metrics-bench:end section, found {n}")
open(doc_path, "w").write(new)
EOF
    log "wrote the figures to docs/benchmarks.md"
fi
