//! Kafka mode through the real binary and Apache Kafka (started by
//! `scripts/services.sh`; a test that kills the broker runs a node of its
//! own). Each test uses its own topic
//! prefix. What a user sees is checked: entities over gRPC equal to the
//! sources, the entities topic read by an independent consumer, dead letters
//! on the DLQ topic.

mod common;

use common::entities_topic::*;
use common::*;
use rdkafka::ClientConfig;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(120);

fn brokers() -> String {
    std::env::var("FABRIC_TEST_KAFKA").expect(
        "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    )
}

/// A fabric on the demo config over the Kafka bus, serving and equal to
/// its sources.
struct KafkaDemo {
    dir: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
    prefix: String,
    fabric: FabricProcess,
}

/// Starts [`KafkaDemo`] with `customers`, topics `<name>_….*` on `brokers`,
/// the entities topic `compacted` or not, and the config text passed
/// through `edit` first. `dir` is the test's directory (a broker of the
/// test's own may live in it), or a new one.
async fn start_demo(
    dir: Option<tempfile::TempDir>,
    brokers: &str,
    name: &str,
    customers: u32,
    compacted: bool,
    edit: impl FnOnce(String) -> String,
) -> KafkaDemo {
    let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let prefix = unique(name);
    let config = kafka_demo_config(
        dir.path(),
        &DemoSettings {
            customers,
            snapshot_interval: "500ms",
            ..Default::default()
        },
        brokers,
        &prefix,
        compacted,
    );
    std::fs::write(&config, edit(std::fs::read_to_string(&config).unwrap())).unwrap();
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-0.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &data).await;
    KafkaDemo {
        dir,
        config,
        data,
        prefix,
        fabric,
    }
}

async fn converge(fabric: &FabricProcess, data: &Path) -> usize {
    converge_within(fabric, data, CONVERGE).await
}

/// Runs the demo workload against the SQLite sources for `for_`.
async fn mutate_for(data: &Path, per_second: f64, for_: Duration) -> u64 {
    let w = Workload::start(data, per_second);
    tokio::time::sleep(for_).await;
    w.stop().await
}

async fn produce(brokers: &str, topic: &str, partition: i32, key: &str, value: &[u8]) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    p.send(
        FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(value),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
}

/// Reads the DLQ topic until a message with `key` arrives; returns its
/// value and headers.
async fn dlq_message(brokers: &str, topic: &str, key: &str) -> (Vec<u8>, HashMap<String, String>) {
    let c = consumer_of(brokers, topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no message keyed {key:?} on {topic} within 60s"
        );
        let Ok(m) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await else {
            continue;
        };
        let m = m.unwrap();
        if m.key() != Some(key.as_bytes()) {
            continue;
        }
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return (m.payload().unwrap_or_default().to_vec(), headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_bus_end_to_end_with_entities_topic_and_dlq() {
    let brokers = brokers();
    // `_dir` keeps the test directory (data, broker storage) until the end.
    let KafkaDemo {
        dir: _dir,
        data,
        prefix,
        mut fabric,
        ..
    } = start_demo(None, &brokers, "e2e", 200, false, |t| t).await;

    // Something that is not a bus record, on the changes topic: dead-lettered,
    // and the pipeline goes on.
    produce(
        &brokers,
        &format!("{prefix}.changes"),
        0,
        "customer/bogus",
        b"\x07 not a bus record",
    )
    .await;
    let written = mutate_for(&data, 100.0, Duration::from_secs(3)).await;
    assert!(
        written > 50,
        "the workload wrote only {written} transactions"
    );
    let compared = converge(&fabric, &data).await;
    let (raw, headers) = dlq_message(&brokers, &format!("{prefix}.dlq"), "customer/bogus").await;
    assert_eq!(raw, b"\x07 not a bus record");
    assert!(
        headers["fabric.reason"].contains("cannot decode a bus record"),
        "{headers:?}"
    );
    assert!(
        headers["fabric.origin"].starts_with(&format!("{prefix}.changes/0@")),
        "{headers:?}"
    );

    // An independent consumer of the entities topic sees what gRPC serves.
    let (keys, topic) =
        entities_topic_equals_grpc(&brokers, &prefix, &fabric, "", Duration::from_secs(60)).await;
    assert_versions_step_by_one(&topic, false);
    let messages: usize = topic.values().map(Vec::len).sum();
    println!(
        "{written} source transactions, {compared} entities equal to the sources, {keys} keys and {messages} messages on {prefix}.entities equal to gRPC"
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_the_kafka_bus_loses_nothing() {
    let brokers = brokers();
    let prefix = unique("kill");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_demo_config(
        dir.path(),
        &DemoSettings {
            customers: 300,
            snapshot_interval: "400ms",
            ..Default::default()
        },
        &brokers,
        &prefix,
        true,
    );
    // The entities topic carries the support view (e-mail hashed), as gRPC does.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "root_table = \"customer\"",
        "root_table = \"customer\"\npublish_view = \"support\"",
    );
    std::fs::write(&config, text).unwrap();
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-0.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    let workload = Workload::start(&data, 100.0);
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let restarts = 3;
    for i in 1..=restarts {
        tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
        fabric.kill9();
        fabric = FabricProcess::start(&config, &dir.path().join(format!("fabric-{i}.log")));
        fabric.wait_serving(Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = workload.stop().await;
    let compared = converge(&fabric, &data).await;

    // At least once: the newest message of every key is what gRPC serves
    // through the same view.
    let (_, topic) = entities_topic_equals_grpc(
        &brokers,
        &prefix,
        &fabric,
        "support",
        Duration::from_secs(60),
    )
    .await;
    for msgs in topic.values() {
        if let Some(doc) = msgs.last().and_then(|m| m.doc.as_ref()) {
            assert_eq!(doc["view"], "support");
            assert!(doc["tables"]["invoices"].is_null(), "{doc}");
            let email = doc["tables"]["customer"][0]["email"].as_str().unwrap();
            assert!(
                email.len() == 64 && !email.contains('@'),
                "e-mail not masked on the topic: {email}"
            );
        }
    }
    println!(
        "seed {seed}: {written} source transactions, {restarts} SIGKILL restarts, {compared} entities equal to the sources and to the entities topic"
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Broker::start(&dir.path().join("broker"), port);
    let brokers = format!("127.0.0.1:{port}");
    // `_dir` keeps the test directory (data, broker storage) until the end.
    let KafkaDemo {
        dir: _dir,
        data,
        prefix,
        mut fabric,
        ..
    } = start_demo(Some(dir), &brokers, "brk", 200, false, |t| t).await;

    let workload = Workload::start(&data, 80.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill9();
    // The sources keep changing while the broker is away.
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written = workload.stop().await;

    // Caught up by itself, with no restart of the fabric.
    let compared = converge(&fabric, &data).await;
    let (_, topic) =
        entities_topic_equals_grpc(&brokers, &prefix, &fabric, "", Duration::from_secs(90)).await;
    // Not a version lost, repeated or out of order on the entities topic
    // either: the broker keeps the idempotent producer's state across its
    // SIGKILL, so a batch sent again after the restart is dropped.
    assert_versions_step_by_one(&topic, false);
    println!(
        "{written} source transactions across a broker SIGKILL and restart, {compared} entities equal to the sources and to the entities topic"
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

/// A Debezium event (JSON converter without schemas) of `table` in the
/// `inventory` database.
fn debezium_event(
    table: &str,
    op: &str,
    before: serde_json::Value,
    after: serde_json::Value,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "before": before,
        "after": after,
        "source": {"connector": "mysql", "db": "inventory", "table": table, "ts_ms": 1_764_237_600_000i64},
        "op": op,
        "ts_ms": 1_764_237_600_000i64,
    }))
    .unwrap()
}

/// The model of what the Debezium topics say: customers and orders by id.
#[derive(Default)]
struct Inventory {
    customers: BTreeMap<i64, serde_json::Value>,
    orders: BTreeMap<i64, serde_json::Value>,
}

impl Inventory {
    /// Each customer's expected entity tables.
    fn expected(&self) -> BTreeMap<i64, BTreeMap<String, BTreeMap<i64, serde_json::Value>>> {
        let mut out: BTreeMap<i64, BTreeMap<String, BTreeMap<i64, serde_json::Value>>> =
            BTreeMap::new();
        for (id, c) in &self.customers {
            out.entry(*id)
                .or_default()
                .entry("customer".into())
                .or_default()
                .insert(*id, c.clone());
        }
        for (id, o) in &self.orders {
            let cid = o["customer_id"].as_i64().unwrap();
            if let Some(e) = out.get_mut(&cid) {
                e.entry("orders".into()).or_default().insert(*id, o.clone());
            }
        }
        out
    }
}

struct DebeziumTopics {
    brokers: String,
    customers: String,
    orders: String,
    producer: FutureProducer,
}

const DBZ_PARTITIONS: i32 = 3;

impl DebeziumTopics {
    async fn send(&self, topic: &str, id: i64, value: &[u8]) {
        let key = format!("{{\"id\":{id}}}");
        self.producer
            .send(
                FutureRecord::to(topic)
                    .partition((id % DBZ_PARTITIONS as i64) as i32)
                    .key(&key)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    async fn upsert_customer(&self, inv: &mut Inventory, id: i64, name: &str) {
        let row = serde_json::json!({"id": id, "name": name});
        let before = inv.customers.insert(id, row.clone());
        let op = if before.is_some() { "u" } else { "c" };
        let ev = debezium_event("customers", op, before.unwrap_or_default(), row);
        self.send(&self.customers, id, &ev).await;
    }

    async fn upsert_order(&self, inv: &mut Inventory, id: i64, customer: i64, amount: i64) {
        let row = serde_json::json!({"id": id, "customer_id": customer, "amount": amount});
        let before = inv.orders.insert(id, row.clone());
        let op = if before.is_some() { "u" } else { "c" };
        let ev = debezium_event("orders", op, before.unwrap_or_default(), row);
        self.send(&self.orders, id, &ev).await;
    }

    async fn delete_order(&self, inv: &mut Inventory, id: i64) {
        let before = inv.orders.remove(&id).unwrap();
        let ev = debezium_event("orders", "d", before, serde_json::Value::Null);
        self.send(&self.orders, id, &ev).await;
    }
}

async fn create_topics(brokers: &str, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, DBZ_PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    // The shared test broker can be slow under the other tests' load: a
    // timed-out request is tried again (a topic it did create then exists).
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
    for attempt in 1.. {
        match admin.create_topics(new.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, e)) => panic!("cannot create topic {t}: {e}"),
                    }
                }
                return;
            }
            Err(e) if attempt < 4 => eprintln!("create topics, attempt {attempt}: {e}; again"),
            Err(e) => panic!("cannot create topics: {e}"),
        }
    }
}

async fn wait_equal(fabric: &FabricProcess, inv: &Inventory) {
    let want = inv.expected();
    let mut last = String::new();
    let deadline = Instant::now() + CONVERGE;
    while Instant::now() < deadline {
        let grpc = grpc_customers(fabric, "").await;
        let have: BTreeMap<i64, _> = grpc
            .values()
            .map(|e| (e.id.parse::<i64>().unwrap(), entity_tables(e)))
            .collect();
        if have == want {
            return;
        }
        last = format!(
            "{} entities served, {} expected; first difference: {:?}",
            have.len(),
            want.len(),
            want.iter()
                .find(|(id, t)| have.get(id) != Some(t))
                .map(|(id, t)| (id, t, have.get(id)))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{last}\nlog:\n{}", fabric.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_topics_feed_entities_and_bad_messages_go_to_the_dlq() {
    let brokers = brokers();
    let prefix = unique("dbz");
    let topics = DebeziumTopics {
        brokers: brokers.clone(),
        customers: format!("{prefix}.inventory.customers"),
        orders: format!("{prefix}.inventory.orders"),
        producer: ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap(),
    };
    create_topics(&brokers, &[&topics.customers, &topics.orders]).await;
    let mut inv = Inventory::default();
    for id in 1..=40 {
        topics
            .upsert_customer(&mut inv, id, &format!("customer {id}"))
            .await;
        for k in 0..2 {
            topics
                .upsert_order(&mut inv, id * 10 + k, id, 100 + k)
                .await;
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = dir.path().join("fabric.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"

[bus]
kind = "kafka"
partitions = 4

[bus.kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"

[snapshot]
dir = "{d}/snapshots"
interval = "300ms"

[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "legacy"
kind = "debezium_kafka"
topics = ["{c}", "{o}"]

[[entities]]
name = "customer"

  [[entities.tables]]
  name = "customer"
  source = "legacy"
  from = "inventory.customers"
  id_column = "id"
  primary_key = ["id"]

  [[entities.tables]]
  name = "orders"
  source = "legacy"
  from = "inventory.orders"
  id_column = "customer_id"
  primary_key = ["id"]
"#,
            grpc = free_port(),
            admin = free_port(),
            c = topics.customers,
            o = topics.orders,
        ),
    )
    .unwrap();
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-0.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    wait_equal(&fabric, &inv).await;

    // A malformed message: dead-lettered with its key; the source goes on.
    topics
        .send(&topics.customers, 7, b"{\"op\": \"u\", \"after\": ")
        .await;
    for id in 1..=40 {
        topics
            .upsert_customer(&mut inv, id, &format!("renamed {id}"))
            .await;
    }
    topics.delete_order(&mut inv, 30).await;
    topics.upsert_order(&mut inv, 31, 5, 999).await; // moves to customer 5
    wait_equal(&fabric, &inv).await;
    let (raw, headers) = dlq_message(&topics.brokers, &format!("{prefix}.dlq"), "{\"id\":7}").await;
    assert_eq!(raw, b"{\"op\": \"u\", \"after\": ");
    assert_eq!(headers["fabric.source"], "legacy");
    assert!(
        headers["fabric.reason"].contains("cannot decode a Debezium message"),
        "{headers:?}"
    );
    assert!(
        headers["fabric.origin"].starts_with(&format!("{}/1@", topics.customers)),
        "{headers:?}"
    );

    // SIGKILL after a snapshot round, changes while it is down, restart:
    // it resumes from its checkpoint and nothing moves back in time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fabric.kill9();
    for id in (1..=40).step_by(3) {
        topics
            .upsert_customer(&mut inv, id, &format!("while down {id}"))
            .await;
        topics.upsert_order(&mut inv, id * 10, id, 7).await;
    }
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-1.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    wait_equal(&fabric, &inv).await;
    println!(
        "{} customers and {} orders from Debezium topics equal over gRPC across a SIGKILL",
        inv.customers.len(),
        inv.orders.len()
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_away_stops_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Broker::start(&dir.path().join("broker"), port);
    let brokers = format!("127.0.0.1:{port}");
    let KafkaDemo {
        dir,
        config,
        data,
        mut fabric,
        ..
    } = start_demo(Some(dir), &brokers, "term", 100, true, |t| {
        t.replace("[server]\n", "[server]\nshutdown_timeout = \"2s\"\n")
    })
    .await;

    // The broker goes away while the sources change, so the router has
    // records it cannot hand on; a graceful stop must still end.
    broker.kill9();
    let written = mutate_for(&data, 50.0, Duration::from_secs(2)).await;
    assert!(
        fabric.terminate(),
        "the fabric did not stop on SIGTERM with the broker away; log:\n{}",
        fabric.log_text()
    );
    assert!(
        fabric
            .log_text()
            .contains("stopping without a final snapshot"),
        "{}",
        fabric.log_text()
    );

    // Nothing was lost: with the broker back, a new start catches up.
    broker.restart();
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-1.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let compared = converge(&fabric, &data).await;
    println!(
        "{written} source transactions while the broker was away; stopped within the shutdown timeout; {compared} entities equal after restart"
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_waits_for_a_broker_that_is_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let config = kafka_demo_config(
        dir.path(),
        &DemoSettings {
            customers: 50,
            ..Default::default()
        },
        &brokers,
        &unique("late"),
        true,
    );
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric.log"));
    eventually(Duration::from_secs(30), "a retry notice in the log", || {
        let log = fabric.log_text();
        async move { log.contains("cannot reach kafka; retrying").then_some(()) }
    })
    .await;
    let _broker = Broker::start(&dir.path().join("broker"), port);
    fabric.wait_serving(Duration::from_secs(90)).await;
    let compared = converge(&fabric, &data).await;
    println!("waited for the broker, then served {compared} entities equal to the sources");
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

/// The changes topic deleted under a running fabric (an operator's
/// mistake, a retention tool): the fabric does not make it again with the
/// broker's defaults, holds what it cannot write (acknowledging nothing
/// behind it to the sources), says so in its log and metrics, and keeps
/// serving what it has.
/// Deletes `topics` under the running `fabric` while the demo's sources
/// change, then waits until `fabric_kafka_writes_held_now` is 1 or more and
/// the log says one of `said`; returns the source transactions written.
async fn delete_under_load(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topics: &[&str],
    fabric: &FabricProcess,
    data: &Path,
    said: &[&str],
) -> u64 {
    let deleted = admin
        .delete_topics(topics, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let written = mutate_for(data, 20.0, Duration::from_secs(4)).await;
    eventually(
        Duration::from_secs(60),
        "the held writes in the log and the metrics",
        || {
            let log = fabric.log_text();
            let admin = fabric.admin.clone();
            async move {
                let (_, metrics) = http_get(&admin, "/metrics").await;
                let held = metrics
                    .lines()
                    .find(|l| l.starts_with("fabric_kafka_writes_held_now "))?
                    .rsplit(' ')
                    .next()?
                    .parse::<f64>()
                    .ok()?;
                (held >= 1.0 && said.iter().any(|s| log.contains(s))).then_some(())
            }
        },
    )
    .await;
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_topic_deleted_under_a_running_fabric() {
    use rdkafka::admin::AdminClient;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = Broker::start(&dir.path().join("broker"), port);
    let brokers = format!("127.0.0.1:{port}");
    let KafkaDemo {
        dir,
        config,
        data,
        prefix,
        mut fabric,
    } = start_demo(Some(dir), &brokers, "gone", 100, true, |t| t).await;
    let served = grpc_customers(&fabric, "").await;

    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let topic = format!("{prefix}.changes");
    // Records queued when the topic went fail (ingest stops); records
    // handed on after it wait (held and retried).
    let written = delete_under_load(
        &admin,
        &[&topic],
        &fabric,
        &data,
        &[
            "ingest stopped: the bus lost a topic",
            "writes to it are held and retried",
        ],
    )
    .await;
    // Still serving, every customer as it was before the delete at least.
    let now = grpc_customers(&fabric, "").await;
    assert_eq!(now.len(), served.len(), "customers served before and after");
    for (k, e) in &served {
        assert!(now[k].version >= e.version, "{k} went back");
    }
    // Not made again by the fabric with the broker's defaults.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    let t = &md.topics()[0];
    assert!(
        t.error().is_some() || t.partitions().is_empty(),
        "{topic} was made again with {} partitions",
        t.partitions().len()
    );
    // A stop still ends cleanly, and the documented way back, a start on
    // a new topic prefix, rebuilds from the sources with nothing lost.
    assert!(
        fabric.terminate(),
        "no clean stop with the topic gone:\n{}",
        fabric.log_text()
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let fresh = format!("{prefix}b");
    std::fs::write(
        &config,
        text.replace(
            &format!("topic_prefix = \"{prefix}\""),
            &format!("topic_prefix = \"{fresh}\""),
        ),
    )
    .unwrap();
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric-1.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let compared = converge(&fabric, &data).await;
    println!(
        "{topic} deleted under the fabric: {written} source transactions held, {} customers still served, the topic not made again; started on {fresh}: {compared} customers equal to the sources",
        now.len()
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

/// Starts another process on `config` with a snapshot directory of its own
/// (empty) and waits until it restored all 4 partitions from the state topic
/// and serves them (a partition still replaying the changes topic after its
/// restore is not listed yet).
async fn restored_elsewhere(dir: &Path, config: &Path, data: &Path) -> FabricProcess {
    let text = std::fs::read_to_string(config).unwrap();
    let snapshots = data.join("snapshots");
    assert!(text.contains(&snapshots.display().to_string()));
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        text.replace(
            &snapshots.display().to_string(),
            &dir.join("other-snapshots").display().to_string(),
        ),
    )
    .unwrap();
    let mut other = FabricProcess::start(&other, &dir.join("other.log"));
    other.wait_serving(Duration::from_secs(60)).await;
    eventually(Duration::from_secs(60), "every partition restored", || {
        let log = other.log_text();
        async move {
            (log.matches("partition restored from the state topic")
                .count()
                == 4)
                .then_some(())
        }
    })
    .await;
    eventually(Duration::from_secs(60), "every partition served", || {
        let grpc = other.grpc.clone();
        async move {
            use entity_fabric::proto::ListPartitionsRequest;
            use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
            let parts = CatalogServiceClient::connect(grpc)
                .await
                .ok()?
                .list_partitions(ListPartitionsRequest {})
                .await
                .ok()?
                .into_inner()
                .partitions;
            (parts.len() == 4 && parts.iter().all(|p| p.serving)).then_some(())
        }
    })
    .await;
    other
}

/// A partition rebuilt on another process from the state topic alone:
/// the first process stops, the changes topic loses every record (as
/// retention would), and a process with no disk of its own restores every
/// partition from the state topic; every customer, its lineage included,
/// is what the first served, and equal to the sources. A customer whose
/// root row was deleted before the stop moved with its partition too: its
/// root row inserted again brings it back whole on the other process, its
/// version going on from where the first left it (issue 21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_restored_from_the_state_topic_alone() {
    use entity_fabric::proto::GetLineageRequest;
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = brokers();
    let KafkaDemo {
        dir,
        config,
        data,
        prefix,
        fabric,
    } = start_demo(None, &brokers, "statealone", 300, true, |t| {
        t.replace(
            "root_table = \"customer\"",
            "root_table = \"customer\"\nlineage = true",
        )
    })
    .await;
    // Entities change row by row: the state topic holds diffs over them.
    let written = mutate_for(&data, 60.0, Duration::from_secs(5)).await;
    converge(&fabric, &data).await;
    // A customer deleted (its root row) before the stop: retired, its other
    // rows kept hidden, and the state topic carries it so.
    let gone = grpc_customers(&fabric, "")
        .await
        .remove("customer/7")
        .expect("customer 7 served");
    let mut db = demo_db(&data).await;
    let root: (String, String, String, String) =
        sqlx::query_as("SELECT name, email, tier, created_at FROM customers WHERE id = 7")
            .fetch_one(&mut db)
            .await
            .unwrap();
    sqlx::query("DELETE FROM customers WHERE id = 7")
        .execute(&mut db)
        .await
        .unwrap();
    converge(&fabric, &data).await;
    let served = grpc_customers(&fabric, "").await;
    assert!(!served.contains_key("customer/7"));
    let lineage = |f: &FabricProcess, ids: Vec<String>| {
        let grpc = f.grpc.clone();
        async move {
            let mut c = CatalogServiceClient::connect(grpc).await.unwrap();
            let mut out = Vec::new();
            for id in ids {
                let r = c
                    .get_lineage(GetLineageRequest {
                        r#type: "customer".into(),
                        id,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                out.push(r);
            }
            out
        }
    };
    let sample: Vec<String> = served.values().take(40).map(|e| e.id.clone()).collect();
    let lineage_before = lineage(&fabric, sample.clone()).await;
    let mut fabric = fabric;
    assert!(fabric.terminate(), "{}", fabric.log_text());

    // Every record of the changes topic gone: nothing to replay.
    let topic = format!("{prefix}.changes");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        let (_, high) = c
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(&topic, p, rdkafka::Offset::Offset(high))
            .unwrap();
    }
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let deleted = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .unwrap();
    for e in deleted.elements() {
        assert!(e.error().is_ok(), "{e:?}");
        let (low, high) = c
            .fetch_watermarks(&topic, e.partition(), Duration::from_secs(10))
            .unwrap();
        assert!(
            high > 0 && low == high,
            "partition {}: {low}..{high}",
            e.partition()
        );
    }

    // Another process, no snapshot of its own.
    let mut other = restored_elsewhere(dir.path(), &config, &data).await;
    let log = other.log_text();
    assert!(!log.contains("rebuilding it from the log"), "{log}");
    let restored = grpc_customers(&other, "").await;
    assert_eq!(restored.len(), served.len());
    for (k, e) in &served {
        assert_eq!(restored.get(k), Some(e), "{k} restored differently");
    }
    assert_eq!(lineage(&other, sample).await, lineage_before);
    // The deleted customer's root row comes back on the other process: the
    // whole customer with it (its rows were restored hidden), one version
    // above the one that retired it, which was one above the last served.
    sqlx::query("INSERT INTO customers (id, name, email, tier, created_at) VALUES (7, ?, ?, ?, ?)")
        .bind(&root.0)
        .bind(&root.1)
        .bind(&root.2)
        .bind(&root.3)
        .execute(&mut db)
        .await
        .unwrap();
    let back = eventually(
        Duration::from_secs(60),
        "customer 7 back on the other process",
        || {
            let other = &other;
            async move { grpc_customers(other, "").await.remove("customer/7") }
        },
    )
    .await;
    assert_eq!(back.version, gone.version + 2, "versions go on, never back");
    let shape = |e: &entity_fabric::proto::Entity| {
        e.tables
            .iter()
            .map(|t| (t.name.clone(), t.rows.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&back), shape(&gone), "back whole");
    // And it goes on from there.
    let more = mutate_for(&data, 30.0, Duration::from_secs(3)).await;
    let compared = converge(&other, &data).await;
    println!(
        "{written} source transactions, the changes topic emptied, {} customers restored from the state topic alone equal to what the first process served; {more} more transactions, {compared} customers equal to the sources",
        restored.len()
    );
    assert!(other.terminate(), "{}", other.log_text());
}

/// The entities and state topics deleted under a running fabric: it keeps
/// serving, holds what it would write there (log line, metric), and once an
/// operator makes the topics again it writes on: every version applied
/// after that is on the new entities topic, and the state topic restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_and_state_topics_deleted_under_a_running_fabric() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let brokers = brokers();
    let KafkaDemo {
        dir,
        config,
        data,
        prefix,
        mut fabric,
    } = start_demo(None, &brokers, "gone_out", 100, true, |t| t).await;
    let served = grpc_customers(&fabric, "").await;
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let (entities, state) = (format!("{prefix}.entities"), format!("{prefix}.state"));
    let written = delete_under_load(
        &admin,
        &[&entities, &state],
        &fabric,
        &data,
        &[
            "the broker lost this topic's partition",
            "writes to it are held and retried",
        ],
    )
    .await;
    // Still up and serving every customer, none gone back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(fabric.exited().is_none(), "{}", fabric.log_text());
    let now = grpc_customers(&fabric, "").await;
    for (k, e) in &served {
        assert!(
            now.get(k).is_some_and(|n| n.version >= e.version),
            "{k} went back"
        );
    }
    // The way back: the topics made again as the fabric makes them.
    let made = admin
        .create_topics(
            &[
                NewTopic::new(&entities, 4, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact"),
                NewTopic::new(&state, 4, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact"),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(made.iter().all(Result::is_ok), "{made:?}");
    let more = mutate_for(&data, 20.0, Duration::from_secs(3)).await;
    let compared = converge(&fabric, &data).await;
    // Every version applied after the topic came back is on it: each
    // entity's newest message is what gRPC serves for the entities it has.
    let grpc = grpc_customers(&fabric, "").await;
    let topic = read_entities(&brokers, &entities, Duration::from_secs(60), |t| {
        grpc.iter()
            .filter(|(k, e)| now.get(*k).is_none_or(|n| n.version < e.version))
            .all(|(k, e)| {
                t.get(k)
                    .and_then(|m| m.last())
                    .is_some_and(|m| m.version == e.version)
            })
    })
    .await;
    assert!(fabric.exited().is_none(), "{}", fabric.log_text());
    // The state topic was written whole again: another process restores
    // every customer from it as this one serves it.
    let last = grpc_customers(&fabric, "").await;
    assert!(
        fabric.log_text().contains(
            "the state topic's partition was deleted and made again: it is written whole"
        )
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    let mut other = restored_elsewhere(dir.path(), &config, &data).await;
    let restored = grpc_customers(&other, "").await;
    assert_eq!(restored.len(), last.len());
    for (k, e) in &last {
        assert_eq!(restored.get(k), Some(e), "{k} restored differently");
    }
    println!(
        "{entities} and {state} deleted: {written} source transactions held, {} customers served throughout; made again: {more} more transactions, {compared} customers equal to the sources, {} entities published since, {} restored from the state topic by another process",
        now.len(),
        topic.len(),
        restored.len()
    );
    assert!(other.terminate(), "{}", other.log_text());
}
