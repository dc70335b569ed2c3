#!/usr/bin/env bash
# Restart times on the demo's artifacts (run scripts/demo.sh first): a
# broker, the service on runs/demo's tokenizer and model, 5 s of replay, then
# kill -9 and a restart, then SIGTERM and a restart; prints the time from
# process start to /readyz 200 each time and what the restores read back.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d); mkdir -p $work/broker
addr=$(bash scripts/broker.sh start $work/broker)
bash scripts/broker.sh topics "$addr" catalogue:1:cleanup.policy=compact interactions:4 recommendations:4 dead-letters:1 histories:4:cleanup.policy=compact >/dev/null
sed "s|^brokers = .*|brokers = \"$addr\"|; s|^state_dir = .*|state_dir = \"$work/state\"|; s|^tokenizer = .*|tokenizer = \"$PWD/runs/demo/tokenizer\"|; s|^model = \"model\"|model = \"$PWD/runs/demo/model\"|" runs/demo/service.toml > $work/service.toml
g=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/genfeed
ready() { # seconds from $1 (ms) to /readyz 200
  for _ in $(seq 1 400); do
    if [ -s $work/state/http.addr ]; then hp=$(cat $work/state/http.addr)
      if exec 3<>/dev/tcp/${hp%:*}/${hp##*:} 2>/dev/null; then printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3; st=$(head -n1 <&3); exec 3<&-
        [[ $st == *" 200 "* ]] && { echo "ready after $(( $(date +%s%3N) - $1 )) ms"; return; }; fi; fi; sleep 0.05; done; echo never; }
t=$(date +%s%3N); $g run --config $work/service.toml 2>>$work/log & pid=$!; ready $t
$g replay --config $work/service.toml --data runs/demo/data --catalogue --rate 100 --seconds 5 --show 0 | tail -1
kill -9 $pid; wait $pid 2>/dev/null || true; rm -f $work/state/http.addr
t=$(date +%s%3N); $g run --config $work/service.toml 2>>$work/log & pid=$!; echo -n "after kill -9: "; ready $t
grep -E "histories restored|restore done" $work/log | tail -2 | cut -c1-140
kill -TERM $pid; wait $pid || true; rm -f $work/state/http.addr
t=$(date +%s%3N); $g run --config $work/service.toml 2>>$work/log & pid=$!; echo -n "after a clean stop: "; ready $t
grep -E "restore done" $work/log | tail -1 | cut -c1-140
kill -TERM $pid; wait $pid || true
bash scripts/broker.sh stop $work/broker >/dev/null; rm -rf $work
