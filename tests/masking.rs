//! Masked columns never leave the process in clear: the real binary on the
//! Kafka bus (the test broker), a pushed source with e-mail addresses and
//! card numbers, a view that hashes, keeps the last 4 and redacts, and that
//! view published on the entities topic. Every way out is searched for the
//! clear values: gRPC reads and watches through the view, every byte of the
//! entities topic (keys, headers, values), the fabric's log. The hash is
//! the keyed one (HMAC-SHA256 under the configured key), not a digest a
//! dictionary reverses, and the key itself appears nowhere either.

mod common;

use common::*;
use entity_fabric::proto::ingest_service_client::IngestServiceClient;
use entity_fabric::proto::row_change::Operation as RowOp;
use entity_fabric::proto::value::Kind;
use entity_fabric::proto::{
    BatchGetEntitiesRequest, GetEntityRequest, PushRequest, RowChange, Value, WatchEntitiesRequest,
};
use hmac::{Hmac, Mac};
use rdkafka::message::{Headers, Message};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(60);
const PEOPLE: u32 = 40;
const KEY: &str = "the masking key of this test, 41 bytes ok";

fn brokers() -> String {
    std::env::var("FABRIC_TEST_KAFKA").expect(
        "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    )
}

fn config(dir: &Path, prefix: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("mask.key"), KEY).unwrap();
    let text = format!(
        r#"
{server}
[bus]
kind = "kafka"
partitions = 2

[bus.kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
entities_compacted = false

[snapshot]
dir = "{d}/snapshots"
interval = "500ms"

[masking]
key_file = "{d}/mask.key"

[[sources]]
name = "crm"
kind = "grpc_push"

[[entities]]
name = "person"
id_type = "int"
publish_view = "safe"

  [[entities.tables]]
  name = "person"
  source = "crm"
  from = "people"
  id_column = "id"
  primary_key = ["id"]

  [entities.views.safe]
  tables = ["person"]
  mask = {{ "person.email" = "hash", "person.card" = "keep_last:4", "person.ssn" = "redact" }}
"#,
        server = loopback_server(),
        brokers = brokers(),
        d = dir.display()
    );
    write_config(dir, &text)
}

fn email(i: u32, round: u32) -> String {
    format!("person{i}.r{round}@example.com")
}
fn card(i: u32) -> String {
    format!("4111222233{i:06}")
}
fn ssn(i: u32) -> String {
    format!("078-05-{i:04}")
}

/// Every clear value the test wrote: none may leave the process.
fn secrets() -> Vec<String> {
    let mut out = vec![KEY.to_string()];
    for i in 0..PEOPLE {
        out.extend([email(i, 0), email(i, 1), card(i), ssn(i)]);
        // The card without its last 4: what keep_last:4 hides.
        out.push(card(i)[..12].to_string());
    }
    out
}

fn leaks(haystack: &[u8], secrets: &[String]) -> Vec<String> {
    secrets
        .iter()
        .filter(|s| haystack.windows(s.len()).any(|w| w == s.as_bytes()))
        .cloned()
        .collect()
}

fn hmac_hex(value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn push(round: u32) -> PushRequest {
    PushRequest {
        source: "crm".into(),
        sequence: round as u64 + 1,
        changes: (0..PEOPLE)
            .map(|i| RowChange {
                table: "people".into(),
                operation: if round == 0 {
                    RowOp::Insert
                } else {
                    RowOp::Update
                } as i32,
                before: HashMap::new(),
                after: HashMap::from([
                    (
                        "id".to_string(),
                        Value {
                            kind: Some(Kind::Int(i as i64)),
                        },
                    ),
                    ("name".to_string(), text(&format!("Person {i}"))),
                    ("email".to_string(), text(&email(i, round))),
                    ("card".to_string(), text(&card(i))),
                    ("ssn".to_string(), text(&ssn(i))),
                ]),
            })
            .collect(),
        commit_time_micros: 0,
    }
}

fn view_req(id: u32) -> GetEntityRequest {
    GetEntityRequest {
        r#type: "person".into(),
        id: id.to_string(),
        view: "safe".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_never_leave_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("mask");
    let cfg = config(dir.path(), &prefix);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(WITHIN).await;
    let mut client = fabric.client().await;
    // On the Kafka bus the group assigns partitions after the server is up;
    // a change applied while its partition is still being rebuilt is not
    // news to a watcher (docs/kafka.md). Wait until every person's partition
    // answers NOT_FOUND rather than UNAVAILABLE before changing anything.
    eventually(WITHIN, "every person's partition served", || {
        let mut c = client.clone();
        async move {
            for i in 0..PEOPLE {
                match c.get_entity(view_req(i)).await {
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    _ => return None,
                }
            }
            Some(())
        }
    })
    .await;
    let mut watch = client
        .watch_entities(WatchEntitiesRequest {
            r#type: "person".into(),
            view: "safe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Two versions of every person: the e-mail changes, the rest stays.
    let ingest = IngestServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap();
    for round in 0..2 {
        // On the Kafka bus the source starts once this process has claimed
        // it: until then a push is UNAVAILABLE, to be retried.
        eventually(WITHIN, "the push source claimed", || {
            let mut ingest = ingest.clone();
            async move {
                let mut acks = ingest
                    .push(tokio_stream::iter(vec![push(round)]))
                    .await
                    .ok()?
                    .into_inner();
                match acks.message().await {
                    Ok(Some(ack)) => {
                        assert!(ack.error.is_empty(), "{}", ack.error);
                        Some(())
                    }
                    Err(e) if e.code() == tonic::Code::Unavailable => None,
                    other => panic!("push: {other:?}"),
                }
            }
        })
        .await;
    }
    // Every person's second version applied (partitions apply each on its
    // own, so one person's does not say much of the others').
    eventually(WITHIN, "the second round applied", || {
        let mut c = client.clone();
        async move {
            for i in 0..PEOPLE {
                let e = c.get_entity(view_req(i)).await.ok()?.into_inner();
                let shown = e.tables[0].rows[0].columns["email"].clone();
                if shown != text(&hmac_hex(&email(i, 1))) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;

    // The data is there in clear for a read without the view: the searches
    // below would find it if a mask were skipped.
    let secrets = secrets();
    let full = client
        .get_entity(GetEntityRequest {
            view: String::new(),
            ..view_req(3)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!leaks(format!("{full:?}").as_bytes(), &secrets).is_empty());

    // gRPC through the view: each masked as configured.
    let mut seen = Vec::new();
    for i in 0..PEOPLE {
        let e = client.get_entity(view_req(i)).await.unwrap().into_inner();
        let row = &e.tables[0].rows[0].columns;
        assert_eq!(row["email"], text(&hmac_hex(&email(i, 1))), "person {i}");
        assert_ne!(
            row["email"],
            text(&hex::encode(Sha256::digest(email(i, 1).as_bytes()))),
            "an unkeyed digest: a dictionary reverses it"
        );
        assert_eq!(row["card"], text(&format!("***{}", &card(i)[12..])));
        assert_eq!(row["ssn"], text("***"));
        assert_eq!(row["name"], text(&format!("Person {i}")));
        seen.push(format!("{e:?}"));
    }
    let batch = client
        .batch_get_entities(BatchGetEntitiesRequest {
            r#type: "person".into(),
            ids: (0..PEOPLE).map(|i| i.to_string()).collect(),
            view: "safe".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.entities.len(), PEOPLE as usize);
    seen.push(format!("{batch:?}"));
    let mut watched = 0;
    while watched < 2 * PEOPLE {
        let change = tokio::time::timeout(WITHIN, watch.message())
            .await
            .expect("every change watched")
            .unwrap()
            .unwrap();
        seen.push(format!("{change:?}"));
        watched += 1;
    }
    for s in &seen {
        let found = leaks(s.as_bytes(), &secrets);
        assert!(found.is_empty(), "gRPC through the view showed {found:?}");
    }

    // Every byte of the entities topic: keys, headers, values.
    let topic = format!("{prefix}.entities");
    let consumer = consumer_from_start(&brokers(), &topic);
    let mut messages = 0;
    let mut hashed = 0;
    let deadline = Instant::now() + WITHIN;
    while messages < 2 * PEOPLE {
        assert!(
            Instant::now() < deadline,
            "only {messages} entity messages on {topic}"
        );
        let Ok(m) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else {
            continue;
        };
        let m = m.unwrap();
        let mut bytes = m.key().unwrap_or_default().to_vec();
        bytes.extend_from_slice(m.payload().unwrap_or_default());
        if let Some(h) = m.headers() {
            for h in h.iter() {
                bytes.extend_from_slice(h.key.as_bytes());
                bytes.extend_from_slice(h.value.unwrap_or_default());
            }
        }
        let found = leaks(&bytes, &secrets);
        assert!(found.is_empty(), "the entities topic carried {found:?}");
        let doc: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let row = &doc["tables"]["person"][0];
        let id = row["id"].as_u64().unwrap() as u32;
        let shown = row["email"].as_str().unwrap();
        assert!(
            shown == hmac_hex(&email(id, 0)) || shown == hmac_hex(&email(id, 1)),
            "person {id}: {shown}"
        );
        hashed += 1;
        messages += 1;
    }
    assert_eq!(hashed, 2 * PEOPLE);

    // The log says nothing it should not, and neither does `fabric check`.
    assert!(fabric.terminate(), "{}", fabric.log_text());
    let found = leaks(fabric.log_text().as_bytes(), &secrets);
    assert!(found.is_empty(), "the log holds {found:?}");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let mut out = check.stdout.clone();
    out.extend_from_slice(&check.stderr);
    let found = leaks(&out, &secrets);
    assert!(found.is_empty(), "fabric check printed {found:?}");
}
