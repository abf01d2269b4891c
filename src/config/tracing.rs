//! `[tracing]`: where the spans of delivery attempts go, and whether courier starts traces.

use std::collections::BTreeMap;

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::{redact_url, ConfigError, Secret};

/// The OTLP/HTTP path of the traces signal, appended to a base endpoint.
const TRACES_PATH: &str = "v1/traces";

/// Trace context and span export.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/HTTP collector, as in `OTEL_EXPORTER_OTLP_ENDPOINT`: a base URL
    /// (`http://collector:4318`) gets `v1/traces` appended to its path; a URL whose path already
    /// ends in `/v1/traces` is used as it is. Absent: no span is exported, and an attempt costs
    /// no span at all.
    pub otlp_endpoint: Option<String>,
    /// Whether an event that arrives without a valid `traceparent` starts a new trace. When
    /// false, such an event is POSTed without `traceparent`.
    pub start_traces: bool,
    /// The `service.name` resource attribute of the exported spans.
    pub service_name: String,
    /// Headers sent with every export request (a collector's API key); values are secrets.
    pub headers: BTreeMap<String, Secret>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            start_traces: false,
            service_name: "courier".to_string(),
            headers: BTreeMap::new(),
        }
    }
}

impl TracingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            traces_url(endpoint).map_err(|e| ConfigError::invalid("tracing.otlp_endpoint", e))?;
        }
        if self.service_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        if !self.headers.is_empty() && self.otlp_endpoint.is_none() {
            return Err(ConfigError::invalid(
                "tracing.headers",
                "are set, but tracing.otlp_endpoint is not: there is no export to send them with",
            ));
        }
        for (name, value) in &self.headers {
            let key = format!("tracing.headers.{name}");
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::invalid(&key, format!("{name:?} is not a valid HTTP header name"))
            })?;
            HeaderValue::from_str(value.expose()).map_err(|_| {
                ConfigError::invalid(
                    &key,
                    "value contains characters that are not allowed in an HTTP header",
                )
            })?;
        }
        Ok(())
    }

    /// The URL export requests are POSTed to, when there is an endpoint.
    pub fn traces_url(&self) -> Option<String> {
        self.otlp_endpoint
            .as_deref()
            .and_then(|e| traces_url(e).ok())
    }
}

/// `endpoint` with the traces path, as the OpenTelemetry exporters read
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; or why it cannot be one.
fn traces_url(endpoint: &str) -> Result<String, String> {
    let shown = redact_url(endpoint);
    let mut url = reqwest::Url::parse(endpoint).map_err(|e| format!("{shown:?}: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "{shown:?} is not an http:// or https:// URL (courier exports OTLP over HTTP, port 4318 by convention; gRPC is not supported)"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{shown:?}: put credentials in tracing.headers, not in the URL"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{shown:?} must have no query or fragment"));
    }
    if !url.path().trim_end_matches('/').ends_with("/v1/traces") {
        let path = format!("{}/{TRACES_PATH}", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_follows_the_otlp_convention() {
        let url = |e: &str| traces_url(e).expect(e);
        assert_eq!(url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(url("https://c/otlp"), "https://c/otlp/v1/traces");
        assert_eq!(url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert!(traces_url("grpc://c:4317").is_err());
        assert!(traces_url("http://u:p@c:4318").is_err());
        assert!(traces_url("c:4318").is_err());
    }

    #[test]
    fn collector_headers_do_not_debug_print() {
        let config = TracingConfig {
            otlp_endpoint: Some("http://c:4318".into()),
            headers: [("x-api-key".to_string(), Secret::new("hunter2"))].into(),
            ..TracingConfig::default()
        };
        assert!(config.validate().is_ok());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("x-api-key"),
            "{shown}"
        );
    }
}
