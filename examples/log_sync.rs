//! Prints what one append and `fdatasync` of the dedup table's log costs on this disk, in a log
//! that grows with each append, as courier's logs do (`src/store/dedup_table/wal.rs`), and in
//! one whose room was written (zeros) when it was made: what writing the room up front would
//! save, and why it is not done, is in docs/performance.md ("Tried, did not help").
//!
//! `cargo run --release --example log_sync [appends] [records per append] [dir]`
//!
//! Each round times `appends` appends of `records per append` 32-byte records (128 by default:
//! the background flush covers about that many at half of a `service.max_in_flight` of 256),
//! each followed by `fdatasync`, first in a new empty file, then in a new file with room for
//! them all; five rounds alternate the two. Wall-clock time per append, and this thread's CPU
//! time (from `/proc/thread-self/schedstat`), the kernel's included. The files are in `dir` (the
//! system's temporary directory by default; `/tmp` may be a RAM disk, where a sync costs
//! nothing) and removed after each round.
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const RECORD: usize = 32;

fn thread_cpu() -> Duration {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// Wall time and CPU time per append.
fn round(dir: &Path, appends: usize, per_append: usize, room: bool) -> (Duration, Duration) {
    let path = dir.join(format!("courier-log-sync-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the log file");
    let bytes = per_append * RECORD;
    if room {
        file.write_all_at(&vec![0u8; appends * bytes], 0)
            .expect("write the room");
        file.sync_all().expect("sync the room");
    }
    let record = vec![0x5au8; bytes];
    let (wall, cpu) = (Instant::now(), thread_cpu());
    for i in 0..appends {
        file.write_all_at(&record, (i * bytes) as u64)
            .expect("append");
        file.sync_data().expect("fdatasync");
    }
    let took = (wall.elapsed(), thread_cpu().saturating_sub(cpu));
    drop(file);
    let _ = std::fs::remove_file(&path);
    (took.0 / appends as u32, took.1 / appends as u32)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let appends: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let per_append: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "{appends} appends of {per_append} records ({} bytes) + fdatasync each, in {}",
        per_append * RECORD,
        dir.display()
    );
    println!("round  growing: wall / CPU per append (us)  with room: wall / CPU per append (us)");
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for r in 1..=5 {
        let grow = round(&dir, appends, per_append, false);
        let room = round(&dir, appends, per_append, true);
        println!(
            "{r}      {:8.1} / {:6.1}                      {:8.1} / {:6.1}",
            us(grow.0),
            us(grow.1),
            us(room.0),
            us(room.1)
        );
    }
}
