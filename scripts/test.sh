#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then
# checks formatting and lints and runs every test in release mode (candle code
# in a debug build is 30-70x slower, and the suite trains small models).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-minilm.sh >/dev/null
export GENFEED_TEXT_MODEL="$PWD/models/all-minilm-l6-v2"

cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
