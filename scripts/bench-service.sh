#!/usr/bin/env bash
# The service benchmark: a broker, `genfeed run` and `genfeed replay` at a fixed
# input rate; prints the replay's JSON summary (sustained interactions/s and
# feeds/s, interaction→feed latency p50/p99, catalogue event→decodable latency).
#
#   scripts/bench-service.sh DATA TOKENIZER MODEL [RATE] [SECONDS] [BEAMS]
#
# DATA is the RecBole folder the tokenizer and model were trained on (e.g. the
# ones scripts/demo.sh leaves in runs/demo). Everything runs on this machine:
# broker, service and load generator share its cores, as they would in the demo.
# GENFEED=path/to/genfeed benchmarks that binary instead of building this tree
# (to compare a change with the build before it on the same machine).
# LEARNING=false turns off learning from the stream ([learning] enabled).
# DEVICE=cuda runs the service's model on the GPU (feed.device; a cuda build),
# BATCH_MAX=N sets feed.batch_max (default 64).
# FRESH_HALF_AT=N sets feed.fresh_half_at (default 20; 0 gives fresh items the
# whole fresh_weight however few they are).
# FRESH_HISTORY=N sets feed.fresh_history (default 5; 1 compares a fresh item
# with the user's last item alone).
# FRESH_CONTENT=sid|catalogue sets feed.fresh_content (default auto: the
# catalogue events' words where MODEL holds fit-affinity's content-tfidf.json).
# FRESH_WEIGHT=W sets feed.fresh_weight (default: the content source's).
# FRESH_SHARE=S sets feed.fresh_share (default unset: the weight as given).
# REFRESH_MS=N sets feed.refresh_ms (default 3600000, no pass within a run; a
# few seconds shows what refreshing idle users' feeds does to hits and latency),
# REFRESH_BATCH=N feed.refresh_batch (default 16).
# ITEM_WAIT_MS=N sets catalogue.item_wait_ms (default 2000; 0 dead-letters an
# interaction that comes before its item at once).
# After the summary, the service's dead letters by reason and the interactions
# that waited for their item go to stderr.
# TRAIN=DIR makes it the prequential replay of a time split
# (`genfeed time-split`): DATA is the split's stream folder, DIR its training
# folder (written as the catalogue), no brand-new items beside them, and the
# baselines (successor counts, content neighbours) scored on the same stream.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
data=$(cd "$1" && pwd); tokenizer=$(cd "$2" && pwd); model=$(cd "$3" && pwd)
rate=${4:-100}; seconds=${5:-30}; beams=${6:-20}
work=$(mktemp -d)
genfeed=${GENFEED:-}
if [ -z "$genfeed" ]; then
  cargo build --release --locked --quiet
  # Where cargo put it: CARGO_TARGET_DIR, when set, moves the build.
  genfeed="$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")/release/genfeed"
fi
service_pid=""
cleanup() {
  if [ -n "$service_pid" ] && kill -0 "$service_pid" 2>/dev/null; then kill -TERM "$service_pid"; wait "$service_pid" || true; fi
  bash scripts/broker.sh stop "$work/broker" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/broker"
addr=$(bash scripts/broker.sh start "$work/broker")
bash scripts/broker.sh topics "$addr" catalogue:1:cleanup.policy=compact interactions:4 \
  recommendations:4 dead-letters:1 histories:4:cleanup.policy=compact >/dev/null
text_model=""
[ -d "$root/models/all-minilm-l6-v2" ] && text_model="text_model = \"$root/models/all-minilm-l6-v2\""
cat >"$work/service.toml" <<TOML
[kafka]
brokers = "$addr"
session_timeout_ms = 6000
[paths]
state_dir = "$work/state"
tokenizer = "$tokenizer"
model = "$model"
$text_model
[feed]
beams = $beams
device = "${DEVICE:-cpu}"
batch_max = ${BATCH_MAX:-64}
fresh_half_at = ${FRESH_HALF_AT:-20}
fresh_history = ${FRESH_HISTORY:-5}
fresh_content = "${FRESH_CONTENT:-auto}"
${FRESH_WEIGHT:+fresh_weight = $FRESH_WEIGHT}
${FRESH_SHARE:+fresh_share = $FRESH_SHARE}
${REFRESH_MS:+refresh_ms = $REFRESH_MS}
${REFRESH_BATCH:+refresh_batch = $REFRESH_BATCH}
[learning]
enabled = ${LEARNING:-true}
[catalogue]
item_wait_ms = ${ITEM_WAIT_MS:-2000}
[http]
listen = "127.0.0.1:0"
TOML
"$genfeed" run --config "$work/service.toml" 2>"$work/service.log" &
service_pid=$!
for _ in $(seq 1 600); do
  [ -s "$work/state/http.addr" ] && break
  kill -0 "$service_pid" 2>/dev/null || { tail -n 20 "$work/service.log"; exit 1; }
  sleep 0.1
done
if [ -n "${TRAIN:-}" ]; then
  split=(--train "$(cd "$TRAIN" && pwd)" --new-items 0 --baselines)
else
  split=(--new-items 2)
fi
"$genfeed" replay --config "$work/service.toml" --data "$data" --catalogue \
  --rate "$rate" --seconds "$seconds" "${split[@]}" --show 0 --json
curl -s "http://$(cat "$work/state/http.addr")/metrics" | awk '
  /^genfeed_dead_letters_total/ { d += $2; if ($2 > 0) r = r " " $1 "=" $2 }
  /^genfeed_interactions_waited_total/ { w = $2 }
  /^genfeed_fresh_weight / { f = $2 }
  /^genfeed_feeds_refreshed_total/ { x = $2 }
  END { printf "service: %d dead letters%s; %d interactions waited for their item; fresh weight at the end %s; %d feeds refreshed\n", d, r, w, f, x }' >&2
