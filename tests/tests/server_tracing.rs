//! Traces: the server exports its spans over OTLP to a receiver run by this test, continues the
//! caller's trace from `traceparent`, and the `leasehold` client sends its caller's span.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, server_bin};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing::Instrument;
use tracing::instrument::WithSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// A span as received, with its resource's service name and its attributes as text.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect();
                    received.push(Received {
                        service: service.clone(),
                        span,
                        attributes,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on a free port; returns its URL and what it receives.
async fn start_collector() -> Result<(String, Collector)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    Ok((url, collector))
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports one span per request (named by method
/// and route template, with status, lock, lease and token) and an `etcd` child span per etcd
/// call, flushed on SIGTERM; a request carrying `traceparent` continues that trace, and so does
/// a request from the `leasehold` client made inside an OpenTelemetry span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_into_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (collector_url, collector) = start_collector().await?;
    let mut server = ServerProcess::spawn_with_env(
        &server_bin!(),
        &etcd.endpoints(),
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url.as_str())],
    )
    .await?;

    // 1. A raw request with a W3C traceparent.
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let api = Api::new(server.url());
    let response = api
        .http()
        .post(format!("{}/v1/locks/traced/acquire", server.url()))
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .json(&serde_json::json!({"ttl": "10s"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);

    // 2. The client, inside a span of the caller's own trace.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let client = leasehold::Client::new(server.url())?;
    let (client_trace, client_span) = async {
        let span = tracing::info_span!("buyer");
        async {
            let guard = client
                .lock("traced-by-client")
                .ttl(Duration::from_secs(10))
                .acquire()
                .await?;
            let context = tracing::Span::current().context();
            let ids = (
                context.span().span_context().trace_id().to_string(),
                context.span().span_context().span_id().to_string(),
            );
            guard.release().await?;
            anyhow::Ok(ids)
        }
        .instrument(span)
        .await
    }
    .with_subscriber(subscriber)
    .await?;

    // SIGTERM flushes the exporter.
    assert!(server.terminate().await?.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.0.lock().unwrap().clone();
        let done = spans.iter().any(|s| hex(&s.span.trace_id) == client_trace);
        if done || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let acquire = spans
        .iter()
        .find(|s| {
            hex(&s.span.trace_id) == trace_id && s.span.name == "POST /v1/locks/{name}/acquire"
        })
        .with_context(|| format!("no acquire span in trace {trace_id}: {:#?}", names(&spans)))?;
    assert_eq!(acquire.service, "leasehold-server");
    assert_eq!(
        hex(&acquire.span.parent_span_id),
        parent_id,
        "continues the caller's span"
    );
    for (key, value) in [
        ("http.method", "POST"),
        ("http.route", "/v1/locks/{name}/acquire"),
        ("http.status", "200"),
        ("lock", "traced"),
    ] {
        assert_eq!(
            acquire.attributes.get(key).map(String::as_str),
            Some(value),
            "{key}"
        );
    }
    assert!(acquire.attributes.contains_key("token"));
    assert!(acquire.attributes.contains_key("lease_id"));
    assert!(acquire.attributes.contains_key("latency_ms"));

    let etcd_children: Vec<_> = spans
        .iter()
        .filter(|s| s.span.parent_span_id == acquire.span.span_id)
        .collect();
    assert!(
        etcd_children.iter().any(|s| s.span.name == "etcd txn"),
        "the acquire's etcd calls are its children: {:#?}",
        names(&spans)
    );
    assert!(
        etcd_children
            .iter()
            .all(|s| s.attributes.contains_key("op"))
    );
    assert!(
        etcd_children.iter().any(|s| s
            .attributes
            .get("target")
            .is_some_and(|t| t.contains("/locks/traced/q/"))),
        "etcd spans name their key"
    );
    assert!(
        etcd_children.iter().all(|s| s
            .attributes
            .get("revision")
            .is_some_and(|r| r.parse::<i64>().is_ok_and(|r| r > 0))),
        "etcd spans carry the revision: {etcd_children:#?}"
    );

    let from_client = spans
        .iter()
        .find(|s| {
            hex(&s.span.trace_id) == client_trace && s.span.name == "POST /v1/locks/{name}/acquire"
        })
        .with_context(|| {
            format!(
                "the client's trace did not reach the server: {:#?}",
                names(&spans)
            )
        })?;
    assert_eq!(hex(&from_client.span.parent_span_id), client_span);
    Ok(())
}

fn names(spans: &[Received]) -> Vec<(String, String)> {
    spans
        .iter()
        .map(|s| (hex(&s.span.trace_id), s.span.name.clone()))
        .collect()
}
