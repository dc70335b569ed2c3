#!/usr/bin/env bash
# The main job, end to end: a real broker, a small tokenizer and model, the
# streaming service, and live feeds.
#
#   scripts/demo.sh                      a generated catalogue (5,000 items, 2,000 users)
#   scripts/demo.sh ../shared/data/toys  a RecBole folder (NAME.item, NAME.inter)
#
# 1. installs the sentence encoder and the tansu broker, builds genfeed;
# 2. trains an RQ-KMeans tokenizer on the items' text and a small generative
#    model on the interactions (DEMO_EPOCHS, default 8), and scores it;
# 3. starts a broker on a free loopback port, creates the topics, starts
#    `genfeed run`, writes the catalogue, then replays the interactions at
#    DEMO_RATE per second (default 100) for DEMO_SECONDS (default 30) with two
#    brand-new items per second, printing live figures every second and a few
#    users' feeds;
# 4. stops the service with SIGTERM (it drains and commits) and the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work="$root/runs/demo"
mkdir -p "$work"

bash scripts/install-minilm.sh >/dev/null
export GENFEED_TEXT_MODEL="$root/models/all-minilm-l6-v2"
bash scripts/broker.sh install >/dev/null
cargo build --release --locked --quiet
genfeed="$root/target/release/genfeed"

if [ $# -ge 1 ]; then
  data=$(cd "$1" && pwd)
else
  data="$work/data"
  "$genfeed" synth --out "$data" --items 5000 --users 2000 --topics 60 >/dev/null
fi
items=$(ls "$data"/*.item | head -n 1)
echo "== catalogue: $items ($(($(wc -l <"$items") - 1)) items)"

echo "== train an RQ-KMeans tokenizer on the items' content (text where there is, else attributes)"
"$genfeed" tokenizer train --items "$items" --method rq-kmeans --encoder auto --out "$work/tokenizer" | tail -n 3

echo "== train the generative model (${DEMO_EPOCHS:-8} epochs, 1 thread)"
"$genfeed" train --data "$data" --tokenizer "$work/tokenizer" --out "$work/model" \
  --epochs "${DEMO_EPOCHS:-8}" --valid-users 1000 --threads 1 >"$work/train.json"
grep -E '^  "(epochs|best_epoch|train_secs)"|^    "(pairs|weight)"' "$work/train.json"
echo "== leave-one-out test on 2,000 users: Recall/NDCG@5/10, invalid-ID rate"
"$genfeed" eval --data "$data" --model "$work/model" --tokenizer "$work/tokenizer" --users 2000 | tail -n 4

echo "== start a broker and create the topics"
broker_dir="$work/broker"
rm -rf "$broker_dir" "$work/state"
mkdir -p "$broker_dir"
service_pid=""
cleanup() {
  if [ -n "$service_pid" ] && kill -0 "$service_pid" 2>/dev/null; then kill -TERM "$service_pid"; wait "$service_pid" || true; fi
  bash scripts/broker.sh stop "$broker_dir" >/dev/null 2>&1 || true
}
trap cleanup EXIT
addr=$(bash scripts/broker.sh start "$broker_dir")
bash scripts/broker.sh topics "$addr" catalogue:1:cleanup.policy=compact interactions:4 \
  recommendations:4 dead-letters:1 histories:4:cleanup.policy=compact >/dev/null
echo "broker at $addr"

cat >"$work/service.toml" <<TOML
# Written by scripts/demo.sh; every key is documented in configs/genfeed.toml.
[kafka]
brokers = "$addr"
session_timeout_ms = 6000

[paths]
state_dir = "state"
tokenizer = "tokenizer"
model = "model"
text_model = "$GENFEED_TEXT_MODEL"

[http]
listen = "127.0.0.1:0"
TOML

echo "== start the service (log: $work/service.log)"
"$genfeed" run --config "$work/service.toml" 2>"$work/service.log" &
service_pid=$!
for _ in $(seq 1 600); do
  [ -s "$work/state/http.addr" ] && break
  kill -0 "$service_pid" 2>/dev/null || { tail -n 20 "$work/service.log"; exit 1; }
  sleep 0.1
done
echo "metrics: http://$(cat "$work/state/http.addr")/metrics"

echo "== write the catalogue, then replay interactions with new items arriving"
"$genfeed" replay --config "$work/service.toml" --data "$data" --catalogue \
  --rate "${DEMO_RATE:-100}" --seconds "${DEMO_SECONDS:-30}" --new-items 2 --show 3

echo "== stop the service (SIGTERM: drain, deliver, commit)"
kill -TERM "$service_pid"
wait "$service_pid"
service_pid=""
grep -E "stopped|draining" "$work/service.log" | tail -n 2
