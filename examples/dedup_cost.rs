//! Prints what the dedup record costs in courier's store as its dedup table fills: every
//! delivery makes one dedup check and, after a 2xx, writes one record, and the benchmark's
//! cases start each on an empty store, where a deployment's table holds `store.dedup_ttl` of
//! deliveries (seven days by default).
//!
//! `cargo run --release --example dedup_cost [records per step] [steps] [cache MiB] [dir]`
//!
//! From an empty store, it measures 50,000 new deliveries (a check that finds nothing, then
//! a record; a commit every 200 records, as the background flush shares one among many), then
//! adds `records per step` more records untimed, and so on `steps` times, with sled's page cache
//! at `store.cache_capacity`'s default unless `cache MiB` is given (the dedup table is read
//! through the operating system's page cache). Ids are UUID-shaped
//! (36 characters) in random order. One task on one thread; wall-clock time per operation, so
//! run it on an otherwise idle machine. The last column is the process's CPU time instead (10 ms
//! resolution), the commits', checkpoints' and rebuilds' work included and their waits for the
//! disk left out. At the end the store is opened again, as at a restart, and the time until its
//! dedup checks stop reading the file (the background scan into the table's filter) is printed,
//! with the file in the page cache and, when run as root, with the page cache dropped first.
//! The store is in `dir` (a new directory under the
//! system's temporary directory by default; `/tmp` may be a RAM disk) and is removed at the end.
use std::time::{Duration, Instant};

use courier::config::StoreConfig;
use courier::store::Store;

/// Deliveries measured at each size of the table.
const SAMPLES: u64 = 50_000;
/// Records per commit while measuring: at 20,000 deliveries/s and the default 10 ms
/// `store.dedup_flush_interval`, one flush covers about 200.
const PER_COMMIT: u64 = 200;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let per_step: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let steps: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let defaults = StoreConfig::default();
    let cache_capacity = args
        .next()
        .and_then(|a| a.parse::<u64>().ok())
        .map_or(defaults.cache_capacity, |mib| mib << 20);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("courier-dedup-cost-{}", std::process::id()))
        });
    let config = StoreConfig {
        path: dir.clone(),
        cache_capacity,
        ..defaults
    };
    let store = or_exit(Store::open(&config));
    println!(
        "dedup table, store {} (cache_capacity {} MiB), {SAMPLES} deliveries per size",
        dir.display(),
        config.cache_capacity >> 20
    );
    println!("| records in the table | check (µs) | record (µs) | commit per {PER_COMMIT} records (µs) | per delivery (µs) | CPU per delivery (µs) |");
    println!("|---|---|---|---|---|---|");
    let mut next = 0u64;
    for step in 0..=steps {
        let (mut check, mut record, mut commit) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let cpu_before = cpu_ns();
        for i in 0..SAMPLES {
            let id = uuid_like(next);
            next += 1;
            let t = Instant::now();
            let seen = store.is_delivered("d", &id).await;
            check += t.elapsed();
            if !matches!(seen, Ok(false)) {
                eprintln!("dedup_cost: a new id was not reported new: {seen:?}");
                std::process::exit(1);
            }
            let t = Instant::now();
            or_exit(store.record_delivered("d", &id).await);
            record += t.elapsed();
            if (i + 1) % PER_COMMIT == 0 {
                let t = Instant::now();
                or_exit(store.try_commit().await);
                commit += t.elapsed();
            }
        }
        let cpu = cpu_ns().saturating_sub(cpu_before);
        let us = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            step * (per_step + SAMPLES),
            us(check, SAMPLES),
            us(record, SAMPLES),
            us(commit, SAMPLES / PER_COMMIT),
            us(check + record + commit, SAMPLES),
            cpu as f64 / 1e3 / SAMPLES as f64,
        );
        if step == steps {
            break;
        }
        for i in 0..per_step {
            or_exit(store.record_delivered("d", &uuid_like(next)).await);
            next += 1;
            if (i + 1) % 100_000 == 0 {
                or_exit(store.try_commit().await);
            }
        }
        or_exit(store.try_commit().await);
        // Writes the fill's pages out before the next measurement: in a deployment a table
        // fills over days, not seconds, and the kernel's writeback of a burst would be timed
        // as the next commits' `fdatasync`.
        let _ = std::process::Command::new("sync").status();
    }
    or_exit(store.close().await);
    drop(store);
    // A restart: the table opened again, with its file in the page cache as the fill left it,
    // then, where this process may drop the page cache (root), read from the disk.
    for cold in [false, true] {
        if cold && !drop_page_cache() {
            println!("(the page cache cannot be dropped here: no figure for a cold start)");
            break;
        }
        let started = Instant::now();
        let store = open_when_unlocked(&config);
        let opened = started.elapsed();
        while !store.dedup_filter_ready() {
            if started.elapsed() > Duration::from_secs(600) {
                eprintln!("dedup_cost: the filter scan did not end within 600 s");
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!(
            "reopened with {next} records, {}: the open took {:.1} ms, the scan into the filter {:.1} ms more (until it ends, each check of a new event reads the file)",
            if cold { "the page cache dropped" } else { "the file in the page cache" },
            opened.as_secs_f64() * 1e3,
            (started.elapsed() - opened).as_secs_f64() * 1e3,
        );
        or_exit(store.close().await);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens the store again. sled lets go of the file lock of a store just closed through its
/// epoch-based reclamation, which may run a moment after the drop; the time until then counts
/// as the open's.
fn open_when_unlocked(config: &StoreConfig) -> Store {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(config) {
            Err(courier::store::StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            opened => return or_exit(opened),
        }
    }
}

/// Writes dirty pages out and drops the page cache, so that the next open reads from the disk;
/// false where that is not allowed (not root).
fn drop_page_cache() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// CPU time of this process in nanoseconds, every thread counted, also those that have ended
/// (a checkpoint's or a rebuild's): `utime + stime` from `/proc/self/stat`, in clock ticks of
/// 10 ms (the kernel's USER_HZ on Linux); 0 where there is no such file.
fn cpu_ns() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are the 14th and 15th fields of the line, the 12th and 13th after ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 10_000_000
}

/// The value, or the error printed and exit code 1: a store that fails has no figure to give.
fn or_exit<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|error| {
        eprintln!("dedup_cost: {error}");
        std::process::exit(1)
    })
}

/// A UUID-shaped id (8-4-4-4-12 hex digits) from `n`, in an order unrelated to `n`, as random
/// UUIDs arrive.
fn uuid_like(n: u64) -> String {
    let (a, b) = (splitmix64(n), splitmix64(n ^ 0x9e37_79b9_7f4a_7c15));
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
