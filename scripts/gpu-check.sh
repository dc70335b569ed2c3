#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU, within 8 minutes, with no
# network and no compiler there: it takes a genfeed binary built elsewhere
# with `--features cuda` (scripts/install-cuda.sh, then `cargo build
# --release --features cuda`) and writes a log and JSON into OUT.
#
#   scripts/gpu-check.sh OUT [GENFEED]     # GENFEED: default target/release/genfeed
#
# GENFEED may be xz-compressed (NAME.xz): the cuda binary is ~70 MB stripped,
# 10 MB compressed, and what travels to the GPU machine has to be small:
#   strip -o genfeed-cuda target/release/genfeed && xz -T0 genfeed-cuda
# With the broker's binary beside it (.tools/bin/tansu, 41 MB, from
# `scripts/broker.sh install`) the service step runs too; binary and broker
# together stay under the device tool's 64 MiB.
#
# What it measures, each step under its own time limit so one that hangs
# costs its share only:
#   device.json     the GPU (nvidia-smi) and where the CUDA libraries came from
#   bench/*.json    `bench generate --device cuda`, TIGER's dimensions (random
#                   model, 12,101 items), beam 20 and 50, batches 64 to 1,024,
#                   masks and candidates on the device; and beam 20, batch
#                   1,024 with them on the host (`--decoding host`), which
#                   copies every step's scores back: what the device tables save
#   train.json      a short training run on the device (examples/s)
#   eval-cpu.json, eval-cuda.json, ranks-*.tsv
#                   the same trained model evaluated on the CPU and on the
#                   device; agreement = users whose top 10 has the same items
#                   in the same order in both, with the largest difference of
#                   their log-probabilities, and users whose target has the
#                   same rank (or is missed by both)
#   oracle-*.tsv    the brute-force oracle: the same model searched with a beam
#                   as wide as the catalogue (exact: every live prefix is kept)
#                   for 50 users on the CPU and on the device; summary: users
#                   whose exact top 10 agrees, and whose beam-20 top 10 on the
#                   device is the exact one (and the share of the exact top
#                   10 it holds: a search error, not a device error)
#   service.json    the service's feed path on the device: a broker, `genfeed
#                   run` with feed.device = "cuda" on that trained model, and
#                   `genfeed replay` at 200 interactions/s for 20 s (feeds/s,
#                   interaction-to-feed latency); only where the broker's
#                   binary came along (.tools/bin/tansu, from `scripts/broker.sh
#                   install` here: the check has no network)
#   summary.json    all of the above in one object
# The CUDA 13 libraries the binary links (the runtime, cuBLAS, cuBLASLt, cuRAND)
# are found through LD_LIBRARY_PATH, else in a Python environment's
# nvidia/*/lib (where PyTorch's wheels put them), else by a search for the
# missing sonames under the usual roots; never at a fixed path.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
genfeed=$(cd "$(dirname "${2:-target/release/genfeed}")" && pwd)/$(basename "${2:-target/release/genfeed}")
exec > >(tee "$out/log.txt") 2>&1
started=$(date +%s)
# candle puts a backtrace in every error where RUST_BACKTRACE is set; the
# log wants the error itself (a panic still gets its backtrace).
export RUST_LIB_BACKTRACE=0
fail() { echo "gpu-check: $*"; exit 1; }
step() { echo "== $* (t=$(($(date +%s) - started)) s)"; }
# Each step's limit, cut to what is left of 460 s, so the whole run stays
# within 8 minutes whatever hangs.
lim() { local left=$((460 - ($(date +%s) - started))); echo $(($1 < left ? $1 : (left > 1 ? left : 1))); }

step "device"
command -v nvidia-smi >/dev/null || fail "no nvidia-smi here: this machine has no NVIDIA driver, and this check needs an NVIDIA GPU"
gpu=$(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1) ||
  fail "nvidia-smi finds no GPU: $gpu"
echo "$gpu"
[ -f "$genfeed" ] || fail "no genfeed binary at $genfeed (build it with --features cuda and pass its path)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ "$genfeed" == *.xz ]]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$genfeed" "$work/genfeed" || fail "could not decompress $genfeed"
  chmod +x "$work/genfeed"
  genfeed="$work/genfeed"
fi

# The libraries the loader cannot find yet, by soname (libcuda.so.1 is the
# driver's: nvidia-smi ran, so it is usually there).
missing() { ldd "$genfeed" 2>/dev/null | awk '/not found/ {print $1}'; }
given="${LD_LIBRARY_PATH:-}"
found=""
# Puts in front of the loader's path each folder among the arguments that
# holds a missing library; in rounds, since a library found names the ones
# it needs in turn (cuBLAS needs cuBLASLt).
take() {
  local so d before
  for _ in 1 2 3; do
    before=$(missing)
    [ -n "$before" ] || return 0
    for so in $before; do
      for d in "$@"; do
        [ -e "$d/$so" ] && { [[ ":$found:" == *":$d:"* ]] || found="${found:+$found:}$d"; break; }
      done
    done
    export LD_LIBRARY_PATH="$found${given:+:$given}"
    [ "$(missing)" != "$before" ] || return 0
  done
}
libs="LD_LIBRARY_PATH"
if [ -n "$(missing)" ]; then
  # Where PyTorch's wheels put them (nvidia/cu13/lib, or one folder per
  # library), in any Python environment the python3 here knows of.
  take $(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in dict.fromkeys(roots):
    for lib in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(lib)
PY
  )
  # Then a search of the usual roots, for an environment python3 does not know.
  [ -z "$(missing)" ] || take $(timeout 30 find /opt /usr /home /root /workspace /venv -xdev \( -name libcuda.so.1 \
    -o -name libcudart.so.13 -o -name libcublas.so.13 -o -name libcublasLt.so.13 -o -name libcurand.so.10 \
    -o -name libnvrtc.so.13 \) -printf '%h\n' 2>/dev/null | sort -u)
  still=$(missing | tr '\n' ' ')
  [ -z "$still" ] || fail "the binary needs ${still}and the loader finds them neither through LD_LIBRARY_PATH, nor in a Python environment's nvidia/*/lib, nor under /opt, /usr, /home, /root, /workspace or /venv: point LD_LIBRARY_PATH at the CUDA 13 libraries"
  libs="$found"
fi
echo "CUDA libraries: $libs"
python3 - "$out/device.json" "$gpu" "$libs" <<'PY'
import json, sys
name, cap, mem, driver = [x.strip() for x in sys.argv[2].splitlines()[0].split(",")]
json.dump({"gpu": name, "compute_cap": cap, "memory": mem, "driver": driver, "cuda_libraries": sys.argv[3]},
          open(sys.argv[1], "w"), indent=2)
PY
probe=$(timeout $(lim 60) "$genfeed" bench generate --device cuda --batch 1 --requests 1 --beams 2 2>&1) ||
  fail "the binary does not run on the device (built without --features cuda, or the libraries do not match): $(echo "$probe" | tail -n 3)"

step "bench generate on the device: beam 20 and 50, batches 64 to 1,024"
mkdir -p "$out/bench"
for beams in 20 50; do
  for batch in 64 256 1024; do
    requests=$((batch * 2 > 512 ? batch * 2 : 512))
    if timeout $(lim 30) "$genfeed" bench generate --device cuda --beams $beams --batch $batch \
      --requests $requests --prefix-output --sibling-output --json >"$out/bench/b$beams-n$batch.json" 2>"$out/bench/b$beams-n$batch.err"; then
      python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in d.items() if not isinstance(v, (dict, list))})' \
        "$out/bench/b$beams-n$batch.json" "beam $beams batch $batch"
    else
      echo "beam $beams batch $batch: failed or over 30 s: $(tail -n 2 "$out/bench/b$beams-n$batch.err")"
    fi
  done
done
if timeout $(lim 30) "$genfeed" bench generate --device cuda --decoding host --beams 20 --batch 1024 \
  --requests 2048 --prefix-output --sibling-output --json >"$out/bench/b20-n1024-host.json" 2>"$out/bench/b20-n1024-host.err"; then
  grep -E '"(decoding|recs_per_sec)"' "$out/bench/b20-n1024-host.json"
else
  echo "beam 20 batch 1024, host decoding: failed or over 30 s: $(tail -n 2 "$out/bench/b20-n1024-host.err")"
fi

step "a small trained model: synthetic catalogue, tokenizer on the CPU, training on the device"
"$genfeed" synth --out "$work/data" --items 3000 --users 3000 --topics 40 >/dev/null || fail "synth failed"
"$genfeed" tokenizer train --items "$work/data/synth.item" --method rq-kmeans --encoder attributes \
  --out "$work/tok" >/dev/null || fail "tokenizer training failed"
timeout $(lim 120) "$genfeed" train --data "$work/data" --tokenizer "$work/tok" --out "$work/model" --device cuda \
  --epochs 3 --valid-users 500 >"$out/train.json" 2>"$out/train.err" ||
  echo "training on the device failed or ran over 120 s: $(tail -n 3 "$out/train.err")"
grep -E '"(epochs|best_epoch|train_secs|examples_per_sec)"' "$out/train.json" || true

if [ -f "$work/model/config.json" ]; then
  step "the same model on the CPU and on the device: agreement of every user's top 10"
  for d in cpu cuda; do
    timeout $(lim 60) "$genfeed" eval --data "$work/data" --model "$work/model" --tokenizer "$work/tok" \
      --users 2000 --device $d --json --ranks "$out/ranks-$d.tsv" >"$out/eval-$d.json" 2>"$out/eval-$d.err" ||
      echo "eval on $d failed or ran over 60 s: $(tail -n 3 "$out/eval-$d.err")"
  done
  step "the brute-force oracle: a beam as wide as the catalogue, 50 users, on the CPU and on the device"
  for d in cpu cuda; do
    timeout $(lim 60) "$genfeed" eval --data "$work/data" --model "$work/model" --tokenizer "$work/tok" \
      --users 50 --beams 3000 --batch 8 --device $d --json --ranks "$out/oracle-$d.tsv" >"$out/oracle-$d.json" 2>"$out/oracle-$d.err" ||
      echo "the oracle on $d failed or ran over 60 s: $(tail -n 3 "$out/oracle-$d.err")"
  done
  timeout $(lim 30) "$genfeed" eval --data "$work/data" --model "$work/model" --tokenizer "$work/tok" \
    --users 50 --device cuda --json --ranks "$out/beam20-cuda.tsv" >/dev/null 2>"$out/beam20-cuda.err" ||
    echo "beam 20 on the device for the oracle's users failed: $(tail -n 3 "$out/beam20-cuda.err")"
fi

if [ -f "$work/model/config.json" ]; then
  if [ -x .tools/bin/tansu ]; then
    step "the service's feed path on the device: broker, genfeed run (feed.device = cuda), replay 200/s for 20 s"
    if GENFEED="$genfeed" DEVICE=cuda BATCH_MAX=256 timeout $(lim 90) bash scripts/bench-service.sh \
      "$work/data" "$work/tok" "$work/model" 200 20 >"$out/service.json" 2>"$out/service.err"; then
      grep -E '"(interactions_per_s|feeds_per_s|latency_ms_p50|latency_ms_p99|service_batch_users_mean|service_generate_ms_mean)"' "$out/service.json" || true
    else
      echo "the service on the device failed or ran over 90 s: $(tail -n 5 "$out/service.err")"
    fi
  else
    echo "no .tools/bin/tansu here (run scripts/broker.sh install where there is a network and bring .tools/bin along): the service step is skipped"
  fi
fi

step "summary"
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
s = {"device": load(os.path.join(out, "device.json")), "bench": {}, "train": load(os.path.join(out, "train.json")),
     "service": load(os.path.join(out, "service.json"))}
for p in sorted(glob.glob(os.path.join(out, "bench", "*.json"))):
    s["bench"][os.path.basename(p)[:-5]] = load(p)
ev = {d: load(os.path.join(out, f"eval-{d}.json")) for d in ("cpu", "cuda")}
s["eval"] = ev
def ranks(name):
    p = os.path.join(out, f"{name}.tsv")
    return [l.rstrip("\n").split("\t") for l in open(p)][1:] if os.path.exists(p) else None
a, b = ranks("ranks-cpu"), ranks("ranks-cuda")
if a and b and len(a) == len(b):
    same_rank = sum(x[:3] == y[:3] for x, y in zip(a, b))
    same_list = [x[3] == y[3] for x, y in zip(a, b)]
    gaps = [max((abs(float(p) - float(q)) for p, q in zip(x[4].split(","), y[4].split(","))), default=0.0)
            for x, y, same in zip(a, b, same_list) if same and x[4]]
    n = len(a)
    s["agreement"] = {"users": n, "same_top10": sum(same_list), "share": sum(same_list) / n,
                      "max_log_prob_gap": max(gaps, default=0.0), "same_target_rank": same_rank,
                      "passes_99": sum(same_list) >= 0.99 * n}
o_cpu, o_dev, b20_dev = ranks("oracle-cpu"), ranks("oracle-cuda"), ranks("beam20-cuda")
if o_cpu and o_dev and len(o_cpu) == len(o_dev):
    s["oracle"] = {"users": len(o_cpu), "same_exact_top10": sum(x[3] == y[3] for x, y in zip(o_cpu, o_dev))}
    if b20_dev and len(b20_dev) == len(o_dev):
        pairs = list(zip(b20_dev, o_dev))
        s["oracle"]["beam20_is_exact_top10"] = sum(x[3] == y[3] for x, y in pairs)
        s["oracle"]["beam20_share_of_exact_top10"] = sum(
            len(set(x[3].split(",")) & set(y[3].split(","))) / max(len(y[3].split(",")), 1) for x, y in pairs) / len(pairs)
b20 = s["bench"].get("b20-n1024") or {}
s["beam20_batch1024_recs_per_sec"] = b20.get("recs_per_sec")
s["beam20_batch1024_host_decoding_recs_per_sec"] = (s["bench"].get("b20-n1024-host") or {}).get("recs_per_sec")
s["train_examples_per_sec"] = (s["train"] or {}).get("examples_per_sec")
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2)
keys = ("agreement", "oracle", "beam20_batch1024_recs_per_sec", "beam20_batch1024_host_decoding_recs_per_sec",
        "train_examples_per_sec")
print(json.dumps({k: s[k] for k in keys if k in s}, indent=2))
PY
echo "gpu-check: done in $(($(date +%s) - started)) s; results in $out"
