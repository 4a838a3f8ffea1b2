//! Row lineage (`lineage = true`), through the real binary against a real
//! PostgreSQL: the catalog's `GetLineage` (and `fabric lineage`) says, for
//! every row of an entity, the source and table it came from, the position
//! of the change that last wrote it (the initial snapshot's, or the LSN of
//! a later commit) and when it was applied; it survives a SIGKILL (it is in
//! the snapshots); a type that does not keep lineage says so.

mod common;

use common::*;
use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
use entity_fabric::proto::{
    GetEntityRequest, GetLineageRequest, GetLineageResponse, SourcePosition,
};
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

fn lsn(text: &str) -> u64 {
    let text = text.strip_prefix("lsn:").unwrap_or(text);
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn config(dir: &Path, url: &str, db: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
{server}
[bus]
partitions = 2
[snapshot]
dir = "{d}/snapshots"
interval = "300ms"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.customers", "public.addresses"]
slot = "{db}"
publication = "{db}"

[[entities]]
name = "customer"
lineage = true
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
name = "contact"
  [[entities.tables]]
  name = "contact"
  source = "crm"
  from = "public.customers"
  id_column = "id"
  primary_key = ["id"]
"#,
        server = loopback_server(),
        d = dir.display()
    );
    write_config(dir, &text)
}

async fn lineage(
    fabric: &FabricProcess,
    ty: &str,
    id: &str,
) -> Result<GetLineageResponse, tonic::Status> {
    CatalogServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap()
        .get_lineage(GetLineageRequest {
            r#type: ty.into(),
            id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_row_says_where_it_came_from_and_when() {
    let db = unique("lineage");
    let url = pg_fresh_db(&db).await;
    pg_at_source(
        &url,
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text);
         CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint, city text);
         ALTER TABLE customers REPLICA IDENTITY FULL;
         ALTER TABLE addresses REPLICA IDENTITY FULL;
         INSERT INTO customers VALUES (1, 'Ada'), (2, 'Bob');
         INSERT INTO addresses VALUES (10, 1, 'Paris'), (11, 1, 'Lyon');",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url, &db);
    let log = dir.path().join("fabric.log");
    let started_micros = chrono::Utc::now().timestamp_micros();
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;

    // A change after the initial snapshot, read back once applied.
    let after = pg_at_source(&url, "UPDATE addresses SET city = 'Nice' WHERE id = 11").await;
    fabric
        .client()
        .await
        .get_entity(GetEntityRequest {
            r#type: "customer".into(),
            id: "1".into(),
            min_positions: vec![SourcePosition {
                source: "crm".into(),
                position: after.clone(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();

    let l = lineage(&fabric, "customer", "1").await.unwrap();
    let now_micros = chrono::Utc::now().timestamp_micros();
    let rows: Vec<(String, String)> = l
        .rows
        .iter()
        .map(|r| {
            let pk = entity_fabric::view::value_from_proto(&r.primary_key[0]).unwrap();
            (r.table.clone(), pk.to_string())
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("addresses".to_string(), "10".to_string()),
            ("addresses".to_string(), "11".to_string()),
            ("customer".to_string(), "1".to_string()),
        ]
    );
    let (paris, nice, ada) = (&l.rows[0], &l.rows[1], &l.rows[2]);
    for r in &l.rows {
        assert!(r.recorded && !r.fetched, "{r:?}");
        assert_eq!(r.source, "crm");
        assert!(r.position.starts_with("lsn:"), "{r:?}");
        assert!(
            (started_micros..=now_micros).contains(&r.applied_time_micros),
            "{r:?}"
        );
    }
    assert_eq!(ada.source_table, "public.customers");
    assert_eq!(paris.source_table, "public.addresses");
    // Read by the initial snapshot, together; the update later, at its commit.
    assert_eq!(paris.position, ada.position);
    assert!(
        lsn(&nice.position) > lsn(&paris.position),
        "{nice:?} {paris:?}"
    );
    assert!(lsn(&nice.position) <= lsn(&after), "{nice:?} after {after}");
    assert!(nice.commit_time_micros >= started_micros);

    // The CLI shows the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["lineage", "customer", "1", "--addr", &fabric.grpc])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "addresses[11] <- crm.public.addresses {}",
            nice.position
        )),
        "{text}"
    );

    // Kept across a SIGKILL: it is in the snapshots.
    eventually(WITHIN, "a snapshot round after the update", || async {
        let (_, m) = http_get(&fabric.admin, "/status.json").await;
        let doc: serde_json::Value = serde_json::from_str(&m).ok()?;
        (doc["snapshot"]["age_s"].as_i64()? < 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    fabric.kill9();
    let mut fabric = FabricProcess::start(&cfg, &log);
    fabric.wait_serving(WITHIN).await;
    let again = eventually(WITHIN, "lineage after the restart", || async {
        lineage(&fabric, "customer", "1").await.ok()
    })
    .await;
    assert_eq!(again.rows, l.rows);

    // A type that does not keep lineage says so.
    let e = lineage(&fabric, "contact", "1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("lineage = true"), "{e:?}");
    assert!(fabric.terminate());
    pg_drop_db(&db, &db).await;
}
