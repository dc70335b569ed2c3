#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs on a machine
# without a GPU and without a CUDA system package: a pinned CUDA 13.0
# compiler (nvcc, its front end and libdevice), headers (with CCCL's, which
# cuda_fp16.h includes) and the libraries
# the binary links to, all from NVIDIA's PyPI wheels, into .tools/cuda.
#
# Usage:
#   bash scripts/install-cuda.sh        # install (idempotent), print the env file
#   . .tools/cuda/env.sh                # then, in the shell that builds:
#   cargo build --release --features cuda
#
# The build targets sm_90 (H100/H200; CUDA_COMPUTE_CAP in env.sh, since
# there is no GPU here to ask). The binary finds the CUDA libraries where it
# runs through LD_LIBRARY_PATH (a PyTorch environment's nvidia/cu13/lib has
# them all), never at a fixed path. Here it links against the wheels'
# libraries and a stub of the driver's libcuda.so (the driver comes with the
# GPU, not with a wheel), generated from the symbols cudarc declares, with
# the driver's soname so the real one is loaded at run time.
set -euo pipefail

# CUDA 13.0 (the H200 machine's toolkit and runtime), pinned by hash.
REQUIREMENTS='
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-runtime==13.0.88 --hash=sha256:422a38f7c739ecbdd3a4b6ec7ed0a1d74db43d8e9bc26685f3d845638922b178
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.0.2.14 --hash=sha256:0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
'
COMPUTE_CAP=90

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.tools/cuda"
log() { echo "install-cuda: $*" >&2; }
die() { log "$*"; exit 1; }

[[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] ||
    die "the pinned CUDA wheels are for x86_64 Linux; this is $(uname -s) $(uname -m)"
command -v g++ >/dev/null || die "nvcc needs a host C++ compiler: apt-get install g++"

stamp="$dest/.installed"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$REQUIREMENTS" ]]; then
    log "CUDA 13.0 already installed in $dest"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    printf '%s\n' "$REQUIREMENTS" >"$work/requirements.txt"
    log "downloading the CUDA 13.0 wheels (about 670 MB)"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$work/requirements.txt" --dest "$work/wheels" >&2
    mkdir -p "$work/tree"
    for w in "$work"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$work/tree"
    done
    rm -rf "$dest"
    mkdir -p "$(dirname "$dest")"
    mv "$work/tree/nvidia/cu13" "$dest"
    chmod +x "$dest"/bin/* "$dest"/nvvm/bin/*
    # The linker looks for lib<name>.so; the wheels ship only the sonames.
    for so in "$dest"/lib/lib*.so.*; do
        base=$(basename "$so")
        ln -sf "$base" "$dest/lib/${base%%.so.*}.so"
    done
    printf '%s' "$REQUIREMENTS" >"$stamp"
fi

# The driver stub: every cu* function cudarc's driver bindings declare.
cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -n 1)
if [[ -z "$cudarc" ]]; then
    (cd "$repo_root" && cargo fetch --locked >&2)
    cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -n 1)
fi
[[ -n "$cudarc" ]] || die "cudarc's sources not found after cargo fetch"
mkdir -p "$dest/stubs"
grep -oP '^\s+fn \Kcu[A-Za-z0-9_]+(?=\()' "$cudarc/src/driver/sys/mod.rs" | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$dest/stubs/cuda.c"
cc -shared -fPIC -o "$dest/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$dest/stubs/cuda.c"

cat >"$dest/env.sh" <<ENV
# Source this before cargo build --features cuda (written by scripts/install-cuda.sh).
export CUDA_HOME="$dest"
export PATH="$dest/bin:\$PATH"
export CUDA_COMPUTE_CAP=$COMPUTE_CAP
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$dest/lib:$dest/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
ENV
log "installed; build with: . $dest/env.sh && cargo build --release --features cuda"
echo "$dest/env.sh"
