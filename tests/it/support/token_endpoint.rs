//! An OAuth2 token endpoint on 127.0.0.1 for the tests: the client credentials grant of RFC 6749
//! section 4.4, with the client authenticating by HTTP Basic or in the form body (section
//! 2.3.1), answering as sections 5.1 and 5.2 say. It counts the grants and the refusals, and it
//! can be taken down and brought back on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

/// How the client must authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Basic,
    Body,
}

struct EndpointState {
    client_id: String,
    client_secret: Mutex<String>,
    auth: ClientAuth,
    /// `expires_in` of the tokens; `None` leaves it out.
    expires_in: Mutex<Option<u64>>,
    /// Every token is `<prefix><n>`, n counting the grants from 1.
    token_prefix: String,
    grants: AtomicUsize,
    refusals: AtomicUsize,
    /// When each grant was answered.
    grant_times: Mutex<Vec<Instant>>,
    /// The form parameters of the last grant.
    last_form: Mutex<Vec<(String, String)>>,
    delay_ms: AtomicU64,
}

/// A token endpoint for one client.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<EndpointState>,
    server: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
}

impl TokenEndpoint {
    /// Accepts the client `client_id` with `client_secret`, authenticating the `auth` way; its
    /// tokens are `tok-1`, `tok-2`, ... and live an hour.
    pub async fn start(client_id: &str, client_secret: &str, auth: ClientAuth) -> TokenEndpoint {
        Self::start_with_prefix(client_id, client_secret, auth, "tok-").await
    }

    /// As [`TokenEndpoint::start`], with tokens `<prefix>1`, `<prefix>2`, ...
    pub async fn start_with_prefix(
        client_id: &str,
        client_secret: &str,
        auth: ClientAuth,
        prefix: &str,
    ) -> TokenEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token endpoint");
        let endpoint = TokenEndpoint {
            addr: listener.local_addr().expect("addr"),
            state: Arc::new(EndpointState {
                client_id: client_id.into(),
                client_secret: Mutex::new(client_secret.into()),
                auth,
                expires_in: Mutex::new(Some(3600)),
                token_prefix: prefix.into(),
                grants: AtomicUsize::new(0),
                refusals: AtomicUsize::new(0),
                grant_times: Mutex::new(Vec::new()),
                last_form: Mutex::new(Vec::new()),
                delay_ms: AtomicU64::new(0),
            }),
            server: Mutex::new(None),
        };
        endpoint.serve(listener);
        endpoint
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/token", axum::routing::post(grant))
            .with_state(self.state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        *self.server.lock().expect("lock") = Some((tx, task));
    }

    /// The `token_url`.
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Takes the endpoint down: the port refuses connections until [`TokenEndpoint::restart`].
    pub async fn stop(&self) {
        let server = self.server.lock().expect("lock").take();
        if let Some((tx, task)) = server {
            let _ = tx.send(());
            // Graceful: idle keep-alive connections are closed too.
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the token endpoint's port again");
        self.serve(listener);
    }

    /// Tokens live this long from now on (`None`: the answer has no `expires_in`).
    pub fn set_expires_in(&self, secs: Option<u64>) {
        *self.state.expires_in.lock().expect("lock") = secs;
    }

    /// The secret the endpoint accepts from now on.
    pub fn set_secret(&self, secret: &str) {
        *self.state.client_secret.lock().expect("lock") = secret.into();
    }

    /// Answers take this long from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Tokens handed out.
    pub fn grants(&self) -> usize {
        self.state.grants.load(Ordering::SeqCst)
    }

    /// Requests refused (a client that did not authenticate, or not the configured way).
    pub fn refusals(&self) -> usize {
        self.state.refusals.load(Ordering::SeqCst)
    }

    /// When each token was handed out.
    pub fn grant_times(&self) -> Vec<Instant> {
        self.state.grant_times.lock().expect("lock").clone()
    }

    /// The form parameters of the last token handed out.
    pub fn last_form(&self) -> Vec<(String, String)> {
        self.state.last_form.lock().expect("lock").clone()
    }
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form(text: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://form.invalid/?{text}"))
        .map(|url| url.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": code, "error_description": description })),
    )
        .into_response()
}

async fn grant(
    State(state): State<Arc<EndpointState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let params = form(&String::from_utf8_lossy(&body));
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let form_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if form_type != "application/x-www-form-urlencoded"
        || param("grant_type").as_deref() != Some("client_credentials")
    {
        state.refusals.fetch_add(1, Ordering::SeqCst);
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "want a client_credentials form",
        );
    }
    // Section 2.3.1: the id and the secret are form-encoded, then joined by ':' for Basic.
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            let decoded = form(&format!("id={id}&secret={secret}"));
            Some((decoded.first()?.1.clone(), decoded.get(1)?.1.clone()))
        });
    let in_body = match (param("client_id"), param("client_secret")) {
        (Some(id), Some(secret)) => Some((id, secret)),
        _ => None,
    };
    let presented = match state.auth {
        ClientAuth::Basic if in_body.is_none() => basic,
        ClientAuth::Body if basic.is_none() => in_body,
        _ => None,
    };
    let secret = state.client_secret.lock().expect("lock").clone();
    if presented != Some((state.client_id.clone(), secret)) {
        state.refusals.fetch_add(1, Ordering::SeqCst);
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let n = state.grants.fetch_add(1, Ordering::SeqCst) + 1;
    state.grant_times.lock().expect("lock").push(Instant::now());
    *state.last_form.lock().expect("lock") = params;
    let mut answer = serde_json::json!({
        "access_token": format!("{}{n}", state.token_prefix),
        "token_type": "Bearer",
    });
    if let Some(secs) = *state.expires_in.lock().expect("lock") {
        answer["expires_in"] = secs.into();
    }
    ([("cache-control", "no-store")], axum::Json(answer)).into_response()
}
