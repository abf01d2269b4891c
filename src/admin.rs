//! The admin HTTP port (`[admin] listen`): `/healthz` (the process is alive), `/readyz` (every
//! source connected and the store working), `/metrics` (Prometheus), and the dead-letter commands
//! of a running worker (sled lets one process open a store, so `courier dead-letters` talks to the
//! worker here).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;

use crate::deadletters::{self, Filter, ReplayOptions};
use crate::delivery::Deliverer;
use crate::destination::Destinations;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct AdminState {
    deliverer: Arc<Deliverer>,
    destinations: Arc<Destinations>,
}

/// Binds `listen` now (so a taken port fails start-up) and serves until the stop is requested.
pub async fn start(
    listen: &str,
    deliverer: Arc<Deliverer>,
    destinations: Arc<Destinations>,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "admin port listening");
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay))
        .route("/dead-letters/purge", post(purge))
        .with_state(AdminState {
            deliverer,
            destinations,
        });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.requested().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin port stopped");
        }
    }))
}

async fn ready(State(s): State<AdminState>) -> Response {
    let mut reasons = s.deliverer.stats().not_ready_reasons();
    reasons.extend(s.deliverer.store().not_ready_reasons());
    if reasons.is_empty() {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "reasons": reasons })),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;

    use crate::stats::DestinationLabel;
    let mut registry = s.deliverer.stats().registry();
    let store = s.deliverer.store();
    // Counted at scrape time; sled counts by walking the tree, which is fine at scrape rates.
    let pending: Gauge = Gauge::default();
    pending.set(store.pending_retries() as i64);
    registry.register(
        "retries_pending",
        "Attempts waiting in the retry store",
        pending,
    );
    let dead: Gauge = Gauge::default();
    dead.set(store.dead_letter_count() as i64);
    registry.register("dead_letters", "Dead letters kept in the store", dead);
    let open: Gauge = Gauge::default();
    open.set(
        s.destinations
            .current()
            .iter()
            .filter(|d| d.circuit().is_open())
            .count() as i64,
    );
    registry.register("circuits_open", "Destinations whose circuit is open", open);
    let rates: Family<DestinationLabel, Gauge<f64, AtomicU64>> = Family::default();
    let now = std::time::Instant::now();
    for dest in s.destinations.current().iter() {
        if let Some(limiter) = dest.rate_limit() {
            rates
                .get_or_create(&DestinationLabel {
                    destination: dest.id().to_string(),
                })
                .set(limiter.current_rate(now));
        }
    }
    registry.register(
        "rate_limit_requests_per_second",
        "The rate a rate-limited destination is held to now (below its configured rate after 429s)",
        rates,
    );
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn store_error(e: crate::store::StoreError) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

async fn list(State(s): State<AdminState>, Query(filter): Query<Filter>) -> Response {
    match deadletters::list(&s.deliverer, &filter) {
        Ok(letters) => Json(letters).into_response(),
        Err(e) => store_error(e),
    }
}

async fn replay(
    State(s): State<AdminState>,
    Query(filter): Query<Filter>,
    Query(options): Query<ReplayOptions>,
) -> Response {
    match deadletters::replay(&s.deliverer, &s.destinations.current(), &filter, options).await {
        Ok(results) => Json(results).into_response(),
        Err(e) => store_error(e),
    }
}

async fn purge(State(s): State<AdminState>, Query(filter): Query<Filter>) -> Response {
    match deadletters::purge(&s.deliverer, &filter).await {
        Ok(n) => Json(serde_json::json!({ "purged": n })).into_response(),
        Err(e) => store_error(e),
    }
}
