//! Clients that send too much, too long, too many or garbage, against the
//! real binary over loopback: every bad call gets a clear status, the
//! server keeps serving everyone else, and open streams stay bounded. And a
//! handler that panics answers INTERNAL instead of taking the server down
//! (the guard layer, on a real tonic server and client).

mod common;

use common::*;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use entity_fabric::proto::ingest_service_client::IngestServiceClient;
use entity_fabric::proto::row_change::Operation as RowOp;
use entity_fabric::proto::{
    BatchGetEntitiesRequest, EntityChange, GetEntityRequest, PushRequest, RowChange,
    SourcePosition, WatchEntitiesRequest,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

const WITHIN: Duration = Duration::from_secs(30);
const MAX_WATCHERS: usize = 6;
const STREAMS_PER_CONNECTION: usize = 4;

fn config(dir: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"
{server}max_request_bytes = 65536
max_streams_per_connection = {STREAMS_PER_CONNECTION}
max_watchers = {MAX_WATCHERS}
watch_buffer = 4096

[bus]
partitions = 2

[snapshot]
dir = "{d}/snapshots"

[[sources]]
name = "push"
kind = "grpc_push"

[[entities]]
name = "item"
id_type = "string"

  [[entities.tables]]
  name = "item"
  source = "push"
  from = "items"
  id_column = "id"
  primary_key = ["id"]

  [entities.views.short]
  tables = ["item"]
  columns = ["item.id"]

[[entities]]
name = "counter"
id_type = "int"

  [[entities.tables]]
  name = "counter"
  source = "push"
  from = "counters"
  id_column = "id"
  primary_key = ["id"]
"#,
        server = loopback_server(),
        d = dir.display()
    );
    write_config(dir, &text)
}

/// One transaction upserting `items` rows `ids`, with a payload.
fn items(sequence: u64, ids: impl Iterator<Item = u32>) -> PushRequest {
    PushRequest {
        source: "push".into(),
        sequence,
        changes: ids
            .map(|i| RowChange {
                table: "items".into(),
                operation: RowOp::Insert as i32,
                before: HashMap::new(),
                after: HashMap::from([
                    ("id".to_string(), text(&format!("item-{i}"))),
                    ("note".to_string(), text(&format!("{sequence:0>1000}"))),
                ]),
            })
            .collect(),
        commit_time_micros: 0,
    }
}

/// Pushes `reqs` and waits for every acknowledgement.
async fn push_acked(ingest: &mut IngestServiceClient<Channel>, reqs: Vec<PushRequest>) {
    let n = reqs.len();
    let mut acks = ingest
        .push(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..n {
        let ack = tokio::time::timeout(WITHIN, acks.message())
            .await
            .expect("ack within time")
            .unwrap()
            .expect("stream open");
        assert!(ack.error.is_empty(), "push refused: {}", ack.error);
    }
}

fn get(ty: &str, id: &str) -> GetEntityRequest {
    GetEntityRequest {
        r#type: ty.into(),
        id: id.into(),
        ..Default::default()
    }
}

fn watch_all() -> WatchEntitiesRequest {
    WatchEntitiesRequest {
        r#type: "item".into(),
        ..Default::default()
    }
}

async fn connect(fabric: &FabricProcess) -> EntityServiceClient<Channel> {
    EntityServiceClient::new(fabric.channel().await.unwrap())
}

async fn metric(fabric: &FabricProcess, name: &str) -> Option<f64> {
    let (_, body) = http_get(&fabric.admin, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The error of a call, which must fail.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("the call should have been refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_clear_statuses_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = FabricProcess::start(&config(dir.path()), &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut ingest = IngestServiceClient::new(fabric.channel().await.unwrap());
    push_acked(&mut ingest, vec![items(1, 0..3)]).await;
    let mut client = connect(&fabric).await;
    eventually(WITHIN, "item-0 served", || {
        let mut c = client.clone();
        async move { c.get_entity(get("item", "item-0")).await.ok() }
    })
    .await;

    // A long id: INVALID_ARGUMENT, and the answer does not echo it whole.
    let long = "x".repeat(2000);
    let e = refused(client.get_entity(get("item", &long)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("longer than the 1024 bytes"), "{e:?}");
    assert!(
        e.message().len() < 300,
        "echoed: {} bytes",
        e.message().len()
    );
    // A request over max_request_bytes is refused before it is decoded.
    let huge = "y".repeat(100_000);
    let e = refused(client.get_entity(get("item", &huge)).await);
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("the limit is: 65536"), "{e:?}");
    // Unknown types (however long the name), views, ids of the wrong type.
    let e = refused(client.get_entity(get(&"t".repeat(10_000), "1")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("unknown entity type"), "{e:?}");
    assert!(
        e.message().len() < 300,
        "echoed: {} bytes",
        e.message().len()
    );
    let mut with_view = get("item", "item-0");
    with_view.view = "nope".into();
    let e = refused(client.get_entity(with_view).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("views: short"), "{e:?}");
    let e = refused(client.get_entity(get("counter", "12abc")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a valid int id"), "{e:?}");
    let e = refused(client.get_entity(get("item", "")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Ids with control characters and non-ASCII are just ids: not found.
    let e = refused(client.get_entity(get("item", "\0\u{7}\u{202e}ünï")).await);
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = refused(
        client
            .batch_get_entities(BatchGetEntitiesRequest {
                r#type: "item".into(),
                ids: vec!["a".into(); 10_001],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = refused(
        client
            .batch_get_entities(BatchGetEntitiesRequest {
                r#type: "item".into(),
                ids: vec!["item-0".into(), long.clone()],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = refused(
        client
            .watch_entities(WatchEntitiesRequest {
                r#type: "item".into(),
                id: long.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The call's deadline is honoured: a position the source has not reached.
    let mut waiting = tonic::Request::new(GetEntityRequest {
        min_positions: vec![SourcePosition {
            source: "push".into(),
            position: "seq:1000000".into(),
        }],
        ..get("item", "item-0")
    });
    waiting.set_timeout(Duration::from_millis(300));
    let e = refused(client.get_entity(waiting).await);
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");

    // Garbage instead of HTTP/2: the connection is closed, nothing else.
    for garbage in [
        vec![0u8; 70_000],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
    ] {
        let addr = fabric.grpc.trim_start_matches("http://").to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(&garbage).await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(WITHIN, s.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the server kept a garbage connection open");
    }
    // An HTTP/2 preface followed by a frame of absurd length.
    {
        let addr = fabric.grpc.trim_start_matches("http://").to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);
        let _ = s.write_all(&bytes).await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(WITHIN, s.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the server kept a bad HTTP/2 connection open");
    }

    // Everyone else is still served, nothing panicked.
    let e = client.get_entity(get("item", "item-2")).await.unwrap();
    assert_eq!(e.into_inner().id, "item-2");
    assert_eq!(metric(&fabric, "fabric_grpc_panics_total").await, Some(0.0));
    assert!(fabric.terminate(), "the fabric did not stop cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_streams_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = FabricProcess::start(&config(dir.path()), &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut ingest = IngestServiceClient::new(fabric.channel().await.unwrap());
    push_acked(&mut ingest, vec![items(1, 0..3)]).await;

    // Streams per connection: with every stream of connection A taken by
    // a watch, a call on A cannot start; on B it is served; once a watch
    // on A ends, A serves again.
    let a = connect(&fabric).await;
    let mut b = connect(&fabric).await;
    let mut on_a = Vec::new();
    for _ in 0..STREAMS_PER_CONNECTION {
        on_a.push(a.clone().watch_entities(watch_all()).await.unwrap());
    }
    let blocked = tokio::time::timeout(
        Duration::from_millis(500),
        a.clone().get_entity(get("item", "item-0")),
    )
    .await;
    assert!(
        blocked.is_err(),
        "a call started beyond max_streams_per_connection: {blocked:?}"
    );
    b.get_entity(get("item", "item-0")).await.unwrap();
    on_a.pop();
    let served = tokio::time::timeout(WITHIN, a.clone().get_entity(get("item", "item-0"))).await;
    assert!(
        matches!(served, Ok(Ok(_))),
        "connection A not served after a stream ended: {served:?}"
    );
    drop(on_a);

    // Watches over all connections: the one over max_watchers is refused,
    // and a slot comes back when a watch ends.
    let mut open = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..MAX_WATCHERS.div_ceil(2) {
        clients.push(connect(&fabric).await);
    }
    eventually(WITHIN, "the first watches closed", || async {
        (metric(&fabric, "fabric_grpc_watchers").await == Some(0.0)).then_some(())
    })
    .await;
    for i in 0..MAX_WATCHERS {
        open.push(
            clients[i % clients.len()]
                .clone()
                .watch_entities(watch_all())
                .await
                .unwrap(),
        );
    }
    let e = refused(b.watch_entities(watch_all()).await);
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("server.max_watchers"), "{e:?}");
    assert_eq!(
        metric(&fabric, "fabric_grpc_watchers").await,
        Some(MAX_WATCHERS as f64)
    );
    // Reads are not watches: they go on.
    b.get_entity(get("item", "item-1")).await.unwrap();
    open.pop();
    let mut again = eventually(WITHIN, "a watch slot given back", || {
        let mut b = b.clone();
        async move { b.watch_entities(watch_all()).await.ok() }
    })
    .await
    .into_inner();
    // And the new watch works.
    push_acked(&mut ingest, vec![items(2, 7..8)]).await;
    let change = tokio::time::timeout(WITHIN, again.message())
        .await
        .expect("a change within time")
        .unwrap()
        .expect("stream open");
    assert_eq!(change.entity.unwrap().id, "item-7");
    assert!(fabric.terminate(), "the fabric did not stop cleanly");
}

/// Counts the changes a watch receives until `n` or an error (and in
/// `progress`, as they come).
async fn drain(
    mut s: tonic::Streaming<EntityChange>,
    n: usize,
    progress: Arc<AtomicUsize>,
) -> (usize, Option<tonic::Status>) {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(WITHIN, s.message()).await {
            Err(_) => break,
            Ok(Ok(Some(_))) => {
                got += 1;
                progress.store(got, Ordering::Relaxed);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return (got, Some(e)),
        }
    }
    (got, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_cut_off_and_the_others_get_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = FabricProcess::start(&config(dir.path()), &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    // Each on its own connection, as two applications would be.
    let slow = connect(&fabric)
        .await
        .watch_entities(watch_all())
        .await
        .unwrap();
    let fast = connect(&fabric)
        .await
        .watch_entities(watch_all())
        .await
        .unwrap();

    // 20,000 changes of about 1 KB, in rounds of 50 transactions of 10
    // rows, each round read by the reading watcher before the next: several
    // times what a watcher may hold back (server.watch_buffer, the stream's
    // queues, the HTTP/2 windows).
    const ROUNDS: u64 = 40;
    let total = (ROUNDS * 500) as usize;
    let progress = Arc::new(AtomicUsize::new(0));
    let fast = tokio::spawn(drain(fast.into_inner(), total, progress.clone()));
    let mut ingest = IngestServiceClient::new(fabric.channel().await.unwrap());
    for round in 0..ROUNDS {
        let reqs = (0..50)
            .map(|t| {
                let seq = round * 50 + t + 1;
                items(seq, (0..10).map(move |r| ((seq * 10 + r) % 2000) as u32))
            })
            .collect();
        push_acked(&mut ingest, reqs).await;
        // Paced by the reader: a burst beyond watch_buffer would cut off a
        // watcher that reads, too (it cannot read what is not sent yet).
        let sent = (round as usize + 1) * 500;
        eventually(WITHIN, "the reading watcher keeps up", || {
            let p = progress.clone();
            async move { (p.load(Ordering::Relaxed) >= sent).then_some(()) }
        })
        .await;
    }

    // The watcher that kept reading got every change.
    let (got, err) = fast.await.unwrap();
    assert!(err.is_none(), "the reading watcher was cut off: {err:?}");
    assert_eq!(got, total, "the reading watcher missed changes");
    // The one that did not read reads now: what was held for it, then why
    // it was cut off.
    let (held, err) = drain(slow.into_inner(), total, Arc::default()).await;
    let err = err.unwrap_or_else(|| panic!("the slow watcher got {held} changes and no error"));
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("fell"), "{err:?}");
    assert!(
        held < total,
        "the slow watcher was sent everything ({held})"
    );
    println!(
        "{total} changes: the reading watcher got {got}; the one that did not read was held {held}, then cut off"
    );
    eventually(WITHIN, "both watches closed", || async {
        (metric(&fabric, "fabric_grpc_watchers").await == Some(0.0)).then_some(())
    })
    .await;
    assert!(fabric.terminate(), "the fabric did not stop cleanly");
}

mod panics {
    use super::*;
    use entity_fabric::grpc::guard::CatchPanicLayer;
    use prometheus_client::metrics::counter::Counter;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::{Health, HealthServer};
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    /// A health service whose `check` of "boom" panics while answering.
    struct Boom;

    #[tonic::async_trait]
    impl Health for Boom {
        async fn check(
            &self,
            request: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
            if request.get_ref().service == "boom" {
                panic!("boom was asked for");
            }
            Ok(tonic::Response::new(HealthCheckResponse { status: 1 }))
        }

        type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

        async fn watch(
            &self,
            _: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            Ok(tonic::Response::new(tokio_stream::empty()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_answers_internal_and_the_server_goes_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let panics = Counter::default();
        let server = tonic::transport::Server::builder()
            .layer(CatchPanicLayer {
                panics: panics.clone(),
            })
            .add_service(HealthServer::new(Boom))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for round in 1..=3 {
            let e = health
                .check(HealthCheckRequest {
                    service: "boom".into(),
                })
                .await
                .expect_err("a panic cannot be an answer");
            assert_eq!(e.code(), Code::Internal, "{e:?}");
            assert!(e.message().contains("grpc.health.v1.Health/Check"), "{e:?}");
            // The same connection goes on serving.
            let ok = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            assert_eq!(ok.into_inner().status, 1);
            assert_eq!(panics.get(), round);
        }
        assert!(!server.is_finished());
        server.abort();
    }
}
