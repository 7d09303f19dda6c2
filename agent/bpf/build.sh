#!/bin/sh
# Compiles tcp_census.bpf.c into tcp_census.bpf.o (committed: building the workspace needs no
# clang). Deterministic for a given clang: relative paths, no DWARF (BTF and CO-RE relocations
# are kept). Usage: agent/bpf/build.sh [OUTPUT] (default: next to the source).
# tests/tests/it/bench_connections_smoke.rs checks that the committed object is this script's output.
set -eu
cd "$(dirname "$0")"
out=${1:-tcp_census.bpf.o}
clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I/usr/include/"$(uname -m)"-linux-gnu -fdebug-compilation-dir=. \
  -c tcp_census.bpf.c -o "$out"
llvm-strip -g "$out"
