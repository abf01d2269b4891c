//! courier: consumes events from RabbitMQ and MQTT, routes each by topic to the partner endpoints
//! that subscribed to it, POSTs it with the exact REST contract, and acks only after the POST was
//! attempted and its outcome stored. The one exception: an event for a destination that cannot
//! take it now (its circuit is open) is written to the retry store, durably, and acked without
//! an attempt.
//!
//! Data flows one way: [`sources`] → [`event`] → [`router`] → [`sender`] → [`store`] → ack, glued
//! by [`pipeline`]. [`run`] wires it all so tests and the binary start courier the same way;
//! docs/architecture.md maps every behaviour to its file.

pub mod admin;
pub mod backoff;
pub mod circuit;
pub mod config;
pub mod deadletters;
pub mod delivery;
pub mod destination;
pub mod event;
pub mod http_client;
pub mod http_pool;
pub mod oauth2;
pub mod pipeline;
pub mod prehashed;
pub mod properties;
pub mod ratelimit;
pub mod reload;
pub mod retry;
pub mod router;
pub mod sender;
pub mod shutdown;
pub mod signature;
pub mod sources;
pub mod stats;
pub mod status;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod topic;
pub mod trace;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use config::{Config, ConfigError};
pub use shutdown::Shutdown;
pub use stats::Stats;

use delivery::Deliverer;
use destination::Destinations;
use sources::supervisor::Sources;
use store::Store;

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
    Sender(#[from] http_client::SenderError),
    /// TLS for a broker connection could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    /// The span exporter could not be built.
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    /// The admin port could not be opened.
    #[error("admin.listen {address}: {source}")]
    Admin {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// The error and its causes on one line: "error sending request: ... : invalid peer certificate: UnknownIssuer".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Makes ring the process-wide rustls provider (lapin, reqwest and rumqttc all use rustls);
/// calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs courier until `shutdown` is requested, then drains in-flight deliveries (up to
/// `service.shutdown_timeout`), flushes the store and returns.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    run_with_stats(config, shutdown, Arc::new(Stats::default())).await
}

/// [`run`], counting into `stats` so the caller can watch progress.
pub async fn run_with_stats(
    config: Config,
    shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), Error> {
    run_from(config, None, shutdown, stats).await
}

/// [`run_with_stats`] with `config`, loaded from the file at `path`, which is loaded again on
/// SIGHUP and when it changes ([`reload`]). What `courier run` does.
pub async fn run_reloading(
    config: Config,
    path: &std::path::Path,
    shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), Error> {
    // What the file said when `config` was loaded; a change event that leaves it as it is
    // reloads nothing.
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    // SIGHUP's default action ends the process. The reload task listens for it only once the
    // start is done, which can take as long as the store or Redis is unavailable; listening now
    // keeps a SIGHUP sent meanwhile from stopping courier (tokio keeps its handler installed).
    #[cfg(unix)]
    if let Err(error) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracing::warn!(%error, "cannot listen for SIGHUP; a SIGHUP stops courier");
    }
    run_from(config, Some((path.to_path_buf(), text)), shutdown, stats).await
}

async fn run_from(
    config: Config,
    file: Option<(std::path::PathBuf, String)>,
    shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), Error> {
    install_crypto_provider();
    let store = Store::start(&config.store)?;
    store.cap_deferred(config.service.max_in_flight);
    let ran = run_on(config, file, store.clone(), shutdown, stats).await;
    // Also after a failed start: the store's background tasks hold it open until it is closed,
    // and sled releases its file lock only then.
    let closed = store.close().await;
    ran?;
    closed?;
    Ok(())
}

/// Everything of [`run_with_stats`] between opening and closing the store.
async fn run_on(
    config: Config,
    file: Option<(std::path::PathBuf, String)>,
    store: Store,
    shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), Error> {
    // Everything that can fail is built before any task starts: a task holds the store, and an
    // early return would leave it running.
    let destinations = Arc::new(Destinations::from_config(&config, &stats)?);
    let mut sources = Sources::build(&config, stats.clone())?;
    let telemetry = telemetry::Telemetry::new(&config.tracing)?;
    let deliverer = Arc::new(Deliverer::with_telemetry(
        store.clone(),
        stats.clone(),
        telemetry,
    ));
    let max_in_flight = config.service.max_in_flight;
    let admin = match &config.admin.listen {
        Some(address) => Some(
            admin::start(
                &config.admin,
                address,
                deliverer.clone(),
                destinations.clone(),
                shutdown.clone(),
                config.service.shutdown_timeout,
            )
            .await
            .map_err(|source| Error::Admin {
                address: address.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let pipeline = Arc::new(pipeline::Pipeline::new(
        destinations.clone(),
        deliverer.clone(),
        config.service.max_payload_bytes,
        stats.clone(),
    ));
    // A worker that cannot store an outcome must not take messages, nor retries, it would only
    // hold hostage (a rolling restart's new process waits here for the old one's lock, and any
    // worker for the Redis of its dedup record).
    store.wait_open(&shutdown).await;
    let scheduler = tokio::spawn(retry::run(
        deliverer.clone(),
        destinations.clone(),
        max_in_flight,
        shutdown.clone(),
        config.service.shutdown_timeout,
    ));

    let (tx, rx) = mpsc::channel(max_in_flight.clamp(1, 1024));
    sources.start(&tx, &shutdown);
    let sources = Arc::new(tokio::sync::Mutex::new(sources));
    let reloading = file.map(|(path, text)| {
        tokio::spawn(reload::run(
            path,
            text,
            config.clone(),
            reload::Running {
                destinations,
                sources: sources.clone(),
                admin: admin.as_ref().map(|(_, access)| access.clone()),
                tx,
                store: store.clone(),
                stats: stats.clone(),
                shutdown: shutdown.clone(),
            },
        ))
    });
    tracing::info!(
        destinations = config.destinations.len(),
        max_in_flight,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "courier started"
    );

    // On a worker thread of its own task, not wherever this future is polled: the binary's
    // `block_on` polls it on the main thread, and each message would then cross one more
    // thread on its way from the source to its task.
    let taking = tokio::spawn(pipeline.run(
        rx,
        shutdown.clone(),
        max_in_flight,
        config.service.shutdown_timeout,
    ));
    match taking.await {
        Ok(()) => {}
        // A bug in the loop itself (the event tasks catch their own panics): fail loudly rather
        // than wait for a shutdown nobody will signal.
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: only when the runtime itself is shutting down.
        Err(error) => tracing::warn!(%error, "the pipeline task was cancelled"),
    }
    // Every message is now acked or abandoned: the sources may close their connections.
    shutdown.mark_drained();
    let _ = scheduler.await;
    if let Some((served, _)) = admin {
        let _ = served.await;
    }
    // The reload task holds the sources while it replaces one; it ends at the stop request.
    if let Some(reloading) = reloading {
        let _ = reloading.await;
    }
    match Arc::try_unwrap(sources) {
        Ok(sources) => sources.into_inner().join(Duration::from_secs(10)).await,
        Err(_) => tracing::warn!("the sources are still held; exiting without waiting for them"),
    }
    // Every attempt has ended its span.
    deliverer.telemetry().shutdown().await;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    tracing::info!(
        received = get(&stats.received),
        delivered = get(&stats.delivered),
        failed = get(&stats.failed),
        duplicates = get(&stats.duplicates),
        unrouted = get(&stats.unrouted),
        dead_lettered = get(&stats.dead_lettered),
        retries_scheduled = get(&stats.retries_scheduled),
        retried = get(&stats.retried),
        parked = get(&stats.parked),
        "courier stopped"
    );
    Ok(())
}

/// What the `dead-letters` commands need when no worker holds the store: the store, opened by
/// this process, and a deliverer and the destinations of `config` to replay through.
pub async fn open_for_commands(
    config: &Config,
) -> Result<(Arc<Deliverer>, Arc<Destinations>), Error> {
    install_crypto_provider();
    let store = Store::open(&config.store)?;
    let stats = Arc::new(Stats::default());
    let destinations = Destinations::from_config(config, &stats)?;
    let telemetry = telemetry::Telemetry::new(&config.tracing)?;
    Ok((
        Arc::new(Deliverer::with_telemetry(store, stats, telemetry)),
        Arc::new(destinations),
    ))
}
