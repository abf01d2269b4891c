//! Prints how long one group commit (sled flush + fdatasync of its log) takes on this disk.
//! `cargo run --release --example commit_latency [dir]`
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("courier-commit-{}", std::process::id()))
        });
    let store = courier::store::Store::open(&courier::config::StoreConfig {
        path: dir.clone(),
        dedup_ttl: Duration::from_secs(3600),
        cache_capacity: 16 << 20,
        ..Default::default()
    })
    .expect("open");
    let mut samples = Vec::new();
    for i in 0..200 {
        store
            .record_delivered("d", &format!("e{i}"))
            .await
            .expect("write");
        let t = Instant::now();
        store.try_commit().await.expect("commit");
        samples.push(t.elapsed());
    }
    samples.sort();
    println!(
        "commit after one write, 200 samples: p50 {:?}  p90 {:?}  max {:?}  (store {})",
        samples[100],
        samples[180],
        samples[199],
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
