#!/usr/bin/env bash
# The main job, end to end: item content -> frozen tokenizer -> semantic IDs.
#
#   scripts/demo.sh                      a generated catalogue of 5,000 items
#   scripts/demo.sh ../shared/data/yelp  a RecBole folder (NAME.item inside)
#
# Installs the sentence encoder, builds genfeed, trains an RQ-KMeans tokenizer
# on the catalogue's text, assigns every item its semantic ID twice (in two
# processes with different thread counts) and checks the outputs are identical,
# then measures whether first-level codes group items of the same category,
# and, where there are interactions, trains and evaluates the generative model.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work="$root/runs/demo"
mkdir -p "$work"

bash scripts/install-minilm.sh >/dev/null
export GENFEED_TEXT_MODEL="$root/models/all-minilm-l6-v2"
cargo build --release --locked --quiet
genfeed="$root/target/release/genfeed"

if [ $# -ge 1 ]; then
  data=$(cd "$1" && pwd)
  items=$(ls "$data"/*.item | head -n 1)
  sep=","
else
  "$genfeed" synth --out "$work/data" --items 5000 --users 2000 --topics 60 >/dev/null
  items="$work/data/synth.item"
  sep=","
fi
echo "== catalogue: $items ($(($(wc -l <"$items") - 1)) items)"

echo "== train an RQ-KMeans tokenizer on the items' text"
"$genfeed" tokenizer train --items "$items" --method rq-kmeans --encoder text --out "$work/tokenizer"

echo "== assign semantic IDs (two processes, 1 and 2 threads)"
RAYON_NUM_THREADS=1 "$genfeed" tokenizer assign --tokenizer "$work/tokenizer" --items "$items" --out "$work/sids-1.tsv"
RAYON_NUM_THREADS=2 "$genfeed" tokenizer assign --tokenizer "$work/tokenizer" --items "$items" --out "$work/sids-2.tsv"
cmp "$work/sids-1.tsv" "$work/sids-2.tsv" && echo "identical: $(wc -l <"$work/sids-1.tsv") SIDs"
echo "unique SIDs: $(cut -f2 "$work/sids-1.tsv" | sort -u | wc -l)"
head -n 5 "$work/sids-1.tsv"

if head -n 1 "$items" | grep -q "categories:"; then
  echo "== do first-level codes group items of a category?"
  "$genfeed" tokenizer check --tokenizer "$work/tokenizer" --items "$items" --field categories --separator "$sep"
fi

inter=$(ls "$(dirname "$items")"/*.inter 2>/dev/null | head -n 1 || true)
if [ -n "$inter" ]; then
  echo "== train the generative model on the interactions (a few epochs, 1 thread)"
  "$genfeed" train --data "$inter" --tokenizer "$work/tokenizer" --out "$work/model" \
    --epochs "${DEMO_EPOCHS:-8}" --valid-users 1000 --threads 1 | tail -n 20
  echo "== leave-one-out test: Recall/NDCG@5/10, invalid-ID rate, coverage, latency"
  "$genfeed" eval --data "$inter" --model "$work/model" --tokenizer "$work/tokenizer" --users 2000
  echo "== curves: $work/model/train_curves.png, log: $work/model/train_log.csv"
  echo "== generation throughput (beam 20, batch 64, TIGER-sized random model)"
  "$genfeed" bench generate --beams 20 --batch 64 --requests 256
fi
