#!/usr/bin/env bash
# Runs the benchmarks behind docs/BENCHMARKS.md and redraws its plots.
#
#   bash scripts/plot-benchmarks.sh            # loadgen (~3 min) + plots
#   bash scripts/plot-benchmarks.sh --claude   # also the real-CLI benchmark (~4 min)
#   bash scripts/plot-benchmarks.sh --plot-only
#
# Figures go to docs/benchmarks/*.json, plots to docs/*.svg. Run it on a quiet
# machine: the load generator and the gateway share its cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=docs/benchmarks
mkdir -p "$out"
if [[ "${1:-}" != "--plot-only" ]]; then
    cargo run --release --example loadgen -- --json "$out/loadgen.json" | tee "$out/loadgen.txt"
    if [[ "${1:-}" == "--claude" ]]; then
        AGENTGATE_CLAUDE_BIN="${AGENTGATE_CLAUDE_BIN:-$(bash scripts/install-claude.sh | tail -n 1)}"
        export AGENTGATE_CLAUDE_BIN
        cargo run --release --example claude_bench -- --runs 20 --json "$out/claude_bench.json" | tee "$out/claude_bench.txt"
    fi
fi
cargo run --release --example bench_plot -- "$out/loadgen.json" docs
