//! Logs and traces: a `tracing` subscriber writing human-readable or JSON logs to stderr, and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OpenTelemetry layer exporting spans over OTLP
//! gRPC. When it is not set no OpenTelemetry code runs at all.
//!
//! The exporter reads the standard `OTEL_*` variables (endpoint, headers, timeout); the service
//! name is `OTEL_SERVICE_NAME`, default `leasehold-server`. Incoming W3C `traceparent` headers
//! are honoured (see `http::observe`), so a client's trace continues through the server into etcd.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::cli::LogFormat;

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use = "dropping it without shutdown() may lose the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber. Must run inside a Tokio runtime (the gRPC exporter needs
    /// one). Logs are filtered by `RUST_LOG` (default `info`); exported spans are Leasehold's own.
    pub fn init(format: LogFormat) -> Self {
        let log_filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // Colour codes only on a terminal: in a file or a pipe they are noise.
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let logs = match format {
            LogFormat::Text => logs.boxed(),
            LogFormat::Json => logs.json().boxed(),
        }
        .with_filter(log_filter);

        let provider = otlp_endpoint_configured().then(build_provider).flatten();
        let traces = provider.as_ref().map(|provider| {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("leasehold-server"))
                .with_filter(EnvFilter::new("leasehold_server=info"))
        });
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .init();
        if provider.is_some() {
            tracing::info!("exporting traces over OTLP");
        }
        Self { provider }
    }

    /// Flushes buffered spans and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("leasehold-server: flushing traces failed: {err}");
        }
    }
}

fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

fn build_provider() -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!("leasehold-server: OTLP exporter not started: {err}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "leasehold-server".to_owned());
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    )
}
