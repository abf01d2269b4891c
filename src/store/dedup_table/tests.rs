use std::os::unix::fs::FileExt;

use super::file::SLOT;
use super::*;

const TTL: u64 = 60_000;

fn run_inline(task: Box<dyn FnOnce() + Send>) -> bool {
    task();
    true
}

fn commit(table: &Arc<DedupTable>, now: u64) {
    table.commit(now, run_inline).expect("commit");
}

/// A table whose every commit is checkpointed into the file at once.
fn open_writing_through(dir: &Path) -> Arc<DedupTable> {
    DedupTable::open_with(dir, 0, TTL, 1).expect("open")
}

fn logs(dir: &Path) -> Vec<u64> {
    wal::list(dir).expect("list")
}

#[test]
fn records_are_found_after_commit_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open(dir.path(), 0, TTL).expect("open");
    let (a, b) = (key_hash("d", "e1"), key_hash("d", "e2"));
    table.record(a, 1000);
    assert_eq!(table.get(&a).unwrap(), Some(1000), "seen before the commit");
    commit(&table, 1000);
    assert_eq!(table.get(&a).unwrap(), Some(1000), "seen after the commit");
    assert_eq!(table.get(&b).unwrap(), None);
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    assert_eq!(table.get(&a).unwrap(), Some(1000));
    assert_eq!(table.live_count(1000).unwrap(), 1);
}

#[test]
fn committed_records_come_back_from_the_log_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open(dir.path(), 0, TTL).expect("open");
    let h = key_hash("d", "e1");
    table.record(h, 1000);
    commit(&table, 1000);
    assert_eq!(table.table().get(&h).unwrap(), None, "not in the file yet");
    // A crash: the table goes away without a checkpoint; the log has the record.
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    assert_eq!(
        table.table().get(&h).unwrap(),
        Some(1000),
        "checkpointed at open"
    );
    assert_eq!(
        logs(dir.path()).len(),
        1,
        "the replayed logs are gone; a new one is open"
    );
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen again");
    assert_eq!(table.get(&h).unwrap(), Some(1000));
    assert_eq!(logs(dir.path()).len(), 1, "empty logs do not pile up");
}

#[test]
fn enough_committed_records_are_checkpointed_and_their_log_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open_with(dir.path(), 0, TTL, 10).expect("open");
    for i in 0..5 {
        table.record(key_hash("d", &format!("e{i}")), 1000);
    }
    commit(&table, 1000);
    let first_log = logs(dir.path());
    assert!(
        table.lock_records().memtable.len() == 5,
        "below the threshold"
    );
    for i in 5..12 {
        table.record(key_hash("d", &format!("e{i}")), 1000);
    }
    commit(&table, 1000);
    assert!(table.lock_records().memtable.is_empty(), "checkpointed");
    assert!(!logs(dir.path()).contains(&first_log[0]), "its log is gone");
    for i in 0..12 {
        let h = key_hash("d", &format!("e{i}"));
        assert_eq!(
            table.table().get(&h).unwrap(),
            Some(1000),
            "e{i} in the file"
        );
    }
    assert_eq!(table.occupied.load(Ordering::SeqCst), 12);
}

#[test]
fn a_failed_checkpoint_keeps_its_records_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open_with(dir.path(), 0, TTL, 1).expect("open");
    // The name of the next log is taken, so the checkpoint cannot start one.
    let next = table.lock_log().wal.seq() + 1;
    let blocker = dir.path().join(format!("dedup.wal.{next}"));
    std::fs::write(&blocker, b"").expect("blocker");
    let h = key_hash("d", "e1");
    table.record(h, 1000);
    commit(&table, 1000);
    assert_eq!(
        table.get(&h).unwrap(),
        Some(1000),
        "still answered from memory"
    );
    assert_eq!(table.table().get(&h).unwrap(), None);
    std::fs::remove_file(&blocker).expect("remove");
    table.record(key_hash("d", "e2"), 1000);
    commit(&table, 1000);
    assert_eq!(
        table.table().get(&h).unwrap(),
        Some(1000),
        "written by the next"
    );
}

#[test]
fn an_uncommitted_record_is_gone_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open(dir.path(), 0, TTL).expect("open");
    table.record(key_hash("d", "e1"), 1000);
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    assert_eq!(table.get(&key_hash("d", "e1")).unwrap(), None);
}

#[test]
fn colliding_home_slots_probe_on_and_wrap_around() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    // Hashes chosen to share the last home slot, so the probe wraps to slot 0.
    let last = INITIAL_CAPACITY - 1;
    let hashes: Vec<KeyHash> = (0..20u8)
        .map(|i| {
            let mut h = [0u8; 16];
            h[..8].copy_from_slice(&last.to_le_bytes());
            h[15] = i + 1;
            h
        })
        .collect();
    for (i, h) in hashes.iter().enumerate() {
        table.record(*h, 1000 + i as u64);
    }
    commit(&table, 2000);
    let file = table.table();
    for (i, h) in hashes.iter().enumerate() {
        assert_eq!(file.get(h).unwrap(), Some(1000 + i as u64), "hash {i}");
    }
    let mut other = hashes[0];
    other[15] = 99;
    assert_eq!(file.get(&other).unwrap(), None);
    assert_eq!(table.occupied.load(Ordering::SeqCst), 20);
}

#[test]
fn a_record_made_again_updates_its_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let h = key_hash("d", "e1");
    table.record(h, 1000);
    commit(&table, 1000);
    table.record(h, 5000);
    commit(&table, 5000);
    assert_eq!(table.table().get(&h).unwrap(), Some(5000));
    assert_eq!(
        table.occupied.load(Ordering::SeqCst),
        1,
        "one slot, written twice"
    );
}

#[test]
fn expired_and_damaged_slots_are_passed_over_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let home = |i: u8| {
        let mut h = [0u8; 16];
        h[0] = 7;
        h[15] = i;
        h
    };
    // One commit each, so home(1) takes the home slot and home(2) the next.
    table.record(home(1), 1000);
    commit(&table, 1000);
    table.record(home(2), 2000);
    commit(&table, 2000);
    let file = table.table();
    let second = (file.home(&home(1)) + 1) & (file.capacity - 1);
    file.file
        .write_all_at(&[0xAB; 8], file::TableFile::offset(second))
        .expect("damage");
    assert_eq!(file.get(&home(2)).unwrap(), None, "damaged: not a record");
    // At 1000 + TTL home(1) has expired: a new key with the same home slot takes its slot,
    // and the damaged slot stays passed over.
    table.record(home(3), 1000 + TTL);
    commit(&table, 1000 + TTL);
    assert_eq!(file.get(&home(1)).unwrap(), None, "overwritten");
    assert_eq!(file.get(&home(3)).unwrap(), Some(1000 + TTL));
    assert_eq!(
        table.occupied.load(Ordering::SeqCst),
        2,
        "no new slot taken"
    );
    let mut raw = [0u8; SLOT];
    file.file
        .read_exact_at(&mut raw, file::TableFile::offset(second))
        .expect("read");
    assert_eq!(&raw[..8], &[0xAB; 8], "the damaged slot is left alone");
}

#[test]
fn the_table_grows_past_half_full_and_keeps_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Open runs its checkpoint at the real time: a TTL that keeps the records of time 1000.
    let ttl = u64::MAX;
    let table = DedupTable::open_with(dir.path(), 0, ttl, 5000).expect("open");
    let n = INITIAL_CAPACITY / 2 + 100;
    for i in 0..n {
        table.record(key_hash("d", &format!("e{i}")), 1000);
        if i % 1000 == 0 {
            commit(&table, 1000);
        }
    }
    commit(&table, 1000);
    drop(table);
    // The records of the last commits are checkpointed at open, past half of the first file.
    let table = DedupTable::open(dir.path(), 0, ttl).expect("reopen");
    assert!(table.table().capacity > INITIAL_CAPACITY, "grown");
    assert_eq!(table.occupied.load(Ordering::SeqCst), n);
    let file = table.table();
    for i in 0..n {
        let h = key_hash("d", &format!("e{i}"));
        assert_eq!(file.get(&h).unwrap(), Some(1000), "e{i}");
    }
    assert_eq!(table.live_count(1000).unwrap() as u64, n);
    assert!(!dir.path().join(NEW_FILE_NAME).exists());
}

#[test]
fn a_checkpoint_larger_than_the_table_grows_it_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let n = INITIAL_CAPACITY * 2;
    for i in 0..n {
        table.record(key_hash("d", &format!("e{i}")), 1000);
    }
    commit(&table, 1000);
    assert_eq!(table.table().capacity, capacity_for(n));
    assert_eq!(table.occupied.load(Ordering::SeqCst), n);
    assert_eq!(table.live_count(1000).unwrap() as u64, n);
}

#[test]
fn sweep_drops_expired_records_once_they_are_as_many_as_the_live_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    for i in 0..10 {
        table.record(key_hash("d", &format!("old{i}")), 1000);
    }
    for i in 0..11 {
        table.record(key_hash("d", &format!("new{i}")), 1000 + TTL);
    }
    commit(&table, 1000 + TTL);
    assert_eq!(
        table.sweep(1000 + TTL).unwrap(),
        0,
        "fewer expired than live"
    );
    assert_eq!(table.sweep(2000 + TTL).unwrap(), 0, "still");
    table.record(key_hash("d", "new"), 1000);
    // 11 expired against 11 live at 1000 + TTL once `new` counts as old too.
    commit(&table, 1000 + TTL);
    assert_eq!(table.sweep(1000 + TTL).unwrap(), 11);
    assert_eq!(table.occupied.load(Ordering::SeqCst), 11);
    assert_eq!(table.live_count(1000 + TTL).unwrap(), 11);
    assert_eq!(table.sweep(1000 + TTL).unwrap(), 0, "nothing expired left");
}

#[test]
fn a_closed_table_refuses_commits_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open(dir.path(), 0, TTL).expect("open");
    table.close();
    table.record(key_hash("d", "e1"), 1000);
    let error = table.commit(1000, run_inline).expect_err("closed");
    assert!(error.to_string().contains("closed by a reopen"), "{error}");
    let error = table.checkpoint(1000).expect_err("closed");
    assert!(error.to_string().contains("closed by a reopen"), "{error}");
}

#[test]
fn an_unfinished_rebuild_is_discarded_and_a_foreign_file_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    table.record(key_hash("d", "e1"), 1000);
    commit(&table, 1000);
    drop(table);
    std::fs::write(dir.path().join(NEW_FILE_NAME), b"half").expect("write");
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    assert_eq!(table.get(&key_hash("d", "e1")).unwrap(), Some(1000));
    assert!(!dir.path().join(NEW_FILE_NAME).exists());
    drop(table);
    std::fs::write(dir.path().join(FILE_NAME), b"something else").expect("write");
    let error = DedupTable::open(dir.path(), 0, TTL)
        .err()
        .expect("not a table");
    assert!(
        error.to_string().contains("shorter than its header"),
        "{error}"
    );
    let mut foreign = vec![7u8; 8192];
    foreign[..5].copy_from_slice(b"hello");
    std::fs::write(dir.path().join(FILE_NAME), foreign).expect("write");
    let error = DedupTable::open(dir.path(), 0, TTL)
        .err()
        .expect("not a table");
    assert!(error.to_string().contains("bad magic"), "{error}");
    assert!(error.to_string().contains("move the file away"), "{error}");
}

#[test]
fn capacity_holds_records_a_quarter_full() {
    assert_eq!(capacity_for(0), INITIAL_CAPACITY);
    assert_eq!(capacity_for(INITIAL_CAPACITY), INITIAL_CAPACITY * 4);
    assert_eq!(capacity_for(INITIAL_CAPACITY + 1), INITIAL_CAPACITY * 8);
}

#[test]
fn a_stopped_table_commits_but_writes_nothing_into_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    table.stop_background();
    let h = key_hash("d", "e1");
    table.record(h, 1000);
    commit(&table, 1000);
    assert!(!table.busy(), "the checkpoint gave up");
    assert_eq!(
        table.get(&h).unwrap(),
        Some(1000),
        "committed, kept in memory"
    );
    assert_eq!(
        table.table().get(&h).unwrap(),
        None,
        "not written into the file"
    );
    table.maintaining.store(true, Ordering::SeqCst);
    let error = table
        .checkpoint(1000)
        .expect_err("a stopped checkpoint gives up");
    table.maintaining.store(false, Ordering::SeqCst);
    assert!(
        is_stopped(&error),
        "told apart from a failure, so it is not logged as one: {error}"
    );
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    assert_eq!(
        table.table().get(&h).unwrap(),
        Some(1000),
        "from its log at open"
    );
}

#[test]
fn an_older_time_does_not_replace_a_newer_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let h = key_hash("d", "e1");
    table.record(h, 5000);
    commit(&table, 5000);
    table.record(h, 1000);
    commit(&table, 5000);
    assert_eq!(table.table().get(&h).unwrap(), Some(5000));
}

#[test]
fn commits_run_a_checkpoint_themselves_when_none_could_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = DedupTable::open_with(dir.path(), 0, TTL, 2).expect("open");
    let no_thread = |_: Box<dyn FnOnce() + Send>| false;
    for i in 0..40 {
        table.record(key_hash("d", &format!("e{i}")), 1000);
        table.commit(1000, no_thread).expect("commit");
        assert!(
            !table.busy(),
            "a checkpoint that could not start leaves no flag behind"
        );
    }
    let waiting = table.lock_records().memtable.len();
    assert!(
        waiting <= 16,
        "{waiting} records wait: the commits checkpointed"
    );
    assert_eq!(
        table.table().get(&key_hash("d", "e0")).unwrap(),
        Some(1000),
        "in the file"
    );
}

/// Waits for the background scan of a reopened table's file into its filter.
fn wait_for_filter(table: &DedupTable) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !table.filter_complete() {
        assert!(
            std::time::Instant::now() < deadline,
            "the filter scan did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_reopened_table_reads_the_file_only_for_keys_its_filter_cannot_rule_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let n = 2_000;
    for i in 0..n {
        table.record(key_hash("d", &format!("e{i}")), 1000);
    }
    commit(&table, 1000);
    drop(table);
    let table = DedupTable::open(dir.path(), 0, TTL).expect("reopen");
    wait_for_filter(&table);
    let file = table.table();
    for i in 0..n {
        let h = key_hash("d", &format!("e{i}"));
        assert_eq!(
            file.get(&h).unwrap(),
            Some(1000),
            "e{i}, read back by the scan"
        );
    }
    let reads_for_present = file.lookup_reads.load(Ordering::Relaxed);
    assert!(
        reads_for_present >= n,
        "every present key is read from the file"
    );
    for i in 0..n {
        let h = key_hash("d", &format!("absent{i}"));
        assert_eq!(file.get(&h).unwrap(), None);
    }
    let reads_for_absent = file.lookup_reads.load(Ordering::Relaxed) - reads_for_present;
    // 2,000 records in 65,536 slots: nearly every absent key is ruled out from memory.
    assert!(
        reads_for_absent < n / 20,
        "{reads_for_absent} reads for {n} absent keys"
    );
}

#[test]
fn records_written_before_the_scan_ends_are_found_and_an_unscanned_file_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    let old = key_hash("d", "on disk before the open");
    table.record(old, 1000);
    commit(&table, 1000);
    drop(table);
    let (file, _) = file::TableFile::open(&dir.path().join(FILE_NAME))
        .expect("open")
        .expect("exists");
    assert_eq!(file.get(&old).unwrap(), Some(1000), "not scanned: read");
    // A checkpoint while the scan has not run yet: the new record sets its own bits.
    let new = key_hash("d", "written during the scan");
    let never = AtomicBool::new(false);
    file.apply(&mut [(new, 2000)], 2000, TTL, &never)
        .expect("apply");
    let stop = AtomicBool::new(true);
    assert!(file.scan_into_filter(&stop).is_err(), "a stopped scan");
    assert!(!file.filter.is_complete(), "stays incomplete");
    assert_eq!(file.get(&old).unwrap(), Some(1000));
    file.scan_into_filter(&never).expect("scan");
    assert!(file.filter.is_complete());
    assert_eq!(file.get(&old).unwrap(), Some(1000));
    assert_eq!(file.get(&new).unwrap(), Some(2000));
}

#[test]
fn a_new_or_rebuilt_file_needs_no_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = open_writing_through(dir.path());
    assert!(table.filter_complete(), "a new, empty file");
    let n = INITIAL_CAPACITY;
    for i in 0..n {
        table.record(key_hash("d", &format!("e{i}")), 1000);
    }
    commit(&table, 1000);
    assert!(table.table().capacity > INITIAL_CAPACITY, "rebuilt larger");
    assert!(
        table.filter_complete(),
        "the rebuild set every record's bits"
    );
    for i in (0..n).step_by(97) {
        let h = key_hash("d", &format!("e{i}"));
        assert_eq!(table.table().get(&h).unwrap(), Some(1000), "e{i}");
    }
}
