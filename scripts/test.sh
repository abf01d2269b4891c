#!/usr/bin/env bash
# Runs courier's whole test suite on a Linux machine.
#
# 1. Makes sure RabbitMQ (127.0.0.1:5672, guest/guest), Mosquitto (127.0.0.1:1883) and Redis
#    (127.0.0.1:6379) answer. A service whose port does not answer is started; a missing binary is
#    first installed from the Debian packages (rabbitmq-server, mosquitto, redis-server). Root is needed only for that; without root
#    the commands go through sudo.
# 2. Makes sure the Standard Webhooks reference library (the standardwebhooks package from PyPI)
#    can be imported, for the signature tests: installed once per machine with pip into
#    ~/.cache/courier-test/python (python3 and pip come from the Debian packages python3 and
#    python3-pip when missing). When it cannot be installed (no network), the tests verify with
#    a port of the reference algorithm instead, and say so.
# 3. Runs `cargo test --workspace --all-targets` (courier's unit tests, the integration tests in
#    tests/it, and the tools' own tests), passing on any arguments:
#        scripts/test.sh                 # everything
#        scripts/test.sh -- --nocapture  # extra arguments go to cargo test
#        scripts/test.sh faults::        # only the tests whose name contains faults::
#        scripts/test.sh --long          # the fault suite (tests/it/faults.rs) with 20,000 events
#                                        # per case instead of 3,000 (about 15 minutes more)
#
# When both services already answer, it prints nothing of its own and only runs the tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian puts rabbitmq-server, rabbitmqctl and mosquitto in /usr/sbin; rustup puts cargo in
# ~/.cargo/bin. Neither is always on PATH (non-root shells, fresh logins).
export PATH="$PATH:/usr/sbin:/sbin"
if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/nonexistent}/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

readonly WAIT_SECONDS=120
readonly AMQP_PORT=5672
readonly MQTT_PORT=1883
readonly REDIS_PORT=6379
readonly MOSQUITTO_CONF=/etc/mosquitto/mosquitto.conf

log() { printf 'scripts/test.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*': run this script as root or install sudo"
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" >/dev/null 2>&1
}

# wait_for_port NAME PORT LOG_HINT: polls until the port answers, for at most WAIT_SECONDS.
wait_for_port() {
    local name=$1 port=$2 hint=$3
    local deadline=$((SECONDS + WAIT_SECONDS))
    until port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$name does not answer on 127.0.0.1:$port after ${WAIT_SECONDS}s; see $hint"
        fi
        sleep 1
    done
}

# Runs a command that starts a daemon, with none of this script's file descriptors open but
# stdin, stdout and stderr: a daemon keeps what it inherits for as long as it runs, such as the
# lock of `flock LOCK scripts/test.sh`, which would then never be released.
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done 2>/dev/null
        "$@"
    )
}

PACKAGES_INSTALLED=0
# Installs both brokers from the Debian packages; runs apt-get update once.
install_packages() {
    if [ "$PACKAGES_INSTALLED" -eq 1 ]; then
        return
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "rabbitmq-server or mosquitto is missing and apt-get is not available: install RabbitMQ and Mosquitto, or start them on 127.0.0.1:$AMQP_PORT and 127.0.0.1:$MQTT_PORT"
    log "installing rabbitmq-server, mosquitto and redis-server from the Debian packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server mosquitto redis-server >/dev/null
    PACKAGES_INSTALLED=1
}

ensure_rabbitmq() {
    if port_open "$AMQP_PORT"; then
        return
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
        install_packages
    fi
    # The package's post-install step may have started it already.
    if ! port_open "$AMQP_PORT"; then
        log "starting RabbitMQ"
        # A node that is already booting makes this fail; the wait below sorts it out.
        detached as_root rabbitmq-server -detached || log "rabbitmq-server -detached failed; waiting for a node anyway"
    fi
    log "waiting for RabbitMQ (at most ${WAIT_SECONDS}s)"
    local deadline=$((SECONDS + WAIT_SECONDS))
    # await_startup fails at once while the node is not reachable yet, so retry it.
    until as_root rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ did not start within ${WAIT_SECONDS}s; see /var/log/rabbitmq/"
        fi
        sleep 2
    done
    wait_for_port RabbitMQ "$AMQP_PORT" /var/log/rabbitmq/
    log "RabbitMQ is up on 127.0.0.1:$AMQP_PORT"
}

ensure_mosquitto() {
    if port_open "$MQTT_PORT"; then
        return
    fi
    if ! command -v mosquitto >/dev/null 2>&1; then
        install_packages
    fi
    if ! port_open "$MQTT_PORT"; then
        log "starting Mosquitto"
        as_root mkdir -p /run/mosquitto
        as_root chown mosquitto /run/mosquitto
        detached as_root mosquitto -d -c "$MOSQUITTO_CONF"
    fi
    wait_for_port Mosquitto "$MQTT_PORT" /var/log/mosquitto/mosquitto.log
    log "Mosquitto is up on 127.0.0.1:$MQTT_PORT"
}

ensure_redis() {
    if port_open "$REDIS_PORT"; then
        return
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        install_packages
    fi
    if ! port_open "$REDIS_PORT"; then
        log "starting Redis"
        # Tests only need a scratch Redis: no snapshots, loopback only.
        detached as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
    fi
    wait_for_port Redis "$REDIS_PORT" "redis-server's log"
    log "Redis is up on 127.0.0.1:$REDIS_PORT"
}

# The integration tests call `rabbitmqctl`. Debian's wrapper refuses to run for users other
# than root and rabbitmq, so a non-root user gets a shim on PATH that goes through sudo.
provide_rabbitmqctl() {
    command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl is not on PATH; the tests need it"
    if is_root || rabbitmqctl -q status >/dev/null 2>&1; then
        return
    fi
    command -v sudo >/dev/null 2>&1 || die "rabbitmqctl only runs as root or rabbitmq here, and sudo is missing"
    SHIM_DIR=$(mktemp -d)
    trap 'rm -rf "$SHIM_DIR"' EXIT
    printf '#!/bin/sh\nexec sudo %s "$@"\n' "$(command -v rabbitmqctl)" >"$SHIM_DIR/rabbitmqctl"
    chmod +x "$SHIM_DIR/rabbitmqctl"
    export PATH="$SHIM_DIR:$PATH"
    # Ask for the password now rather than in the middle of a test.
    sudo -v
}

command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust (https://rustup.rs), then run this script again"

# The signature tests verify courier's requests with the Standard Webhooks reference library.
# `pip install --target` works on Debian's system Python too (PEP 668 guards only installs
# into the interpreter's own environment).
readonly PYTHON_DEPS="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/courier-test/python"
ensure_standardwebhooks() {
    export PYTHONPATH="$PYTHON_DEPS${PYTHONPATH:+:$PYTHONPATH}"
    if python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
        export COURIER_REQUIRE_STANDARDWEBHOOKS=1
        return
    fi
    if ! python3 -m pip --version >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
        log "installing python3 and python3-pip from the Debian packages"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null || true
    fi
    log "installing the standardwebhooks package into $PYTHON_DEPS"
    if PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --target "$PYTHON_DEPS" standardwebhooks >&2 &&
        python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
        export COURIER_REQUIRE_STANDARDWEBHOOKS=1
    else
        log "warning: standardwebhooks could not be installed; the signature tests use the reference algorithm instead"
    fi
}

ensure_rabbitmq
ensure_mosquitto
ensure_redis
provide_rabbitmqctl
ensure_standardwebhooks

if [ "${1:-}" = "--long" ]; then
    shift
    export COURIER_FAULT_EVENTS="${COURIER_FAULT_EVENTS:-20000}"
fi

cargo test --workspace --all-targets "$@"
