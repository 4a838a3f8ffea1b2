//! Live config changes through the real binary, a real PostgreSQL (CDC)
//! and a SQLite source: `fabric plan` shows what a new config changes and
//! costs without applying it; an invalid config, or one that needs a
//! restart, is refused by `fabric reload` and the old one keeps serving;
//! SIGHUP applies a view, a masked column and a new table (its source reads
//! it from the start, then streams on); `fabric reload` removes a table, a
//! view, a source and an entity type; reads of the entity type no change
//! touches never fail meanwhile; a restart after the changes serves what
//! they left, and a table added while the fabric was stopped is read from
//! the start rather than lost behind the old checkpoint.

mod common;

use common::*;
use entity_fabric::proto::GetEntityRequest;
use sqlx::{Connection, SqliteConnection};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

/// The parts of the config the steps add and remove.
#[derive(Clone, Copy, Default)]
struct Parts {
    orders: bool,
    public_view: bool,
    tickets: bool,
    grpc_port: Option<u16>,
}

fn config_text(dir: &Path, server: &str, url: &str, db: &str, p: Parts) -> String {
    let d = dir.display();
    let server = match p.grpc_port {
        Some(port) => server.replace(
            &server.lines().nth(1).unwrap().to_string(),
            &format!("grpc_addr = \"127.0.0.1:{port}\""),
        ),
        None => server.to_string(),
    };
    let pg_tables = if p.orders {
        "[\"public.customers\", \"public.orders\"]"
    } else {
        "[\"public.customers\"]"
    };
    let mut text = format!(
        r#"
{server}
[bus]
partitions = 2
[snapshot]
dir = "{d}/snapshots"
interval = "500ms"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "pg"
kind = "postgres_cdc"
url = "{url}"
tables = {pg_tables}
slot = "{db}"
publication = "{db}"
"#
    );
    if p.tickets {
        text.push_str(&format!(
            r#"
[[sources]]
name = "helpdesk"
kind = "sqlite"
path = "{d}/helpdesk.db"
tables = ["tickets"]
poll_interval = "20ms"
"#
        ));
    }
    text.push_str(
        r#"
[[entities]]
name = "customer"
description = "Who buys"
  [[entities.tables]]
  name = "customer"
  source = "pg"
  from = "public.customers"
  id_column = "id"
  primary_key = ["id"]
"#,
    );
    if p.orders {
        text.push_str(
            r#"
  [[entities.tables]]
  name = "orders"
  source = "pg"
  from = "public.orders"
  id_column = "customer_id"
  primary_key = ["id"]
"#,
        );
    }
    if p.public_view {
        text.push_str(
            r#"
  [entities.views.public]
  tables = ["customer"]
  mask = { "customer.email" = "redact" }
"#,
        );
    }
    if p.tickets {
        text.push_str(
            r#"
[[entities]]
name = "ticket"
  [[entities.tables]]
  name = "ticket"
  source = "helpdesk"
  from = "tickets"
  id_column = "id"
  primary_key = ["id"]
"#,
        );
    }
    text
}

/// Runs `fabric <args>`; its exit code and standard output.
fn fabric_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn get(
    fabric: &FabricProcess,
    ty: &str,
    id: &str,
    view: &str,
) -> Result<entity_fabric::proto::Entity, tonic::Status> {
    fabric
        .client()
        .await
        .get_entity(GetEntityRequest {
            r#type: ty.into(),
            id: id.into(),
            view: view.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Customer `id` read straight from its sources (a staleness bound of 0).
async fn get_fresh(fabric: &FabricProcess, id: &str) -> entity_fabric::proto::Entity {
    fabric
        .client()
        .await
        .get_entity(GetEntityRequest {
            r#type: "customer".into(),
            id: id.into(),
            max_staleness_ms: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn table_names(e: &entity_fabric::proto::Entity) -> Vec<String> {
    e.tables.iter().map(|t| t.name.clone()).collect()
}

/// The ids of the rows of `table` in customer `id`.
async fn row_ids(fabric: &FabricProcess, id: &str, table: &str) -> Option<Vec<i64>> {
    let e = get(fabric, "customer", id, "").await.ok()?;
    let tables = entity_tables(&e);
    Some(
        tables
            .get(table)
            .map(|rows| rows.keys().copied().collect())
            .unwrap_or_default(),
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn sighup(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sources_tables_views_and_types_change_while_serving() {
    let db = unique("live");
    let url = pg_fresh_db(&db).await;
    pg_at_source(&url,
        "CREATE TABLE customers(id int PRIMARY KEY, name text, email text); \
         CREATE TABLE orders(id int PRIMARY KEY, customer_id int, total numeric(10,2)); \
         ALTER TABLE customers REPLICA IDENTITY FULL; ALTER TABLE orders REPLICA IDENTITY FULL; \
         INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.com'); \
         INSERT INTO orders VALUES (10, 1, 5.00), (11, 1, 7.50), (12, 2, 1.00);",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let helpdesk = dir.path().join("helpdesk.db");
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&helpdesk)
            .create_if_missing(true);
        let mut c = SqliteConnection::connect_with(&opts).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE tickets(id INTEGER PRIMARY KEY, subject TEXT); \
             INSERT INTO tickets VALUES (1, 'cannot log in'), (2, 'refund');",
        )
        .execute(&mut c)
        .await
        .unwrap();
    }
    let server = loopback_server();
    let write = |p: Parts| -> PathBuf {
        write_config(dir.path(), &config_text(dir.path(), &server, &url, &db, p))
    };
    let v1 = Parts {
        tickets: true,
        ..Parts::default()
    };
    let config = write(v1);
    let path = config.to_str().unwrap().to_string();
    let log = dir.path().join("fabric.log");
    let mut fabric = FabricProcess::start(&config, &log);
    fabric.wait_serving(WITHIN).await;
    eventually(WITHIN, "customer 1 and ticket 1", || async {
        let c = get(&fabric, "customer", "1", "").await.ok()?;
        let t = get(&fabric, "ticket", "1", "").await.ok()?;
        (!c.tables.is_empty() && !t.tables.is_empty()).then_some(())
    })
    .await;
    assert_eq!(row_ids(&fabric, "1", "orders").await, Some(vec![]));

    // Reads of the ticket type, which no change until the last touches,
    // go on all along: every one must succeed.
    let reads = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop_reader = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (grpc, reads, failures, stop) = (
            fabric.grpc.clone(),
            reads.clone(),
            failures.clone(),
            stop_reader.clone(),
        );
        tokio::spawn(async move {
            let mut client =
                entity_fabric::proto::entity_service_client::EntityServiceClient::connect(grpc)
                    .await
                    .unwrap();
            while !stop.is_cancelled() {
                let r = client
                    .get_entity(GetEntityRequest {
                        r#type: "ticket".into(),
                        id: "1".into(),
                        ..Default::default()
                    })
                    .await;
                reads.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(e) if !e.get_ref().tables.is_empty() => {}
                    Ok(_) => failures.lock().unwrap().push("empty ticket".into()),
                    Err(s) => failures.lock().unwrap().push(s.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // The plan of a config with a new table and a masked view: nothing applied.
    let v2 = Parts {
        orders: true,
        public_view: true,
        ..v1
    };
    let new_file = dir.path().join("new.toml");
    std::fs::write(&new_file, config_text(dir.path(), &server, &url, &db, v2)).unwrap();
    let (code, out) = fabric_cli(&["plan", "--config", new_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all applied live"), "{out}");
    assert!(
        out.contains("+ table customer.orders: source pg reads all its tables from the start"),
        "{out}"
    );
    assert!(
        out.contains("+ view customer.public: readable at once"),
        "{out}"
    );
    assert!(
        out.contains("~ source pg: restarts and reads all its tables again"),
        "{out}"
    );
    assert_eq!(
        row_ids(&fabric, "1", "orders").await,
        Some(vec![]),
        "a plan applies nothing"
    );

    // An invalid config is refused; the running one stays.
    std::fs::write(
        &config,
        config_text(dir.path(), &server, &url, &db, v2).replace(
            "from = \"public.orders\"",
            "from = \"public.orders\"\n  id_via = { table = \"nope\", column = \"x\" }",
        ),
    )
    .unwrap();
    let (code, out) = fabric_cli(&["reload", "--config", &path]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the config file is invalid"), "{out}");
    // A config that needs a restart is refused whole, saying why.
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            &server,
            &url,
            &db,
            Parts {
                grpc_port: Some(free_port()),
                ..v2
            },
        ),
    )
    .unwrap();
    let (code, out) = fabric_cli(&["reload", "--config", &path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("~ server.grpc_addr: needs a restart [restart]"),
        "{out}"
    );
    assert!(
        out.contains("restart the fabric to apply this config"),
        "{out}"
    );
    assert_eq!(row_ids(&fabric, "1", "orders").await, Some(vec![]));
    let err = get(&fabric, "customer", "1", "public").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let (_, metrics) = http_get(&fabric.admin, "/metrics").await;
    assert_eq!(
        metric(&metrics, "fabric_config_reloads_refused_total"),
        2.0,
        "{metrics}"
    );

    // SIGHUP applies the new table and the masked view.
    write(v2);
    sighup(fabric.pid());
    eventually(
        WITHIN,
        "customer 1's orders from the initial snapshot",
        || async { (row_ids(&fabric, "1", "orders").await? == vec![10, 11]).then_some(()) },
    )
    .await;
    let public = get(&fabric, "customer", "1", "public").await.unwrap();
    let row = &public.tables[0].rows[0];
    let email = entity_fabric::view::value_from_proto(&row.columns["email"]).unwrap();
    assert_eq!(email.to_string(), "***", "the new view masks the email");
    assert!(public.tables.iter().all(|t| t.name == "customer"));
    // The source streams on after reading the new table.
    pg_at_source(&url, "INSERT INTO orders VALUES (13, 1, 2.25); UPDATE customers SET name = 'Ada L.' WHERE id = 1;").await;
    eventually(WITHIN, "order 13 streamed", || async {
        (row_ids(&fabric, "1", "orders").await? == vec![10, 11, 13]).then_some(())
    })
    .await;
    assert_eq!(
        first_row_field(&fabric.grpc, "customer", "1", "name")
            .await
            .as_deref(),
        Some("Ada L.")
    );
    // Reads with a staleness bound read the new table from the source too.
    assert_eq!(
        table_names(&get_fresh(&fabric, "1").await),
        ["customer", "orders"]
    );

    // A watch of the whole type through the masked view, open across the
    // reload that removes the view: every message it brings is masked, and
    // it ends (ABORTED, saying why) rather than fall back to the whole
    // entity, unmasked, for the changes after.
    let mut watch = entity_fabric::proto::entity_service_client::EntityServiceClient::connect(
        fabric.grpc.clone(),
    )
    .await
    .unwrap()
    .watch_entities(entity_fabric::proto::WatchEntitiesRequest {
        r#type: "customer".into(),
        view: "public".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    pg_at_source(
        &url,
        "UPDATE customers SET email = 'ada@example.org' WHERE id = 1;",
    )
    .await;
    let masked = |m: &entity_fabric::proto::EntityChange| {
        let e = m.entity.as_ref().unwrap();
        for t in &e.tables {
            for r in &t.rows {
                if let Some(v) = r.columns.get("email") {
                    let v = entity_fabric::view::value_from_proto(v)
                        .unwrap()
                        .to_string();
                    assert_eq!(v, "***", "a watch of the view sent {} unmasked", e.id);
                }
            }
        }
    };
    let first = tokio::time::timeout(WITHIN, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    masked(&first);

    // `fabric reload` drops the table and the view again.
    write(v1);
    let (code, out) = fabric_cli(&["reload", "--config", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("- table customer.orders: its rows are dropped"),
        "{out}"
    );
    assert!(out.contains("- view customer.public"), "{out}");
    eventually(WITHIN, "customer 1 without orders", || async {
        let e = get(&fabric, "customer", "1", "").await.ok()?;
        e.tables.iter().all(|t| t.name != "orders").then_some(())
    })
    .await;
    let err = get(&fabric, "customer", "1", "public").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Changes of the dropped table no longer arrive; the rest still does.
    pg_at_source(&url, "INSERT INTO orders VALUES (14, 2, 3.00); UPDATE customers SET name = 'Bob B.' WHERE id = 2;").await;
    eventually(WITHIN, "customer 2 renamed", || async {
        (first_row_field(&fabric.grpc, "customer", "2", "name").await? == "Bob B.").then_some(())
    })
    .await;
    let ended = loop {
        match tokio::time::timeout(WITHIN, watch.message()).await.unwrap() {
            Ok(Some(m)) => masked(&m),
            Ok(None) => panic!("the watch of the removed view ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Aborted, "{ended}");
    assert!(
        ended.message().contains("removed view \"public\""),
        "{ended}"
    );
    assert_eq!(row_ids(&fabric, "2", "orders").await, Some(vec![]));
    // A read straight from the source does not bring the dropped table back.
    assert_eq!(table_names(&get_fresh(&fabric, "2").await), ["customer"]);
    assert_eq!(row_ids(&fabric, "2", "orders").await, Some(vec![]));

    // Tickets were read without a failure through all of it.
    stop_reader.cancel();
    reader.await.unwrap();
    let failed = failures.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} of {} reads failed: {:?}",
        failed.len(),
        reads.load(Ordering::Relaxed),
        &failed[..failed.len().min(5)]
    );
    assert!(reads.load(Ordering::Relaxed) > 10, "the reader ran");

    // Remove the helpdesk source and the ticket type.
    let v3 = Parts {
        tickets: false,
        ..v1
    };
    write(v3);
    let (code, out) = fabric_cli(&["reload", "--config", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("- source helpdesk: stops"), "{out}");
    assert!(
        out.contains("- entity type ticket: its 2 entities are dropped"),
        "{out}"
    );
    let err = get(&fabric, "ticket", "1", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("unknown entity type"), "{err}");
    let (_, metrics) = http_get(&fabric.admin, "/metrics").await;
    assert_eq!(
        metric(&metrics, "fabric_config_reloads_applied_total"),
        3.0,
        "{metrics}"
    );
    assert!(
        fabric.terminate(),
        "clean stop; log:\n{}",
        fabric.log_text()
    );

    // A table added while the fabric is stopped is read from the start,
    // not lost behind the checkpoint taken without it.
    pg_at_source(&url, "INSERT INTO orders VALUES (15, 2, 9.00);").await;
    write(Parts { orders: true, ..v3 });
    let mut fabric = FabricProcess::start(&config, &log);
    fabric.wait_serving(WITHIN).await;
    eventually(WITHIN, "customer 2's orders after the restart", || async {
        (row_ids(&fabric, "2", "orders").await? == vec![12, 14, 15]).then_some(())
    })
    .await;
    assert_eq!(
        first_row_field(&fabric.grpc, "customer", "2", "name")
            .await
            .as_deref(),
        Some("Bob B.")
    );
    assert!(
        fabric.log_text().contains("it starts over"),
        "the start says why the source starts over"
    );
    assert!(fabric.terminate());

    // A table removed while the fabric is stopped is not served from the
    // restored snapshot.
    write(v3);
    let mut fabric = FabricProcess::start(&config, &log);
    fabric.wait_serving(WITHIN).await;
    let e = get(&fabric, "customer", "2", "").await.unwrap();
    assert_eq!(table_names(&e), ["customer"]);
    assert!(fabric.terminate());
    pg_drop_db(&db, &db).await;
}
