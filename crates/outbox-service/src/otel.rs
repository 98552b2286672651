//! OpenTelemetry traces, exported over OTLP/HTTP when the standard
//! variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER*`
//! and `OTEL_BSP_*` as the specification says). Without an endpoint nothing
//! is installed: [`enabled`] is false and the relay and the consumer make
//! no span at all, so export off costs one atomic load per message.
//!
//! Spans are batched and sent by the SDK's own thread with a blocking HTTP
//! client, off the service's runtime. [`Traces::shutdown`] flushes what is
//! still buffered; every binary calls it on its way out (SIGTERM included).
//!
//! The span context travels in W3C `traceparent` / `tracestate` headers:
//! [`parent`] reads one into a context to start a child span under, and
//! [`traceparent`] writes a span's.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context, global};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::{secrets, traceparent};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The protocols built in (gRPC is not: it would bring a second HTTP stack).
const PROTOCOLS: &[&str] = &["http/protobuf", "http/json"];

/// Whether spans are exported: [`init`] installed an exporter.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why tracing could not start: fatal, the operator asked for it.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("{name}={value}: only {} are built in", PROTOCOLS.join(" and "))]
    Protocol { name: &'static str, value: String },
    /// The exporter's own error, passwords of any URL in it masked.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// The installed exporter, if any; see [`Traces::shutdown`].
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

/// Installs the OTLP exporter when the environment names an endpoint.
/// `service` is `service.name` unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` names one.
pub fn init(service: &str) -> Result<Traces, TracesError> {
    init_from(service, |name| std::env::var(name).ok())
}

fn init_from(service: &str, env: impl Fn(&str) -> Option<String>) -> Result<Traces, TracesError> {
    let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if disabled || !endpoint {
        return Ok(Traces::default());
    }
    // The first named wins; unnamed, the specification's default. Given
    // to the exporter explicitly: with both built in, its own default is JSON.
    let mut protocol = Protocol::HttpBinary;
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        let Some(value) = env(name) else {
            continue;
        };
        protocol = match value.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" => Protocol::HttpBinary,
            "http/json" => Protocol::HttpJson,
            _ => return Err(TracesError::Protocol { name, value }),
        };
        break;
    }
    // The exporter's HTTP client takes TLS from rustls, whose provider
    // must be chosen first; another part of the process may have.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|error| TracesError::Exporter(secrets::redact(&error.to_string())))?;
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|pair| pair.trim_start().starts_with("service.name="))
        });
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(service, "exporting traces over OTLP");
    Ok(Traces {
        provider: Some(provider),
    })
}

impl Traces {
    /// Sends the spans still buffered and stops the exporter. Blocks on the
    /// SDK's thread, so it runs on a blocking thread of the runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        ENABLED.store(false, Ordering::Relaxed);
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        let error = match done {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        tracing::warn!(%error, "flushing the last spans failed");
    }
}

/// A context whose remote parent is the span a `traceparent` header names
/// (with its `tracestate`, when valid); an empty context (a new root) when
/// the header is absent or malformed.
pub fn parent(header: Option<&str>, state: Option<&str>) -> Context {
    let Some(header) = header.filter(|h| traceparent::trace_id(h).is_some()) else {
        return Context::new();
    };
    let mut parts = header.trim().split('-').skip(1);
    let (Some(trace), Some(span), Some(flags)) = (parts.next(), parts.next(), parts.next()) else {
        return Context::new();
    };
    let (Ok(trace), Ok(span), Ok(flags)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(span),
        u8::from_str_radix(flags, 16),
    ) else {
        return Context::new();
    };
    let state = state
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(trace, span, TraceFlags::new(flags), true, state);
    Context::new().with_remote_span_context(context)
}

/// A span's `traceparent` header (version 00).
pub fn traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_the_parent_it_names() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parent(Some(header), Some("vendor=abc"));
        let span = context.span();
        let span = span.span_context();
        assert!(span.is_remote() && span.is_sampled());
        assert_eq!(traceparent(span), header);
        assert_eq!(span.trace_state().get("vendor"), Some("abc"));
        for bad in [None, Some(""), Some("00-zz-00f067aa0ba902b7-01")] {
            assert!(!parent(bad, None).has_active_span(), "{bad:?}");
        }
    }

    #[test]
    fn without_an_endpoint_nothing_is_installed() {
        let traces = init_from("x", |_| None).map(|t| t.provider.is_none());
        assert!(matches!(traces, Ok(true)));
        let off = init_from("x", |name| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4318".into()),
            "OTEL_SDK_DISABLED" => Some("true".into()),
            _ => None,
        });
        assert!(matches!(off.map(|t| t.provider.is_none()), Ok(true)));
    }

    #[test]
    fn grpc_is_refused_in_one_line() {
        let error = init_from("x", |name| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4317".into()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".into()),
            _ => None,
        });
        let Err(error) = error else {
            panic!("grpc accepted");
        };
        assert_eq!(
            error.to_string(),
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc: only http/protobuf and http/json are built in"
        );
    }
}
