//! W3C trace context for outgoing requests (feature `otel`).

/// The `traceparent` header for the caller's current `tracing` span, if it belongs to an
/// OpenTelemetry trace (a `tracing-opentelemetry` layer is installed and the span is sampled
/// or recording). Written by hand: the format is one line of the W3C spec, and this way the
/// caller need not install a global propagator.
#[cfg(feature = "otel")]
pub(crate) fn traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// Without the `otel` feature no trace context is sent.
#[cfg(not(feature = "otel"))]
pub(crate) fn traceparent() -> Option<String> {
    None
}
