#!/usr/bin/env bash
# Runs every Portico test. Filled in by the test harness work; see README.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
