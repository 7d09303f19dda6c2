# Shared by the benchmark scripts (sourced, not run). Expects ROOT and log/die from the caller.

# Sets AGENT_BIN and AGENT_BUILD: the release build, or $NODEKEEPER_BIN with BENCH_NO_BUILD=1
# (smoke runs reuse the suite's debug binary).
resolve_agent_bin() {
    if [[ "${BENCH_NO_BUILD:-0}" == 1 ]]; then
        AGENT_BIN=${NODEKEEPER_BIN:?BENCH_NO_BUILD=1 needs NODEKEEPER_BIN}
        AGENT_BUILD="NODEKEEPER_BIN"
    else
        log "building the release agent"
        (cd "$ROOT" && cargo build --release -p nodekeeper >&2)
        AGENT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/nodekeeper
        AGENT_BUILD="release build"
    fi
    [[ -x "$AGENT_BIN" ]] || die "agent binary $AGENT_BIN is missing"
}
