//! Shared helpers of the integration tests: start the real `fabric` binary
//! on free loopback ports, wait for it, stop or kill it, talk gRPC to it.
#![allow(dead_code)]

pub mod entities_topic;
pub mod two_databases;

use entity_fabric::proto::entity_service_client::EntityServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings for a test copy of `config/demo.toml`.
pub struct DemoSettings {
    pub customers: u32,
    pub mutations_per_second: f64,
    pub snapshot_interval: &'static str,
    pub partitions: u32,
}

impl Default for DemoSettings {
    fn default() -> Self {
        DemoSettings {
            customers: 300,
            mutations_per_second: 0.0,
            snapshot_interval: "1s",
            partitions: 4,
        }
    }
}

/// Writes the project's demo config into `dir`, with its data under `dir`
/// and free ports; returns the config path.
pub fn demo_config(dir: &Path, s: &DemoSettings) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml"))
            .unwrap();
    let data = dir.join("data");
    let text = text
        .replace("\"../data", &format!("\"{}", data.display()))
        .replace("127.0.0.1:50051", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", free_port()))
        .replace("customers = 5000", &format!("customers = {}", s.customers))
        .replace(
            "mutations_per_second = 20",
            &format!("mutations_per_second = {}", s.mutations_per_second),
        )
        .replace(
            "interval = \"10s\"",
            &format!("interval = \"{}\"", s.snapshot_interval),
        )
        .replace("partitions = 8", &format!("partitions = {}", s.partitions));
    let path = dir.join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `[masking]` with a key file of its own in `dir`, for configs that
/// several processes share (the Kafka bus refuses a per-process key when a
/// view hashes).
pub fn shared_mask_key(dir: &Path) -> String {
    let path = dir.join("mask.key");
    std::fs::write(&path, format!("test key {}", unique("mask"))).unwrap();
    format!("\n[masking]\nkey_file = \"{}\"\n", path.display())
}

/// The demo config on the Kafka bus at `brokers` with topics `<prefix>.*`;
/// `compacted` is the entities topic's `entities_compacted` (a compacted
/// topic loses old versions by design, so tests that count every version
/// turn it off).
pub fn kafka_demo_config(
    dir: &Path,
    s: &DemoSettings,
    brokers: &str,
    prefix: &str,
    compacted: bool,
) -> PathBuf {
    let path = demo_config(dir, s);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("kind = \"embedded\""));
    let text = text.replace("kind = \"embedded\"", "kind = \"kafka\"")
        + &format!(
            "\n[bus.kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\nentities_compacted = {compacted}\n"
        )
        + &shared_mask_key(dir);
    std::fs::write(&path, text).unwrap();
    path
}

/// A `[server]` section on free loopback ports, for test configs.
pub fn loopback_server() -> String {
    format!(
        "[server]\ngrpc_addr = \"127.0.0.1:{}\"\nadmin_addr = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port()
    )
}

/// Writes `text` as `dir/fabric.toml`; returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A text value, as pushed over `IngestService`.
pub fn text(s: &str) -> entity_fabric::proto::Value {
    entity_fabric::proto::Value {
        kind: Some(entity_fabric::proto::value::Kind::Text(s.into())),
    }
}

/// A consumer of every partition of `topic` from its beginning.
pub fn consumer_from_start(brokers: &str, topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer;
    let c: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("test_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts = md.topics()[0].partitions().len();
    assert!(parts > 0, "topic {topic} has no partitions");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

/// Reads `[server]` addresses back from a config file.
/// The config's gRPC and admin addresses, read from its text (so that a
/// config naming `${VARIABLES}` only the fabric's environment holds loads).
fn addrs(config: &Path) -> (String, String) {
    let text = std::fs::read_to_string(config).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let server = doc.get("server").and_then(|s| s.as_table());
    let addr = |key: &str, default: &str| {
        server
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string()
    };
    (
        addr("grpc_addr", "127.0.0.1:50051"),
        addr("admin_addr", "127.0.0.1:9464"),
    )
}

/// A running `fabric run` process.
pub struct FabricProcess {
    child: Option<Child>,
    pub grpc: String,
    pub admin: String,
    pub log: PathBuf,
}

impl FabricProcess {
    /// Starts `fabric run --config <config>`, logging (JSON) to `log`.
    pub fn start(config: &Path, log: &Path) -> Self {
        Self::start_env(config, log, &[])
    }

    /// [`start`](Self::start) with these environment variables set for the
    /// fabric.
    pub fn start_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let (grpc, admin) = addrs(config);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fabric"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("FABRIC_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        FabricProcess {
            child: Some(child),
            grpc: format!("http://{grpc}"),
            admin,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the health service says SERVING.
    pub async fn wait_serving(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "fabric exited with {status} before serving; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(ch) = self.channel().await
                && let Ok(r) = HealthClient::new(ch)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fabric not serving within {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(self.grpc.clone())
            .unwrap()
            .connect()
            .await
    }

    pub async fn client(&self) -> EntityServiceClient<Channel> {
        EntityServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How the process ended, when it did.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL: no shutdown, no final snapshot.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FabricProcess {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what the fabric said last.
        if std::thread::panicking() {
            let log = self.log_text();
            // Backtrace frames say little here; the lines around them do.
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with("at ")
                        || t.split(':')
                            .next()
                            .is_some_and(|n| n.parse::<u32>().is_ok()))
                })
                .rev()
                .take(40)
                .collect();
            eprintln!(
                "--- last lines of {} ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A connection to the demo's three SQLite files (billing and support attached).
pub async fn demo_db(data: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let demo = data.join("demo");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(demo.join("crm.db"))
        .busy_timeout(Duration::from_secs(10));
    let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    for (db, alias) in [("billing.db", "billing"), ("support.db", "support")] {
        let sql = format!("ATTACH DATABASE '{}' AS {alias}", demo.join(db).display());
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    }
    c
}

/// What the SQLite sources say every customer entity holds: id -> table -> rows
/// keyed by primary key, each row a JSON object of its columns.
pub type Expected = std::collections::BTreeMap<
    i64,
    std::collections::BTreeMap<String, std::collections::BTreeMap<i64, serde_json::Value>>,
>;

pub async fn expected_customers(data: &Path) -> Expected {
    let mut c = demo_db(data).await;
    let mut out = Expected::new();
    let queries = [
        (
            "customer",
            "SELECT json_object('id', id, 'name', name, 'email', email, 'tier', tier, 'created_at', created_at), id, id FROM customers",
        ),
        (
            "addresses",
            "SELECT json_object('id', id, 'customer_id', customer_id, 'kind', kind, 'street', street, 'city', city, 'country', country), customer_id, id FROM addresses",
        ),
        (
            "invoices",
            "SELECT json_object('id', id, 'customer_id', customer_id, 'amount', amount, 'currency', currency, 'status', status, 'issued_on', issued_on), customer_id, id FROM billing.invoices",
        ),
        (
            "payments",
            "SELECT json_object('id', p.id, 'invoice_id', p.invoice_id, 'amount', p.amount, 'method', p.method, 'paid_at', p.paid_at), i.customer_id, p.id FROM billing.payments p JOIN billing.invoices i ON i.id = p.invoice_id",
        ),
        (
            "tickets",
            "SELECT json_object('id', id, 'customer_id', customer_id, 'subject', subject, 'status', status, 'priority', priority, 'opened_at', opened_at), customer_id, id FROM support.tickets",
        ),
    ];
    use sqlx::Row;
    for (table, sql) in queries {
        for r in sqlx::query(sql).fetch_all(&mut c).await.unwrap() {
            let row: serde_json::Value = serde_json::from_str(&r.get::<String, _>(0)).unwrap();
            let cid: i64 = r.get(1);
            let pk: i64 = r.get(2);
            out.entry(cid)
                .or_default()
                .entry(table.to_string())
                .or_default()
                .insert(pk, row);
        }
    }
    // An entity exists only with its customer row (the root) in the demo.
    out.retain(|_, t| t.contains_key("customer"));
    out
}

/// An entity from gRPC in the same shape as [`Expected`]'s values.
pub fn entity_tables(
    e: &entity_fabric::proto::Entity,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<i64, serde_json::Value>> {
    let mut out = std::collections::BTreeMap::new();
    for t in &e.tables {
        let rows: &mut std::collections::BTreeMap<i64, serde_json::Value> =
            out.entry(t.name.clone()).or_default();
        for r in &t.rows {
            let obj: serde_json::Map<String, serde_json::Value> = r
                .columns
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        entity_fabric::view::value_from_proto(v).unwrap().to_json(),
                    )
                })
                .collect();
            let id = obj["id"].as_i64().unwrap();
            rows.insert(id, serde_json::Value::Object(obj));
        }
    }
    out
}

/// Whether a value the fabric serves equals what SQLite holds: equal JSON,
/// or the same instant (SQLite keeps `YYYY-MM-DD HH:MM:SS` text, the fabric
/// serves RFC 3339), or the same decimal/number.
pub fn same_value(sqlite: &serde_json::Value, fabric: &serde_json::Value) -> bool {
    use entity_fabric::event::value::parse_timestamp;
    if sqlite == fabric {
        return true;
    }
    match (sqlite, fabric) {
        (serde_json::Value::String(a), serde_json::Value::String(b)) => {
            matches!((parse_timestamp(a), parse_timestamp(b)), (Some(x), Some(y)) if x == y)
        }
        (serde_json::Value::Number(a), serde_json::Value::String(b))
        | (serde_json::Value::String(b), serde_json::Value::Number(a)) => {
            b.parse::<f64>().ok() == a.as_f64()
        }
        _ => false,
    }
}

/// Differences between SQLite's truth and the fabric's entity, as text.
pub fn diff_entity(
    id: i64,
    want: &std::collections::BTreeMap<String, std::collections::BTreeMap<i64, serde_json::Value>>,
    got: &std::collections::BTreeMap<String, std::collections::BTreeMap<i64, serde_json::Value>>,
) -> Vec<String> {
    let mut out = Vec::new();
    let tables: std::collections::BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    for t in tables {
        let empty = Default::default();
        let w = want.get(t).unwrap_or(&empty);
        let g = got.get(t).unwrap_or(&empty);
        let pks: std::collections::BTreeSet<&i64> = w.keys().chain(g.keys()).collect();
        for pk in pks {
            match (w.get(pk), g.get(pk)) {
                (Some(a), Some(b)) => {
                    let a = a.as_object().unwrap();
                    let b = b.as_object().unwrap();
                    for (col, av) in a {
                        let bv = b.get(col).unwrap_or(&serde_json::Value::Null);
                        if !same_value(av, bv) {
                            out.push(format!(
                                "customer {id} {t}[{pk}].{col}: source {av}, fabric {bv}"
                            ));
                        }
                    }
                }
                (Some(_), None) => {
                    out.push(format!("customer {id} {t}[{pk}]: missing in the fabric"))
                }
                (None, Some(_)) => out.push(format!(
                    "customer {id} {t}[{pk}]: in the fabric, not in the source"
                )),
                (None, None) => {}
            }
        }
    }
    out
}

/// Every id of one entity type, through `ListEntities` pages of `page`.
pub async fn all_ids(
    client: &mut EntityServiceClient<Channel>,
    entity_type: &str,
    page: u32,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client
            .list_entities(entity_fabric::proto::ListEntitiesRequest {
                r#type: entity_type.into(),
                page_size: page,
                page_token: token.clone(),
            })
            .await;
        // A process of the group stopping or a partition moving answers
        // UNAVAILABLE, "retry": as a client is told to, retry.
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => panic!("ListEntities failed: {s:?}"),
        };
        ids.extend(resp.ids);
        if resp.next_page_token.is_empty() {
            return ids;
        }
        token = resp.next_page_token;
    }
}

/// Compares every customer entity with the demo's sources; returns how
/// many customers the sources hold and the mismatches.
pub async fn compare_all(
    client: &mut EntityServiceClient<Channel>,
    data: &Path,
) -> (usize, Vec<String>) {
    let want = expected_customers(data).await;
    (want.len(), compare_with(client, &want).await)
}

/// Compares every customer entity the fabric serves with `want`; returns
/// the mismatches (empty: equal).
pub async fn compare_with(
    client: &mut EntityServiceClient<Channel>,
    want: &Expected,
) -> Vec<String> {
    use entity_fabric::proto::BatchGetEntitiesRequest;
    let ids = all_ids(client, "customer", 500).await;
    let mut mismatches = Vec::new();
    let have: std::collections::BTreeSet<i64> = ids.iter().map(|i| i.parse().unwrap()).collect();
    for id in want.keys() {
        if !have.contains(id) {
            mismatches.push(format!("customer {id}: missing in the fabric"));
        }
    }
    for id in &have {
        if !want.contains_key(id) {
            mismatches.push(format!("customer {id}: in the fabric, not in the sources"));
        }
    }
    for chunk in ids.chunks(500) {
        let resp = client
            .batch_get_entities(BatchGetEntitiesRequest {
                r#type: "customer".into(),
                ids: chunk.to_vec(),
                view: String::new(),
                ..Default::default()
            })
            .await;
        // A partition moving between processes answers UNAVAILABLE with a
        // retry-after: a mismatch for now (callers that wait retry).
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                mismatches.push(format!("batch read unavailable: {}", s.message()));
                continue;
            }
            Err(s) => panic!("batch read failed: {s:?}"),
        };
        for e in resp.entities {
            let id: i64 = e.id.parse().unwrap();
            if let Some(w) = want.get(&id) {
                mismatches.extend(diff_entity(id, w, &entity_tables(&e)));
            }
        }
    }
    mismatches
}

/// The PostgreSQL (wal_level=logical) the test command started
/// (`scripts/services.sh`). Missing is a failure, never a skip.
pub fn pg_url() -> String {
    std::env::var("FABRIC_TEST_PG_URL").expect(
        "FABRIC_TEST_PG_URL is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    )
}

/// The MariaDB (ROW/FULL binlog) the test command started. Missing is a failure.
pub fn mysql_url() -> String {
    std::env::var("FABRIC_TEST_MYSQL_URL").expect(
        "FABRIC_TEST_MYSQL_URL is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    )
}

/// A name unique to this test run, for databases, slots and tables.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One column of an entity's first table's first row, as text; `None` while
/// the fabric is unreachable or the entity is missing.
pub async fn first_row_field(
    grpc: &str,
    entity_type: &str,
    id: &str,
    column: &str,
) -> Option<String> {
    let mut client = EntityServiceClient::connect(grpc.to_string()).await.ok()?;
    let e = client
        .get_entity(entity_fabric::proto::GetEntityRequest {
            r#type: entity_type.into(),
            id: id.into(),
            view: String::new(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let v = e.tables.first()?.rows.first()?.columns.get(column)?;
    entity_fabric::view::value_from_proto(v)
        .ok()
        .map(|v| v.to_string())
}

/// Waits (up to `within`) until every customer entity equals the SQLite
/// sources under `data`; returns how many were compared, or panics with the
/// first mismatches and the fabric's log.
pub async fn converge_within(fabric: &FabricProcess, data: &Path, within: Duration) -> usize {
    let mut client = fabric.client().await;
    let deadline = Instant::now() + within;
    loop {
        let (n, mismatches) = compare_all(&mut client, data).await;
        if mismatches.is_empty() {
            return n;
        }
        if Instant::now() > deadline {
            panic!(
                "{} mismatches after {within:?}, first ones:\n{}\nlog:\n{}",
                mismatches.len(),
                mismatches
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n"),
                fabric.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The demo workload against the SQLite sources under `data`, run by the
/// test process (so killing the fabric does not stop it).
pub struct Workload {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<u64>,
}

impl Workload {
    pub fn start(data: &Path, per_second: f64) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let demo = data.join("demo");
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                entity_fabric::demo::mutate(&demo, per_second, stop)
                    .await
                    .unwrap()
            }
        });
        Workload { stop, task }
    }

    /// Stops it; returns the transactions it committed.
    pub async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// An Apache Kafka node of this test's own (broker and controller in one
/// process, KRaft), started by `scripts/kafka.sh node`: storage in `dir`,
/// kept across `kill9` and `restart` as a real broker's disk is.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    node_id: u32,
    controller_port: u16,
    voters: String,
    cluster_id: String,
    /// A server.properties of the test's own (`kafka.sh run`), else one
    /// made by `kafka.sh node` from the fields above.
    properties: Option<PathBuf>,
    child: Option<std::process::Child>,
}

impl Broker {
    /// A one-node cluster on `port` (its controller on a free port),
    /// ready to serve when this returns.
    pub fn start(dir: &Path, port: u16) -> Self {
        let controller_port = free_port();
        let mut b = Broker {
            dir: dir.to_path_buf(),
            port,
            node_id: 1,
            controller_port,
            voters: format!("1@127.0.0.1:{controller_port}"),
            cluster_id: cluster_id(),
            properties: None,
            child: None,
        };
        b.spawn();
        b.wait_started();
        b
    }

    /// A node run from `properties` (its `log.dirs` formatted on the first
    /// start), listening on `port`; logs and state beside it in `dir`.
    pub fn start_with(dir: &Path, port: u16, properties: &Path) -> Self {
        let mut b = Broker {
            dir: dir.to_path_buf(),
            port,
            node_id: 1,
            controller_port: 0,
            voters: String::new(),
            cluster_id: cluster_id(),
            properties: Some(properties.to_path_buf()),
            child: None,
        };
        b.spawn();
        b.wait_started();
        b
    }

    /// `127.0.0.1:<port>`, for `brokers =`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn spawn(&mut self) {
        let script = std::env::var("FABRIC_TEST_KAFKA_SH").expect(
            "FABRIC_TEST_KAFKA_SH is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
        );
        std::fs::create_dir_all(&self.dir).unwrap();
        // A new log each start, so that readiness is this start's.
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = std::process::Command::new(script);
        match &self.properties {
            Some(p) => cmd.arg("run").arg(p),
            None => cmd
                .arg("node")
                .arg(&self.dir)
                .arg(self.node_id.to_string())
                .arg(self.port.to_string())
                .arg(self.controller_port.to_string())
                .arg(&self.voters),
        };
        let child = cmd
            .arg(&self.cluster_id)
            .arg("384m")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn wait_started(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains("Kafka Server started") {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "Kafka node {} exited ({status}) before serving; its log:\n{log}",
                    self.node_id
                );
            }
            assert!(
                Instant::now() < deadline,
                "Kafka node {} did not start in 90 s; see {}",
                self.node_id,
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no shutdown, what the broker acknowledged stays in the page
    /// cache as after a process crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Killed (if running) and started again on its storage, ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_started();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A new KRaft cluster id: 16 random bytes in unpadded base64url, as
/// Kafka's own `random-uuid` prints, and like it never starting with `-`
/// (the storage tool would take it for an option).
fn cluster_id() -> String {
    use base64::Engine;
    loop {
        let bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// Three Kafka nodes of this test's own, each broker and controller (a
/// quorum of 3 survives the loss of one): topics made here default to
/// replication factor 3 and `min.insync.replicas` 2, so a killed leader is
/// a real failover.
pub struct Cluster {
    pub nodes: Vec<Broker>,
}

impl Cluster {
    pub fn start(dir: &Path) -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id();
        let mut nodes: Vec<Broker> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, controller_port))| {
                let mut b = Broker {
                    dir: dir.join(format!("node{}", i + 1)),
                    port,
                    node_id: i as u32 + 1,
                    controller_port,
                    voters: voters.clone(),
                    cluster_id: cluster_id.clone(),
                    properties: None,
                    child: None,
                };
                b.spawn();
                b
            })
            .collect();
        for n in &mut nodes {
            n.wait_started();
        }
        Cluster { nodes }
    }

    /// Every node's address, for `brokers =` (a client finds the rest).
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(Broker::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node with this broker id (1, 2 or 3).
    pub fn node(&mut self, id: i32) -> &mut Broker {
        &mut self.nodes[id as usize - 1]
    }
}

/// A fresh database on the test PostgreSQL; returns its URL.
pub async fn pg_fresh_db(name: &str) -> String {
    use sqlx::Connection;
    let base = pg_url();
    let mut c = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// Drops a database of [`pg_fresh_db`] and the replication slot `slot`.
pub async fn pg_drop_db(name: &str, slot: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
    let _ = sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .execute(&mut c)
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut c)
    .await;
}

/// Runs SQL on the test PostgreSQL at `url` and returns the LSN after it.
/// The test server runs with `synchronous_commit = off`, where
/// `pg_current_wal_lsn()` may fall short of a commit: this session commits
/// synchronously.
pub async fn pg_at_source(url: &str, sql: &str) -> String {
    use sqlx::{Connection, Row};
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0)
}

/// A TCP proxy on loopback in front of a server (a database), which a test
/// cuts and restores: a source's connection lost while its database stays up.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` (host:port).
    pub async fn start(target: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, o, target) = (cut.clone(), open.clone(), target.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::Acquire) {
                    // Cut: the connection is closed as soon as it is made.
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                o.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy {
            port,
            cut,
            open,
            task,
        }
    }

    /// `url` (scheme://user@host:port/path) with its host and port this
    /// proxy's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (user, rest) = rest.split_once('@').unwrap();
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        format!("{scheme}://{user}@127.0.0.1:{}{path}", self.port)
    }

    /// Closes every connection through the proxy, and every new one as soon
    /// as it is made, until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        for h in self.open.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// The host:port of a `scheme://user@host:port/path` URL.
pub fn url_address(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.split_once('@').map_or(rest, |x| x.1);
    rest.split('/').next().unwrap().to_string()
}
