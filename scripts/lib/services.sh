# Shell functions shared by scripts/test.sh and scripts/demo.sh: finding, installing (from the
# Debian packages) and starting the local RabbitMQ, Mosquitto and Redis. Sourced, not run; the
# sourcing script sets SCRIPT (its name, for log lines) first.

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

log() { printf '%s: %s\n' "$SCRIPT" "$*" >&2; }
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

APT_UPDATED=0
# install_packages PACKAGE...: installs Debian packages, running apt-get update once.
install_packages() {
    command -v apt-get >/dev/null 2>&1 ||
        die "$* missing and apt-get is not available: install them, or start RabbitMQ on 127.0.0.1:$AMQP_PORT and Mosquitto on 127.0.0.1:$MQTT_PORT yourself"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $* from the Debian packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
    if port_open "$AMQP_PORT"; then
        return
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
        install_packages rabbitmq-server
    fi
    # The package's post-install step may have started it already.
    if ! port_open "$AMQP_PORT"; then
        log "starting RabbitMQ"
        # A node that is already booting makes this fail; the wait below sorts it out.
        detached as_root rabbitmq-server -detached || log "rabbitmq-server -detached failed; waiting for a node anyway"
    fi
    log "waiting for RabbitMQ (at most ${WAIT_SECONDS}s)"
    await_rabbitmq
    log "RabbitMQ is up on 127.0.0.1:$AMQP_PORT"
}

# Waits (at most WAIT_SECONDS) until the RabbitMQ node has booted and its AMQP port answers.
await_rabbitmq() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    # await_startup fails at once while the node is not reachable yet, so retry it.
    until as_root rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "RabbitMQ did not start within ${WAIT_SECONDS}s; see /var/log/rabbitmq/"
        fi
        sleep 2
    done
    wait_for_port RabbitMQ "$AMQP_PORT" /var/log/rabbitmq/
}

# The binaries are installed even when something already answers on the port: the TLS tests
# start a Mosquitto and a Redis of their own.
ensure_mosquitto() {
    if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
        install_packages mosquitto
    fi
    if port_open "$MQTT_PORT"; then
        return
    fi
    log "starting Mosquitto"
    as_root mkdir -p /run/mosquitto
    as_root chown mosquitto /run/mosquitto
    detached as_root mosquitto -d -c "$MOSQUITTO_CONF"
    wait_for_port Mosquitto "$MQTT_PORT" /var/log/mosquitto/mosquitto.log
    log "Mosquitto is up on 127.0.0.1:$MQTT_PORT"
}

ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        install_packages redis-server
    fi
    if port_open "$REDIS_PORT"; then
        return
    fi
    log "starting Redis"
    # Tests only need a scratch Redis: no snapshots, loopback only.
    detached as_root redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
    wait_for_port Redis "$REDIS_PORT" "redis-server's log"
    log "Redis is up on 127.0.0.1:$REDIS_PORT"
}

