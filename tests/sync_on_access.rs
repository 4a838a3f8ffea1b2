//! Entities read straight from their sources, through the real binary
//! against real PostgreSQL and MariaDB:
//!
//! - a `sync = "on_access"` type (nothing captured) is loaded when first
//!   read, served from memory while younger than `max_age` (no source query:
//!   counted by the fabric per table, and by PostgreSQL's own statistics),
//!   refreshed after it, and dropped from memory when not read for
//!   `evict_after`;
//! - 100 concurrent reads of an entity not yet loaded make one query per
//!   source table;
//! - a change-captured type read with a staleness bound: an entity missing
//!   from memory (its source started without an initial snapshot) is read
//!   from the source, kept, and from then on changed by capture.

mod common;

use common::*;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use entity_fabric::proto::{BatchGetEntitiesRequest, Entity, GetEntityRequest, SourcePosition};
use mysql_async::prelude::*;
use sqlx::{Connection, PgConnection, Row};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;

const MAX_AGE: Duration = Duration::from_secs(2);
const EVICT_AFTER: Duration = Duration::from_secs(4);

fn config(dir: &Path, pg: &str, my: &str, db: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"
[bus]
partitions = 4
[snapshot]
dir = "{d}/snapshots"
interval = "1s"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"

# Captured: accounts. Started without an initial snapshot, so rows that
# were there before are not in memory until read with a staleness bound.
[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{pg}"
tables = ["public.accounts"]
slot = "{db}"
publication = "{db}"
initial_snapshot = false

# Read by query only.
[[sources]]
name = "profiles_db"
kind = "postgres_cdc"
url = "{pg}"

[[sources]]
name = "shop"
kind = "mysql_binlog"
url = "{my}"

[[entities]]
name = "account"
  [[entities.tables]]
  name = "account"
  source = "crm"
  from = "public.accounts"
  id_column = "id"
  primary_key = ["id"]

[[entities]]
name = "profile"
sync = "on_access"
max_age = "{max_age}ms"
evict_after = "{evict}ms"
  [[entities.tables]]
  name = "profile"
  source = "profiles_db"
  from = "public.profiles"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "prefs"
  source = "profiles_db"
  from = "public.prefs"
  id_column = "profile_id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "orders"
  source = "shop"
  from = "{db}.orders"
  id_column = "profile_id"
  primary_key = ["id"]

# The same rows, bounded by count and by bytes.
[[entities]]
name = "card"
sync = "on_access"
evict_after = "1h"
max_entities = 2
  [[entities.tables]]
  name = "card"
  source = "profiles_db"
  from = "public.profiles"
  id_column = "id"
  primary_key = ["id"]

[[entities]]
name = "tiny"
sync = "on_access"
evict_after = "1h"
max_bytes = 1
  [[entities.tables]]
  name = "tiny"
  source = "profiles_db"
  from = "public.profiles"
  id_column = "id"
  primary_key = ["id"]
"#,
        grpc = free_port(),
        admin = free_port(),
        d = dir.display(),
        max_age = MAX_AGE.as_millis(),
        evict = EVICT_AFTER.as_millis(),
    );
    let path = dir.join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const PG_SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric(12,2) NOT NULL, owner text);
ALTER TABLE accounts REPLICA IDENTITY FULL;
INSERT INTO accounts SELECT i, i * 1.5, 'owner ' || i FROM generate_series(1, 10) i;
CREATE TABLE profiles (id bigint PRIMARY KEY, name text NOT NULL, score numeric(10,2));
INSERT INTO profiles SELECT i, 'profile ' || i, i * 0.25 FROM generate_series(1, 200) i;
-- No index on profile_id: each fetch of prefs is one sequential scan,
-- counted by pg_stat_user_tables.seq_scan.
CREATE TABLE prefs (id bigint PRIMARY KEY, profile_id bigint NOT NULL, k text, v text);
INSERT INTO prefs SELECT i, 1 + i % 200, 'k' || i, 'v' || i FROM generate_series(1, 400) i;
";

async fn get(
    client: &mut EntityServiceClient<Channel>,
    ty: &str,
    id: &str,
    max_staleness_ms: Option<u64>,
) -> Result<Entity, tonic::Status> {
    let mut req = tonic::Request::new(GetEntityRequest {
        r#type: ty.into(),
        id: id.into(),
        max_staleness_ms,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(20));
    client.get_entity(req).await.map(|r| r.into_inner())
}

fn rows(e: &Entity, table: &str) -> usize {
    e.tables
        .iter()
        .find(|t| t.name == table)
        .map_or(0, |t| t.rows.len())
}

fn field(e: &Entity, table: &str, column: &str) -> Option<String> {
    let t = e.tables.iter().find(|t| t.name == table)?;
    let v = t.rows.first()?.columns.get(column)?;
    entity_fabric::view::value_from_proto(v)
        .ok()
        .map(|v| v.to_string())
}

/// The fabric's count of fetch queries per source table, from `/metrics`.
async fn fetches(fabric: &FabricProcess) -> std::collections::BTreeMap<String, u64> {
    let (status, body) = http_get(&fabric.admin, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| l.starts_with("fabric_source_fetches_total{"))
        .filter_map(|l| {
            let table = l.split("table=\"").nth(1)?.split('"').next()?.to_string();
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((table, n))
        })
        .collect()
}

async fn metric(fabric: &FabricProcess, line_start: &str) -> Option<f64> {
    let (_, body) = http_get(&fabric.admin, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_read_from_their_sources_on_access_and_under_a_staleness_bound() {
    let dir = tempfile::tempdir().unwrap();
    let db = unique("soa");
    // PostgreSQL: one database for both PostgreSQL sources.
    let mut admin = PgConnection::connect(&pg_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let pg = format!("{}/{db}", pg_url().rsplit_once('/').unwrap().0);
    let mut p = PgConnection::connect(&pg).await.unwrap();
    sqlx::raw_sql(PG_SCHEMA).execute(&mut p).await.unwrap();
    // Scans of prefs so far (setting up may scan it), once the setup's
    // statistics are flushed.
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut p)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut p).await.unwrap();
    let scans_before = eventually(Duration::from_secs(30), "setup statistics", || {
        let pg = pg.clone();
        async move {
            let mut c = PgConnection::connect(&pg).await.ok()?;
            let r = sqlx::query(
                "SELECT seq_scan, n_tup_ins FROM pg_stat_user_tables WHERE relname = 'prefs'",
            )
            .fetch_one(&mut c)
            .await
            .ok()?;
            let (scans, inserted): (i64, i64) = (r.get(0), r.get(1));
            (inserted == 400).then_some(scans as u64)
        }
    })
    .await;
    // MariaDB: orders of profiles.
    let mut m = mysql_async::Conn::from_url(mysql_url()).await.unwrap();
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.orders (id BIGINT PRIMARY KEY, profile_id BIGINT NOT NULL, total DECIMAL(10,2))"
    ))
    .await
    .unwrap();
    m.query_drop(format!(
        "INSERT INTO {db}.orders SELECT seq, 1 + seq % 200, seq * 2.5 FROM {db}.seq_1_to_600"
    ))
    .await
    .unwrap();

    let cfg = config(dir.path(), &pg, &mysql_url(), &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut client = fabric.client().await;

    // First read: loaded from PostgreSQL and MariaDB, one query per table.
    assert!(fetches(&fabric).await.is_empty());
    let e = get(&mut client, "profile", "1", None).await.unwrap();
    assert_eq!(field(&e, "profile", "name").as_deref(), Some("profile 1"));
    assert_eq!(rows(&e, "prefs"), 2);
    assert_eq!(rows(&e, "orders"), 3);
    let once = fetches(&fabric).await;
    assert_eq!(
        once.values().copied().collect::<Vec<_>>(),
        vec![1, 1, 1],
        "{once:?}"
    );
    // Within max_age: from memory, no source query, even after the source changed.
    sqlx::query("UPDATE profiles SET name = 'renamed' WHERE id = 1")
        .execute(&mut p)
        .await
        .unwrap();
    for _ in 0..20 {
        let again = get(&mut client, "profile", "1", None).await.unwrap();
        assert_eq!(again.version, e.version);
        assert_eq!(
            field(&again, "profile", "name").as_deref(),
            Some("profile 1")
        );
    }
    assert_eq!(fetches(&fabric).await, once);
    // Past max_age: refreshed, a new version.
    tokio::time::sleep(MAX_AGE + Duration::from_millis(300)).await;
    let fresh = get(&mut client, "profile", "1", None).await.unwrap();
    assert_eq!(field(&fresh, "profile", "name").as_deref(), Some("renamed"));
    assert_eq!(fresh.version, e.version + 1);
    assert!(fetches(&fabric).await.values().all(|n| *n == 2));
    // A request may ask for fresher than max_age.
    sqlx::query("UPDATE profiles SET name = 'renamed again' WHERE id = 1")
        .execute(&mut p)
        .await
        .unwrap();
    let bounded = get(&mut client, "profile", "1", Some(0)).await.unwrap();
    assert_eq!(
        field(&bounded, "profile", "name").as_deref(),
        Some("renamed again")
    );

    // 100 concurrent reads of a profile not loaded: one query per table.
    let before = fetches(&fabric).await;
    let reads = (0..100).map(|_| {
        let mut c = client.clone();
        async move { get(&mut c, "profile", "2", None).await }
    });
    let got = futures::future::join_all(reads).await;
    let first = got[0].as_ref().unwrap().clone();
    for r in &got {
        assert_eq!(r.as_ref().unwrap(), &first);
    }
    assert_eq!(rows(&first, "orders"), 3);
    let after = fetches(&fabric).await;
    for (table, n) in &after {
        assert_eq!(*n, before[table] + 1, "{table}: {before:?} -> {after:?}");
    }
    println!(
        "100 concurrent reads of an entity not loaded: {after:?} fetches per table (was {before:?})"
    );

    // Not in the sources either: NOT_FOUND; in a batch: missing.
    let err = get(&mut client, "profile", "999", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let batch = client
        .batch_get_entities(BatchGetEntitiesRequest {
            r#type: "profile".into(),
            ids: vec!["3".into(), "999".into(), "4".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = batch.entities.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["3", "4"]);
    assert_eq!(batch.missing_ids, ["999"]);

    let held = metric(&fabric, "fabric_entities{entity_type=\"profile\"}").await;
    assert_eq!(held, Some(4.0), "profiles 1 to 4 held");

    // Bounds: at most 2 cards (the most recently read stay); tiny's byte
    // bound is smaller than any entity (none stays).
    for id in 1..=5 {
        get(&mut client, "card", &id.to_string(), None)
            .await
            .unwrap();
        get(&mut client, "tiny", &id.to_string(), None)
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "cards and tinies over their bounds dropped",
        || {
            let f = &fabric;
            async move {
                let cards = metric(f, "fabric_entities{entity_type=\"card\"}").await?;
                let tinies = metric(f, "fabric_entities{entity_type=\"tiny\"}").await?;
                (cards == 2.0 && tinies == 0.0).then_some(())
            }
        },
    )
    .await;
    let cards_fetched = fetches(&fabric).await["public.profiles"];
    for id in [4, 5] {
        get(&mut client, "card", &id.to_string(), None)
            .await
            .unwrap();
    }
    assert_eq!(
        fetches(&fabric).await["public.profiles"],
        cards_fetched,
        "cards 4 and 5, read last, stayed in memory"
    );

    // PostgreSQL's own count of scans of prefs equals the fabric's count of
    // its fetches (its statistics are flushed within about ten seconds).
    let ours = fetches(&fabric).await["public.prefs"];
    let scans = eventually(Duration::from_secs(30), "PostgreSQL's scan count", || {
        let pg = pg.clone();
        async move {
            let mut c = PgConnection::connect(&pg).await.ok()?;
            let n: i64 =
                sqlx::query("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'prefs'")
                    .fetch_one(&mut c)
                    .await
                    .ok()?
                    .get(0);
            (n as u64 >= scans_before + ours).then_some(n as u64 - scans_before)
        }
    })
    .await;
    assert_eq!(
        scans, ours,
        "PostgreSQL scanned prefs {scans} times (after {scans_before} in setting up), the fabric fetched it {ours} times"
    );
    // Loads of profile 1 (first read, after max_age, fresher than max_age),
    // of 2 (100 reads at once), of 999 (missing: once, the batch's read of it
    // within max_age asks no source) and of 3 and 4 (the batch).
    assert_eq!(ours, 7);

    // Not read for evict_after: dropped from memory; a read loads it again.
    eventually(EVICT_AFTER * 4, "idle profiles dropped", || {
        let f = &fabric;
        async move {
            let n = metric(f, "fabric_entities{entity_type=\"profile\"}").await?;
            (n == 0.0).then_some(())
        }
    })
    .await;
    let dropped = metric(
        &fabric,
        "fabric_entities_evicted_total{entity_type=\"profile\"}",
    )
    .await
    .unwrap();
    assert!(dropped >= 4.0, "{dropped}");
    let back = get(&mut client, "profile", "1", None).await.unwrap();
    assert_eq!(
        field(&back, "profile", "name").as_deref(),
        Some("renamed again")
    );

    // A captured type with a staleness bound: account 7 predates the
    // fabric's capture (no initial snapshot), so memory lacks it.
    let err = get(&mut client, "account", "7", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let read = get(&mut client, "account", "7", Some(5_000)).await.unwrap();
    assert_eq!(field(&read, "account", "balance").as_deref(), Some("10.50"));
    let kept = get(&mut client, "account", "7", None).await.unwrap();
    assert_eq!(kept, read, "the fetched entity is kept");
    // Capture goes on from there, with values typed as the fetch typed them.
    sqlx::query("UPDATE accounts SET owner = 'new owner' WHERE id = 7")
        .execute(&mut p)
        .await
        .unwrap();
    let lsn: String = sqlx::query("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut p)
        .await
        .unwrap()
        .get(0);
    let mut req = tonic::Request::new(GetEntityRequest {
        r#type: "account".into(),
        id: "7".into(),
        min_positions: vec![SourcePosition {
            source: "crm".into(),
            position: lsn,
        }],
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(20));
    let changed = client.get_entity(req).await.unwrap().into_inner();
    assert_eq!(
        field(&changed, "account", "owner").as_deref(),
        Some("new owner")
    );
    assert_eq!(changed.version, read.version + 1);
    let (a, b) = (
        &read.tables[0].rows[0].columns,
        &changed.tables[0].rows[0].columns,
    );
    assert_eq!(a["balance"], b["balance"], "the same value, typed the same");
    // Caught up: a bound is met from memory, no query.
    let accounts_before = fetches(&fabric).await["public.accounts"];
    let again = get(&mut client, "account", "7", Some(5_000)).await.unwrap();
    assert_eq!(again, changed);
    assert_eq!(fetches(&fabric).await["public.accounts"], accounts_before);

    assert!(
        fabric.terminate(),
        "clean exit; log:\n{}",
        fabric.log_text()
    );
    let _ = m.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await;
    let _ = sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&db)
    .execute(&mut admin)
    .await;
    drop(p);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}
