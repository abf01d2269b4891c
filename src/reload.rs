//! Configuration reload: on SIGHUP, or when the configuration file changes (a Kubernetes
//! ConfigMap update swaps a symlink in the file's directory, so the directory is watched), the
//! file is loaded and validated again and, when it is valid, put in force without a restart.
//!
//! - Destinations: a new set (and its routing table) replaces the old one at once; unchanged
//!   destinations are kept as they are, new and changed ones are built afresh. An event routed
//!   before keeps its set, so requests under way finish on their old settings. A removed
//!   destination takes no new event; its pending retries and dead letters stay in the store
//!   and resume when it comes back.
//! - Sources: a changed `[rabbitmq]` or `[mqtt]` section reconnects that source only.
//! - `[admin] token` changes at once.
//! - `[store]`, `[service]`, `[admin] listen` and `[tracing]` are fixed at start: a file that
//!   changes them is refused as a whole, with a log line naming the key. (`[tracing]` owns the
//!   span exporter's thread and its batch of spans not yet sent; replacing it under way could
//!   lose them.)
//!
//! An invalid file changes nothing: courier logs why and keeps running on the configuration in
//! force. Every outcome is counted in `courier_config_reload_total{result}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::admin::AdminAccess;
use crate::config::Config;
use crate::destination::{self, Destinations};
use crate::shutdown::Shutdown;
use crate::sources::supervisor::Sources;
use crate::sources::Delivery;
use crate::stats::Stats;
use crate::store::Store;

/// Changes of the file closer together than this are taken as one.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// How often the file is read again without a change event: an event can be missed (a watched
/// directory that a ConfigMap swap replaced, a file that is a symlink elsewhere).
const RECHECK: Duration = Duration::from_secs(10);

/// How soon a reload that did not load or could not be set up is tried again, doubling up to
/// [`RETRY_MAX`]: what it needs may come later without the file changing (a Secret volume
/// with a new TLS file, updated apart from the ConfigMap).
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    /// A key that needs a restart changed: trying again cannot help.
    Refused,
    /// The file did not load, or what it names could not be set up.
    Failed,
}

/// What made courier look at the file again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: the file is loaded again even if it did not change, as an operator who sends it
    /// expects.
    Signal,
    /// Something changed in the file's directory: loaded only if the file's text changed.
    FileChanged,
    /// The periodic look ([`RECHECK`]), or the time to try a failed reload again.
    Timer,
}

/// What a reload acts on.
pub(crate) struct Running {
    pub destinations: Arc<Destinations>,
    pub sources: Arc<tokio::sync::Mutex<Sources>>,
    pub admin: Option<AdminAccess>,
    pub tx: mpsc::Sender<Delivery>,
    pub store: Store,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

/// Watches `path` and SIGHUP until the stop is requested, and puts each valid new version of the
/// file in force over `config`, the one courier started with from `text`.
pub(crate) async fn run(path: PathBuf, text: String, config: Config, running: Running) {
    let (triggers_tx, mut triggers) = mpsc::unbounded_channel();
    // Kept alive for as long as this runs: dropping it stops the watching.
    let _watcher = match watch_directory(&path, triggers_tx.clone()) {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot watch the configuration file; reload with SIGHUP");
            None
        }
    };
    #[cfg(unix)]
    let signals = tokio::spawn(forward_sighup(
        triggers_tx.clone(),
        running.shutdown.clone(),
    ));
    // The file may have changed while courier was starting (waiting for its store or Redis),
    // before anything watched it: compared once now, and loaded if it did.
    let _ = triggers_tx.send(Trigger::FileChanged);
    let mut current = config;
    let mut last_text = text;
    // When the last reload that failed is tried again, and the wait after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let tick = retry.map_or(RECHECK, |(at, _)| {
            at.saturating_duration_since(tokio::time::Instant::now())
                .min(RECHECK)
        });
        let trigger = tokio::select! {
            t = triggers.recv() => t,
            () = tokio::time::sleep(tick) => Some(Trigger::Timer),
            _ = running.shutdown.requested() => None,
        };
        let Some(mut trigger) = trigger else { break };
        // Let a burst of changes settle (an editor's save, a symlink swap), for at most ten
        // debounce periods.
        for _ in 0..10 {
            tokio::select! {
                more = tokio::time::timeout(DEBOUNCE, triggers.recv()) => match more {
                    Ok(Some(t)) => if t == Trigger::Signal { trigger = t },
                    Ok(None) | Err(_) => break,
                },
                _ = running.shutdown.requested() => break,
            }
        }
        if running.shutdown.is_requested() {
            break;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) => {
                // Mid-swap, or removed: the next change brings it back.
                tracing::warn!(path = %path.display(), %error, "cannot read the configuration file; keeping the running configuration");
                continue;
            }
        };
        let retry_due = retry.is_some_and(|(at, _)| tokio::time::Instant::now() >= at);
        if text == last_text && trigger != Trigger::Signal && !retry_due {
            continue;
        }
        let changed = text != last_text;
        last_text = text;
        let outcome = match Config::load(&path) {
            Err(error) => {
                running.stats.reloaded("invalid");
                tracing::error!(path = %path.display(), %error, "configuration reload refused: the file is not valid; keeping the running configuration");
                Outcome::Failed
            }
            Ok(new) => {
                let outcome = apply(&current, &new, &running).await;
                if outcome == Outcome::Applied {
                    current = new;
                }
                outcome
            }
        };
        retry = match outcome {
            Outcome::Failed => {
                let wait = match retry {
                    Some((_, wait)) if !changed => (wait * 2).min(RETRY_MAX),
                    _ => RETRY_FIRST,
                };
                tracing::info!(retry_in = ?wait, "the configuration file is loaded again then, changed or not");
                Some((tokio::time::Instant::now() + wait, wait))
            }
            Outcome::Applied | Outcome::Refused => None,
        };
    }
    #[cfg(unix)]
    signals.abort();
}

/// Puts `new` in force over `current`.
async fn apply(current: &Config, new: &Config, running: &Running) -> Outcome {
    if let Some(key) = fixed_key_changed(current, new) {
        running.stats.reloaded("refused");
        tracing::error!(
            key,
            "configuration reload refused: {key} cannot change without a restart; keeping the running configuration"
        );
        return Outcome::Refused;
    }
    // Everything that can fail is built first, so a failure changes nothing.
    let mut sources = running.sources.lock().await;
    let replacement = match sources.prepare(new) {
        Ok(r) => r,
        Err(error) => {
            running.stats.reloaded("failed");
            tracing::error!(%error, "configuration reload failed; keeping the running configuration");
            return Outcome::Failed;
        }
    };
    let old_set = running.destinations.current();
    let (set, changes) = match destination::rebuild(Some(&old_set), new, &running.stats) {
        Ok(built) => built,
        Err(error) => {
            running.stats.reloaded("failed");
            tracing::error!(%error, "configuration reload failed; keeping the running configuration");
            return Outcome::Failed;
        }
    };
    running.destinations.replace(set);
    if let Some(admin) = &running.admin {
        admin.set(&new.admin);
    }
    let pending = running
        .store
        .pending_retries_by_destination()
        .unwrap_or_default();
    for name in &changes.removed {
        let retries = pending
            .iter()
            .find(|(d, _)| d == name)
            .map_or(0, |(_, n)| *n);
        tracing::warn!(
            destination = %name,
            retries,
            "destination removed: it takes no new event; its pending retries and dead letters stay in the store and resume if it comes back"
        );
    }
    tracing::info!(
        added = ?changes.added,
        changed = ?changes.changed,
        removed = ?changes.removed,
        sources_reconnect = replacement.changes_anything(),
        "configuration reloaded"
    );
    running.stats.reloaded("applied");
    sources
        .replace(
            replacement,
            &running.tx,
            &running.shutdown,
            current.service.shutdown_timeout,
        )
        .await;
    Outcome::Applied
}

/// The first key that only a restart can change, if `new` changes one.
fn fixed_key_changed(current: &Config, new: &Config) -> Option<&'static str> {
    let (a, b) = (&current.store, &new.store);
    let store = [
        ("store.path", a.path != b.path),
        ("store.dedup_ttl", a.dedup_ttl != b.dedup_ttl),
        ("store.cache_capacity", a.cache_capacity != b.cache_capacity),
        (
            "store.dedup_flush_interval",
            a.dedup_flush_interval != b.dedup_flush_interval,
        ),
        ("store.dedup", a.dedup != b.dedup),
        ("store.redis_url", a.redis_url != b.redis_url),
        ("store.redis_tls", a.redis_tls != b.redis_tls),
        ("store.redis_prefix", a.redis_prefix != b.redis_prefix),
    ];
    let (a, b) = (&current.service, &new.service);
    let service = [
        ("service.max_in_flight", a.max_in_flight != b.max_in_flight),
        (
            "service.worker_threads",
            a.worker_threads != b.worker_threads,
        ),
        (
            "service.shutdown_timeout",
            a.shutdown_timeout != b.shutdown_timeout,
        ),
        (
            "service.max_payload_bytes",
            a.max_payload_bytes != b.max_payload_bytes,
        ),
    ];
    let admin = [("admin.listen", current.admin.listen != new.admin.listen)];
    let (a, b) = (&current.tracing, &new.tracing);
    let tracing = [
        ("tracing.otlp_endpoint", a.otlp_endpoint != b.otlp_endpoint),
        ("tracing.start_traces", a.start_traces != b.start_traces),
        ("tracing.service_name", a.service_name != b.service_name),
        ("tracing.headers", a.headers != b.headers),
    ];
    store
        .into_iter()
        .chain(service)
        .chain(admin)
        .chain(tracing)
        .find_map(|(key, changed)| changed.then_some(key))
}

/// Watches the directory of `path` (not the file: a ConfigMap update replaces a symlink in the
/// directory, and an editor may replace the file) and reports the changes that can concern the
/// file: to its own name, or to the `..data` links a ConfigMap volume swaps.
fn watch_directory(
    path: &Path,
    triggers: mpsc::UnboundedSender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let concerns = move |changed: &Path| {
        changed
            .file_name()
            .is_some_and(|n| Some(n) == name.as_deref() || n.to_string_lossy().starts_with(".."))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !event.kind.is_access() && event.paths.iter().any(|p| concerns(p)) {
                let _ = triggers.send(Trigger::FileChanged);
            }
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(unix)]
async fn forward_sighup(triggers: mpsc::UnboundedSender<Trigger>, shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; the configuration reloads when its file changes");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hangups.recv() => {
                if got.is_none() || triggers.send(Trigger::Signal).is_err() {
                    return;
                }
                tracing::info!("SIGHUP: loading the configuration file again");
            }
            _ = shutdown.requested() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "{extra}[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n\
             [[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1/a\"\n"
        ))
        .expect("config")
    }

    #[test]
    fn fixed_keys_are_named() {
        let base = config("");
        assert_eq!(fixed_key_changed(&base, &config("")), None);
        assert_eq!(
            fixed_key_changed(&base, &config("[store]\npath = \"elsewhere\"\n")),
            Some("store.path")
        );
        assert_eq!(
            fixed_key_changed(&base, &config("[service]\nmax_in_flight = 7\n")),
            Some("service.max_in_flight")
        );
        assert_eq!(
            fixed_key_changed(&base, &config("[admin]\nlisten = \"127.0.0.1:9\"\n")),
            Some("admin.listen")
        );
        assert_eq!(
            fixed_key_changed(&base, &config("[tracing]\nstart_traces = true\n")),
            Some("tracing.start_traces")
        );
        assert_eq!(
            fixed_key_changed(&base, &config("[organization]\nname = \"x\"\n")),
            None,
            "the organization is in the destinations, which a reload rebuilds"
        );
    }
}
