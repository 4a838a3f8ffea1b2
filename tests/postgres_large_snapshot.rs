//! The initial snapshot of a 1,000,000-row PostgreSQL table while writes
//! continue: its progress is reported while it runs (catalog API, status
//! JSON, log), and afterwards every entity equals the table. A test binary
//! of its own: it is the heaviest test (about a million entities in memory).

mod common;

use common::*;
use entity_fabric::proto::BatchGetEntitiesRequest;
use sqlx::{Connection, PgConnection, Row};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const ROWS: i64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_snapshot_under_writes_equals_the_table() {
    let db = unique("fab_pgbig");
    let base = pg_url();
    let mut admin = PgConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE devices (id bigint PRIMARY KEY, reading numeric(10,3) NOT NULL, label text);
         ALTER TABLE devices REPLICA IDENTITY FULL;
         INSERT INTO devices SELECT i, (i % 1000) / 10.0, 'd' || i FROM generate_series(1, {ROWS}) i;"
    )))
    .execute(&mut c)
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fabric.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[bus]
partitions = 4
[snapshot]
dir = "{d}/snapshots"
interval = "10s"
[dlq]
file = "{d}/dlq.jsonl"
[[sources]]
name = "fleet"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.devices"]
slot = "{db}"
publication = "{db}"
batch_size = 20000
[[entities]]
name = "device"
  [[entities.tables]]
  name = "device"
  source = "fleet"
  from = "public.devices"
  id_column = "id"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    // Progress while the snapshot is read, as the catalog and the status
    // page report it.
    let progress = {
        let (grpc, admin) = (fabric.grpc.clone(), fabric.admin.clone());
        tokio::spawn(async move {
            use entity_fabric::proto::ListSourcesRequest;
            use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
            let mut c = CatalogServiceClient::connect(grpc).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                let r = c.list_sources(ListSourcesRequest {}).await;
                let p = r
                    .ok()
                    .and_then(|r| r.into_inner().sources.into_iter().next()?.progress);
                if let Some(p) = p.filter(|p| p.done > 0) {
                    let (_, body) = http_get(&admin, "/status.json").await;
                    return Some((p, body));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        })
    };

    // Writes while the snapshot is read: updates, inserts and deletes.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut c = PgConnection::connect(&url).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(11);
            for i in 0..600i64 {
                let id = rng.i64(1..ROWS);
                match i % 3 {
                    0 => sqlx::query(
                        "UPDATE devices SET reading = reading + 1, label = 'changed' WHERE id = $1",
                    )
                    .bind(id)
                    .execute(&mut c)
                    .await
                    .unwrap(),
                    1 => sqlx::query("INSERT INTO devices VALUES ($1, 1.5, 'new')")
                        .bind(ROWS + 1 + i)
                        .execute(&mut c)
                        .await
                        .unwrap(),
                    _ => sqlx::query("DELETE FROM devices WHERE id = $1")
                        .bind(id)
                        .execute(&mut c)
                        .await
                        .unwrap(),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    writer.await.unwrap();
    let (p, status) = progress
        .await
        .unwrap()
        .expect("no progress reported while the snapshot was read");
    assert_eq!(p.what, "initial snapshot of public.devices");
    assert_eq!(p.unit, "rows");
    // Counted (the table was never analysed) or the planner's estimate.
    let total = p.total.expect("a total");
    assert!((900_000..=1_100_000).contains(&total), "{p:?}");
    assert!(p.done <= total && p.per_second > 0.0, "{p:?}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let shown = &status["sources"][0]["progress"];
    assert_eq!(
        shown["what"], "initial snapshot of public.devices",
        "{status}"
    );
    assert!(shown["done"].as_u64().unwrap() >= p.done, "{status}");

    // Expected: every row of the table.
    let want: HashMap<i64, (String, String)> =
        sqlx::query("SELECT id, reading::text, label FROM devices")
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.get::<i64, _>(0),
                    (r.get::<String, _>(1), r.get::<String, _>(2)),
                )
            })
            .collect();

    let mut client = fabric.client().await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ids = all_ids(&mut client, "device", 10000).await;
        let mut bad = Vec::new();
        if ids.len() != want.len() {
            bad.push(format!("{} entities, {} rows", ids.len(), want.len()));
        } else {
            for chunk in ids.chunks(10_000) {
                let resp = client
                    .batch_get_entities(BatchGetEntitiesRequest {
                        r#type: "device".into(),
                        ids: chunk.to_vec(),
                        view: String::new(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                for e in resp.entities {
                    let id: i64 = e.id.parse().unwrap();
                    let row = &e.tables[0].rows[0].columns;
                    let text = |c: &str| {
                        entity_fabric::view::value_from_proto(&row[c])
                            .unwrap()
                            .to_string()
                    };
                    let got = (text("reading"), text("label"));
                    if want.get(&id) != Some(&got) {
                        bad.push(format!(
                            "device {id}: source {:?}, fabric {got:?}",
                            want.get(&id)
                        ));
                    }
                }
            }
        }
        if bad.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} mismatches, first: {:?}\nlog:\n{}",
            bad.len(),
            &bad[..bad.len().min(10)],
            fabric.log_text()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let log = fabric.log_text();
    assert!(
        log.contains("done: initial snapshot of public.devices"),
        "no line saying the snapshot is done"
    );
    println!(
        "{} rows snapshotted under 600 concurrent writes; all equal after {:?}",
        want.len(),
        started.elapsed()
    );
    assert!(fabric.terminate());
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&db)
        .execute(&mut admin)
        .await;
    drop(c);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}
