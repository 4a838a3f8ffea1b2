//! Forgetting an entity on request (right to erasure), through the real
//! binary against a real PostgreSQL, on the embedded bus with snapshot
//! encryption and access control:
//!
//! - only a principal with `forget:customer` may forget (others get
//!   PERMISSION_DENIED / UNAUTHENTICATED and an audit line); the forget is
//!   audited with who, which entity and why;
//! - the entity leaves memory at once, a watcher is told FORGET, and its
//!   later changes at the source are dropped (read-your-writes proves they
//!   were processed) and counted, across a SIGKILL and restart;
//! - no snapshot file, current or backed up before the forget, yields it
//!   (its key is gone), while every other entity still reads back;
//! - a sync-on-access entity forgotten is not read from its source;
//! - `fabric unblock` lets later changes build it again; a forget with
//!   `--allow-rebuild` lets the next change do so at once;
//! - on the Kafka bus: tombstones on the entities topic (operation
//!   `forget`) and the state topic (with the blocked id), a new process
//!   restoring from the state topic keeps it blocked, and a forget asked of
//!   a process that does not hold the entity is done by the one that does;
//! - sealed snapshots: a wrong master key or a missing
//!   `[snapshot.encryption]` refuses the start, the right key restores.

mod common;

use common::*;
use entity_fabric::proto::entity_change::Operation;
use entity_fabric::proto::{
    ForgetEntityRequest, GetEntityRequest, SourcePosition, WatchEntitiesRequest,
};
use entity_fabric::store::keystore::KeyStore;
use entity_fabric::store::snapshot;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic::Code;

const WITHIN: Duration = Duration::from_secs(60);
const DPO_TOKEN: &str = "dpo-token-5e1f0a9b77c24d13";
const READER_TOKEN: &str = "reader-token-0b8d6e2f41a97c35";
const MASTER: &str = "the snapshot master key of this test";
const PARTITIONS: u32 = 4;

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn secret_email(id: i64) -> String {
    format!("private.person.{id}@erase-me.example")
}

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint NOT NULL, city text);
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE addresses REPLICA IDENTITY FULL;
INSERT INTO customers
  SELECT i, 'customer ' || i, 'private.person.' || i || '@erase-me.example'
  FROM generate_series(1, 40) i;
INSERT INTO addresses SELECT i, 1 + i % 40, 'city ' || i FROM generate_series(1, 80) i;
";

fn config(dir: &Path, url: &str, db: &str) -> PathBuf {
    std::fs::write(dir.join("master.key"), MASTER).unwrap();
    let text = format!(
        r#"
{server}
[bus]
partitions = {PARTITIONS}

[snapshot]
dir = "{d}/snapshots"
interval = "500ms"
keep = 2

[snapshot.encryption]
key_file = "{d}/master.key"
keys_dir = "{d}/keys"

[dlq]
file = "{d}/dlq.jsonl"

[access]
anonymous = []

[[access.principals]]
name = "reader"
token_sha256 = ["{reader}"]
allow = ["read:customer", "read:profile"]

[[access.principals]]
name = "dpo"
token_sha256 = ["{dpo}"]
allow = ["read:*", "forget:customer", "forget:profile"]

[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.customers", "public.addresses"]
slot = "{db}"
publication = "{db}"

# Read by query only, for the sync-on-access type.
[[sources]]
name = "profiles_db"
kind = "postgres_cdc"
url = "{url}"

[[entities]]
name = "customer"
  [[entities.tables]]
  name = "customer"
  source = "crm"
  from = "public.customers"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "addresses"
  source = "crm"
  from = "public.addresses"
  id_column = "customer_id"
  primary_key = ["id"]

[[entities]]
name = "profile"
sync = "on_access"
max_age = "1h"
  [[entities.tables]]
  name = "profile"
  source = "profiles_db"
  from = "public.customers"
  id_column = "id"
  primary_key = ["id"]
"#,
        server = loopback_server(),
        d = dir.display(),
        reader = sha(READER_TOKEN),
        dpo = sha(DPO_TOKEN),
    );
    write_config(dir, &text)
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn get(ty: &str, id: &str, lsn: Option<&str>) -> GetEntityRequest {
    GetEntityRequest {
        r#type: ty.into(),
        id: id.into(),
        min_positions: lsn
            .map(|l| SourcePosition {
                source: "crm".into(),
                position: l.into(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The entity as the reader sees it: `Ok(tables)` or the gRPC error.
async fn read(
    fabric: &FabricProcess,
    ty: &str,
    id: &str,
    lsn: Option<&str>,
) -> Result<entity_fabric::proto::Entity, tonic::Status> {
    fabric
        .client()
        .await
        .get_entity(with_token(get(ty, id, lsn), Some(READER_TOKEN)))
        .await
        .map(|r| r.into_inner())
}

/// `fabric <args…>` as the data protection officer: exit success, stdout.
fn cli(fabric: &FabricProcess, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .args(["--addr", &fabric.grpc])
        .env("FABRIC_TOKEN", DPO_TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn metric(fabric: &FabricProcess, line_start: &str) -> f64 {
    let (_, body) = http_get(&fabric.admin, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Every snapshot file under `dir` read with the keystore in `keys` (as
/// it is now: a copy is opened, the fabric's own files are left alone):
/// (files read, customer ids found, records whose key is gone).
fn snapshot_contents(dir: &Path, keys: &Path) -> (usize, Vec<String>, usize) {
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(keys, scratch.path());
    let ks = KeyStore::open(scratch.path(), MASTER.as_bytes(), PARTITIONS).unwrap();
    let mut ids = Vec::new();
    let (mut files, mut erased) = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, ids, 0);
    };
    for f in entries {
        let path = f.unwrap().path();
        if path.extension().is_none_or(|x| x != "snap") {
            continue;
        }
        // The fabric may have pruned it since it was listed.
        let Ok(s) = snapshot::read(&path, Some(&ks)) else {
            continue;
        };
        files += 1;
        erased += s.erased;
        ids.extend(s.entities.iter().map(|e| e.key.id.to_string()));
    }
    (files, ids, erased)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        // Renamed or pruned meanwhile: skipped.
        if e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_entity_is_gone_everywhere_and_stays_gone_until_unblocked() {
    let db = unique("forget");
    let url = pg_fresh_db(&db).await;
    pg_at_source(&url, SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let log = dir.path().join("fabric.log");
    let snaps = dir.path().join("snapshots");
    let keys = dir.path().join("keys");
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;

    // Customer 7 with its two addresses, in memory and in a sealed snapshot.
    eventually(WITHIN, "customer 7 with its addresses", || async {
        let e = read(&fabric, "customer", "7", None).await.ok()?;
        (e.tables.iter().map(|t| t.rows.len()).sum::<usize>() == 3).then_some(())
    })
    .await;
    eventually(WITHIN, "a snapshot holding customer 7", || async {
        let (_, ids, _) = snapshot_contents(&snaps, &keys);
        ids.iter().any(|i| i == "7").then_some(())
    })
    .await;
    // A backup taken before the forget: snapshot files (keys kept apart).
    let backup = dir.path().join("backup");
    copy_dir(&snaps, &backup);
    let (backed_up, ids, _) = snapshot_contents(&backup, &keys);
    assert!(backed_up > 0 && ids.iter().any(|i| i == "7"));
    // Sealed: no clear value on disk, before or after.
    for f in std::fs::read_dir(&backup).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        let e = secret_email(7);
        assert!(!bytes.windows(e.len()).any(|w| w == e.as_bytes()));
    }

    // A watcher of customer 7.
    let mut watch = fabric
        .client()
        .await
        .watch_entities(with_token(
            WatchEntitiesRequest {
                r#type: "customer".into(),
                id: "7".into(),
                ..Default::default()
            },
            Some(READER_TOKEN),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.operation, Operation::Upsert as i32);

    // Who may forget: not a reader, not an anonymous caller.
    let ask = ForgetEntityRequest {
        r#type: "customer".into(),
        id: "7".into(),
        ..Default::default()
    };
    let mut client = fabric.client().await;
    let denied = client
        .forget_entity(with_token(ask.clone(), Some(READER_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let anon = client
        .forget_entity(with_token(ask.clone(), None))
        .await
        .unwrap_err();
    assert_eq!(anon.code(), Code::Unauthenticated, "{anon:?}");
    assert!(read(&fabric, "customer", "7", None).await.is_ok());

    // The data protection officer forgets customer 7.
    let (ok, out) = cli(
        &fabric,
        &[
            "forget",
            "customer",
            "7",
            "--reason",
            "erasure request 4711",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("forgotten: customer 7 (was held"), "{out}");
    assert!(out.contains("snapshot written without it"), "{out}");
    assert!(out.contains("its snapshot key is deleted"), "{out}");
    let gone = read(&fabric, "customer", "7", None).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(gone.message().contains("forgotten"), "{}", gone.message());
    assert!(read(&fabric, "customer", "8", None).await.is_ok());
    let change = tokio::time::timeout(WITHIN, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.operation, Operation::Forget as i32);
    assert_eq!(change.entity.unwrap().id, "7");

    // Its later changes at the source are processed and dropped.
    let lsn = pg_at_source(
        &url,
        "UPDATE customers SET name = 'changed after' WHERE id IN (7, 8);
         INSERT INTO addresses VALUES (1000, 7, 'new city');",
    )
    .await;
    let after = read(&fabric, "customer", "7", Some(&lsn))
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::NotFound, "{after:?}");
    let eight = read(&fabric, "customer", "8", Some(&lsn)).await.unwrap();
    assert!(format!("{eight:?}").contains("changed after"), "{eight:?}");
    let dropped = metric(
        &fabric,
        "fabric_blocked_changes_total{entity_type=\"customer\"}",
    )
    .await;
    assert!(dropped >= 1.0, "blocked changes counted: {dropped}");

    // No snapshot file, current or from the backup, yields it any more;
    // every other entity still reads back from the backup.
    let (_, now, _) = snapshot_contents(&snaps, &keys);
    assert!(!now.is_empty() && !now.iter().any(|i| i == "7"), "{now:?}");
    let (_, old, erased) = snapshot_contents(&backup, &keys);
    assert!(!old.iter().any(|i| i == "7"), "backup still yields 7");
    assert!(erased >= 1, "the backup's record of 7 reads as erased");
    assert!(old.iter().any(|i| i == "8"));

    // A sync-on-access entity forgotten before it was ever read is not
    // read from its source.
    let (ok, out) = cli(&fabric, &["forget", "profile", "5"]);
    assert!(ok && out.contains("was not held"), "{out}");
    let fetches = "fabric_source_fetches_total{source=\"profiles_db\",table=\"public.customers\"}";
    let before = metric(&fabric, fetches).await;
    let p = read(&fabric, "profile", "5", None).await.unwrap_err();
    assert_eq!(p.code(), Code::NotFound, "{p:?}");
    assert_eq!(metric(&fabric, fetches).await, before);
    assert!(read(&fabric, "profile", "6", None).await.is_ok());
    assert_eq!(metric(&fabric, fetches).await, before + 1.0);

    // SIGKILL, and every snapshot file lost: the fabric starts over from
    // its sources, which still hold customer 7; it stays forgotten (the
    // blocked ids outlive snapshot files), its changes still dropped.
    fabric.kill9();
    for f in std::fs::read_dir(&snaps).unwrap() {
        let path = f.unwrap().path();
        if path.extension().is_some_and(|x| x == "snap") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;
    let lsn = pg_at_source(
        &url,
        "UPDATE customers SET name = 'after restart' WHERE id = 7",
    )
    .await;
    let gone = read(&fabric, "customer", "7", Some(&lsn))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("forgotten"), "{gone:?}");
    assert!(read(&fabric, "customer", "9", Some(&lsn)).await.is_ok());
    assert!(
        fabric
            .log_text()
            .contains("blocked ids of forgotten entities restored")
    );

    // Unblocked: the next change builds it again, from what it carries.
    let (ok, out) = cli(&fabric, &["unblock", "customer", "7"]);
    assert!(ok && out.contains("unblocked: customer 7"), "{out}");
    let lsn = pg_at_source(&url, "UPDATE customers SET name = 'returned' WHERE id = 7").await;
    let back = read(&fabric, "customer", "7", Some(&lsn)).await.unwrap();
    assert!(format!("{back:?}").contains("returned"));

    // Forgotten with a rebuild allowed: gone now, back with its next change.
    let (ok, out) = cli(&fabric, &["forget", "customer", "8", "--allow-rebuild"]);
    assert!(ok && out.contains("later changes build it again"), "{out}");
    assert_eq!(
        read(&fabric, "customer", "8", None)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let lsn = pg_at_source(
        &url,
        "UPDATE customers SET name = 'eight again' WHERE id = 8",
    )
    .await;
    let eight = read(&fabric, "customer", "8", Some(&lsn)).await.unwrap();
    assert!(format!("{eight:?}").contains("eight again"));

    // The audit trail: the refusals, and who forgot what and why; no token.
    let text = fabric.log_text();
    assert!(
        text.lines().any(|l| l.contains("call denied")
            && l.contains("reader")
            && l.contains("ForgetEntity")),
        "no audit line for the reader's refusal"
    );
    assert!(
        text.lines().any(|l| l.contains("entity forgotten")
            && l.contains("dpo")
            && l.contains("customer/7")
            && l.contains("erasure request 4711")),
        "no audit line for the forget:\n{text}"
    );
    for secret in [DPO_TOKEN, READER_TOKEN, MASTER] {
        assert!(!text.contains(secret), "a secret in the log");
    }
    assert!(fabric.terminate());
    pg_drop_db(&db, &db).await;
}

/// Every message of `topic` with `key`, in order: (value, operation header).
async fn messages_of(brokers: &str, topic: &str, key: &str) -> Vec<(Option<Vec<u8>>, String)> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::{Headers, Message};
    let c = consumer_from_start(brokers, topic);
    let parts = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap()
        .topics()[0]
        .partitions()
        .len();
    let mut ends = Vec::new();
    for p in 0..parts as i32 {
        let (_, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        ends.push(high);
    }
    let mut out = Vec::new();
    let mut read = vec![0i64; ends.len()];
    let deadline = std::time::Instant::now() + WITHIN;
    while read.iter().zip(&ends).any(|(r, e)| r < e) {
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} not read to its end"
        );
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await else {
            continue;
        };
        read[m.partition() as usize] = m.offset() + 1;
        if m.key() != Some(key.as_bytes()) {
            continue;
        }
        let op = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "fabric.operation"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        out.push((m.payload().map(<[u8]>::to_vec), op));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_kafka_a_forget_tombstones_the_topics_and_holds_in_a_new_process() {
    let brokers = std::env::var("FABRIC_TEST_KAFKA").expect(
        "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
    );
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("forget");
    let settings = DemoSettings {
        customers: 60,
        snapshot_interval: "500ms",
        ..Default::default()
    };
    let cfg = kafka_demo_config(dir.path(), &settings, &brokers, &prefix, false);
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric-0.log"));
    fabric.wait_serving(WITHIN).await;
    converge_within(&fabric, &data, WITHIN).await;

    let (ok, out) = cli(&fabric, &["forget", "customer", "42", "--reason", "gdpr"]);
    assert!(ok && out.contains("was held"), "{out}");
    let gone = fabric
        .client()
        .await
        .get_entity(get("customer", "42", None))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // The entities topic: its versions, then a tombstone saying `forget`.
    let msgs = messages_of(&brokers, &format!("{prefix}.entities"), "customer/42").await;
    let (last, op) = msgs.last().expect("customer 42 on the entities topic");
    assert!(last.is_none() && op == "forget", "{msgs:?}");
    assert!(msgs[..msgs.len() - 1].iter().all(|(v, _)| v.is_some()));
    // The state topic: a tombstone, and the blocked id.
    let state = format!("{prefix}.state");
    let msgs = messages_of(&brokers, &state, "customer/42").await;
    assert!(msgs.last().is_some_and(|(v, _)| v.is_none()), "{msgs:?}");
    let blocked = messages_of(&brokers, &state, "!blocked/customer/42").await;
    assert!(
        blocked.last().is_some_and(|(v, _)| v.is_some()),
        "{blocked:?}"
    );

    // A change at the source is dropped.
    let bump = |name: &'static str| {
        let data = data.clone();
        async move {
            let mut c = demo_db(&data).await;
            sqlx::query("UPDATE customers SET name = ?1 WHERE id = 42")
                .bind(name)
                .execute(&mut c)
                .await
                .unwrap();
        }
    };
    bump("changed after the forget").await;
    let counter = "fabric_blocked_changes_total{entity_type=\"customer\"}";
    eventually(WITHIN, "the change of 42 dropped", || async {
        (metric(&fabric, counter).await >= 1.0).then_some(())
    })
    .await;
    assert!(fabric.terminate());

    // A new process with no local state restores from the state topic and
    // keeps 42 forgotten; its sources' changes of 42 are still dropped.
    let second = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{}/snapshots", data.display()),
        &format!("{}/snapshots", second.path().display()),
    );
    assert!(
        text.contains(&second.path().display().to_string()),
        "snapshot dir not moved"
    );
    let cfg2 = second.path().join("fabric.toml");
    std::fs::write(&cfg2, text).unwrap();
    let mut fabric = FabricProcess::start(&cfg2, &second.path().join("fabric-1.log"));
    fabric.wait_serving(WITHIN).await;
    let forgotten = eventually(WITHIN, "42 served as forgotten", || async {
        match fabric
            .client()
            .await
            .get_entity(get("customer", "42", None))
            .await
        {
            Err(s) if s.code() == Code::NotFound => Some(s.message().to_string()),
            _ => None,
        }
    })
    .await;
    assert!(forgotten.contains("forgotten"), "{forgotten}");
    assert!(
        fabric
            .log_text()
            .contains("partition restored from the state topic")
    );
    bump("changed again").await;
    eventually(
        WITHIN,
        "the change of 42 dropped by the new process",
        || async { (metric(&fabric, counter).await >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        fabric
            .client()
            .await
            .get_entity(get("customer", "42", None))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Two processes: a forget asked of the one that does not hold the
    // entity is done by the one that does; both then answer NOT_FOUND.
    let third = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&cfg2).unwrap().replace(
        &second.path().display().to_string(),
        &third.path().display().to_string(),
    );
    let (grpc, admin) = (free_port(), free_port());
    let text = {
        let c = entity_fabric::config::Config::load(&cfg2).unwrap();
        text.replace(&c.server.grpc_addr, &format!("127.0.0.1:{grpc}"))
            .replace(&c.server.admin_addr, &format!("127.0.0.1:{admin}"))
    };
    let cfg3 = third.path().join("fabric.toml");
    std::fs::write(&cfg3, text).unwrap();
    let mut other = FabricProcess::start(&cfg3, &third.path().join("fabric-2.log"));
    other.wait_serving(WITHIN).await;
    let p = entity_fabric::event::EntityKey::new("customer", "17").partition(settings.partitions);
    let elsewhere = eventually(WITHIN, "partition of 17 held by one of two", || async {
        let (a, b) = (serves(&fabric, p).await, serves(&other, p).await);
        match (a, b) {
            (true, false) if holds_some(&other).await => Some(&other),
            (false, true) if holds_some(&fabric).await => Some(&fabric),
            _ => None,
        }
    })
    .await;
    let holder = if std::ptr::eq(elsewhere, &fabric) {
        &other
    } else {
        &fabric
    };
    let (ok, out) = cli(elsewhere, &["forget", "customer", "17"]);
    assert!(ok && out.contains("was held"), "{out}");
    // Applied by the holder (its applier's line), not by the one asked.
    let applied = "entity forgotten key=customer/17";
    assert!(
        holder.log_text().contains(applied),
        "not applied by the holder"
    );
    assert!(!elsewhere.log_text().contains(applied));
    for f in [&fabric, &other] {
        let s = f
            .client()
            .await
            .get_entity(get("customer", "17", None))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    assert!(other.terminate());
    assert!(fabric.terminate());
}

/// Partition `p` is served by this process.
async fn serves(f: &FabricProcess, p: u32) -> bool {
    partitions_served(f).await.contains(&p)
}

async fn holds_some(f: &FabricProcess) -> bool {
    !partitions_served(f).await.is_empty()
}

async fn partitions_served(f: &FabricProcess) -> Vec<u32> {
    use entity_fabric::proto::ListPartitionsRequest;
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    let Ok(mut c) = CatalogServiceClient::connect(f.grpc.clone()).await else {
        return Vec::new();
    };
    match c.list_partitions(ListPartitionsRequest {}).await {
        Ok(r) => r
            .into_inner()
            .partitions
            .into_iter()
            .filter(|p| p.serving)
            .map(|p| p.partition)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Runs `fabric run --config cfg` expecting it to refuse to start: its
/// exit status and what it said (within 60 s).
fn refused_start(cfg: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["run", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WITHIN;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("fabric did not refuse to start within {WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sealed_snapshots_refuse_a_wrong_key_or_no_keystore_and_restore_with_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    std::fs::write(&key, "the right master key, 32 bytes..").unwrap();
    let cfg = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 200,
            snapshot_interval: "500ms",
            ..Default::default()
        },
    );
    let plain = std::fs::read_to_string(&cfg).unwrap();
    let sealed = format!(
        "{plain}\n[snapshot.encryption]\nkey_file = \"{}\"\n",
        key.display()
    );
    std::fs::write(&cfg, &sealed).unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("fabric.log");
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;
    converge_within(&fabric, &data, WITHIN).await;
    assert!(fabric.terminate(), "no clean stop");

    // Another master key: refused, naming what is wrong; nothing changed.
    std::fs::write(&key, "another master key, also 32 byte").unwrap();
    let (status, err) = refused_start(&cfg);
    assert!(!status.success());
    assert!(err.contains("does not open with this master key"), "{err}");
    assert!(!err.contains("another master key"), "the key was printed");
    // No [snapshot.encryption]: refused rather than re-reading every source.
    std::fs::write(&cfg, &plain).unwrap();
    let (status, err) = refused_start(&cfg);
    assert!(!status.success());
    assert!(
        err.contains("encrypted and [snapshot.encryption] is not configured"),
        "{err}"
    );
    // The right key again: restored from the sealed snapshots.
    std::fs::write(&key, "the right master key, 32 bytes..").unwrap();
    std::fs::write(&cfg, &sealed).unwrap();
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;
    assert!(
        fabric
            .log_text()
            .lines()
            .any(|l| l.contains("restored") && l.contains("entities=200")),
        "not restored from the snapshots"
    );
    converge_within(&fabric, &data, WITHIN).await;
    assert!(fabric.terminate());
}
