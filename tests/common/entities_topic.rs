//! The entities topic as a consumer outside the fabric reads it: each
//! key's messages in topic order, compared with what gRPC serves.

use super::*;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Headers, Message};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// One message of the entities topic.
#[derive(Debug, Clone)]
pub struct EntityMsg {
    pub version: u64,
    pub operation: String,
    /// The JSON document; `None` for a tombstone.
    pub doc: Option<serde_json::Value>,
}

pub fn header(m: &impl Message, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// An independent consumer of `topic`, every partition from the start.
pub fn consumer_of(brokers: &str, topic: &str) -> StreamConsumer {
    consumer_from_start(brokers, topic)
}

/// Reads the entities topic until `done` holds for what was read, per key
/// in topic order.
pub async fn read_entities(
    brokers: &str,
    topic: &str,
    within: Duration,
    done: impl Fn(&BTreeMap<String, Vec<EntityMsg>>) -> bool,
) -> BTreeMap<String, Vec<EntityMsg>> {
    let c = consumer_of(brokers, topic);
    let mut by_key: BTreeMap<String, Vec<EntityMsg>> = BTreeMap::new();
    let deadline = Instant::now() + within;
    while !done(&by_key) {
        assert!(
            Instant::now() < deadline,
            "the entities topic did not show every entity within {within:?}"
        );
        let Ok(m) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await else {
            continue;
        };
        let m = m.unwrap();
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let msg = EntityMsg {
            version: header(&m, "fabric.version").unwrap().parse().unwrap(),
            operation: header(&m, "fabric.operation").unwrap(),
            doc: m
                .payload()
                .map(|p| serde_json::from_slice(p).expect("an entity document is JSON")),
        };
        by_key.entry(key).or_default().push(msg);
    }
    by_key
}

/// Every customer served over gRPC: key `customer/<id>` to the entity.
pub async fn grpc_customers(
    fabric: &FabricProcess,
    view: &str,
) -> HashMap<String, entity_fabric::proto::Entity> {
    let mut client = fabric.client().await;
    let ids = all_ids(&mut client, "customer", 500).await;
    let mut out = HashMap::new();
    for chunk in ids.chunks(500) {
        let resp = client
            .batch_get_entities(entity_fabric::proto::BatchGetEntitiesRequest {
                r#type: "customer".into(),
                ids: chunk.to_vec(),
                view: view.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in resp.entities {
            out.insert(format!("customer/{}", e.id), e);
        }
    }
    out
}

/// The tables of an entities-topic document, in [`entity_tables`]' shape.
pub fn doc_tables(doc: &serde_json::Value) -> BTreeMap<String, BTreeMap<i64, serde_json::Value>> {
    doc["tables"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, rows)| {
            let rows = rows
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["id"].as_i64().unwrap(), r.clone()))
                .collect();
            (t.clone(), rows)
        })
        .collect()
}

/// The last message of every key equals what gRPC serves: same version and
/// tables, or a tombstone for an entity gRPC no longer has. Returns how many
/// keys were compared.
pub fn topic_matches_grpc(
    topic: &BTreeMap<String, Vec<EntityMsg>>,
    grpc: &HashMap<String, entity_fabric::proto::Entity>,
) -> usize {
    for (key, e) in grpc {
        let last = topic
            .get(key)
            .and_then(|v| v.last())
            .unwrap_or_else(|| panic!("{key} is served over gRPC but not on the entities topic"));
        assert_eq!(last.version, e.version, "{key}: last version on the topic");
        let doc = last
            .doc
            .as_ref()
            .unwrap_or_else(|| panic!("{key}: last message is a tombstone"));
        assert_eq!(doc["type"], "customer");
        assert_eq!(doc["id"], e.id.as_str());
        assert_eq!(doc["version"], e.version);
        assert_eq!(doc["operation"], "upsert");
        assert_eq!(doc_tables(doc), entity_tables(e), "{key}: tables differ");
    }
    for (key, msgs) in topic {
        if !grpc.contains_key(key) {
            let last = msgs.last().unwrap();
            assert!(
                last.doc.is_none() && last.operation == "delete",
                "{key} is gone from gRPC but its last message is not a tombstone: {last:?}"
            );
        }
    }
    grpc.len()
}

/// Every key's versions in topic order go up by one, or start again at 1
/// after a tombstone: no version lost or out of order. A message repeated
/// right after itself (same version, same content) is allowed when
/// `repeats_allowed` and counted: delivery is at least once. Returns the
/// number of repeats.
pub fn assert_versions_step_by_one(
    topic: &BTreeMap<String, Vec<EntityMsg>>,
    repeats_allowed: bool,
) -> usize {
    let mut repeats = 0;
    for (key, msgs) in topic {
        let mut prev: Option<&EntityMsg> = None;
        for m in msgs {
            let repeat = prev.is_some_and(|p| p.version == m.version && p.doc == m.doc);
            repeats += repeat as usize;
            let ok = match prev {
                None => m.version == 1,
                Some(_) if repeat => repeats_allowed,
                Some(p) => m.version == p.version + 1 || (p.doc.is_none() && m.version == 1),
            };
            assert!(
                ok,
                "{key}: version {} follows {:?} on the entities topic (all: {:?})",
                m.version,
                prev.map(|p| p.version),
                msgs.iter().map(|m| m.version).collect::<Vec<_>>()
            );
            prev = Some(m);
        }
    }
    repeats
}

pub fn all_grpc_versions_seen(
    grpc: &HashMap<String, entity_fabric::proto::Entity>,
) -> impl Fn(&BTreeMap<String, Vec<EntityMsg>>) -> bool + '_ {
    move |topic| {
        grpc.iter().all(|(k, e)| {
            topic
                .get(k)
                .and_then(|v| v.last())
                .is_some_and(|m| m.version >= e.version)
        })
    }
}

/// Reads `<prefix>.entities` until it holds every version gRPC serves
/// through `view`, then asserts each key's last message is what gRPC serves
/// (see [`topic_matches_grpc`]); returns the keys compared and the topic.
pub async fn entities_topic_equals_grpc(
    brokers: &str,
    prefix: &str,
    fabric: &FabricProcess,
    view: &str,
    within: Duration,
) -> (usize, BTreeMap<String, Vec<EntityMsg>>) {
    let grpc = grpc_customers(fabric, view).await;
    let topic = read_entities(
        brokers,
        &format!("{prefix}.entities"),
        within,
        all_grpc_versions_seen(&grpc),
    )
    .await;
    (topic_matches_grpc(&topic, &grpc), topic)
}

/// `topic` as a stock consumer reads it (`tests/stock_consumer.py`:
/// Confluent's Python client, none of the fabric's code), from the start of
/// every partition to the end offsets it finds when it starts.
pub fn stock_read(brokers: &str, topic: &str) -> BTreeMap<String, Vec<EntityMsg>> {
    let python = std::env::var("FABRIC_TEST_PYTHON").expect(
        "FABRIC_TEST_PYTHON is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stock_consumer.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args([brokers, topic])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the stock consumer failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_key: BTreeMap<String, Vec<EntityMsg>> = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let h = &m["headers"];
        by_key
            .entry(m["key"].as_str().unwrap().to_string())
            .or_default()
            .push(EntityMsg {
                version: h["fabric.version"].as_str().unwrap().parse().unwrap(),
                operation: h["fabric.operation"].as_str().unwrap().to_string(),
                doc: m["value"]
                    .as_str()
                    .map(|v| serde_json::from_str(v).expect("an entity document is JSON")),
            });
    }
    by_key
}

/// The stock consumer's reading of `<prefix>.entities`, once it shows every
/// version gRPC serves (read again until then, for up to `within`).
pub async fn stock_read_until_current(
    brokers: &str,
    prefix: &str,
    grpc: &HashMap<String, entity_fabric::proto::Entity>,
    within: Duration,
) -> BTreeMap<String, Vec<EntityMsg>> {
    let deadline = Instant::now() + within;
    let topic = format!("{prefix}.entities");
    loop {
        let (b, t) = (brokers.to_string(), topic.clone());
        let read = tokio::task::spawn_blocking(move || stock_read(&b, &t))
            .await
            .unwrap();
        if all_grpc_versions_seen(grpc)(&read) {
            return read;
        }
        assert!(
            Instant::now() < deadline,
            "the entities topic, read by a stock consumer, lacks versions gRPC serves after {within:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every key's versions in topic order cover 1..=last with none missing,
/// where a message may repeat a version published before it (a process
/// that restarted from a snapshot publishes what it applies again): each
/// repeat must carry the same document as that version's first message.
/// A tombstone followed by version 1 starts the key anew. Returns the
/// number of repeated messages.
pub fn assert_no_version_missing(topic: &BTreeMap<String, Vec<EntityMsg>>) -> usize {
    let mut repeats = 0;
    for (key, msgs) in topic {
        let mut seen: BTreeMap<u64, &EntityMsg> = BTreeMap::new();
        let mut newest = 0;
        let mut prev: Option<&EntityMsg> = None;
        for m in msgs {
            if prev.is_some_and(|p| p.doc.is_none()) && m.version == 1 {
                seen.clear();
                newest = 0;
            }
            if m.version <= newest {
                let first = seen[&m.version];
                assert!(
                    first.doc == m.doc && first.operation == m.operation,
                    "{key}: version {} published twice with different contents:\n{first:?}\n{m:?}",
                    m.version
                );
                repeats += 1;
            } else {
                assert_eq!(
                    m.version,
                    newest + 1,
                    "{key}: version {} follows {newest} on the entities topic (all: {:?})",
                    m.version,
                    msgs.iter().map(|m| m.version).collect::<Vec<_>>()
                );
                newest = m.version;
                seen.insert(m.version, m);
            }
            prev = Some(m);
        }
    }
    repeats
}

/// The newest message of every key (the highest version, wherever repeats
/// put it), for [`topic_matches_grpc`].
pub fn newest_per_key(
    topic: &BTreeMap<String, Vec<EntityMsg>>,
) -> BTreeMap<String, Vec<EntityMsg>> {
    topic
        .iter()
        .map(|(k, msgs)| {
            let newest = msgs.iter().max_by_key(|m| m.version).unwrap().clone();
            (k.clone(), vec![newest])
        })
        .collect()
}
