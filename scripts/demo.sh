#!/usr/bin/env bash
# The main job, end to end: a real broker, a small tokenizer and model, the
# streaming service, and live feeds.
#
#   scripts/demo.sh                      a generated stream (5,000 items, 500 of them
#                                        arriving while it runs, 2,000 users)
#   scripts/demo.sh ../shared/data/toys  a RecBole folder (NAME.item, NAME.inter)
#
# 1. installs the sentence encoder and the tansu broker, builds genfeed;
# 2. cuts the log in time (`genfeed time-split`, 80% before the cut): trains an
#    RQ-KMeans tokenizer on the items' text and a small generative model on
#    the interactions before the cut (DEMO_EPOCHS, default 8), and scores it;
# 3. starts a broker on a free loopback port, creates the topics, starts
#    `genfeed run`, writes the training catalogue, sends each user's last
#    training interactions, then replays the interactions after the cut at
#    DEMO_RATE per second (default 100) for DEMO_SECONDS (default 30), items
#    met only after the cut arriving as catalogue events just before their
#    first interaction; every interaction is scored against the feed its user
#    held (hit rate, for known and for new items), printing live figures
#    every second and a few users' feeds;
# 4. stops the service with SIGTERM (it drains and commits), starts it again
#    on its state and times how long it takes to serve (DEMO_RESTART_SECONDS
#    more of replay, default 5), stops it and the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work="$root/runs/demo"
mkdir -p "$work"

bash scripts/install-minilm.sh >/dev/null
export GENFEED_TEXT_MODEL="$root/models/all-minilm-l6-v2"
bash scripts/broker.sh install >/dev/null
cargo build --release --locked --quiet
# Where cargo put it: CARGO_TARGET_DIR, when set, moves the build.
genfeed="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/release/genfeed"

if [ $# -ge 1 ]; then
  data=$(cd "$1" && pwd)
else
  data="$work/data"
  "$genfeed" synth --out "$data" --items 5000 --users 2000 --topics 60 --late-items 500 >/dev/null
fi
echo "== cut the log in time: train before the cut, stream after it"
"$genfeed" time-split --data "$data" --out "$work/split" --cut 0.8 >/dev/null
train="$work/split/train"
stream="$work/split/stream"
items=$(ls "$train"/*.item | head -n 1)
echo "== training catalogue: $items ($(($(wc -l <"$items") - 1)) items)"

echo "== train an RQ-KMeans tokenizer on the items' content (text where there is, else attributes)"
"$genfeed" tokenizer train --items "$items" --method rq-kmeans --encoder auto --out "$work/tokenizer" | tail -n 3

echo "== train the generative model (${DEMO_EPOCHS:-8} epochs, 1 thread)"
"$genfeed" train --data "$train" --tokenizer "$work/tokenizer" --out "$work/model" \
  --epochs "${DEMO_EPOCHS:-8}" --valid-users 1000 --threads 1 >"$work/train.json"
grep -E '^  "(epochs|best_epoch|train_secs)"|^    "(pairs|weight)"' "$work/train.json"
echo "== leave-one-out test on 2,000 users: Recall/NDCG@5/10, invalid-ID rate"
"$genfeed" eval --data "$train" --model "$work/model" --tokenizer "$work/tokenizer" --users 2000 | tail -n 4

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
# tansu completes a group join after half of this (1 s; the service joins
# while it loads); the default 10000 would make every start wait 5 s.
session_timeout_ms = 2000

[paths]
state_dir = "state"
tokenizer = "tokenizer"
model = "model"
text_model = "$GENFEED_TEXT_MODEL"

[feed]
# Feed idle users again every 10 s (default an hour), so that within the
# replay new items reach users before their next interaction.
refresh_ms = 10000

[http]
listen = "127.0.0.1:0"
TOML

# Starts the service and waits until /readyz says ready (catalogue read to
# its end, partitions assigned, histories restored); prints the seconds taken.
start_service() {
  rm -f "$work/state/http.addr"
  local t0=$(date +%s%3N)
  "$genfeed" run --config "$work/service.toml" 2>>"$work/service.log" &
  service_pid=$!
  for _ in $(seq 1 1200); do
    kill -0 "$service_pid" 2>/dev/null || { tail -n 20 "$work/service.log"; exit 1; }
    if [ -s "$work/state/http.addr" ]; then
      local hp=$(cat "$work/state/http.addr")
      if exec 3<>"/dev/tcp/${hp%:*}/${hp##*:}" 2>/dev/null; then
        printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
        local status=$(head -n 1 <&3)
        exec 3<&-
        if [[ $status == *" 200 "* ]]; then
          local t1=$(date +%s%3N)
          echo "ready after $(((t1 - t0) / 1000)).$(printf '%03d' $(((t1 - t0) % 1000))) s; metrics: http://$hp/metrics"
          return
        fi
      fi
    fi
    sleep 0.05
  done
  echo "not ready after 60 s"; exit 1
}

echo "== start the service (log: $work/service.log)"
: >"$work/service.log"
start_service

echo "== write the training catalogue, warm up the users, then stream what came after the cut"
"$genfeed" replay --config "$work/service.toml" --data "$stream" --train "$train" --catalogue \
  --rate "${DEMO_RATE:-100}" --seconds "${DEMO_SECONDS:-30}" --show 3

echo "== stop the service (SIGTERM: drain, deliver, commit)"
kill -TERM "$service_pid"
wait "$service_pid"
service_pid=""
grep -E "stopped|draining" "$work/service.log" | tail -n 2

echo "== start it again on its state: it trusts its histories and reads only what is new"
start_service
"$genfeed" replay --config "$work/service.toml" --data "$stream" \
  --rate "${DEMO_RATE:-100}" --seconds "${DEMO_RESTART_SECONDS:-5}" --show 0
kill -TERM "$service_pid"
wait "$service_pid"
service_pid=""
grep -E "histories restored|stopped" "$work/service.log" | tail -n 5
