#!/usr/bin/env bash
# Runs courier's whole test suite on a Linux machine.
#
# 1. Makes sure RabbitMQ (127.0.0.1:5672, guest/guest), Mosquitto (127.0.0.1:1883) and Redis
#    (127.0.0.1:6379) answer. A service whose port does not answer is started; a missing binary is
#    first installed from the Debian packages (rabbitmq-server, mosquitto, redis-server, and
#    openssl for the test certificates), mosquitto and redis-server even when their ports answer,
#    because tests/it/tls.rs and tests/it/redis_tls.rs start TLS servers of their own. Root is needed only for that; without root the commands
#    go through sudo.
#    RabbitMQ also gets a TLS listener on 127.0.0.1:5671 that requires a client certificate
#    (verify_peer, fail_if_no_peer_cert), for tests/it/tls.rs. The first time, the script makes a
#    test CA, the listener's certificate and a client certificate in /var/lib/courier-test/tls,
#    adds the listener to /etc/rabbitmq/rabbitmq.conf (in a block marked as courier's) and
#    restarts RabbitMQ once. The same restart turns on SASL EXTERNAL (the plugin
#    rabbitmq_auth_mechanism_ssl, and EXTERNAL next to PLAIN and AMQPLAIN in another marked
#    block), for the test that logs in with the client certificate.
# 2. Makes sure the Python packages some tests use can be imported: the Standard Webhooks
#    reference library (standardwebhooks, for the signature tests), installed once per machine
#    with pip into ~/.cache/courier-test/python (when it cannot be installed, the signature tests
#    use a port of the reference algorithm instead, and say so), and kubernetes-validate (for
#    the manifest test), in a virtual environment under target/ unless python3 has it already.
# 3. Runs `cargo test --workspace --all-targets` (courier's unit tests, the integration tests in
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

SCRIPT=scripts/test.sh
# shellcheck source=scripts/lib/services.sh
. scripts/lib/services.sh

readonly AMQPS_PORT=5671
readonly TLS_DIR=/var/lib/courier-test/tls
readonly RABBITMQ_CONF=/etc/rabbitmq/rabbitmq.conf
readonly RABBITMQ_TLS_MARK="# courier test suite: TLS listener (scripts/test.sh)"
readonly RABBITMQ_EXTERNAL_MARK="# courier test suite: SASL EXTERNAL (scripts/test.sh)"

# The test CA, RabbitMQ's server certificate (localhost, 127.0.0.1) and a client certificate, in
# TLS_DIR: readable by everyone (they protect nothing but a loopback test listener), except the
# CA's key. Made once; kept as long as all the files are there.
ensure_test_certificates() {
    # tests/it/tls.rs runs openssl too, for the key formats rcgen does not write.
    command -v openssl >/dev/null 2>&1 || install_packages openssl
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

# RabbitMQ's TLS listener on 127.0.0.1:5671, which requires a client certificate of the test CA,
# and the SASL EXTERNAL mechanism (rabbitmq_auth_mechanism_ssl), with which a client logs in
# with that certificate instead of a password. What is missing is added, then RabbitMQ restarts
# once.
ensure_rabbitmq_tls() {
    ensure_test_certificates
    local restart=false
    if ! port_open "$AMQPS_PORT"; then
        restart=true
        if ! as_root grep -qF "$RABBITMQ_TLS_MARK" "$RABBITMQ_CONF" 2>/dev/null; then
            if as_root grep -qE '^[[:space:]]*(ssl_options\.|listeners\.ssl\.)' "$RABBITMQ_CONF" 2>/dev/null; then
                die "$RABBITMQ_CONF has TLS settings of its own but nothing listens on 127.0.0.1:$AMQPS_PORT; add a TLS listener there with verify_peer and fail_if_no_peer_cert, using the files in $TLS_DIR"
            fi
            log "adding a TLS listener on 127.0.0.1:$AMQPS_PORT to $RABBITMQ_CONF"
            printf '\n%s\nlisteners.ssl.courier = 127.0.0.1:%s\nssl_options.cacertfile = %s/ca.pem\nssl_options.certfile = %s/server.pem\nssl_options.keyfile = %s/server.key\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n' \
                "$RABBITMQ_TLS_MARK" "$AMQPS_PORT" "$TLS_DIR" "$TLS_DIR" "$TLS_DIR" |
                as_root tee -a "$RABBITMQ_CONF" >/dev/null
        fi
    fi
    if ! rabbitmq_offers_external; then
        restart=true
        log "enabling RabbitMQ's SASL EXTERNAL mechanism (plugin rabbitmq_auth_mechanism_ssl)"
        as_root rabbitmq-plugins -q enable --offline rabbitmq_auth_mechanism_ssl >/dev/null ||
            die "cannot enable the RabbitMQ plugin rabbitmq_auth_mechanism_ssl"
        if ! as_root grep -qF "$RABBITMQ_EXTERNAL_MARK" "$RABBITMQ_CONF" 2>/dev/null; then
            if as_root grep -qE '^[[:space:]]*auth_mechanisms\.' "$RABBITMQ_CONF" 2>/dev/null; then
                die "$RABBITMQ_CONF lists auth_mechanisms of its own; add EXTERNAL to them (next to PLAIN and AMQPLAIN)"
            fi
            # Listing the mechanisms replaces RabbitMQ's default list, so PLAIN and AMQPLAIN stay.
            printf '\n%s\nauth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = AMQPLAIN\nauth_mechanisms.3 = EXTERNAL\n' \
                "$RABBITMQ_EXTERNAL_MARK" | as_root tee -a "$RABBITMQ_CONF" >/dev/null
        fi
    fi
    [ "$restart" = true ] || return 0
    log "restarting RabbitMQ so that it takes the TLS listener and SASL EXTERNAL"
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
    await_rabbitmq
    wait_for_port "RabbitMQ's TLS listener" "$AMQPS_PORT" /var/log/rabbitmq/
    rabbitmq_offers_external || die "RabbitMQ does not offer SASL EXTERNAL after the restart; see /var/log/rabbitmq/"
    log "RabbitMQ is up on 127.0.0.1:$AMQP_PORT and, with TLS and SASL EXTERNAL, 127.0.0.1:$AMQPS_PORT"
}

# Whether the running RabbitMQ offers SASL EXTERNAL: the mechanism is listed and its plugin is
# enabled. A broker that cannot be asked stops the script: guessing "no" would restart it.
rabbitmq_offers_external() {
    local mechanisms plugins
    mechanisms=$(as_root rabbitmqctl -q eval 'application:get_env(rabbit, auth_mechanisms).' 2>&1) ||
        die "cannot ask RabbitMQ for its auth_mechanisms (rabbitmqctl eval): $mechanisms"
    [[ $mechanisms == *EXTERNAL* ]] || return 1
    plugins=$(as_root rabbitmq-plugins -q list --enabled --minimal 2>&1) ||
        die "cannot ask RabbitMQ for its plugins (rabbitmq-plugins list): $plugins"
    [[ $'\n'$plugins$'\n' == *$'\n'rabbitmq_auth_mechanism_ssl$'\n'* ]]
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
ensure_rabbitmq_tls
ensure_mosquitto
ensure_redis
provide_rabbitmqctl
ensure_kubernetes_validate
ensure_standardwebhooks

if [ "${1:-}" = "--long" ]; then
    shift
    export COURIER_FAULT_EVENTS="${COURIER_FAULT_EVENTS:-20000}"
fi

cargo test --workspace --all-targets "$@"
