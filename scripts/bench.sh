#!/usr/bin/env bash
# Runs courier-bench (tools/courier-bench): courier's throughput, latency, fanout, routing and
# memory next to the raw limits of this machine, in one run. Needs RabbitMQ and Mosquitto on
# localhost (scripts/test.sh starts them) and python3 for the aio-pika + aiohttp baseline.
#     scripts/bench.sh                                  # 50,000 events, 30 s latency run
#     scripts/bench.sh --events 5000 --latency-seconds 5
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python3 -c 'import aio_pika, aiohttp' 2>/dev/null; then
    python3 -m pip install -q -r tools/courier-bench/requirements.txt
fi
# The workspace shares one target/: courier-bench finds the courier binary next to itself.
cargo build --release -p courier -p courier-bench
exec target/release/courier-bench "$@"
