//! The admin HTTP port (`[admin] listen`): `/healthz` (the process is alive), `/readyz` (every
//! source connected, the store working, and no destination whose OAuth2 client the token endpoint
//! refuses), `/metrics` (Prometheus), and the dead-letter commands of a running worker (sled lets
//! one process open a store, so `courier dead-letters` talks to the worker here).
//!
//! Probes and scrapers reach the first three from anywhere. The dead-letter endpoints list partner
//! data and change the store, so they need `Authorization: Bearer <[admin] token>`, or, without a
//! token, a loopback listen address (where only this machine reaches them).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::deadletters::{self, Filter, ReplayQuery};
use crate::delivery::Deliverer;
use crate::destination::Destinations;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct AdminState {
    deliverer: Arc<Deliverer>,
    destinations: Arc<Destinations>,
    /// Cancelled when the shutdown timeout ends: a replay still under way stops then. Each
    /// connection is a task of its own, which stopping the server's accept loop leaves running.
    cut: CancellationToken,
}

/// Who may use the dead-letter endpoints of a running admin port; a configuration reload
/// changes it when `[admin] token` changes.
#[derive(Clone)]
pub struct AdminAccess(Arc<std::sync::RwLock<Access>>);

impl AdminAccess {
    fn new(config: &AdminConfig) -> AdminAccess {
        AdminAccess(Arc::new(std::sync::RwLock::new(Access::of(config))))
    }

    /// Puts the rule of `config` in force for the next request.
    pub fn set(&self, config: &AdminConfig) {
        let access = Access::of(config);
        access.warn_if_refused(config.listen.as_deref().unwrap_or_default());
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = access;
    }
}

/// Binds `[admin] listen` now (so a taken port fails start-up) and serves until the stop is
/// requested, and the requests under way then for at most `shutdown_timeout`.
pub async fn start(
    config: &AdminConfig,
    listen: &str,
    deliverer: Arc<Deliverer>,
    destinations: Arc<Destinations>,
    shutdown: Shutdown,
    shutdown_timeout: Duration,
) -> std::io::Result<(tokio::task::JoinHandle<()>, AdminAccess)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "admin port listening");
    let access = AdminAccess::new(config);
    access
        .0
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .warn_if_refused(listen);
    let cut = CancellationToken::new();
    let dead_letters = axum::Router::new()
        .route("/dead-letters", get(list))
        .route("/dead-letters/replay", post(replay))
        .route("/dead-letters/purge", post(purge))
        .route_layer(middleware::from_fn_with_state(access.clone(), authorize));
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(dead_letters)
        .with_state(AdminState {
            deliverer,
            destinations,
            cut: cut.clone(),
        });
    let grace = shutdown.clone();
    let served = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.requested().await });
        let served = std::future::IntoFuture::into_future(served);
        // A graceful stop waits for the requests under way, and a replay through this port can
        // take long (it waits for each destination's rate limit and slots): it gets the
        // shutdown timeout, as deliveries do. Dropping its attempt keeps the letter.
        let deadline = async {
            grace.requested().await;
            tokio::time::sleep(shutdown_timeout).await;
        };
        tokio::select! {
            served = served => if let Err(error) = served {
                tracing::error!(%error, "admin port stopped");
            },
            () = deadline => {
                tracing::warn!("a request to the admin port was still under way at the shutdown timeout; stopped it");
                cut.cancel();
            }
        }
    });
    Ok((served, access))
}

/// Who may use the dead-letter endpoints.
enum Access {
    /// Whoever sends this bearer token.
    Token(Vec<u8>),
    /// Anyone who can connect: the port listens on loopback only.
    Loopback,
    /// No one: the port is reachable from other machines and no token is set.
    Refused,
}

impl Access {
    fn of(config: &AdminConfig) -> Access {
        match &config.token {
            Some(token) => Access::Token(token.expose().as_bytes().to_vec()),
            None if config.is_loopback() => Access::Loopback,
            None => Access::Refused,
        }
    }

    fn warn_if_refused(&self, listen: &str) {
        if let Access::Refused = self {
            tracing::warn!(
                address = %listen,
                "the admin port listens beyond loopback without [admin] token: the dead-letter endpoints answer 403"
            );
        }
    }

    /// Why a request with these headers is refused, as the answer to send; `None` lets it in.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        match self {
            Access::Loopback => from_a_browser(headers).then(|| {
                (
                    StatusCode::FORBIDDEN,
                    "the dead-letter endpoints on a loopback admin port without a token do not \
                     answer browsers (an Origin header, or a Host that is not a loopback address): \
                     use courier dead-letters or curl, or set [admin] token\n",
                )
                    .into_response()
            }),
            Access::Refused => Some(
                (
                    StatusCode::FORBIDDEN,
                    "the dead-letter endpoints need a token when the admin port listens beyond \
                 loopback: set [admin] token (for example token = \"${COURIER_ADMIN_TOKEN}\") and \
                 send Authorization: Bearer <token>\n",
                )
                    .into_response(),
            ),
            Access::Token(want) => {
                use subtle::ConstantTimeEq as _;
                // The scheme's name is case-insensitive (RFC 9110 section 11.1).
                let given = headers
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes())
                    .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
                    .map(|v| &v[7..])
                    .unwrap_or_default();
                // Compared in constant time, so the answer's timing does not reveal how much of
                // a guess was right; as hashes, so it does not reveal the token's length either.
                let digest = |bytes: &[u8]| -> [u8; 32] { sha2::Sha256::digest(bytes).into() };
                if bool::from(digest(given).ct_eq(&digest(want))) {
                    None
                } else {
                    Some(
                        (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Bearer")],
                            "missing or wrong Authorization: Bearer token ([admin] token)\n",
                        )
                            .into_response(),
                    )
                }
            }
        }
    }
}

/// Whether a request may come from a web page rather than from a command on this machine. On a
/// loopback port without a token, anything that runs on the machine may use the dead-letter
/// endpoints, and a browser runs the pages of any site: a page may POST to 127.0.0.1 (browsers
/// then send `Origin`), or have its own name resolve to 127.0.0.1 (DNS rebinding, which leaves
/// that name in `Host`). `courier dead-letters` and curl send neither.
fn from_a_browser(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::ORIGIN) {
        return true;
    }
    let Some(host) = headers.get(header::HOST) else {
        return false;
    };
    let Ok(host) = host.to_str() else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        // [::1]:9464
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

async fn authorize(State(access): State<AdminAccess>, request: Request, next: Next) -> Response {
    let refused = access
        .0
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .refusal(request.headers());
    match refused {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

async fn ready(State(s): State<AdminState>) -> Response {
    let mut reasons = s.deliverer.stats().not_ready_reasons();
    reasons.extend(s.deliverer.store().not_ready_reasons());
    reasons.extend(
        s.destinations
            .current()
            .iter()
            .filter_map(|d| d.not_ready_reason()),
    );
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
    // The store keeps these counts as it writes (src/store/counts.rs): no tree is walked here.
    let pending: Gauge = Gauge::default();
    pending.set(store.pending_retries() as i64);
    registry.register(
        "retries_pending",
        "Attempts waiting in the retry store",
        pending,
    );
    let by_destination: prometheus_client::metrics::family::Family<
        crate::stats::DestinationLabel,
        Gauge,
    > = Default::default();
    for (destination, n) in store.pending_retries_by_destination().unwrap_or_default() {
        by_destination
            .get_or_create(&crate::stats::DestinationLabel { destination })
            .set(n as i64);
    }
    registry.register(
        "retries_pending_by_destination",
        "Attempts waiting in the retry store, per destination (also of destinations a reload removed, which keep them until they come back)",
        by_destination,
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

/// `503` while the store is closed or keeps failing (try again once `/readyz` says ready);
/// `500` for anything else.
fn store_error(e: crate::store::StoreError) -> Response {
    use crate::store::StoreError;
    let status = match e {
        StoreError::Closed { .. } | StoreError::Failing { .. } | StoreError::Locked { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, e.to_string()).into_response()
}

/// How many letters `GET /dead-letters` answers when the request gives no `limit`.
pub const LIST_PAGE: usize = 1_000;

/// The largest `limit` `GET /dead-letters` takes: a page is built in memory, and a dead-letter
/// tree can hold far more letters than the worker should hold at once.
pub const LIST_PAGE_MAX: usize = 10_000;

/// One page of the matching letters; when it is full, `Link: <...>; rel="next"` gives the
/// request for the next one.
async fn list(State(s): State<AdminState>, Query(mut filter): Query<Filter>) -> Response {
    let limit = filter.limit.unwrap_or(LIST_PAGE);
    if limit > LIST_PAGE_MAX {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "limit: at most {LIST_PAGE_MAX} letters a page; ask for the next page with \
                 after=<the last key of this one>\n"
            ),
        )
            .into_response();
    }
    filter.limit = Some(limit);
    // Off the runtime's threads: a filter that matches few letters reads many to fill a page.
    let deliverer = s.deliverer.clone();
    let page = filter.clone();
    let listed = tokio::task::spawn_blocking(move || deadletters::list(&deliverer, &page)).await;
    let letters = match listed {
        Ok(Ok(letters)) => letters,
        Ok(Err(e)) => return store_error(e),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing dead letters failed: {e}\n"),
            )
                .into_response()
        }
    };
    let mut response = Json(&letters).into_response();
    if let Some(last) = letters.last().filter(|_| letters.len() == limit) {
        filter.after = last.key.parse().ok();
        let link = serde_urlencoded::to_string(&filter).ok().and_then(|query| {
            format!("</dead-letters?{query}>; rel=\"next\"")
                .parse()
                .ok()
        });
        if let Some(link) = link {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    response
}

async fn replay(State(s): State<AdminState>, Query(query): Query<ReplayQuery>) -> Response {
    let (filter, options) = query.split();
    let replayed = deadletters::replay(&s.deliverer, &s.destinations, &filter, options);
    // Dropping the replay at a stop keeps the letters it has not replayed yet.
    let replayed = tokio::select! {
        replayed = replayed => replayed,
        () = s.cut.cancelled() => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "courier is stopping: the replay stopped; the letters not replayed yet stay\n",
            )
                .into_response()
        }
    };
    match replayed {
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
