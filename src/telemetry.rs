//! The trace side of a delivery attempt: the `traceparent` its POST carries and, with
//! `[tracing] otlp_endpoint`, the span it exports over OTLP/HTTP.
//!
//! Without an endpoint there is no OpenTelemetry pipeline at all: an attempt of an event that
//! came with a trace costs one random span id and one header; an attempt of an event without
//! one costs a branch. With one, each attempt that POSTs is a `courier.deliver` span (kind
//! client) of the event's trace, batched by the SDK on a thread of its own and flushed at
//! shutdown. Spans of unsampled traces (flags `00`) get a span id for the `traceparent` and are
//! not exported, as parent-based sampling asks.

use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use reqwest::header::HeaderValue;

use crate::config::TracingConfig;
use crate::delivery::Settled;
use crate::event::Event;
use crate::trace::TraceContext;

/// How long a graceful stop waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The span exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("tracing.otlp_endpoint: cannot build the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Trace propagation and span export for every attempt of this process.
pub struct Telemetry {
    start_traces: bool,
    ids: RandomIdGenerator,
    export: Option<Export>,
}

struct Export {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// The headers of one attempt's trace context.
#[derive(Debug, Clone)]
pub struct TraceHeaders {
    /// `00-<trace id>-<this attempt's span id>-<flags>`.
    pub traceparent: HeaderValue,
    /// The incoming `tracestate`, unchanged.
    pub tracestate: Option<HeaderValue>,
}

/// One attempt's place in its trace: the headers to send and, when exported, the span to end
/// with the attempt's outcome.
pub struct AttemptTrace {
    headers: Option<TraceHeaders>,
    span: Option<opentelemetry_sdk::trace::Span>,
}

/// Who asked for an attempt, as the span's `courier.origin` says it.
#[derive(Debug, Clone, Copy)]
pub enum AttemptKind {
    Message,
    Retry,
    Replay,
}

impl AttemptKind {
    fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Message => "message",
            AttemptKind::Retry => "retry",
            AttemptKind::Replay => "replay",
        }
    }
}

impl Telemetry {
    /// No export and no new traces: incoming traces are still continued.
    pub fn off() -> Telemetry {
        Telemetry {
            start_traces: false,
            ids: RandomIdGenerator::default(),
            export: None,
        }
    }

    /// What `config` asks for. Builds the exporter (it connects to nothing yet).
    pub fn new(config: &TracingConfig) -> Result<Telemetry, TelemetryError> {
        let export = match config.traces_url() {
            None => None,
            Some(url) => {
                let headers = config
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_string()))
                    .collect();
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url)
                    .with_headers(headers)
                    .build()
                    .map_err(|e| TelemetryError(e.to_string()))?;
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name(config.service_name.clone())
                            .build(),
                    )
                    .build();
                let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "courier");
                Some(Export { provider, tracer })
            }
        };
        Ok(Telemetry {
            start_traces: config.start_traces,
            ids: RandomIdGenerator::default(),
            export,
        })
    }

    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        self.export.is_some()
    }

    /// Gives an event that arrived without a trace a new one, when `start_traces` says so. With
    /// export, the trace's root is a `courier.receive` span (kind consumer) that marks the
    /// event's arrival; every attempt, at every destination and hours later, is its child.
    pub fn start_trace(&self, event: &mut Event) {
        if !self.start_traces || event.trace.is_some() {
            return;
        }
        let Some(export) = &self.export else {
            event.trace = Some(TraceContext::fresh(
                self.ids.new_trace_id().to_bytes(),
                self.ids.new_span_id().to_bytes(),
            ));
            return;
        };
        let mut span = export
            .tracer
            .span_builder("courier.receive")
            .with_kind(SpanKind::Consumer)
            .with_start_time(event.received_at)
            .with_attributes([
                KeyValue::new("courier.event_id", event.id.clone()),
                KeyValue::new("courier.topic", event.topic.clone()),
                KeyValue::new("courier.source", event.source.as_str()),
            ])
            .start_with_context(&export.tracer, &Context::new());
        let context = span.span_context().clone();
        span.end();
        event.trace = Some(TraceContext {
            trace_id: context.trace_id().to_bytes(),
            parent_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
            tracestate: None,
        });
    }

    /// The trace of one POST of `event` to `destination`, attempt number `attempt`.
    pub fn attempt(
        &self,
        event: &Event,
        destination: &str,
        attempt: u32,
        kind: AttemptKind,
    ) -> AttemptTrace {
        let Some(context) = &event.trace else {
            return AttemptTrace {
                headers: None,
                span: None,
            };
        };
        let Some(export) = &self.export else {
            return AttemptTrace {
                headers: headers(context, self.ids.new_span_id().to_bytes(), context.flags),
                span: None,
            };
        };
        let parent = SpanContext::new(
            TraceId::from_bytes(context.trace_id),
            SpanId::from_bytes(context.parent_id),
            TraceFlags::new(context.flags),
            true,
            TraceState::default(),
        );
        let span = export
            .tracer
            .span_builder("courier.deliver")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("courier.destination", destination.to_string()),
                KeyValue::new("courier.event_id", event.id.clone()),
                KeyValue::new("courier.topic", event.topic.clone()),
                KeyValue::new("courier.attempt", i64::from(attempt)),
                KeyValue::new("courier.origin", kind.as_str()),
            ])
            .start_with_context(
                &export.tracer,
                &Context::new().with_remote_span_context(parent),
            );
        let own = span.span_context();
        AttemptTrace {
            headers: headers(context, own.span_id().to_bytes(), own.trace_flags().to_u8()),
            span: Some(span),
        }
    }

    /// Sends the spans still batched and stops the exporter; at most `FLUSH_TIMEOUT` (5 s).
    pub async fn shutdown(&self) {
        let Some(export) = &self.export else { return };
        let provider = export.provider.clone();
        // The SDK waits for its export thread: not on a runtime worker.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => tracing::debug!("spans flushed"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "the last spans may not have reached the collector")
            }
            Err(error) => tracing::warn!(%error, "the span flush did not finish"),
        }
    }
}

fn headers(context: &TraceContext, span_id: [u8; 8], flags: u8) -> Option<TraceHeaders> {
    let traceparent = HeaderValue::from_str(&context.child(span_id, flags)).ok()?;
    let tracestate = context
        .tracestate
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok());
    Some(TraceHeaders {
        traceparent,
        tracestate,
    })
}

impl AttemptTrace {
    /// The headers the POST carries, if the event is in a trace.
    pub fn headers(&self) -> Option<&TraceHeaders> {
        self.headers.as_ref()
    }

    /// Ends the span, if there is one, with what the attempt came to.
    pub fn finish(self, settled: &Settled) {
        let Some(mut span) = self.span else { return };
        let (outcome, status, reason): (&str, Option<u16>, Option<&str>) = match settled {
            Settled::Delivered { status } => ("delivered", Some(*status), None),
            Settled::RetryScheduled { status, reason } => {
                ("retry_scheduled", *status, Some(reason))
            }
            Settled::DeadLettered { status, reason } => ("dead_lettered", *status, Some(reason)),
            Settled::StillDead { status, reason } => ("still_dead", *status, Some(reason)),
            Settled::Duplicate => ("duplicate", None, None),
            Settled::Parked => ("parked", None, None),
            Settled::Busy => ("busy", None, None),
            Settled::Blocked { reason } => ("blocked", None, Some(reason)),
        };
        span.set_attribute(KeyValue::new("courier.outcome", outcome));
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        match reason {
            Some(reason) if outcome != "delivered" => {
                span.set_status(Status::error(Cow::Owned(reason.to_string())));
            }
            _ => span.set_status(Status::Ok),
        }
        span.end();
    }
}
