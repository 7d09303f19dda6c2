#!/usr/bin/env bash
# Compares nodekeeper's DNS cache with four caching forwarders from Debian in the same run:
# unbound, dnsmasq, dnsdist (packet cache) and kresd (knot-resolver), each forwarding to the same
# upstream (unbound serving a zone authoritatively). For each cache and each phase it prints QPS,
# the server's CPU seconds, queries per server CPU-second, mean and p99 latency, lost queries
# and peak RSS, and the ratio nodekeeper / best peer. No timed assertions: the numbers are
# reported, never checked.
#
# Phases, per cache (each started fresh, pinned to CPU 0; dnsperf and the upstream on CPU 1):
#   hits    BENCH_NAMES names, warmed first, looped for BENCH_SECONDS: every answer a cache hit
#   mixed   one pass over 9 warmed names then 1 never-seen name, repeated (90% hits, 10% misses)
#   misses  one pass over never-seen names (every query goes upstream)
# Throughput runs are closed-loop (dnsperf -c 10 -q 200: as fast as the cache answers). Latency
# is measured separately at a fixed offered load (BENCH_LATENCY_QPS, the same for every cache)
# from dnsperf -v's per-query latencies (mean, nearest-rank p99), hits and mixed.
# Every cache caps TTLs at 30 s (node-local-dns' default); the zone's TTL is 300 s; phases are
# shorter than 30 s after their warm-up, so no warmed name expires during a phase.
#
# Usage: tests/bench/dns_vs_peers.sh [--write-docs]
#   --write-docs  replace the section between the dns-bench markers in docs/benchmarks.md
# Environment:
#   BENCH_SECONDS       length of the hits phase (default 20, at most 25)
#   BENCH_NAMES         warmed names (default 1000)
#   BENCH_MIXED_QUERIES queries in the mixed pass (default 1000000)
#   BENCH_MISS_QUERIES  queries in the misses pass (default 100000)
#   BENCH_LATENCY_QPS   offered load of the latency runs (default 20000), BENCH_LATENCY_SECONDS (5)
#   BENCH_LATENCY_RUNS  latency runs per cache and phase, the median reported (default 3)
#   BENCH_FIXED_QPS     offered loads of the CPU-per-query runs (default "10000 50000")
#   BENCH_FIXED_SECONDS length of each CPU-per-query run (default 10)
#   BENCH_PEERS         caches to run (default "nodekeeper unbound dnsmasq dnsdist kresd")
#   BENCH_NO_BUILD=1    skip `cargo build --release` and use $NODEKEEPER_BIN
#   NODEKEEPER_BIN      agent binary (required with BENCH_NO_BUILD=1)
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
SECONDS_HITS=${BENCH_SECONDS:-20}
NAMES=${BENCH_NAMES:-1000}
MIXED_QUERIES=${BENCH_MIXED_QUERIES:-1000000}
MISS_QUERIES=${BENCH_MISS_QUERIES:-100000}
LAT_QPS=${BENCH_LATENCY_QPS:-20000}
LAT_SECONDS=${BENCH_LATENCY_SECONDS:-5}
LAT_RUNS=${BENCH_LATENCY_RUNS:-3}
read -r -a FIXED_QPS <<<"${BENCH_FIXED_QPS:-10000 50000}"
FIXED_SECONDS=${BENCH_FIXED_SECONDS:-10}
read -r -a CACHES <<<"${BENCH_PEERS:-nodekeeper unbound dnsmasq dnsdist kresd}"
ZONE=bench.example.com
# dnsperf: 10 client sockets, 200 queries outstanding, 2 s timeout (a query later is lost).
PERF_ARGS=(-c 10 -q 200 -t 2)
CMD="bash tests/bench/dns_vs_peers.sh --write-docs"

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

for v in SECONDS_HITS NAMES MIXED_QUERIES MISS_QUERIES LAT_QPS LAT_SECONDS LAT_RUNS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
((SECONDS_HITS <= 25)) || die "BENCH_SECONDS must be at most 25 (warmed names expire after 30 s)"
for tool in dnsperf unbound dig python3 getconf taskset; do
    command -v "$tool" >/dev/null || die "$tool is not installed (tests/scripts/install-deps)"
done
declare -A BIN=([unbound]=unbound [dnsmasq]=dnsmasq [dnsdist]=dnsdist [kresd]=kresd)
for c in "${CACHES[@]}"; do
    case "$c" in
        nodekeeper) ;;
        unbound | dnsmasq | dnsdist | kresd)
            command -v "${BIN[$c]}" >/dev/null || die "${BIN[$c]} is not installed (tests/scripts/install-deps)" ;;
        *) die "unknown cache $c in BENCH_PEERS" ;;
    esac
done
if [[ $WRITE_DOCS == 1 ]]; then
    [[ -z "${BENCH_SECONDS:-}${BENCH_NAMES:-}${BENCH_MIXED_QUERIES:-}${BENCH_MISS_QUERIES:-}${BENCH_PEERS:-}" &&
        "${BENCH_NO_BUILD:-0}" != 1 ]] ||
        die "--write-docs needs the full run (no BENCH_* overrides, no BENCH_NO_BUILD)"
    grep -q '<!-- dns-bench:start -->' "$ROOT/docs/benchmarks.md" ||
        die "docs/benchmarks.md has no <!-- dns-bench:start --> marker"
fi

# shellcheck source=tests/bench/lib.sh
source "$ROOT/tests/bench/lib.sh"
if [[ " ${CACHES[*]} " == *" nodekeeper "* ]]; then resolve_agent_bin; fi

# --- processes: every PID we start is tracked and killed on any exit -----------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nk-dns-bench.XXXXXX")
declare -A PID=()

stop() {
    local pid=${PID[$1]:-} i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$1]"
}

cleanup() {
    local rc=$? p
    trap - EXIT
    for p in "${!PID[@]}"; do stop "$p"; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

CPUS=$(nproc)
if [[ $CPUS -ge 2 ]]; then
    SERVER_PIN=(taskset -c 0)
    CLIENT_PIN=(taskset -c 1)
    PINNING="cache on CPU 0; dnsperf and the upstream on CPU 1"
else
    SERVER_PIN=()
    CLIENT_PIN=()
    PINNING="no pinning ($CPUS CPU)"
fi
if [[ $CPUS -ge 2 ]]; then taskset -pc 1 $$ >/dev/null; fi # this shell, dig, awk: off the cache's CPU

free_port() {
    python3 -c 'import socket, sys
for _ in range(100):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 0)); p = u.getsockname()[1]
    t = socket.socket()
    try:
        t.bind((sys.argv[1], p)); print(p); break
    except OSError:
        pass' "$1"
}

# start NAME PIN... -- CMD...: runs CMD with the given pinning, logs to $WORK/NAME.log.
start() {
    local name=$1
    shift
    local pin=()
    while [[ $1 != -- ]]; do pin+=("$1"); shift; done
    shift
    "${pin[@]}" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
}

# wait_answer NAME IP PORT: until IP#PORT answers h0.$ZONE with NOERROR (20 s).
wait_answer() {
    local name=$1 ip=$2 port=$3 i
    for ((i = 0; i < 200; i++)); do
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name exited during startup"; }
        if dig "@$ip" -p "$port" +tries=1 +time=1 "h0.$ZONE" A 2>/dev/null | grep -q 'status: NOERROR'; then
            return 0
        fi
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2
    die "$name did not answer h0.$ZONE on $ip#$port within 20 s"
}

# --- the upstream: unbound, authoritative for $ZONE with a wildcard -------------------------------

UP_IP=127.0.0.2
UP_PORT=$(free_port "$UP_IP")
mkdir -p "$WORK/upstream"
printf '$ORIGIN %s.\n$TTL 300\n@ 300 IN SOA ns hostmaster 1 3600 600 86400 30\n@ 300 IN NS ns\nns 300 IN A 192.0.2.53\n* 300 IN A 192.0.2.1\n' \
    "$ZONE" >"$WORK/upstream/zone"
cat >"$WORK/upstream/unbound.conf" <<EOF
server:
  interface: $UP_IP@$UP_PORT
  port: $UP_PORT
  do-ip6: no
  username: ""
  chroot: ""
  directory: "$WORK/upstream"
  pidfile: "$WORK/upstream/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-daemonize: no
  module-config: "iterator"
  num-threads: 1
  access-control: 127.0.0.0/8 allow
auth-zone:
  name: "$ZONE."
  zonefile: "$WORK/upstream/zone"
  for-downstream: yes
  for-upstream: no
  fallback-enabled: no
EOF
start upstream "${CLIENT_PIN[@]}" -- unbound -d -c "$WORK/upstream/unbound.conf"
wait_answer upstream "$UP_IP" "$UP_PORT"
log "upstream: unbound on $UP_IP#$UP_PORT, authoritative for *.$ZONE"

# --- query files -----------------------------------------------------------------------------------

awk -v n="$NAMES" -v z="$ZONE" 'BEGIN { for (i = 0; i < n; i++) print "h" i "." z " A" }' >"$WORK/hits.txt"
# mixed/misses/latency-mixed names carry the cache's name: a cache never sees a name twice.
gen_mixed() { # CACHE N FILE [TAG]
    awk -v n="$2" -v names="$NAMES" -v z="$ZONE" -v c="$1${4:-}" \
        'BEGIN { for (i = 0; i < n; i++) if (i % 10 == 9) print "m" i "-" c "." z " A"; else print "h" (i % names) "." z " A" }' >"$3"
}
gen_misses() { # CACHE N FILE
    awk -v n="$2" -v z="$ZONE" -v c="$1" 'BEGIN { for (i = 0; i < n; i++) print "x" i "-" c "." z " A" }' >"$3"
}

# --- the caches ------------------------------------------------------------------------------------

# start_cache C IP PORT: starts cache C listening on IP#PORT, forwarding to the upstream.
start_cache() {
    local c=$1 ip=$2 port=$3 d="$WORK/$1"
    mkdir -p "$d"
    case "$c" in
        nodekeeper)
            cat >"$d/config.yaml" <<EOF
shutdownTimeout: 5s
dns:
  enabled: true
  lameDuck: 0s
  listenIps: [$ip]
  port: $port
  node: {manageInterface: false, rules: none}
  upstreams:
    default: {servers: ["$UP_IP:$UP_PORT"], protocol: udp}
    clusterZones: []
    kubeDnsConfigMap: ""
  cache: {maxTtl: 30s}
EOF
            start "$c" "${SERVER_PIN[@]}" -- env -u KUBECONFIG NODEKEEPER_LOG=warn "$AGENT_BIN" run \
                --standalone --config "$d/config.yaml" --state-dir "$d/state" \
                --metrics-listen "127.0.0.1:$(free_port 127.0.0.1)" --api-listen "127.0.0.1:$(free_port 127.0.0.1)"
            ;;
        unbound)
            cat >"$d/unbound.conf" <<EOF
server:
  interface: $ip@$port
  port: $port
  do-ip6: no
  username: ""
  chroot: ""
  directory: "$d"
  pidfile: "$d/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-daemonize: no
  module-config: "iterator"
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  cache-max-ttl: 30
  cache-max-negative-ttl: 30
  prefetch: yes
  msg-cache-size: 64m
  rrset-cache-size: 128m
forward-zone:
  name: "."
  forward-addr: $UP_IP@$UP_PORT
EOF
            start "$c" "${SERVER_PIN[@]}" -- unbound -d -c "$d/unbound.conf"
            ;;
        dnsmasq)
            start "$c" "${SERVER_PIN[@]}" -- dnsmasq --keep-in-foreground --no-daemon --no-resolv --no-hosts \
                --bind-interfaces --pid-file= --user=root "--listen-address=$ip" "--port=$port" \
                "--server=$UP_IP#$UP_PORT" --cache-size=10000 --max-cache-ttl=30 --dns-forward-max=1000
            ;;
        dnsdist)
            cat >"$d/dnsdist.conf" <<EOF
setLocal("$ip:$port")
setSecurityPollSuffix("")
newServer({address="$UP_IP:$UP_PORT", checkName="h0.$ZONE.", checkInterval=1})
pc = newPacketCache(100000, {maxTTL=30})
getPool(""):setCache(pc)
EOF
            start "$c" "${SERVER_PIN[@]}" -- dnsdist --supervised --disable-syslog -C "$d/dnsdist.conf"
            ;;
        kresd)
            cat >"$d/kresd.conf" <<EOF
net.listen('$ip', $port, { kind = 'dns' })
trust_anchors.remove('.')
cache.size = 100 * MB
cache.max_ttl(30)
policy.add(policy.all(policy.FORWARD('$UP_IP@$UP_PORT')))
EOF
            start "$c" "${SERVER_PIN[@]}" -- kresd -n -c "$d/kresd.conf" "$d"
            ;;
    esac
    wait_answer "$c" "$ip" "$port"
}

version_of() {
    case "$1" in
        nodekeeper) echo "$("$AGENT_BIN" version) ($AGENT_BUILD)" ;;
        unbound) unbound -V | head -n 1 | sed 's/^Version /unbound /' ;;
        dnsmasq) dnsmasq --version | head -n 1 | awk '{ print "dnsmasq", $3 }' ;;
        dnsdist) dnsdist --version | head -n 1 | awk '{ print $1, $2 }' ;;
        kresd) kresd --version | head -n 1 ;;
    esac
}

# --- measurements ----------------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)
machine_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat; }
cpu_ticks() {
    local stat
    stat=$(<"/proc/${PID[$1]}/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/${PID[$1]}/status"; }

# perf C IP PORT FILE OUT ARGS...: dnsperf pinned to the client CPU; stdout to OUT.
perf() {
    local ip=$2 port=$3 file=$4 out=$5
    shift 5
    "${CLIENT_PIN[@]}" dnsperf -s "$ip" -p "$port" -d "$file" "$@" >"$out" 2>&1 ||
        { cat "$out" >&2; die "dnsperf against $ip#$port failed"; }
}
field() { # FILE LABEL: the first number after "LABEL:" in a dnsperf report
    awk -v k="$2:" 'index($0, k) { sub(".*" k "[[:space:]]*", ""); print $1 + 0; exit }' "$1"
}
# latency FILE: "mean p99" in ms from dnsperf -v lines "> RCODE NAME TYPE SECONDS" (timed-out
# queries, which have no SECONDS, are left out: the lost column counts them).
latency() {
    python3 - "$1" <<'EOF'
import math, sys
def ms(line):
    # "> RCODE NAME TYPE SECONDS"; a query that timed out has no SECONDS (it counts as lost).
    try:
        return float(line.split()[-1]) * 1000
    except ValueError:
        return None
t = sorted(v for v in (ms(l) for l in open(sys.argv[1]) if l.startswith("> ")) if v is not None)
if not t:
    print("n/a n/a")
else:
    rank = lambda q: t[max(0, math.ceil(q * len(t)) - 1)]
    print(f"{sum(t) / len(t):.3f} {rank(0.99):.3f}")
EOF
}

# median_pair: lines "mean p99" on stdin -> the median of each column ("n/a" if any is n/a).
median_pair() {
    python3 -c '
import statistics, sys
rows = [l.split() for l in sys.stdin if l.strip()]
if not rows or any("n/a" in r for r in rows):
    print("n/a n/a")
else:
    print(" ".join(f"{statistics.median(float(r[i]) for r in rows):.3f}" for i in (0, 1)))
'
}

declare -A R=() VERSION=() # R[cache,phase,metric]
read -r MACHINE_BUSY0 MACHINE_IDLE0 < <(machine_jiffies)
i=0
for c in "${CACHES[@]}"; do
    i=$((i + 1))
    ip=127.0.0.$((10 + i))
    port=$(free_port "$ip")
    log "$c: starting on $ip#$port ($(version_of "$c"))"
    start_cache "$c" "$ip" "$port"
    gen_mixed "$c" "$MIXED_QUERIES" "$WORK/$c.mixed.txt"
    gen_mixed "$c" $((LAT_QPS * LAT_SECONDS)) "$WORK/$c.latmixed.txt" lat
    gen_misses "$c" "$MISS_QUERIES" "$WORK/$c.misses.txt"
    for phase in hits mixed misses; do
        # Warm (all phases: warmed names must be fresh for the whole phase), then measure.
        perf "$c" "$ip" "$port" "$WORK/hits.txt" "$WORK/$c.warm" -n 1 "${PERF_ARGS[@]}"
        case $phase in
            hits) args=(-d "$WORK/hits.txt" -l "$SECONDS_HITS") ;;
            mixed) args=(-d "$WORK/$c.mixed.txt" -n 1 -l 60) ;;
            misses) args=(-d "$WORK/$c.misses.txt" -n 1 -l 60) ;;
        esac
        t0=$(cpu_ticks "$c")
        perf "$c" "$ip" "$port" "${args[1]}" "$WORK/$c.$phase.out" "${args[@]:2}" "${PERF_ARGS[@]}"
        t1=$(cpu_ticks "$c")
        out="$WORK/$c.$phase.out"
        R[$c,$phase,qps]=$(field "$out" "Queries per second")
        R[$c,$phase,done]=$(field "$out" "Queries completed")
        R[$c,$phase,lost]=$(field "$out" "Queries lost")
        R[$c,$phase,cpu]=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz }')
        R[$c,$phase,qpcpu]=$(awk -v n="${R[$c,$phase,done]}" -v s="${R[$c,$phase,cpu]}" \
            'BEGIN { if (s == 0) print "n/a"; else printf "%.0f", n / s }')
        R[$c,$phase,mean]=n/a
        R[$c,$phase,p99]=n/a
        if [[ $phase != misses ]]; then
            lat_file="$WORK/hits.txt"
            [[ $phase == mixed ]] && lat_file="$WORK/$c.latmixed.txt"
            # A 5 s tail moves between runs by more than caches differ: the median of LAT_RUNS.
            lat_results=()
            for run in $(seq "$LAT_RUNS"); do
                perf "$c" "$ip" "$port" "$WORK/hits.txt" "$WORK/$c.warm" -n 1 "${PERF_ARGS[@]}"
                perf "$c" "$ip" "$port" "$lat_file" "$WORK/$c.$phase.lat.$run" -l "$LAT_SECONDS" \
                    -Q "$LAT_QPS" -v "${PERF_ARGS[@]}"
                lat_results+=("$(latency "$WORK/$c.$phase.lat.$run")")
            done
            read -r R[$c,$phase,mean] R[$c,$phase,p99] < <(printf '%s\n' "${lat_results[@]}" | median_pair)
        fi
        log "$c $phase: ${R[$c,$phase,qps]} QPS, ${R[$c,$phase,cpu]} CPU s, ${R[$c,$phase,qpcpu]} q/CPU-s, lost ${R[$c,$phase,lost]}, mean ${R[$c,$phase,mean]} ms, p99 ${R[$c,$phase,p99]} ms"
    done
    # CPU per query at fixed offered loads (what a node pays: a node-local cache is rarely
    # saturated): hits (the warmed names) and misses (never-seen names), each load in turn.
    for qps in "${FIXED_QPS[@]}"; do
        for kind in hits misses; do
            perf "$c" "$ip" "$port" "$WORK/hits.txt" "$WORK/$c.warm" -n 1 "${PERF_ARGS[@]}"
            file="$WORK/hits.txt"
            if [[ $kind == misses ]]; then
                file="$WORK/$c.fixed$qps.txt"
                gen_misses "$c-f$qps" $((qps * FIXED_SECONDS)) "$file"
            fi
            out="$WORK/$c.fixed$qps.$kind.out"
            t0=$(cpu_ticks "$c")
            perf "$c" "$ip" "$port" "$file" "$out" -l "$FIXED_SECONDS" -Q "$qps" "${PERF_ARGS[@]}"
            t1=$(cpu_ticks "$c")
            k="fixed$qps$kind"
            R[$c,$k,done]=$(field "$out" "Queries completed")
            R[$c,$k,lost]=$(field "$out" "Queries lost")
            R[$c,$k,us]=$(awk -v n="${R[$c,$k,done]}" -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" \
                'BEGIN { if (n == 0 || b == a) print "n/a"; else printf "%.2f", (b - a) / hz * 1e6 / n }')
            log "$c $kind at $qps QPS: ${R[$c,$k,us]} CPU us per query, ${R[$c,$k,done]} completed, lost ${R[$c,$k,lost]}"
        done
    done
    kill -0 "${PID[$c]}" 2>/dev/null || die "$c died during the run"
    R[$c,rss]=$(awk -v k="$(status_kib "$c" VmHWM)" 'BEGIN { printf "%.1f", k / 1024 }')
    VERSION[$c]=$(version_of "$c") 2>/dev/null || true
    stop "$c"
done
read -r MACHINE_BUSY1 MACHINE_IDLE1 < <(machine_jiffies)
MACHINE_BUSY=$(awk -v b="$((MACHINE_BUSY1 - MACHINE_BUSY0))" -v i="$((MACHINE_IDLE1 - MACHINE_IDLE0))" \
    'BEGIN { printf "%.0f%%", 100 * b / (b + i) }')

# --- report ----------------------------------------------------------------------------------------

# best PHASE METRIC higher|lower: the best value among the peers (not nodekeeper) and its cache.
best() {
    local phase=$1 m=$2 dir=$3 c v bv="" bc=""
    for c in "${CACHES[@]}"; do
        [[ $c == nodekeeper ]] && continue
        v=${R[$c,$phase,$m]}
        [[ $v == n/a ]] && continue
        if [[ -z $bv ]] || awk -v a="$v" -v b="$bv" -v d="$dir" 'BEGIN { exit !(d == "higher" ? a > b : a < b) }'; then
            bv=$v
            bc=$c
        fi
    done
    echo "${bv:-n/a} ${bc:-none}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }

table() {
    local phase=$1 title=$2 c
    echo "**$title**"
    echo
    echo "| cache | QPS | server CPU, s | queries per CPU-second | mean latency, ms | p99 latency, ms | lost | peak RSS, MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for c in "${CACHES[@]}"; do
        printf '| %s | %.0f | %s | %s | %s | %s | %s | %s |\n' "$c" "${R[$c,$phase,qps]}" "${R[$c,$phase,cpu]}" \
            "${R[$c,$phase,qpcpu]}" "${R[$c,$phase,mean]}" "${R[$c,$phase,p99]}" "${R[$c,$phase,lost]}" "${R[$c,rss]}"
    done
    if [[ " ${CACHES[*]} " == *" nodekeeper "* && ${#CACHES[@]} -gt 1 ]]; then
        local q m p
        read -r q qc < <(best "$phase" qpcpu higher)
        read -r m mc < <(best "$phase" mean lower)
        read -r p pc < <(best "$phase" p99 lower)
        read -r s sc < <(best "$phase" qps higher)
        printf '| ratio nodekeeper / best peer | %s (%s) | | %s (%s) | %s (%s) | %s (%s) | | |\n' \
            "$(ratio "${R[nodekeeper,$phase,qps]}" "$s")" "$sc" \
            "$(ratio "${R[nodekeeper,$phase,qpcpu]}" "$q")" "$qc" \
            "$(ratio "${R[nodekeeper,$phase,mean]}" "$m")" "$mc" \
            "$(ratio "${R[nodekeeper,$phase,p99]}" "$p")" "$pc"
    fi
    echo
}

# fixed_table: CPU microseconds per completed query at each fixed offered load (lower is better).
fixed_table() {
    local c qps kind head="| cache |" rule="|---|" row
    for qps in "${FIXED_QPS[@]}"; do
        for kind in hits misses; do
            head+=" $kind at $qps QPS, CPU us/query | lost |"
            rule+="---:|---:|"
        done
    done
    echo "**CPU per query at fixed offered loads (${FIXED_SECONDS} s each; lower is better)**"
    echo
    echo "$head"
    echo "$rule"
    for c in "${CACHES[@]}"; do
        row="| $c |"
        for qps in "${FIXED_QPS[@]}"; do
            for kind in hits misses; do
                row+=" ${R[$c,fixed$qps$kind,us]} | ${R[$c,fixed$qps$kind,lost]} |"
            done
        done
        echo "$row"
    done
    if [[ " ${CACHES[*]} " == *" nodekeeper "* && ${#CACHES[@]} -gt 1 ]]; then
        row="| ratio nodekeeper / best peer |"
        for qps in "${FIXED_QPS[@]}"; do
            for kind in hits misses; do
                read -r v vc < <(best "fixed$qps$kind" us lower)
                row+=" $(ratio "${R[nodekeeper,fixed$qps$kind,us]}" "$v") ($vc) | |"
            done
        done
        echo "$row"
    fi
    echo
}

REPORT=$WORK/report.md
{
    table hits "All cache hits ($NAMES warmed names, ${SECONDS_HITS} s)"
    table mixed "Mixed: 90% hits, 10% misses ($MIXED_QUERIES queries, one pass)"
    table misses "All misses ($MISS_QUERIES never-seen names, one pass; latency not measured)"
    fixed_table
    echo "Throughput: closed loop, dnsperf \`${PERF_ARGS[*]}\`; queries per CPU-second = completed queries / the cache's utime+stime (/proc/PID/stat) over the run."
    echo "Latency: ${LAT_RUNS} separate runs at a fixed ${LAT_QPS} QPS for ${LAT_SECONDS} s each (the same offered load for every cache), from dnsperf -v's per-query latencies: the median over the runs of each run's mean and nearest-rank p99; peak RSS is VmHWM at the end."
    echo "Machine: $CPUS CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r); $PINNING."
    echo "Whole-machine CPU busy during the run (caches, dnsperf, upstream, anything else): $MACHINE_BUSY."
    echo "Peers: $(for c in "${CACHES[@]}"; do printf '%s; ' "${VERSION[$c]:-$c}"; done)upstream: $(version_of unbound), authoritative, on CPU 1; $(dnsperf -h 2>&1 | awk '/^Version/ { print "dnsperf " $2 }')."
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
body = f"<!-- dns-bench:start -->\n<!-- generated by: {cmd} -->\n\n{report}\n\n<!-- dns-bench:end -->"
new, n = re.subn(r"<!-- dns-bench:start -->.*?<!-- dns-bench:end -->", lambda _: body, doc, flags=re.S)
if n != 1:
    sys.exit(f"{doc_path}: expected one dns-bench:start ... dns-bench:end section, found {n}")
open(doc_path, "w").write(new)
EOF
    log "wrote the figures to docs/benchmarks.md"
fi
