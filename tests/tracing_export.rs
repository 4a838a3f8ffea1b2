//! OpenTelemetry span export (`[log.otlp]`): the real binary on the demo
//! sources sends its spans over OTLP/gRPC to a collector this test runs
//! (the OTLP trace service from `opentelemetry-proto`, on loopback): a span
//! per gRPC call, named by its method, with the RPC attributes, continuing
//! the caller's trace when the call carries a W3C `traceparent`; snapshot
//! rounds; all under the configured `service.name`. With no `[log.otlp]`
//! nothing is sent (the other tests run that way).

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// One exported span as the collector got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex::encode(&s.trace_id),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_reach_an_otlp_collector() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 100,
            snapshot_interval: "500ms",
            ..Default::default()
        },
    );
    let text = std::fs::read_to_string(&cfg).unwrap()
        + &format!(
            "\n[log.otlp]\nendpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"fabric-under-test\"\n"
        );
    std::fs::write(&cfg, text).unwrap();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(WITHIN).await;
    converge_within(&fabric, &dir.path().join("data"), WITHIN).await;

    // A call that continues a caller's trace, and one that starts its own.
    let mut client = fabric.client().await;
    let mut traced = tonic::Request::new(entity_fabric::proto::GetEntityRequest {
        r#type: "customer".into(),
        id: "7".into(),
        ..Default::default()
    });
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.get_entity(traced).await.unwrap();
    client
        .get_entity(entity_fabric::proto::GetEntityRequest {
            r#type: "customer".into(),
            id: "8".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let spans = eventually(WITHIN, "the spans at the collector", || {
        let spans = collector.spans.lock().unwrap().clone();
        async move {
            let gets = spans
                .iter()
                .filter(|s| s.name == "/fabric.v1.EntityService/GetEntity")
                .count();
            let rounds = spans.iter().any(|s| s.name == "round");
            (gets >= 2 && rounds).then_some(spans)
        }
    })
    .await;
    assert!(
        spans.iter().all(|s| s.service == "fabric-under-test"),
        "{spans:?}"
    );
    let gets: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "/fabric.v1.EntityService/GetEntity")
        .collect();
    for g in &gets {
        assert_eq!(
            g.attributes.get("rpc.system").map(String::as_str),
            Some("grpc")
        );
        assert_eq!(
            g.attributes.get("rpc.service").map(String::as_str),
            Some("fabric.v1.EntityService")
        );
        assert_eq!(
            g.attributes.get("rpc.method").map(String::as_str),
            Some("GetEntity")
        );
    }
    assert!(
        gets.iter().any(|g| g.trace_id == TRACE_ID),
        "the caller's trace was not continued: {gets:?}"
    );
    assert!(gets.iter().any(|g| g.trace_id != TRACE_ID));
    assert!(fabric.terminate());
}
