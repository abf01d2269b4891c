//! What this crate's unit tests build a worker's parts from: a configuration with destinations
//! over a store in a temporary directory, and events. No broker is connected to.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, Format};
use crate::delivery::Deliverer;
use crate::destination::Destinations;
use crate::event::{Event, Inbound, SourceKind};
use crate::stats::Stats;
use crate::store::Store;

/// A worker's parts without its sources.
pub(crate) struct Parts {
    pub config: Config,
    pub store: Store,
    pub stats: Arc<Stats>,
    pub deliverer: Arc<Deliverer>,
    pub destinations: Arc<Destinations>,
}

/// The parts of a worker whose store is in `dir` and whose destinations are `destinations`
/// (`[[destinations]]` tables in TOML).
pub(crate) fn parts(dir: &Path, destinations: &str) -> Parts {
    crate::install_crypto_provider();
    let config = Config::from_toml(&format!(
        "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n[store]\npath = {:?}\n{destinations}",
        dir.join("store")
    ))
    .expect("config");
    let store = Store::start(&config.store).expect("store");
    let stats = Arc::new(Stats::default());
    let deliverer = Arc::new(Deliverer::new(store.clone(), stats.clone()));
    let destinations = Arc::new(Destinations::from_config(&config, &stats).expect("destinations"));
    Parts {
        config,
        store,
        stats,
        deliverer,
        destinations,
    }
}

/// A message as a source hands it over.
pub(crate) fn inbound(body: &str, topic: &str) -> Inbound {
    Inbound {
        source: SourceKind::Rabbitmq,
        format: Format::Auto,
        body: bytes::Bytes::from(body.to_string()),
        topic: topic.to_string(),
        message_id: None,
        headers: Vec::new(),
        received_at: SystemTime::now(),
        properties: None,
        expiry: None,
    }
}

/// The event `id` on topic `t`, with empty data.
pub(crate) fn event(id: &str) -> Event {
    let body = format!(r#"{{"id":"{id}","topic":"t","data":{{}}}}"#);
    crate::event::parse(&inbound(&body, "t"), 1 << 20).expect("event")
}
