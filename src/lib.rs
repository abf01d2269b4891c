//! courier: consumes events from RabbitMQ and MQTT, routes each by topic to the partner endpoints that
//! subscribed to it, POSTs it with the exact REST contract, and acks only after the POST was
//! attempted and its outcome stored. The one exception: an event for a destination whose circuit
//! is open is written to the retry store (durably) and acked without an attempt.
//!
//! Data flows one way: [`sources`] → [`event`] → [`router`] → [`sender`] → [`store`] → ack, glued
//! by [`pipeline`]. [`run`] wires it all so tests and the binary start courier the same way.

pub mod admin;
pub mod backoff;
pub mod circuit;
pub mod config;
pub mod deadletters;
pub mod dedup;
pub mod delivery;
pub mod event;
pub mod pipeline;
pub mod retry;
pub mod router;
pub mod sender;
pub mod sources;
pub mod stats;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError};
pub use stats::Stats;

/// Why courier could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (exit code 2).
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    /// The store could not be opened or flushed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The HTTP client could not be built.
    #[error(transparent)]
    Sender(#[from] sender::SenderError),
    /// The MQTT source could not be set up.
    #[error(transparent)]
    Mqtt(#[from] sources::mqtt::MqttSetupError),
    /// The admin port could not be opened.
    #[error("admin.listen {address}: {source}")]
    Admin {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Makes ring the process-wide rustls provider (lapin, reqwest and later MQTT all use rustls);
/// calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs courier until `shutdown` is cancelled, then drains in-flight deliveries (up to
/// `service.shutdown_timeout`), flushes the store and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with_stats(config, shutdown, Arc::new(Stats::default())).await
}

/// [`run`], counting into `stats` so the caller can watch progress.
pub async fn run_with_stats(
    config: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), Error> {
    install_crypto_provider();
    // An unwritable disk or a lock still held by a stopping predecessor is waited out like an
    // unreachable broker: nothing is acked until the store opens (see `Store::recover`).
    let store = Arc::new(store::Store::open_or_closed(&config.store));
    let sender = sender::Sender::new(&config)?;
    let router = Arc::new(router::Router::new(&config.destinations));
    let max_in_flight = config.service.max_in_flight;
    let dedup = dedup::Dedup::open(&config.store, store.clone(), &shutdown).await?;
    let deliverer = Arc::new(delivery::Deliverer::new(
        &config,
        sender,
        store.clone(),
        dedup,
        stats.clone(),
    ));
    let admin = match &config.admin.listen {
        Some(address) => Some(
            admin::start(address, deliverer.clone(), router.clone(), shutdown.clone())
                .await
                .map_err(|source| Error::Admin {
                    address: address.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let pipeline = Arc::new(pipeline::Pipeline::new(
        router,
        deliverer.clone(),
        config.service.max_payload_bytes,
        stats.clone(),
    ));
    let scheduler = tokio::spawn(retry::run(
        deliverer.clone(),
        stats.clone(),
        max_in_flight,
        shutdown.clone(),
        config.service.shutdown_timeout,
    ));

    // A worker that cannot store an outcome must not take messages it would only hold hostage
    // (a rolling restart's new process waits here for the old one's lock).
    wait_for_store(&store, &shutdown).await;

    let (tx, rx) = mpsc::channel(max_in_flight.clamp(1, 1024));
    let release = CancellationToken::new();
    let mut sources = JoinSet::new();
    if let Some(rabbitmq) = config.rabbitmq.clone() {
        let source = sources::amqp::AmqpSource::new(rabbitmq, max_in_flight, stats.clone());
        sources.spawn(source.run(tx.clone(), shutdown.clone(), release.clone()));
    }
    if let Some(mqtt) = config.mqtt.clone() {
        let source = sources::mqtt::MqttSource::new(mqtt, stats.clone())?;
        sources.spawn(source.run(tx.clone(), shutdown.clone(), release.clone()));
    }
    drop(tx);
    let sweeper = tokio::spawn(sweep_dedup(
        store.clone(),
        config.store.dedup_ttl,
        release.clone(),
    ));
    tracing::info!(
        destinations = config.destinations.len(),
        max_in_flight,
        "courier started"
    );

    // On a worker thread of its own task, not wherever this future is polled: the binary's
    // `block_on` polls it on the main thread, and each message would then cross one more thread
    // on its way from the source to its task (a context switch per message, measured with
    // `perf record -e sched:sched_switch`; docs/performance.md).
    let taking =
        tokio::spawn(pipeline.run(rx, shutdown, max_in_flight, config.service.shutdown_timeout));
    match taking.await {
        Ok(()) => {}
        // A bug in the loop itself (the event tasks catch their own panics): fail as loudly as
        // before it had a task of its own, rather than wait for a shutdown nobody will signal.
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: only when the runtime itself is shutting down.
        Err(error) => tracing::warn!(%error, "the pipeline task was cancelled"),
    }
    // Every message is now acked or abandoned: the sources may close their connections.
    release.cancel();
    let _ = scheduler.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while sources.join_next().await.is_some() {}
    })
    .await;
    if closed.is_err() {
        tracing::warn!("a source did not close within 10s; exiting anyway");
    }
    // The sweeper holds the store, and sled releases its file lock only when the last handle is
    // gone: wait for it, so a restart in the same process can open the store again.
    let _ = sweeper.await;
    if store.closed_reason().is_none() {
        store.flush().await?;
    }
    let s = &stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        received = get(&s.received),
        delivered = get(&s.delivered),
        failed = get(&s.failed),
        duplicates = get(&s.duplicates),
        unrouted = get(&s.unrouted),
        dead_lettered = get(&s.dead_lettered),
        retries_scheduled = get(&s.retries_scheduled),
        retried = get(&s.retried),
        parked = get(&s.parked),
        "courier stopped"
    );
    Ok(())
}

/// What the `dead-letters` commands need when no worker holds the store: the store opened by
/// this process, a sender and the routing table of `config`.
pub async fn open_for_commands(
    config: &Config,
) -> Result<(Arc<delivery::Deliverer>, Arc<router::Router>), Error> {
    install_crypto_provider();
    let store = Arc::new(store::Store::open(&config.store)?);
    let sender = sender::Sender::new(config)?;
    let dedup = dedup::Dedup::open(&config.store, store.clone(), &CancellationToken::new()).await?;
    let deliverer =
        delivery::Deliverer::new(config, sender, store, dedup, Arc::new(Stats::default()));
    Ok((
        Arc::new(deliverer),
        Arc::new(router::Router::new(&config.destinations)),
    ))
}

/// Returns once the store is open (at once, normally), trying to open it with backoff, or when
/// `stop` is cancelled.
async fn wait_for_store(store: &store::Store, stop: &CancellationToken) {
    let mut backoff =
        backoff::ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while let Some(reason) = store.closed_reason() {
        let closed = store::StoreError::Closed {
            path: store.path().to_string(),
            reason,
        };
        if store.recover(&closed, store.generation()).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Drops expired dedup entries at start and then every tenth of the TTL (at most hourly), until
/// `stop`.
async fn sweep_dedup(store: Arc<store::Store>, ttl: Duration, stop: CancellationToken) {
    let every = (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    while !stop.is_cancelled() {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.sweep_expired()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "expired dedup entries swept"),
            Ok(Err(error)) => tracing::warn!(%error, "dedup sweep failed; will try again"),
            Err(error) => tracing::warn!(%error, "dedup sweep task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => {}
        }
    }
}
