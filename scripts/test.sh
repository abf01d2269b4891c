#!/usr/bin/env bash
# Runs courier's whole test suite on a Linux machine.
#
# 1. Makes sure RabbitMQ (127.0.0.1:5672, guest/guest), Mosquitto (127.0.0.1:1883) and Redis
#    (127.0.0.1:6379) answer. A service whose port does not answer is started; a missing binary is
#    first installed from the Debian packages (rabbitmq-server, mosquitto, redis-server, and
#    openssl for the test certificates). Root is needed only for that; without root the commands
#    go through sudo.
#    RabbitMQ also gets a TLS listener on 127.0.0.1:5671 that requires a client certificate
#    (verify_peer, fail_if_no_peer_cert), for tests/it/tls.rs. The first time, the script makes a
#    test CA, the listener's certificate and a client certificate in /var/lib/courier-test/tls,
#    adds the listener to /etc/rabbitmq/rabbitmq.conf (in a block marked as courier's) and
#    restarts RabbitMQ once.
# 2. Runs `cargo test --workspace --all-targets` (courier's unit tests, the integration tests in
#    tests/it, and the tools' own tests), passing on any arguments:
#        scripts/test.sh                 # everything
#        scripts/test.sh -- --nocapture  # extra arguments go to cargo test
#        scripts/test.sh faults::        # only the tests whose name contains faults::
#        scripts/test.sh --long          # the fault suite (tests/it/faults.rs) with 20,000 events
#                                        # per case instead of 3,000 (about 15 minutes more)
#
# When every service already answers, it prints nothing of its own and only runs the tests.
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
readonly AMQPS_PORT=5671
readonly TLS_DIR=/var/lib/courier-test/tls
readonly RABBITMQ_CONF=/etc/rabbitmq/rabbitmq.conf
readonly RABBITMQ_TLS_MARK="# courier test suite: TLS listener (scripts/test.sh)"

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
    log "installing rabbitmq-server, mosquitto, redis-server and openssl from the Debian packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server mosquitto redis-server openssl >/dev/null
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

# The test CA, RabbitMQ's server certificate (localhost, 127.0.0.1) and a client certificate, in
# TLS_DIR: readable by everyone (they protect nothing but a loopback test listener), except the
# CA's key. Made once; kept as long as all the files are there.
ensure_test_certificates() {
    # tests/it/tls.rs runs openssl too, for the key formats rcgen does not write.
    command -v openssl >/dev/null 2>&1 || install_packages
    local f missing=0
    for f in ca.pem server.pem server.key client.pem client.key; do
        [ -r "$TLS_DIR/$f" ] || missing=1
    done
    if [ "$missing" -eq 0 ]; then
        return
    fi
    log "making the test certificates of RabbitMQ's TLS listener in $TLS_DIR"
    local work
    work=$(mktemp -d)
    (
        cd "$work"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj "/CN=courier test CA" -keyout ca.key -out ca.pem 2>/dev/null
        printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
        printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n' >client.ext
        for who in server client; do
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                -subj "/CN=courier test $who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
            openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days 3650 -extfile "$who.ext" -out "$who.pem" 2>/dev/null
        done
    )
    as_root mkdir -p "$TLS_DIR"
    as_root install -m 0600 "$work/ca.key" "$TLS_DIR/ca.key"
    for f in ca.pem server.pem server.key client.pem client.key; do
        as_root install -m 0644 "$work/$f" "$TLS_DIR/$f"
    done
    as_root chmod 0755 "$TLS_DIR" "$(dirname "$TLS_DIR")"
    rm -rf "$work"
}

# RabbitMQ's TLS listener on 127.0.0.1:5671, which requires a client certificate of the test CA.
ensure_rabbitmq_tls() {
    ensure_test_certificates
    if port_open "$AMQPS_PORT"; then
        return
    fi
    if ! as_root grep -qF "$RABBITMQ_TLS_MARK" "$RABBITMQ_CONF" 2>/dev/null; then
        if as_root grep -qE '^[[:space:]]*(ssl_options\.|listeners\.ssl\.)' "$RABBITMQ_CONF" 2>/dev/null; then
            die "$RABBITMQ_CONF has TLS settings of its own but nothing listens on 127.0.0.1:$AMQPS_PORT; add a TLS listener there with verify_peer and fail_if_no_peer_cert, using the files in $TLS_DIR"
        fi
        log "adding a TLS listener on 127.0.0.1:$AMQPS_PORT to $RABBITMQ_CONF"
        printf '\n%s\nlisteners.ssl.courier = 127.0.0.1:%s\nssl_options.cacertfile = %s/ca.pem\nssl_options.certfile = %s/server.pem\nssl_options.keyfile = %s/server.key\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n' \
            "$RABBITMQ_TLS_MARK" "$AMQPS_PORT" "$TLS_DIR" "$TLS_DIR" "$TLS_DIR" |
            as_root tee -a "$RABBITMQ_CONF" >/dev/null
    fi
    log "restarting RabbitMQ so that it opens 127.0.0.1:$AMQPS_PORT"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        as_root systemctl restart rabbitmq-server
    else
        as_root rabbitmqctl -q stop >/dev/null 2>&1 || log "rabbitmqctl stop failed; starting anyway"
        local deadline=$((SECONDS + WAIT_SECONDS))
        while port_open "$AMQP_PORT"; do
            [ "$SECONDS" -lt "$deadline" ] || die "RabbitMQ did not stop within ${WAIT_SECONDS}s"
            sleep 1
        done
        detached as_root rabbitmq-server -detached || log "rabbitmq-server -detached failed; waiting for a node anyway"
    fi
    local deadline=$((SECONDS + WAIT_SECONDS))
    until as_root rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ did not start again within ${WAIT_SECONDS}s; see /var/log/rabbitmq/"
        fi
        sleep 2
    done
    wait_for_port RabbitMQ "$AMQP_PORT" /var/log/rabbitmq/
    wait_for_port "RabbitMQ's TLS listener" "$AMQPS_PORT" /var/log/rabbitmq/
    log "RabbitMQ is up on 127.0.0.1:$AMQP_PORT and, with TLS, 127.0.0.1:$AMQPS_PORT"
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

# The Kubernetes manifests are checked against the Kubernetes schemas offline by
# kubernetes-validate (from PyPI), which bundles them (tests/it/deploy.rs). The tests run the
# Python in COURIER_PYTHON: the machine's python3 when it has the package, otherwise a virtual
# environment under target/ (Debian's own python3 refuses pip installs outside one).
ensure_kubernetes_validate() {
    if python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
        export COURIER_PYTHON=python3
        return
    fi
    local venv=target/python-tools
    if [ ! -x "$venv/bin/python" ]; then
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            command -v apt-get >/dev/null 2>&1 || die "python3 cannot create a virtual environment; install python3-venv"
            log "installing python3-venv from the Debian packages"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$venv"
            python3 -m venv "$venv"
        fi
    fi
    if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
        log "installing kubernetes-validate from PyPI into $venv"
        "$venv/bin/python" -m pip install -q kubernetes-validate
    fi
    COURIER_PYTHON="$(pwd)/$venv/bin/python"
    export COURIER_PYTHON
}

ensure_rabbitmq
ensure_rabbitmq_tls
ensure_mosquitto
ensure_redis
provide_rabbitmqctl
ensure_kubernetes_validate

if [ "${1:-}" = "--long" ]; then
    shift
    export COURIER_FAULT_EVENTS="${COURIER_FAULT_EVENTS:-20000}"
fi

cargo test --workspace --all-targets "$@"
