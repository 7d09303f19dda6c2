#!/usr/bin/env bash
# Compares nodekeeper's disk discovery + inspection with util-linux over the same loop devices,
# in the same run: `nodekeeper disks list --json` (disks.devices = exactly the benchmark's
# loops) against `lsblk -J -O <devices>` followed by `blkid -p <device>` for each device, which
# is what a script doing the same job runs. Reports wall time and syscall counts per run, with
# ratios (nodekeeper / lsblk + blkid). No timed assertions: numbers are reported, never checked.
#
# nodekeeper itself cross-checks each selected disk with `blkid -p` and `wipefs -n`
# (disks.crossCheck, default true), so it is measured twice: as configured by default, and with
# disks.crossCheck: false (its own probes only).
#
# Needs root: it creates BENCH_DEVICES small loop devices (sparse files in a temp dir) carrying a
# mix of signatures (blank, ext4, swap, GPT, MBR, random data), and detaches every one of them on
# exit, whatever happens (trap). No tool runs on a device this script did not attach.
#
# Usage: tests/bench/disks_vs_lsblk.sh [--write-docs]
#   --write-docs  replace the section between the disks-bench markers in docs/benchmarks.md
# Environment:
#   BENCH_DEVICES       loop devices (default 32)
#   BENCH_RUNS          timed runs per command (default 30; hyperfine adds 3 warm-up runs)
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
DEVICES=${BENCH_DEVICES:-32}
RUNS=${BENCH_RUNS:-30}
LOOP_MIB=64
CMD="bash tests/bench/disks_vs_lsblk.sh --write-docs"

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "BENCH_DEVICES must be a positive integer"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer"
[[ $(id -u) == 0 ]] || die "needs root (it creates loop devices)"
for tool in losetup lsblk blkid wipefs strace python3 mkfs.ext4 mkswap sgdisk sfdisk; do
    command -v "$tool" >/dev/null || die "$tool is not installed (tests/scripts/install-deps)"
done
if [[ $WRITE_DOCS == 1 ]]; then
    # Docs carry the real figures only: 32 devices, the full run count, the release build.
    [[ "$DEVICES" == 32 && "$RUNS" == 30 && "${BENCH_NO_BUILD:-0}" != 1 ]] ||
        die "--write-docs needs the full run (no BENCH_DEVICES, BENCH_RUNS, BENCH_NO_BUILD)"
    grep -q '<!-- disks-bench:start -->' "$ROOT/docs/benchmarks.md" ||
        die "docs/benchmarks.md has no <!-- disks-bench:start --> marker"
fi

# shellcheck source=tests/bench/lib.sh
source "$ROOT/tests/bench/lib.sh"
resolve_agent_bin

# --- loop devices: every one we attach is detached on any exit ------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nk-disks-bench.XXXXXX")
LOOPS=()

cleanup() {
    local rc=$? dev
    trap - EXIT
    for dev in "${LOOPS[@]}"; do
        losetup --detach "$dev" 2>/dev/null || log "warning: could not detach $dev"
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

KINDS=(blank ext4 swap gpt mbr random)
log "creating $DEVICES loop devices of $LOOP_MIB MiB (${KINDS[*]}, in turn)"
for ((i = 0; i < DEVICES; i++)); do
    kind=${KINDS[i % ${#KINDS[@]}]}
    img="$WORK/$i-$kind.img"
    truncate -s "${LOOP_MIB}M" "$img"
    # Signatures are written into the backing file before it is attached.
    case "$kind" in
        blank) ;;
        ext4) mkfs.ext4 -q -F "$img" ;;
        swap) chmod 600 "$img"; mkswap "$img" >/dev/null 2>&1 ;;
        gpt) sgdisk -n 1:2048:+16M "$img" >/dev/null ;;
        mbr) echo ',16M,83' | sfdisk -q -X dos "$img" >/dev/null ;;
        random) head -c 1M /dev/urandom | dd of="$img" conv=notrunc status=none ;;
    esac
    dev=$(losetup --find --show "$img")
    [[ "$dev" == /dev/loop* ]] || die "losetup printed $dev"
    LOOPS+=("$dev")
done
NAMES=$(printf '"%s", ' "${LOOPS[@]##*/}")
NAMES=${NAMES%, }

for cc in true false; do
    cat >"$WORK/config-$cc.yaml" <<EOF
disks:
  devices: [$NAMES]
  modelPatterns: []
  minSizeBytes: 1048576
  crossCheck: $cc
EOF
done

# The peer: what a script would run to learn the same (devices, then signatures per device).
cat >"$WORK/peer.sh" <<EOF
lsblk -J -O ${LOOPS[*]} >/dev/null
for d in ${LOOPS[*]}; do blkid -p "\$d" >/dev/null || true; done
EOF
NK_CMD="$AGENT_BIN disks list --json --config $WORK/config-true.yaml"
NK_OFF_CMD="$AGENT_BIN disks list --json --config $WORK/config-false.yaml"
PEER_CMD="bash $WORK/peer.sh"

# --- sanity: both sides see the same thing ----------------------------------------------------------

$NK_CMD >"$WORK/nk.json"
NK_FOUND=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))["disks"]
print(sum(1 for x in d if x["decision"] == "has-data"), sum(1 for x in d if x["decision"] == "candidate"))
' "$WORK/nk.json")
BLKID_FOUND=0
for d in "${LOOPS[@]}"; do
    if blkid -p "$d" >/dev/null 2>&1; then BLKID_FOUND=$((BLKID_FOUND + 1)); fi
done

# --- wall time --------------------------------------------------------------------------------------

declare -A MEAN=() SD=()
if command -v hyperfine >/dev/null; then
    TIMER="hyperfine $(hyperfine --version | awk '{print $2}') ($RUNS runs after 3 warm-up runs)"
    log "timing with hyperfine"
    hyperfine --style none --warmup 3 --runs "$RUNS" --export-json "$WORK/hf.json" \
        -n nk "$NK_CMD" -n nk_off "$NK_OFF_CMD" -n peer "$PEER_CMD" >/dev/null
    while read -r name mean sd; do
        MEAN[$name]=$mean
        SD[$name]=$sd
    done < <(python3 -c '
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(r["command"], "%.2f" % (r["mean"] * 1000), "%.2f" % ((r["stddev"] or 0) * 1000))
' "$WORK/hf.json")
else
    TIMER="a shell loop ($RUNS runs after 3 warm-up runs; hyperfine not installed)"
    log "timing with a shell loop (hyperfine not installed)"
    for name in nk nk_off peer; do
        case $name in nk) c=$NK_CMD ;; nk_off) c=$NK_OFF_CMD ;; peer) c=$PEER_CMD ;; esac
        for ((i = 0; i < 3; i++)); do $c >/dev/null; done
        : >"$WORK/$name.times"
        for ((i = 0; i < RUNS; i++)); do
            t0=$(date +%s%N); $c >/dev/null; t1=$(date +%s%N)
            echo $(((t1 - t0))) >>"$WORK/$name.times"
        done
        read -r MEAN[$name] SD[$name] < <(python3 -c '
import statistics, sys
v = [int(l) / 1e6 for l in open(sys.argv[1])]
print("%.2f" % statistics.mean(v), "%.2f" % (statistics.stdev(v) if len(v) > 1 else 0))
' "$WORK/$name.times")
    done
fi

# --- syscalls and processes (strace -c -f: every child counted) --------------------------------------

declare -A SYSCALLS=() EXECS=() OPENS=() READS=()
for name in nk nk_off peer; do
    case $name in nk) c=$NK_CMD ;; nk_off) c=$NK_OFF_CMD ;; peer) c=$PEER_CMD ;; esac
    strace -f -c -o "$WORK/$name.strace" $c >/dev/null
    read -r SYSCALLS[$name] EXECS[$name] OPENS[$name] READS[$name] < <(python3 -c '
import sys
calls = {}
total = 0
for line in open(sys.argv[1]):
    f = line.split()
    # % time, seconds, usecs/call, calls, [errors,] syscall
    if len(f) >= 5 and f[0][0].isdigit():
        name = f[-1]
        n = int(f[3])
        errors = int(f[4]) if len(f) == 6 else 0
        if name == "total":
            total = n
        else:
            calls[name] = n
            calls[name + "_ok"] = n - errors
print(total, calls.get("execve_ok", 0), calls.get("openat", 0) + calls.get("open", 0), calls.get("read", 0) + calls.get("pread64", 0))
' "$WORK/$name.strace")
done

# --- report -------------------------------------------------------------------------------------------

ratio() { python3 -c 'import sys; a, b = map(float, sys.argv[1:]); print("%.2f" % (a / b) if b else "n/a")' "$1" "$2"; }

REPORT="$WORK/report.md"
{
    echo "**nodekeeper disks list vs lsblk + blkid, $DEVICES loop devices** (ratio = nodekeeper / lsblk + blkid)"
    echo
    echo "| metric | nodekeeper | nodekeeper, crossCheck off | lsblk + blkid | ratio | ratio, crossCheck off |"
    echo "|---|---:|---:|---:|---:|---:|"
    row() {
        local label=$1 a=$2 b=$3 p=$4
        echo "| $label | $a | $b | $p | $(ratio "$a" "$p") | $(ratio "$b" "$p") |"
    }
    row "wall time mean, ms" "${MEAN[nk]}" "${MEAN[nk_off]}" "${MEAN[peer]}"
    row "wall time stddev, ms" "${SD[nk]}" "${SD[nk_off]}" "${SD[peer]}"
    row "syscalls per run (strace -c -f)" "${SYSCALLS[nk]}" "${SYSCALLS[nk_off]}" "${SYSCALLS[peer]}"
    row "programs executed per run (successful execve)" "${EXECS[nk]}" "${EXECS[nk_off]}" "${EXECS[peer]}"
    row "open/openat per run" "${OPENS[nk]}" "${OPENS[nk_off]}" "${OPENS[peer]}"
    row "read/pread64 per run" "${READS[nk]}" "${READS[nk_off]}" "${READS[peer]}"
    echo
    read -r nk_data nk_cand <<<"$NK_FOUND"
    echo "Signatures found: nodekeeper calls $nk_data of $DEVICES devices has-data and $nk_cand candidate;"
    echo "\`blkid -p\` finds a signature on $BLKID_FOUND of $DEVICES (it has no verdict for random data)."
    echo "Devices: $DEVICES loop devices of $LOOP_MIB MiB on sparse files, in turn ${KINDS[*]}."
    echo "Wall time: $TIMER. Syscalls: one run under \`strace -f -c\`, all child processes counted."
    echo "Peers: $("$AGENT_BIN" version) ($AGENT_BUILD); $(lsblk --version); $(blkid --version | sed 's/  */ /g')."
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r)."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC')."
} >"$REPORT"
cat "$REPORT"

if [[ $WRITE_DOCS == 1 ]]; then
    python3 - "$ROOT/docs/benchmarks.md" "$REPORT" "$CMD" <<'EOF'
import re, sys
doc_path, report_path, cmd = sys.argv[1:]
doc = open(doc_path).read()
report = open(report_path).read().rstrip("\n")
body = f"<!-- disks-bench:start -->\n<!-- generated by: {cmd} -->\n\n{report}\n\n<!-- disks-bench:end -->"
new, n = re.subn(r"<!-- disks-bench:start -->.*?<!-- disks-bench:end -->", lambda _: body, doc, flags=re.S)
if n != 1:
    sys.exit(f"{doc_path}: expected one disks-bench:start ... disks-bench:end section, found {n}")
open(doc_path, "w").write(new)
EOF
    log "wrote the figures to docs/benchmarks.md"
fi
