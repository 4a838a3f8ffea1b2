//! A source database restarted mid-stream: the connector recovers by itself
//! (retry with backoff from its last position) and catches up. A test binary
//! of its own, because it restarts the shared test server.

mod common;

use common::*;
use sqlx::{Connection, PgConnection};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream_is_recovered() {
    let restart = std::env::var("FABRIC_TEST_PG_RESTART").unwrap_or_default();
    assert!(
        !restart.is_empty(),
        "FABRIC_TEST_PG_RESTART is not set: run the tests with ./scripts/test.sh"
    );
    let db = unique("fab_pgrestart");
    let base = pg_url();
    let mut admin = PgConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    drop(admin);
    let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric(12,2));
         ALTER TABLE accounts REPLICA IDENTITY FULL;
         INSERT INTO accounts SELECT i, 0 FROM generate_series(1, 50) i;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    drop(c);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fabric.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[snapshot]
dir = "{d}/snapshots"
interval = "500ms"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"
[[sources]]
name = "ledger"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.accounts"]
slot = "{db}"
publication = "{db}"
[[entities]]
name = "account"
  [[entities.tables]]
  name = "account"
  source = "ledger"
  from = "public.accounts"
  id_column = "id"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    let grpc = fabric.grpc.clone();
    let balance = |id: &'static str| first_row_field(&grpc, "account", id, "balance");
    eventually(Duration::from_secs(30), "the initial snapshot", || {
        balance("7")
    })
    .await;

    // Restart the server, then write: the source reconnects and catches up.
    let status = std::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .unwrap();
    assert!(status.success(), "restarting PostgreSQL failed");
    let mut c = eventually(Duration::from_secs(30), "PostgreSQL back", || {
        let url = url.clone();
        async move { PgConnection::connect(&url).await.ok() }
    })
    .await;
    sqlx::query("UPDATE accounts SET balance = 77.70 WHERE id = 7")
        .execute(&mut c)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the update after the restart",
        || async { (balance("7").await.as_deref() == Some("77.70")).then_some(()) },
    )
    .await;
    let log = fabric.log_text();
    assert!(
        log.contains("source failed; retrying"),
        "no retry was logged:\n{log}"
    );

    assert!(fabric.terminate());
    drop(c);
    let mut admin = PgConnection::connect(&base).await.unwrap();
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&db)
        .execute(&mut admin)
        .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_restart_mid_stream_is_recovered() {
    use mysql_async::prelude::*;
    let restart = std::env::var("FABRIC_TEST_MYSQL_RESTART").unwrap_or_default();
    assert!(
        !restart.is_empty(),
        "FABRIC_TEST_MYSQL_RESTART is not set: run the tests with ./scripts/test.sh"
    );
    let db = unique("fab_myrestart");
    let my = mysql_url();
    let mut m = mysql_async::Conn::from_url(my.clone()).await.unwrap();
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.accounts (id BIGINT PRIMARY KEY, balance DECIMAL(12,2))"
    ))
    .await
    .unwrap();
    m.query_drop(format!(
        "INSERT INTO {db}.accounts VALUES (1, 0), (2, 0), (3, 0)"
    ))
    .await
    .unwrap();
    drop(m);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fabric.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[snapshot]
dir = "{d}/snapshots"
interval = "500ms"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"
[[sources]]
name = "ledger"
kind = "mysql_binlog"
url = "{my}"
tables = ["{db}.accounts"]
[[entities]]
name = "account"
  [[entities.tables]]
  name = "account"
  source = "ledger"
  from = "{db}.accounts"
  id_column = "id"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let grpc = fabric.grpc.clone();
    let balance = |id: &'static str| first_row_field(&grpc, "account", id, "balance");
    eventually(Duration::from_secs(30), "the initial snapshot", || {
        balance("2")
    })
    .await;

    let status = std::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .unwrap();
    assert!(status.success(), "restarting MariaDB failed");
    let mut m = eventually(Duration::from_secs(30), "MariaDB back", || {
        let my = my.clone();
        async move { mysql_async::Conn::from_url(my).await.ok() }
    })
    .await;
    m.query_drop(format!(
        "UPDATE {db}.accounts SET balance = 12.34 WHERE id = 2"
    ))
    .await
    .unwrap();
    eventually(
        Duration::from_secs(90),
        "the update after the restart",
        || async { (balance("2").await.as_deref() == Some("12.34")).then_some(()) },
    )
    .await;
    let log = fabric.log_text();
    assert!(
        log.contains("source failed; retrying"),
        "no retry was logged:\n{log}"
    );
    assert!(fabric.terminate());
    let _ = m.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await;
}
