#!/usr/bin/env bash
# courier's main job in one command, on a Linux machine without Docker:
#
# 1. makes sure RabbitMQ (127.0.0.1:5672) and Mosquitto (127.0.0.1:1883) answer, starting them,
#    and installing them from the Debian packages when they are missing (as scripts/test.sh does;
#    root or sudo is needed only for that);
# 2. builds courier, starts the example receiver (docker/receiver.py, on 127.0.0.1:8080) and
#    `courier run --config config.toml`;
# 3. publishes one sample event to RabbitMQ and one to MQTT, and prints where each arrived;
# 4. keeps everything running, so you can publish more, until Ctrl-C stops it all.
#
#     scripts/demo.sh            # until Ctrl-C
#     scripts/demo.sh --check    # stops once both events arrived: exit 0, or 1 after 60 s
#
# The store is config.toml's (data/courier); COURIER_STORE__PATH puts it elsewhere. COURIER_BIN
# names a courier binary to run instead of building one (the test suite passes its own).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SCRIPT=scripts/demo.sh
# shellcheck source=scripts/lib/services.sh
. scripts/lib/services.sh

readonly RECEIVER_PORT=8080
readonly ADMIN=http://127.0.0.1:9464
readonly AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

check=0
case "${1:-}" in
"") ;;
--check) check=1 ;;
*) die "usage: scripts/demo.sh [--check]" ;;
esac

if [ -z "${COURIER_BIN:-}" ] && ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found: install Rust (https://rustup.rs), then run this script again"
fi
ensure_rabbitmq
ensure_mosquitto
command -v python3 >/dev/null 2>&1 || install_packages python3
command -v amqp-publish >/dev/null 2>&1 || install_packages amqp-tools
command -v mosquitto_pub >/dev/null 2>&1 || install_packages mosquitto-clients
for port in "$RECEIVER_PORT" 9464; do
    if port_open "$port"; then
        die "127.0.0.1:$port is taken; config.toml needs it (stop what listens there)"
    fi
done

courier=${COURIER_BIN:-}
if [ -z "$courier" ]; then
    log "building courier"
    cargo build -q --bin courier
    courier=target/debug/courier
fi

work=$(mktemp -d)
pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap stop_all EXIT
trap 'log "stopping"; exit 0' INT TERM

python3 docker/receiver.py "$RECEIVER_PORT" >"$work/receiver.log" 2>&1 &
pids+=($!)
"$courier" run --config config.toml >"$work/courier.log" 2>&1 &
pids+=($!)
courier_pid=$!

# Ready: both sources connected and the store open (GET /readyz answers 200).
ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "$ADMIN/readyz" >/dev/null 2>&1
}
deadline=$((SECONDS + 60))
until ready; do
    if ! kill -0 "$courier_pid" 2>/dev/null; then
        cat "$work/courier.log" >&2
        die "courier stopped; its log is above"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "courier was not ready within 60 s; $ADMIN/readyz says why"
    sleep 0.5
done
log "courier is running (log: $work/courier.log, receiver's: $work/receiver.log)"

# The requests the receiver got for event `$1`: "POST /path", one per line.
arrivals() {
    awk -v id="$1" '
        /^POST / { request = $0 }
        tolower($0) == "x-request-id: " tolower(id) { print "    " request }
    ' "$work/receiver.log"
}

stamp=$(date +%s%N)
rabbit_id="demo-rabbitmq-$stamp"
mqtt_id="demo-mqtt-$stamp"
rabbit_topic=tempo.batch.batch_run_status
mqtt_topic=tempo/events/batch/batch_run_status
amqp-publish -u "$AMQP_URL" -e tempo.events -r "$rabbit_topic" -p \
    -b "{\"id\":\"$rabbit_id\",\"data\":{\"run\":7}}"
log "published $rabbit_id to RabbitMQ (exchange tempo.events, routing key $rabbit_topic)"

# courier subscribes right after it connects: until the subscription is in place, a message
# published to the topic reaches nobody, so the same event (the same id) is published again
# every 2 s until it arrives; dedup keeps a second copy from being POSTed twice.
deadline=$((SECONDS + 60))
next_publish=$SECONDS
while [ -z "$(arrivals "$rabbit_id")" ] || [ -z "$(arrivals "$mqtt_id")" ]; do
    if [ "$SECONDS" -ge "$next_publish" ] && [ -z "$(arrivals "$mqtt_id")" ]; then
        mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -t "$mqtt_topic" \
            -m "{\"id\":\"$mqtt_id\",\"data\":{\"run\":8}}"
        next_publish=$((SECONDS + 2))
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "not every sample event arrived within 60 s; courier's log:"
        cat "$work/courier.log" >&2
        exit 1
    fi
    sleep 0.2
done

printf '\nThe RabbitMQ event %s (routing key %s) arrived at the receiver as:\n%s\n' \
    "$rabbit_id" "$rabbit_topic" "$(arrivals "$rabbit_id")"
printf 'The MQTT event %s (topic %s) arrived as:\n%s\n' \
    "$mqtt_id" "$mqtt_topic" "$(arrivals "$mqtt_id")"
printf '(config.toml: partner-basic takes every topic at /events; partner-apikey takes tempo.batch.* at /api-key-events.)\n\n'

if [ "$check" -eq 1 ]; then
    exit 0
fi
cat <<EOF
courier keeps running. Publish more, for example:
    amqp-publish -u '$AMQP_URL' -e tempo.events -r tempo.equipment.status -b '{"id":"e1","data":{}}'
    mosquitto_pub -q 1 -t tempo/events/equipment/status -m '{"id":"e2","data":{}}'
and watch:  tail -f $work/receiver.log
Ctrl-C stops courier, the receiver and this script.
EOF
wait "$courier_pid"
