#!/usr/bin/env python3
"""Where one process of a `perf record -g` run spent its time.

`perf report --pid` filters poorly when the recording covers several processes (courier-bench
spawns one courier per case), so this reads `perf script` output directly:

    perf record -F 1999 -g -o perf.data -- target/release/courier-bench --events 10000
    perf script -i perf.data -F pid,ip,sym > perf.txt
    scripts/perf_by_process.py perf.txt                 # samples per process
    scripts/perf_by_process.py perf.txt PID sled,hyper  # that process: share of samples whose
                                                        # stack mentions each word, then the top
                                                        # functions by own time

Build with frame pointers and line tables so the stacks are whole enough:
    RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \\
        CARGO_TARGET_DIR=target-prof cargo build --release -p courier -p courier-bench
"""
import collections
import re
import sys


def samples(path):
    pid, frames = None, []
    with open(path, errors="replace") as f:
        for line in f:
            head = re.match(r"^\s*(\d+)\s*$", line)
            if head:
                if pid is not None and frames:
                    yield pid, frames
                pid, frames = int(head.group(1)), []
                continue
            frame = re.match(r"^\s+[0-9a-f]+\s+(.*)$", line)
            if frame:
                frames.append(re.sub(r"\+0x[0-9a-f]+$", "", frame.group(1).strip()))
    if pid is not None and frames:
        yield pid, frames


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if len(sys.argv) == 2:
        per_pid = collections.Counter(pid for pid, _ in samples(sys.argv[1]))
        for pid, n in per_pid.most_common(20):
            print(f"{n:8d}  pid {pid}")
        return
    want = int(sys.argv[2])
    words = sys.argv[3].split(",") if len(sys.argv) > 3 else []
    total, inclusive, own = 0, collections.Counter(), collections.Counter()
    for pid, frames in samples(sys.argv[1]):
        if pid != want:
            continue
        total += 1
        own[frames[0][:110]] += 1
        stack = " ".join(frames)
        for word in words:
            if word in stack:
                inclusive[word] += 1
    if total == 0:
        sys.exit(f"no samples for pid {want}")
    print(f"{total} samples")
    for word, n in inclusive.most_common():
        print(f"{100 * n / total:5.1f}%  stack mentions {word}")
    print("top functions by own time:")
    for name, n in own.most_common(20):
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
