use std::time::Duration;

use serde_json::value::RawValue;

use super::*;
use crate::event::SourceKind;

fn config(dir: &std::path::Path, ttl: Duration) -> StoreConfig {
    StoreConfig {
        path: dir.to_path_buf(),
        dedup_ttl: ttl,
        cache_capacity: 1 << 20,
        ..StoreConfig::default()
    }
}

/// Opens a store that this process had open and dropped. sled frees a dropped database (and
/// its file lock) through epoch-based reclamation, which may run a moment after the drop while
/// other tests keep threads busy; a worker waits for the lock the same way (`Store::start`).
fn open_again(config: &StoreConfig) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(config) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            opened => return opened.expect("reopen"),
        }
    }
}

#[tokio::test]
async fn a_long_event_id_is_deduplicated_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("open");
    let long_id = "y".repeat(300);
    assert!(!store.is_delivered("d", &long_id).await.unwrap());
    store.record_delivered("d", &long_id).await.unwrap();
    assert!(store.is_delivered("d", &long_id).await.unwrap());
    assert!(!store.is_delivered("d", &long_id[1..]).await.unwrap());
}

/// A new store's dedup checks never read its table's file; a reopened store's stop reading it
/// once the background scan has read the file into the filter, and they still find what the
/// file holds.
#[tokio::test]
async fn the_dedup_filter_is_ready_when_new_and_once_a_reopened_table_is_scanned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), Duration::from_secs(3600));
    {
        let store = Store::open(&cfg).expect("open");
        assert!(store.dedup_filter_ready(), "a new table needs no scan");
        store.record_delivered("d", "e1").await.unwrap();
        store.try_commit().await.unwrap();
        store.close().await.unwrap();
    }
    let store = open_again(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.dedup_filter_ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "the scan of the reopened table did not end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.is_delivered("d", "e1").await.unwrap());
    assert!(!store.is_delivered("d", "e2").await.unwrap());
    // With the record in Redis there is no table, so no filter to be ready.
    let redis_dir = tempfile::tempdir().expect("tempdir");
    let redis = Store::open(&StoreConfig {
        dedup: DedupBackend::Redis,
        ..config(redis_dir.path(), Duration::from_secs(3600))
    })
    .expect("open a store whose dedup record is in Redis (connects to nothing)");
    assert!(!redis.dedup_filter_ready());
}

#[tokio::test]
async fn dedup_survives_reopen_and_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("open");
        assert!(!store.is_delivered("d", "e1").await.unwrap());
        store.record_delivered("d", "e1").await.unwrap();
        store.try_commit().await.unwrap();
        assert!(store.is_delivered("d", "e1").await.unwrap());
        assert!(!store.is_delivered("other", "e1").await.unwrap());
    }
    let store = open_again(&config(dir.path(), Duration::from_secs(3600)));
    assert!(store.is_delivered("d", "e1").await.unwrap());
    drop(store);
    let store = open_again(&config(dir.path(), Duration::from_millis(1)));
    std::thread::sleep(Duration::from_millis(5));
    assert!(!store.is_delivered("d", "e1").await.unwrap(), "expired");
    assert_eq!(store.sweep_expired().unwrap(), 1);
    assert_eq!(store.delivered_count(), 0);
}

#[tokio::test]
async fn concurrent_commits_share_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.record_delivered("d", &format!("e{i}")).await.unwrap();
            store.try_commit().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.delivered_count(), 64);
    assert!(store.all_durable(), "every write was followed by a commit");
}

#[tokio::test]
async fn a_write_is_durable_only_after_a_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
    assert!(store.all_durable(), "nothing written yet");
    store.record_delivered("d", "e1").await.unwrap();
    assert!(!store.all_durable());
    store.try_commit().await.unwrap();
    assert!(store.all_durable());
    store.remove_retry("d", "e1").unwrap();
    assert!(!store.all_durable(), "a removal counts as a write");
    store.try_commit().await.unwrap();
    assert!(store.all_durable());
}

fn stored(id: &str) -> StoredEvent {
    StoredEvent {
        id: id.into(),
        topic: "t".into(),
        tenant_id: None,
        destination_id: None,
        eligible_for_retry: true,
        time: None,
        metadata: Default::default(),
        body: RawValue::from_string("{}".into()).unwrap(),
        received_at_ms: 0,
        source: SourceKind::Rabbitmq,
        properties: None,
        trace: None,
    }
}

#[tokio::test]
async fn retries_are_ordered_unique_per_pair_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
        let rec = |id: &str, at: u64, attempts: u32| RetryRecord {
            destination: "d".into(),
            event: stored(id),
            attempts,
            next_at_ms: at,
            last_status: Some(503),
            last_error: "HTTP 503".into(),
        };
        store.schedule_retry(&rec("b", 200, 1)).unwrap();
        store.schedule_retry(&rec("a", 100, 1)).unwrap();
        store.schedule_retry(&rec("c", 300, 1)).unwrap();
        // Rescheduling a pair replaces its earlier entry.
        store.schedule_retry(&rec("a", 250, 2)).unwrap();
        let mut other = rec("z", 50, 1);
        other.destination = "e".into();
        store.schedule_retry(&other).unwrap();
        assert_eq!(store.pending_retries(), 4);
        assert_eq!(store.next_retry_at("d").unwrap(), Some(200));
        assert_eq!(store.next_retry_at("e").unwrap(), Some(50));
        assert_eq!(store.next_retry_at("none").unwrap(), None);
        assert_eq!(store.retry_destinations().unwrap(), vec!["d", "e"]);
        assert_eq!(
            store.pending_retries_by_destination().unwrap(),
            vec![("d".to_string(), 3), ("e".to_string(), 1)]
        );
        let due = store.due_retries("d", 260, 10, |_| false).unwrap();
        let ids: Vec<_> = due
            .iter()
            .map(|r| (r.event.id.as_str(), r.attempts))
            .collect();
        assert_eq!(ids, vec![("b", 1), ("a", 2)]);
        let due = store.due_retries("d", 260, 10, |id| id == "b").unwrap();
        assert_eq!(due.len(), 1);
        store.remove_retry("e", "z").unwrap();
        store.remove_retry("d", "b").unwrap();
        store.try_commit().await.unwrap();
    }
    let store = open_again(&config(dir.path(), Duration::from_secs(60)));
    let all: Vec<_> = store
        .retries()
        .unwrap()
        .into_iter()
        .map(|r| r.event.id)
        .collect();
    assert_eq!(all, vec!["a", "c"]);
}

/// The counts `/metrics` reads follow every write, and agree with a walk of the trees after a
/// reopen.
#[tokio::test]
async fn retry_and_dead_letter_counts_follow_the_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), Duration::from_secs(60));
    let rec = |destination: &str, id: &str, at: u64| RetryRecord {
        destination: destination.into(),
        event: stored(id),
        attempts: 1,
        next_at_ms: at,
        last_status: Some(503),
        last_error: "HTTP 503".into(),
    };
    let walked = |store: &Store| {
        let h = store.handles().expect("open");
        (h.retry_index.len(), h.dead.len())
    };
    {
        let store = Store::open(&cfg).expect("open");
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            store.schedule_retry(&rec("d", id, i as u64)).unwrap();
        }
        store.schedule_retry(&rec("e", "z", 5)).unwrap();
        store.schedule_retry(&rec("e", "y", 6)).unwrap();
        // A reschedule replaces; it adds nothing.
        let moved = rec("d", "a", 100);
        store.schedule_retry(&moved).unwrap();
        store.remove_retry("e", "z").unwrap();
        store.remove_retry("e", "nothing").unwrap();
        store.remove_retry_record(&moved).unwrap();
        // Its entry is gone already: removing it again changes nothing.
        store.remove_retry_record(&moved).unwrap();
        store.remove_retry_record(&rec("d", "b", 999)).unwrap();
        for i in 0..4 {
            store
                .dead_letter(&event_letter(&format!("x{i}"), "d"))
                .unwrap();
        }
        let first = store.dead_letters().unwrap()[0].key.clone();
        assert!(store.remove_dead_letter(&first).unwrap());
        assert!(!store.remove_dead_letter(&first).unwrap());
        // The index entry of b pointed at its own key (at 1), not at 999: b stays.
        assert_eq!(
            store.pending_retries_by_destination().unwrap(),
            vec![("d".to_string(), 2), ("e".to_string(), 1)]
        );
        assert_eq!(store.pending_retries(), 3);
        assert_eq!(store.dead_letter_count(), 3);
        assert_eq!(walked(&store), (3, 3));
        store.remove_retry("e", "y").unwrap();
        assert_eq!(
            store.pending_retries_by_destination().unwrap(),
            vec![("d".to_string(), 2)],
            "a destination with none left is not listed"
        );
        store.try_commit().await.unwrap();
    }
    let store = open_again(&cfg);
    assert_eq!(
        store.pending_retries_by_destination().unwrap(),
        vec![("d".to_string(), 2)]
    );
    assert_eq!(store.dead_letter_count(), 3);
    assert_eq!(walked(&store), (2, 3));
}

#[tokio::test]
async fn a_store_that_cannot_open_waits_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), Duration::from_secs(60));
    let first = Store::open(&cfg).expect("open");
    first.record_delivered("d", "e1").await.expect("write");
    first.try_commit().await.expect("commit");

    // The lock is held: the worker's store starts closed and says why.
    let shutdown = Shutdown::new();
    let second = Store::start(&cfg).expect("starts closed");
    let error = second.is_delivered("d", "e1").await.expect_err("closed");
    assert!(matches!(error, StoreError::Closed { .. }), "{error}");
    assert!(error.to_string().contains("in use"), "{error}");
    assert!(second.closed_reason().is_some());
    assert!(!second.not_ready_reasons().is_empty());
    assert!(!second.inner.db.open_if_closed().await);

    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second.wait_open(&shutdown))
        .await
        .expect("opened once the lock was released");
    assert!(second.closed_reason().is_none());
    assert!(second.is_delivered("d", "e1").await.expect("open now"));

    // A reopen of an open store (after a disk error) moves the epoch on and keeps what was
    // committed.
    let before = second.epoch();
    let disk_error = StoreError::Sled {
        path: "x".into(),
        source: sled::Error::Unsupported("simulated".into()),
    };
    assert!(second.inner.db.recover(&disk_error, before.0).await);
    assert!(second.reopened_since(before));
    assert!(second.is_delivered("d", "e1").await.expect("reopened"));
    // A caller that saw the old generation does not reopen again.
    let after = second.epoch();
    assert!(second.inner.db.recover(&disk_error, before.0).await);
    assert!(!second.reopened_since(after));
    // Errors a reopen cannot cure do not reopen.
    assert!(!StoreError::Redis("down".into()).cured_by_reopen());
    second.close().await.expect("close");
}

#[tokio::test]
async fn an_unfinished_snapshot_does_not_block_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), Duration::from_secs(60));
    {
        let store = Store::open(&cfg).expect("open");
        store.record_delivered("d", "e1").await.expect("write");
        store.try_commit().await.expect("commit");
    }
    // What a snapshot write that hit a full disk leaves behind.
    std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").expect("write");
    let store = Store::open(&cfg).expect("opens despite the unfinished snapshot");
    assert!(store.is_delivered("d", "e1").await.expect("read"));
    assert!(!dir.path().join("snap.FFFFFFFFFFFFFFFF.generating").exists());
}

#[tokio::test]
async fn dead_letters_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
    let inbound = crate::event::Inbound {
        source: SourceKind::Rabbitmq,
        format: crate::config::Format::Auto,
        body: bytes::Bytes::from_static(b"\xff"),
        topic: "t".into(),
        message_id: None,
        headers: Vec::new(),
        received_at: std::time::SystemTime::now(),
        properties: None,
        expiry: None,
    };
    let letter = DeadLetter::bad_input(&inbound, "not UTF-8".into(), 16);
    store.dead_letter(&letter).unwrap();
    store.try_commit().await.unwrap();
    let all = store.dead_letters().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].raw().unwrap(), b"\xff");
    assert_eq!(all[0].key.len(), 32);
    let mut changed = all[0].clone();
    changed.attempts = 3;
    assert!(store.update_dead_letter(&changed).unwrap());
    assert_eq!(store.dead_letters().unwrap()[0].attempts, 3);
    assert!(store.remove_dead_letter(&changed.key).unwrap());
    assert!(store.dead_letters().unwrap().is_empty());
}

fn event_letter(id: &str, destination: &str) -> DeadLetter {
    let event = crate::testing::event(id);
    DeadLetter::for_event(
        &event,
        DeadLetterKind::Failed,
        Some(destination),
        "HTTP 400".into(),
        1,
        Some(400),
    )
}

#[tokio::test]
async fn dead_letters_are_read_a_page_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
    assert_eq!(store.newest_dead_letter().expect("newest"), None);
    for i in 0..10 {
        let destination = if i % 2 == 0 { "even" } else { "odd" };
        store
            .dead_letter(&event_letter(&format!("e{i}"), destination))
            .expect("dead letter");
    }
    let all = store.dead_letters().expect("all");
    let ids: Vec<_> = all.iter().map(|l| l.event_id.clone().unwrap()).collect();
    assert_eq!(ids, (0..10).map(|i| format!("e{i}")).collect::<Vec<_>>());
    let key = |i: usize| {
        all[i]
            .key
            .parse::<LetterKey>()
            .expect("a listed key parses")
    };
    assert_eq!(key(3).to_string(), all[3].key);
    assert_eq!(store.newest_dead_letter().expect("newest"), Some(key(9)));

    // After e2, the odd ones, three of them.
    let page = store
        .scan_dead_letters(Some(&key(2)), None, 3, |l| {
            l.destination.as_deref() == Some("odd")
        })
        .expect("page");
    let ids: Vec<_> = page.iter().map(|l| l.event_id.clone().unwrap()).collect();
    assert_eq!(ids, ["e3", "e5", "e7"]);
    // Up to and including e6.
    let page = store
        .scan_dead_letters(Some(&key(4)), Some(&key(6)), 100, |_| true)
        .expect("page");
    let ids: Vec<_> = page.iter().map(|l| l.event_id.clone().unwrap()).collect();
    assert_eq!(ids, ["e5", "e6"]);
    assert!(store
        .scan_dead_letters(None, None, 0, |_| true)
        .expect("empty page")
        .is_empty());

    // A replay's update of a letter a purge removed meanwhile does not bring it back.
    let mut replayed = all[0].clone();
    replayed.attempts = 2;
    assert!(store.remove_dead_letter(&replayed.key).expect("purge"));
    assert!(!store.update_dead_letter(&replayed).expect("update"));
    assert_eq!(store.dead_letters().expect("all").len(), 9);
    assert!(store
        .update_dead_letter(&{
            let mut l = all[1].clone();
            l.attempts = 5;
            l
        })
        .expect("update"));
    assert_eq!(store.dead_letters().expect("all")[0].attempts, 5);

    for bad in [
        "",
        "zz",
        &"0".repeat(31),
        &"g".repeat(32),
        &"é".repeat(16),
        &"+0".repeat(16),
    ] {
        assert!(bad.parse::<LetterKey>().is_err(), "{bad:?}");
    }
}

/// A worker's store (with its background flush) whose flush waits `interval`.
async fn started(dir: &std::path::Path, interval: Duration) -> Store {
    let config = StoreConfig {
        dedup_flush_interval: interval,
        ..config(dir, Duration::from_secs(3600))
    };
    Store::start(&config).expect("start")
}

/// Waits up to `limit` for every write to be durable; returns how long that took.
async fn durable_within(store: &Store, limit: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if store.all_durable() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_commit_returns_at_once_and_the_background_flush_follows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = started(dir.path(), Duration::from_millis(300)).await;
    store.record_delivered("d", "e1").await.expect("record");
    store.commit_deferred().await;
    assert!(
        !store.all_durable(),
        "the deferred commit flushed by itself"
    );
    let took = durable_within(&store, Duration::from_secs(5))
        .await
        .expect("the background flush never came");
    assert!(
        took >= Duration::from_millis(200),
        "flushed after {took:?}, before the interval"
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_store_flushes_what_waits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = started(dir.path(), Duration::from_secs(60)).await;
    store.record_delivered("d", "e1").await.expect("record");
    store.commit_deferred().await;
    assert!(!store.all_durable());
    store.close().await.expect("close");
    assert!(store.all_durable(), "records left unflushed at stop");
    // With no background flush running any more, a deferred commit flushes by itself.
    store.record_delivered("d", "e2").await.expect("record");
    store.commit_deferred().await;
    assert!(store.all_durable());
}

/// Records `count` deliveries (events e0, e1, ...) to destination `d`, without a commit.
async fn record_delivered(store: &Store, count: u64) {
    for i in 0..count {
        store
            .record_delivered("d", &format!("e{i}"))
            .await
            .expect("record");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_waiting_writes_make_a_deferred_commit_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = started(dir.path(), Duration::from_secs(60)).await;
    record_delivered(&store, commit::MAX_DEFERRED + 1).await;
    store.commit_deferred().await;
    assert!(
        store.all_durable(),
        "more than MAX_DEFERRED writes waited, and the deferred commit did not flush"
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_commit_past_the_cap_flushes_before_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = started(dir.path(), Duration::from_secs(60)).await;
    store.cap_deferred(8);
    record_delivered(&store, 9).await;
    store.commit_deferred().await;
    assert!(
        store.all_durable(),
        "9 writes waited with a cap of 8, and the deferred commit did not flush"
    );
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_cap_waiting_cuts_the_flush_interval_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An interval no test waits out: only the cap can make these records durable in time.
    let store = started(dir.path(), Duration::from_secs(60)).await;
    store.cap_deferred(8);
    record_delivered(&store, 5).await;
    store.commit_deferred().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.all_durable() {
        assert!(
            std::time::Instant::now() < deadline,
            "5 of a cap of 8 waited, and the background flush still waited for its interval"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.close().await.expect("close");
}

#[tokio::test]
async fn dedup_records_of_the_old_sled_tree_move_to_the_dedup_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = millis(std::time::SystemTime::now());
    {
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("sled");
        let tree = db.open_tree("delivered").expect("tree");
        tree.insert(b"d\0e1", &now.to_be_bytes()).expect("insert");
        tree.insert(b"d\0old", &(now - 7_200_000).to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("open");
    assert!(store.is_delivered("d", "e1").await.unwrap(), "moved");
    assert!(
        !store.is_delivered("d", "old").await.unwrap(),
        "moved, and expired"
    );
    assert!(!store.is_delivered("other", "e1").await.unwrap());
    assert_eq!(store.delivered_count(), 1);
    let h = store.handles().expect("open");
    let tree = h.db.open_tree("delivered").expect("tree");
    assert!(tree.is_empty(), "the old tree is emptied");
    drop((tree, h));
    drop(store);
    let store = open_again(&config(dir.path(), Duration::from_secs(3600)));
    assert!(
        store.is_delivered("d", "e1").await.unwrap(),
        "durable after the move"
    );
}

#[tokio::test]
async fn a_commit_of_dedup_records_alone_does_not_flush_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
    let h = store.handles().expect("open");
    let dirty = || h.sled_dirty.load(std::sync::atomic::Ordering::SeqCst);
    store.record_delivered("d", "e1").await.unwrap();
    assert!(!dirty(), "a dedup record is not a sled write");
    store.try_commit().await.unwrap();
    assert!(store.all_durable());
    store.remove_retry("d", "e1").unwrap();
    assert!(dirty(), "a retry-tree write is");
    store.try_commit().await.unwrap();
    assert!(!dirty(), "flushed");
    assert!(store.all_durable());
}
