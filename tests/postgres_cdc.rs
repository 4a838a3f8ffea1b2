//! `postgres_cdc` against a real PostgreSQL (wal_level=logical), through the
//! real binary: initial snapshot, streaming under a concurrent workload with
//! out-of-order commits, SIGKILL mid-stream, and clear errors for bad setups.

mod common;

use common::*;
use entity_fabric::proto::BatchGetEntitiesRequest;
use sqlx::{Connection, PgConnection, Row};
use std::path::Path;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(90);

const SCHEMA: &str = "
CREATE TABLE customers (
  id bigint PRIMARY KEY, name text NOT NULL, email text, balance numeric(14,2),
  tags text[], meta jsonb, born date, seen timestamptz, uid uuid, active boolean);
CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint NOT NULL, city text);
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE addresses REPLICA IDENTITY FULL;
INSERT INTO customers
  SELECT i, 'customer ' || i, 'c' || i || '@example.org', (i * 10.25)::numeric(14,2),
         ARRAY['t' || (i % 3), 'x y'], jsonb_build_object('n', i), date '2000-01-01' + i,
         timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute', gen_random_uuid(), i % 2 = 0
  FROM generate_series(1, 300) i;
INSERT INTO addresses SELECT i, 1 + i % 300, 'city ' || i FROM generate_series(1, 450) i;
";

fn config(dir: &Path, url: &str, slot: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:{grpc}"
admin_addr = "127.0.0.1:{admin}"

[bus]
partitions = 4

[snapshot]
dir = "{d}/snapshots"
interval = "500ms"
keep = 2

[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.customers", "public.addresses"]
slot = "{slot}"
publication = "{slot}"

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
"#,
        grpc = free_port(),
        admin = free_port(),
        d = dir.display()
    );
    let path = dir.join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// What PostgreSQL holds, shaped like an entity: id -> table -> pk -> row.
async fn expected(url: &str) -> Expected {
    let mut c = PgConnection::connect(url).await.unwrap();
    let mut out = Expected::new();
    for (table, sql) in [
        (
            "customer",
            "SELECT (to_jsonb(c) - 'uid')::text, id, id FROM customers c",
        ),
        (
            "addresses",
            "SELECT to_jsonb(a)::text, customer_id, id FROM addresses a",
        ),
    ] {
        for r in sqlx::query(sql).fetch_all(&mut c).await.unwrap() {
            let row: serde_json::Value = serde_json::from_str(&r.get::<String, _>(0)).unwrap();
            out.entry(r.get::<i64, _>(1))
                .or_default()
                .entry(table.to_string())
                .or_default()
                .insert(r.get::<i64, _>(2), row);
        }
    }
    out.retain(|_, t| t.contains_key("customer"));
    out
}

async fn mismatches(fabric: &FabricProcess, url: &str) -> (usize, Vec<String>) {
    let want = expected(url).await;
    let mut client = fabric.client().await;
    let ids = all_ids(&mut client, "customer", 1000).await;
    let mut out = Vec::new();
    let have: std::collections::BTreeSet<i64> = ids.iter().map(|i| i.parse().unwrap()).collect();
    // Entities without a customer row (addresses of a deleted customer) are
    // not in `want`; the demo keeps them, the comparison ignores them.
    for id in want.keys() {
        if !have.contains(id) {
            out.push(format!("customer {id}: missing in the fabric"));
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
            .await
            .unwrap()
            .into_inner();
        for e in resp.entities {
            let id: i64 = e.id.parse().unwrap();
            let mut got = entity_tables(&e);
            if let Some(c) = got.get_mut("customer") {
                for row in c.values_mut() {
                    row.as_object_mut().unwrap().remove("uid");
                }
            }
            match want.get(&id) {
                Some(w) => out.extend(diff_entity(id, w, &got)),
                None if got.contains_key("customer") => {
                    out.push(format!("customer {id}: in the fabric, not in the source"))
                }
                None => {}
            }
        }
    }
    (want.len(), out)
}

/// The first source in the catalog once `pred` holds for it (30 s at most).
async fn source_when(
    fabric: &FabricProcess,
    what: &str,
    pred: impl Fn(&entity_fabric::proto::SourceInfo) -> bool,
) -> entity_fabric::proto::SourceInfo {
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    let cat = CatalogServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap();
    let pred = &pred;
    eventually(Duration::from_secs(30), what, || {
        let mut cat = cat.clone();
        async move {
            let s = cat
                .list_sources(entity_fabric::proto::ListSourcesRequest {})
                .await
                .ok()?
                .into_inner();
            let s = s.sources.into_iter().next()?;
            pred(&s).then_some(s)
        }
    })
    .await
}

async fn converge(fabric: &FabricProcess, url: &str) -> usize {
    let deadline = std::time::Instant::now() + CONVERGE;
    let last = loop {
        let (n, m) = mismatches(fabric, url).await;
        if m.is_empty() {
            return n;
        }
        if std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    panic!(
        "{} mismatches, first:\n{}\nlog:\n{}",
        last.len(),
        last.iter().take(15).cloned().collect::<Vec<_>>().join("\n"),
        fabric.log_text()
    );
}

/// Random transactions from `sessions` concurrent connections; each session
/// holds some transactions open while others commit (out-of-order commits).
async fn workload(url: String, sessions: usize, txns_each: usize, seed: u64) -> usize {
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed + s as u64);
            let mut c = PgConnection::connect(&url).await.unwrap();
            let mut done = 0;
            for i in 0..txns_each {
                let mut tx = c.begin().await.unwrap();
                let n = rng.usize(1..4);
                for k in 0..n {
                    let cid = rng.i64(1..340);
                    match rng.u8(0..6) {
                        0 => {
                            sqlx::query("INSERT INTO customers (id, name, balance, tags, active) VALUES ($1, 'new', 1.50, ARRAY['n'], true) ON CONFLICT (id) DO UPDATE SET name = 'renamed ' || $2")
                                .bind(cid).bind(i as i64).execute(&mut *tx).await.unwrap();
                        }
                        1 | 2 => {
                            sqlx::query("UPDATE customers SET balance = balance + 0.01, meta = jsonb_build_object('i', $2::int), seen = now() WHERE id = $1")
                                .bind(cid).bind(i as i32).execute(&mut *tx).await.unwrap();
                        }
                        3 => {
                            let aid = 10_000 + (s as i64) * 100_000 + (i * 4 + k) as i64;
                            sqlx::query("INSERT INTO addresses VALUES ($1, $2, 'new city')")
                                .bind(aid).bind(cid).execute(&mut *tx).await.unwrap();
                        }
                        4 => {
                            sqlx::query("DELETE FROM addresses WHERE id = (SELECT id FROM addresses WHERE customer_id = $1 ORDER BY id LIMIT 1)")
                                .bind(cid).execute(&mut *tx).await.unwrap();
                        }
                        _ => {
                            // Moves an address to another customer.
                            sqlx::query("UPDATE addresses SET customer_id = $2 WHERE id = (SELECT min(id) FROM addresses WHERE customer_id = $1)")
                                .bind(cid).bind(rng.i64(1..300)).execute(&mut *tx).await.unwrap();
                        }
                    }
                }
                if rng.u8(0..10) == 0 {
                    // Hold this transaction open while other sessions commit.
                    tokio::time::sleep(Duration::from_millis(rng.u64(5..40))).await;
                }
                tx.commit().await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_stream_and_sigkill_converge_to_postgres() {
    let db = unique("fab_pg");
    let url = pg_fresh_db(&db).await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(&mut c).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);

    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    assert_eq!(converge(&fabric, &url).await, 300, "initial snapshot");

    // Types survive the trip.
    let e = fabric
        .client()
        .await
        .get_entity(entity_fabric::proto::GetEntityRequest {
            r#type: "customer".into(),
            id: "4".into(),
            view: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let row = &e.tables.iter().find(|t| t.name == "customer").unwrap().rows[0];
    let v = |c: &str| entity_fabric::view::value_from_proto(&row.columns[c]).unwrap();
    assert_eq!(
        v("balance"),
        entity_fabric::event::Value::Decimal("41.00".into())
    );
    assert_eq!(v("tags").to_json(), serde_json::json!(["t1", "x y"]));
    assert_eq!(v("active"), entity_fabric::event::Value::Bool(true));
    assert!(matches!(v("uid"), entity_fabric::event::Value::Uuid(_)));
    assert_eq!(v("born").to_json(), "2000-01-05");
    assert_eq!(v("seen").to_json(), "2024-01-01T00:04:00Z");

    // A concurrent workload, with a SIGKILL of the fabric in the middle.
    let load = tokio::spawn(workload(url.clone(), 3, 400, 7));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fabric.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let txns = load.await.unwrap();
    let n = converge(&fabric, &url).await;
    println!("{txns} transactions from 3 sessions, 1 SIGKILL, {n} entities equal to PostgreSQL");
    assert!(
        !fabric.log_text().contains("initial snapshot read"),
        "the restart re-read the tables"
    );

    // The catalog and /metrics show the source's position, durability and lag.
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    let cat = CatalogServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap();
    let src = eventually(Duration::from_secs(30), "a durable position", || {
        let mut cat = cat.clone();
        async move {
            let s = cat
                .list_sources(entity_fabric::proto::ListSourcesRequest {})
                .await
                .ok()?
                .into_inner();
            let s = s.sources.into_iter().next()?;
            s.durable_position.starts_with("lsn:").then_some(s)
        }
    })
    .await;
    assert_eq!(src.kind, "postgres_cdc");
    assert_eq!(src.state, "streaming");
    assert!(src.routed_position.starts_with("lsn:"), "{src:?}");
    assert!(src.lag_millis >= 0);
    let (_, metrics) = http_get(&fabric.admin, "/metrics").await;
    for m in [
        "fabric_source_lag_seconds{source=\"crm\"}",
        "fabric_changes_applied_total{source=\"crm\"}",
    ] {
        assert!(metrics.contains(m), "{m} missing");
    }

    // An idle slot does not hold WAL: after unrelated writes (a table outside
    // the publication), the slot's confirmed position follows the WAL end.
    sqlx::raw_sql(
        "CREATE TABLE unrelated (x int); INSERT INTO unrelated SELECT generate_series(1, 5000);",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let lsn = |s: &str| entity_fabric::event::position::parse_lsn(s).unwrap();
    let slot = db.clone();
    eventually(
        Duration::from_secs(90),
        "the idle slot to follow the WAL end",
        || {
            let url = url.clone();
            let slot = slot.clone();
            let target = lsn(&target);
            async move {
                let mut c = PgConnection::connect(&url).await.ok()?;
                let confirmed: String = sqlx::query_scalar(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&slot)
            .fetch_one(&mut c)
            .await
            .ok()?;
                (lsn(&confirmed) >= target).then_some(())
            }
        },
    )
    .await;

    // The slot follows what is durable: it is advanced, not left at the start.
    let confirmed: Option<String> = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&db)
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(confirmed.is_some());
    assert!(fabric.terminate());
    drop(c);
    pg_drop_db(&db, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_full_replica_identity_is_refused_by_name() {
    let db = unique("fab_pgbad");
    let url = pg_fresh_db(&db).await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text);
         CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint);
         ALTER TABLE customers REPLICA IDENTITY FULL;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let src = source_when(&fabric, "the source to fail", |s| s.state == "failed").await;
    assert!(
        src.last_error.starts_with("source crm: "),
        "{}",
        src.last_error
    );
    assert!(
        src.last_error
            .contains("table public.addresses has REPLICA IDENTITY DEFAULT"),
        "{}",
        src.last_error
    );
    assert!(
        src.last_error
            .contains("ALTER TABLE public.addresses REPLICA IDENTITY FULL"),
        "{}",
        src.last_error
    );
    // The rest of the fabric keeps serving.
    let (status, _) = http_get(&fabric.admin, "/healthz").await;
    assert_eq!(status, 200);
    let mut client = fabric.client().await;
    let e = client
        .get_entity(entity_fabric::proto::GetEntityRequest {
            r#type: "customer".into(),
            id: "1".into(),
            view: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(fabric.terminate());
    drop(c);
    pg_drop_db(&db, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_retried_with_the_reason_shown() {
    let db = unique("fab_pgauth");
    let dir = tempfile::tempdir().unwrap();
    // A user that does not exist: the server refuses the connection.
    let url = pg_url().replacen("postgres://postgres@", "postgres://nobody_here:secret@", 1);
    let cfg = config(dir.path(), &url, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let src = source_when(&fabric, "the source to retry", |s| {
        s.state == "retrying" && !s.last_error.is_empty()
    })
    .await;
    assert!(
        src.last_error.starts_with("source crm: connect:"),
        "{}",
        src.last_error
    );
    assert!(src.last_error.contains("nobody_here"), "{}", src.last_error);
    assert!(fabric.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_down_at_start_is_retried_while_the_fabric_serves() {
    let db = unique("fab_pgdown");
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port.
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let cfg = config(dir.path(), &url, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let src = source_when(&fabric, "the source to retry", |s| {
        s.state == "retrying" && !s.last_error.is_empty()
    })
    .await;
    assert!(
        src.last_error.starts_with("source crm: connect:"),
        "{}",
        src.last_error
    );
    let (status, _) = http_get(&fabric.admin, "/healthz").await;
    assert_eq!(status, 200);
    // Backoff: retries are logged more than once, further apart each time.
    let retries = eventually(Duration::from_secs(30), "several retries", || {
        let log = fabric.log_text();
        async move {
            let n = log.matches("source failed; retrying").count();
            (n >= 3).then_some(log)
        }
    })
    .await;
    assert!(retries.contains("backoff_ms=200"), "{retries}");
    assert!(retries.contains("backoff_ms=400"), "{retries}");
    assert!(fabric.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_refused_by_name() {
    let db = unique("fab_pgmissing");
    let url = pg_fresh_db(&db).await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text);
         ALTER TABLE customers REPLICA IDENTITY FULL;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let src = source_when(&fabric, "the source to fail", |s| s.state == "failed").await;
    assert_eq!(
        src.last_error,
        "source crm: table public.addresses does not exist (or is not a table) in the database"
    );
    assert!(fabric.terminate());
    drop(c);
    pg_drop_db(&db, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmapped_column_type_is_refused_unless_carried_as_text() {
    let db = unique("fab_pgtype");
    let url = pg_fresh_db(&db).await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE DOMAIN email AS text;
         CREATE TYPE mood AS ENUM ('calm', 'angry');
         CREATE TABLE customers (id bigint PRIMARY KEY, name email, mood mood, wait interval);
         CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint);
         ALTER TABLE customers REPLICA IDENTITY FULL;
         ALTER TABLE addresses REPLICA IDENTITY FULL;
         INSERT INTO customers VALUES (1, 'a@b.c', 'calm', interval '1 day 2 hours');",
    )
    .execute(&mut c)
    .await
    .unwrap();

    // By default the interval column is refused, by name and type.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let src = source_when(&fabric, "the source to fail", |s| s.state == "failed").await;
    assert!(
        src.last_error.contains(
            "column public.customers.wait has type interval, which the fabric does not map"
        ),
        "{}",
        src.last_error
    );
    assert!(
        src.last_error.contains("unmapped_types = \"text\""),
        "{}",
        src.last_error
    );
    assert!(fabric.terminate());

    // With unmapped_types = "text" it is carried as its text; the domain and
    // the enum decode as text either way.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "kind = \"postgres_cdc\"",
        "kind = \"postgres_cdc\"\nunmapped_types = \"text\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let client = fabric.client().await;
    let e = eventually(Duration::from_secs(30), "customer 1", || {
        let mut client = client.clone();
        async move {
            client
                .get_entity(entity_fabric::proto::GetEntityRequest {
                    r#type: "customer".into(),
                    id: "1".into(),
                    view: String::new(),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    let row = &e.tables[0].rows[0].columns;
    let v = |c: &str| entity_fabric::view::value_from_proto(&row[c]).unwrap();
    assert_eq!(
        v("wait"),
        entity_fabric::event::Value::Text("1 day 02:00:00".into())
    );
    assert_eq!(v("name"), entity_fabric::event::Value::Text("a@b.c".into()));
    assert_eq!(v("mood"), entity_fabric::event::Value::Text("calm".into()));
    // Streamed changes decode the same way.
    sqlx::query("UPDATE customers SET wait = interval '3 minutes', mood = 'angry' WHERE id = 1")
        .execute(&mut c)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the streamed update", || {
        let mut client = client.clone();
        async move {
            let e = client
                .get_entity(entity_fabric::proto::GetEntityRequest {
                    r#type: "customer".into(),
                    id: "1".into(),
                    view: String::new(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let row = &e.tables[0].rows[0].columns;
            let w = entity_fabric::view::value_from_proto(&row["wait"]).ok()?;
            let m = entity_fabric::view::value_from_proto(&row["mood"]).ok()?;
            (w == entity_fabric::event::Value::Text("00:03:00".into())
                && m == entity_fabric::event::Value::Text("angry".into()))
            .then_some(())
        }
    })
    .await;
    assert!(fabric.terminate());
    drop(c);
    pg_drop_db(&db, &db).await;
}
