#!/usr/bin/env bash
# Counts what one courier-bench case costs courier per event, in numbers that do not move with
# the machine's load the way rates do: calls to malloc, the store's syncs (sync_file_range,
# fsync, fdatasync), futex calls, context switches. For comparing two builds; needs perf with
# uprobes and tracepoints (root). BENCH=path/to/courier-bench picks another benchmark binary.
#     scripts/bench_counts.sh mqtt 20000 [path/to/courier]
#     scripts/bench_counts.sh amqp 20000 /tmp/old/courier
#     scripts/bench_counts.sh latency 1000 [path/to/courier]   # a steady 1,000 events/s for 15 s
# The case's courier is found by its config path, perf attaches to it until it exits, and each
# count is divided by the number of events (for fanout: deliveries, a fifth of the events × 10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case_name=${1:?case: amqp, mqtt, fanout or latency}
events=${2:-20000}
courier=${3:-target/release/courier}
libc=$(ldd "$courier" | awk '/libc.so.6/ {print $3}')
perf probe -q -x "$libc" --add malloc 2>/dev/null || true
# A courier binary built with jemalloc (src/main.rs) allocates through its own _rjem_malloc;
# libc's malloc then counts only what C code asks of libc. Probe the one the binary uses.
malloc_event=probe_libc:malloc
if nm "$courier" 2>/dev/null | grep ' T _rjem_malloc$' >/dev/null; then
    # A probe of that name left by a run on another binary would count that binary's calls.
    perf probe -q -d probe_courier:_rjem_malloc 2>/dev/null || true
    perf probe -q -x "$courier" --add _rjem_malloc 2>/dev/null || true
    malloc_event=probe_courier:_rjem_malloc
fi
# The latency case's second argument is its rate; its courier's directory is named after it.
dir_name=$case_name
args=(--events "$events" --latency-seconds 1 --mqtt-runs 1)
if [ "$case_name" = latency ]; then
    dir_name=latency$events
    args=(--rate "$events" --latency-seconds 15)
fi
"${BENCH:-target/release/courier-bench}" "${args[@]}" --only "$case_name" \
    --courier "$courier" > /tmp/bench_counts.$$.out 2>&1 &
bench=$!
pid=""
for _ in $(seq 600); do
    pid=$(pgrep -f "courier-bench-[0-9]+-$dir_name/courier.toml" || true)
    [ -n "$pid" ] && break
    sleep 0.1
done
[ -n "$pid" ] || { cat /tmp/bench_counts.$$.out; echo "no courier process for $case_name"; exit 1; }
perf stat -x, -p "$pid" \
    -e "$malloc_event",syscalls:sys_enter_sync_file_range,syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync \
    -e syscalls:sys_enter_futex,context-switches,task-clock \
    -o /tmp/bench_counts.$$.stat 2>/dev/null || true
wait "$bench" || true
grep -E "^courier|^fanout|^latency" /tmp/bench_counts.$$.out || cat /tmp/bench_counts.$$.out
per=$events
[ "$case_name" = fanout ] && per=$(( (events / 5 > 1000 ? events / 5 : 1000) * 10 ))
# Counted from courier's start, its 2 s before the first event included.
[ "$case_name" = latency ] && per=$(( events * 15 ))
awk -F, -v n="$per" '/^[0-9]/ { printf "%-32s %12.0f  %10.3f per event\n", $3, $1, $1 / n }' /tmp/bench_counts.$$.stat
rm -f /tmp/bench_counts.$$.out /tmp/bench_counts.$$.stat
