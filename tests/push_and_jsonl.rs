//! The `grpc_push` and `jsonl` sources end to end through the real binary:
//! pushed transactions with acknowledgements, Debezium lines in a file,
//! `id_via` links that arrive late, and the dead-letter file.

mod common;

use common::*;
use entity_fabric::proto::ingest_service_client::IngestServiceClient;
use entity_fabric::proto::row_change::Operation as RowOp;
use entity_fabric::proto::value::Kind;
use entity_fabric::proto::{GetEntityRequest, PushAck, PushRequest, RowChange, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

fn config(dir: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"

[bus]
partitions = 3

[snapshot]
dir = "{d}/snapshots"
interval = "300ms"
keep = 2

[router]
pending_timeout = "1s"

[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "orders"
kind = "grpc_push"

[[sources]]
name = "cdc"
kind = "jsonl"
path = "{d}/events.jsonl"
poll_interval = "20ms"

[[entities]]
name = "account"
id_type = "string"

  [[entities.tables]]
  name = "account"
  source = "cdc"
  from = "public.accounts"
  id_column = "code"
  primary_key = ["code"]

  [[entities.tables]]
  name = "orders"
  source = "orders"
  from = "orders"
  id_column = "account"
  primary_key = ["id"]

  [[entities.tables]]
  name = "lines"
  source = "orders"
  from = "order_lines"
  id_via = {{ table = "orders", column = "order_id" }}
  primary_key = ["order_id", "n"]
"#,
        grpc = free_port(),
        admin = free_port(),
        d = dir.display()
    );
    let path = dir.join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn int(i: i64) -> Value {
    Value {
        kind: Some(Kind::Int(i)),
    }
}
fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::Text(s.into())),
    }
}
fn row(pairs: &[(&str, Value)]) -> HashMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}
fn insert(table: &str, after: HashMap<String, Value>) -> RowChange {
    RowChange {
        table: table.into(),
        operation: RowOp::Insert as i32,
        before: HashMap::new(),
        after,
    }
}

async fn push_all(
    client: &mut IngestServiceClient<tonic::transport::Channel>,
    reqs: Vec<PushRequest>,
) -> Vec<PushAck> {
    let n = reqs.len();
    let mut acks = client
        .push(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        out.push(
            tokio::time::timeout(WITHIN, acks.message())
                .await
                .expect("ack within time")
                .unwrap()
                .expect("stream open"),
        );
    }
    out
}

fn debezium_line(op: &str, code: &str, name: &str, txn: Option<&str>) -> String {
    let after = if op == "d" {
        serde_json::Value::Null
    } else {
        serde_json::json!({"code": code, "name": name})
    };
    let before = if op == "d" {
        serde_json::json!({"code": code, "name": name})
    } else {
        serde_json::Value::Null
    };
    let mut payload = serde_json::json!({
        "before": before,
        "after": after,
        "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "accounts", "ts_ms": 1764237600000i64, "lsn": 1234},
        "op": op,
        "ts_ms": 1764237600100i64,
    });
    if let Some(t) = txn {
        payload["transaction"] =
            serde_json::json!({"id": t, "total_order": 1, "data_collection_order": 1});
    }
    payload.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_and_file_sources_assemble_one_entity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let events = dir.path().join("events.jsonl");
    {
        let mut f = std::fs::File::create(&events).unwrap();
        writeln!(f, "{}", debezium_line("c", "acme", "Acme Ltd", Some("tx1"))).unwrap();
        writeln!(f, "{}", debezium_line("c", "globex", "Globex", Some("tx1"))).unwrap();
        writeln!(f, "this is not json").unwrap();
    }
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let client = fabric.client().await;
    let mut ingest = IngestServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap();

    // A line of an order arrives before its order: it waits for the link.
    let acks = push_all(
        &mut ingest,
        vec![
            PushRequest {
                source: "orders".into(),
                sequence: 1,
                changes: vec![insert(
                    "order_lines",
                    row(&[("order_id", int(500)), ("n", int(1)), ("sku", text("X-1"))]),
                )],
                commit_time_micros: 0,
            },
            PushRequest {
                source: "orders".into(),
                sequence: 2,
                changes: vec![insert(
                    "orders",
                    row(&[
                        ("id", int(500)),
                        ("account", text("acme")),
                        ("total", text("9.90")),
                    ]),
                )],
                commit_time_micros: 0,
            },
            // A resend of sequence 2 is acknowledged and skipped.
            PushRequest {
                source: "orders".into(),
                sequence: 2,
                changes: vec![insert(
                    "orders",
                    row(&[
                        ("id", int(500)),
                        ("account", text("acme")),
                        ("total", text("0.00")),
                    ]),
                )],
                commit_time_micros: 0,
            },
            // A line whose order never comes.
            PushRequest {
                source: "orders".into(),
                sequence: 3,
                changes: vec![insert(
                    "order_lines",
                    row(&[("order_id", int(777)), ("n", int(1)), ("sku", text("LOST"))]),
                )],
                commit_time_micros: 0,
            },
            // A malformed transaction is refused with a reason; the stream goes on.
            PushRequest {
                source: "orders".into(),
                sequence: 4,
                changes: vec![RowChange {
                    table: "orders".into(),
                    operation: RowOp::Insert as i32,
                    before: HashMap::new(),
                    after: HashMap::new(),
                }],
                commit_time_micros: 0,
            },
        ],
    )
    .await;
    assert_eq!(
        acks.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        vec![1, 2, 2, 3, 4]
    );
    assert!(acks[..4].iter().all(|a| a.error.is_empty()), "{acks:?}");
    assert!(
        acks[4].error.contains("insert needs `after`"),
        "{:?}",
        acks[4]
    );

    let e = eventually(
        WITHIN,
        "account acme with its order, line and row from the file",
        || {
            let mut c = client.clone();
            async move {
                let e = c
                    .get_entity(GetEntityRequest {
                        r#type: "account".into(),
                        id: "acme".into(),
                        view: String::new(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                (e.tables.len() == 3).then_some(e)
            }
        },
    )
    .await;
    let orders = e.tables.iter().find(|t| t.name == "orders").unwrap();
    assert_eq!(orders.rows.len(), 1);
    assert_eq!(
        orders.rows[0].columns["total"],
        text("9.90"),
        "the resend must not overwrite"
    );
    let lines = e.tables.iter().find(|t| t.name == "lines").unwrap();
    assert_eq!(lines.rows[0].columns["sku"], text("X-1"));

    // New lines appended to the file are followed; a delete removes the entity.
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&events)
            .unwrap();
        writeln!(
            f,
            "{}",
            debezium_line("u", "globex", "Globex Corporation", None)
        )
        .unwrap();
    }
    eventually(WITHIN, "globex renamed", || {
        let mut c = client.clone();
        async move {
            let e = c
                .get_entity(GetEntityRequest {
                    r#type: "account".into(),
                    id: "globex".into(),
                    view: String::new(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (e.tables[0].rows[0].columns["name"] == text("Globex Corporation")).then_some(())
        }
    })
    .await;

    // The undecodable line and the line whose order never came are dead letters, with reasons.
    let dlq = dir.path().join("dlq.jsonl");
    let letters = eventually(WITHIN, "two dead letters", || {
        let dlq = dlq.clone();
        async move {
            let text = std::fs::read_to_string(&dlq).ok()?;
            let v: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (v.len() >= 2).then_some(v)
        }
    })
    .await;
    assert!(
        letters
            .iter()
            .any(|l| l["source"] == "cdc" && l["raw"] == "this is not json"),
        "{letters:?}"
    );
    let lost = letters
        .iter()
        .find(|l| l["source"] == "orders")
        .expect("the unlinked line is dead-lettered");
    assert!(
        lost["reason"].as_str().unwrap().contains("key \"777\""),
        "{lost}"
    );
    assert!(lost["raw"].as_str().unwrap().contains("LOST"), "{lost}");

    // Once snapshots hold them, pushed sequences are reported durable.
    let durable = eventually(WITHIN, "durable_sequence to reach 3", || {
        let mut ing = ingest.clone();
        async move {
            let acks = push_all(
                &mut ing,
                vec![PushRequest {
                    source: "orders".into(),
                    sequence: 3,
                    changes: vec![],
                    commit_time_micros: 0,
                }],
            )
            .await;
            (acks[0].durable_sequence >= 3).then_some(acks[0].durable_sequence)
        }
    })
    .await;
    assert!(durable >= 3);

    // Many transactions sent without waiting for acks: each is acknowledged
    // in the order sent, a malformed one in its place with its error.
    let reqs: Vec<PushRequest> = (4..=303u64)
        .map(|seq| PushRequest {
            source: "orders".into(),
            sequence: seq,
            changes: vec![if seq == 150 {
                insert("orders", HashMap::new())
            } else {
                insert(
                    "orders",
                    row(&[
                        ("id", int(1000 + seq as i64)),
                        ("account", text("acme")),
                        ("total", text("1.00")),
                    ]),
                )
            }],
            commit_time_micros: 0,
        })
        .collect();
    let acks = push_all(&mut ingest, reqs).await;
    assert_eq!(
        acks.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        (4..=303).collect::<Vec<_>>()
    );
    for a in &acks {
        assert_eq!(a.error.is_empty(), a.sequence != 150, "{a:?}");
    }
    assert!(
        acks[146].error.contains("insert needs `after`"),
        "{:?}",
        acks[146]
    );

    // Pushing to a source that does not exist is refused by name.
    let err = ingest
        .push(tokio_stream::iter(vec![PushRequest {
            source: "nope".into(),
            sequence: 1,
            changes: vec![],
            commit_time_micros: 0,
        }]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("no grpc_push source named \"nope\" (known: orders)"),
        "{}",
        err.message()
    );

    assert!(fabric.terminate(), "{}", fabric.log_text());

    // After a restart everything is restored from the snapshot.
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric2.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut client = fabric.client().await;
    let e = client
        .get_entity(GetEntityRequest {
            r#type: "account".into(),
            id: "acme".into(),
            view: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.tables.len(), 3);
    assert!(fabric.terminate());
}
