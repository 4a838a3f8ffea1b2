//! One customer entity assembled from PostgreSQL (customers, addresses) and
//! MariaDB (invoices, and payments found through their invoice), through
//! the real binary: 10,000 random transactions from concurrent sessions that
//! commit out of order, a SIGKILL of the fabric in the middle, and then every
//! entity equals what queries of the two databases return.

mod common;

use common::*;
use entity_fabric::proto::BatchGetEntitiesRequest;
use mysql_async::prelude::*;
use sqlx::{Connection, PgConnection, Row};
use std::path::Path;
use std::time::Duration;

const CUSTOMERS: i64 = 300;

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
interval = "500ms"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{pg}"
tables = ["public.customers", "public.addresses"]
slot = "{db}"
publication = "{db}"

[[sources]]
name = "billing"
kind = "mysql_binlog"
url = "{my}"
tables = ["{db}.invoices", "{db}.payments"]

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
  [[entities.tables]]
  name = "invoices"
  source = "billing"
  from = "{db}.invoices"
  id_column = "customer_id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "payments"
  source = "billing"
  from = "{db}.payments"
  id_via = {{ table = "invoices", column = "invoice_id" }}
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

async fn expected(pg: &str, my: &str, db: &str) -> Expected {
    let mut out = Expected::new();
    let mut c = PgConnection::connect(pg).await.unwrap();
    for (table, sql) in [
        (
            "customer",
            "SELECT to_jsonb(c)::text, id, id FROM customers c",
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
                .entry(table.into())
                .or_default()
                .insert(r.get::<i64, _>(2), row);
        }
    }
    let mut m = mysql_async::Conn::from_url(format!("{my}/{db}"))
        .await
        .unwrap();
    for (table, sql) in [
        (
            "invoices",
            "SELECT JSON_OBJECT('id', id, 'customer_id', customer_id, 'amount', CAST(amount AS CHAR), 'status', status, 'issued_at', DATE_FORMAT(issued_at, '%Y-%m-%d %H:%i:%s')), customer_id, id FROM invoices",
        ),
        (
            "payments",
            "SELECT JSON_OBJECT('id', p.id, 'invoice_id', p.invoice_id, 'amount', CAST(p.amount AS CHAR), 'method', p.method), i.customer_id, p.id FROM payments p JOIN invoices i ON i.id = p.invoice_id",
        ),
    ] {
        let rows: Vec<(String, i64, i64)> = m.query(sql).await.unwrap();
        for (json, cid, pk) in rows {
            out.entry(cid)
                .or_default()
                .entry(table.into())
                .or_default()
                .insert(pk, serde_json::from_str(&json).unwrap());
        }
    }
    out.retain(|_, t| t.contains_key("customer"));
    out
}

async fn mismatches(fabric: &FabricProcess, want: &Expected) -> Vec<String> {
    let mut client = fabric.client().await;
    let ids = all_ids(&mut client, "customer", 1000).await;
    let mut out = Vec::new();
    for id in want.keys() {
        if !ids.contains(&id.to_string()) {
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
            let got = entity_tables(&e);
            match want.get(&id) {
                Some(w) => out.extend(diff_entity(id, w, &got)),
                None => out.push(format!("customer {id}: in the fabric, not in the sources")),
            }
        }
    }
    out
}

async fn pg_workload(url: String, session: u64, txns: usize) {
    let mut rng = fastrand::Rng::with_seed(100 + session);
    let mut c = PgConnection::connect(&url).await.unwrap();
    let mut i = 0;
    while i < txns {
        let mut tx = c.begin().await.unwrap();
        let mut failed = false;
        for k in 0..rng.usize(1..4) {
            let cid = rng.i64(1..=CUSTOMERS);
            match rng.u8(0..5) {
                0 | 1 => {
                    failed |= sqlx::query("UPDATE customers SET balance = balance + 1.25, name = 'n' || $2 WHERE id = $1")
                        .bind(cid).bind(i as i64).execute(&mut *tx).await.is_err();
                }
                2 => {
                    let aid = 100_000 * (session as i64 + 1) + (i * 4 + k) as i64;
                    sqlx::query("INSERT INTO addresses VALUES ($1, $2, 'new')")
                        .bind(aid)
                        .bind(cid)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                3 => {
                    failed |= sqlx::query("DELETE FROM addresses WHERE id = (SELECT min(id) FROM addresses WHERE customer_id = $1)")
                        .bind(cid).execute(&mut *tx).await.is_err();
                }
                _ => {
                    failed |= sqlx::query("UPDATE addresses SET customer_id = $2 WHERE id = (SELECT max(id) FROM addresses WHERE customer_id = $1)")
                        .bind(cid).bind(rng.i64(1..=CUSTOMERS)).execute(&mut *tx).await.is_err();
                }
            }
            if failed {
                break;
            }
        }
        if failed {
            // A deadlock with another session: roll back and try again.
            let _ = tx.rollback().await;
            continue;
        }
        if rng.u8(0..12) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(2..25))).await;
        }
        if tx.commit().await.is_ok() {
            i += 1;
        }
    }
}

async fn my_workload(url: String, session: u64, txns: usize) {
    let mut rng = fastrand::Rng::with_seed(200 + session);
    let mut c = mysql_async::Conn::from_url(url).await.unwrap();
    let mut i = 0;
    while i < txns {
        let mut failed = false;
        let mut tx = c
            .start_transaction(mysql_async::TxOpts::default())
            .await
            .unwrap();
        for k in 0..rng.usize(1..4) {
            let cid = rng.i64(1..=CUSTOMERS);
            let new_id = 1_000_000 * (session as i64 + 1) + (i * 4 + k) as i64;
            match rng.u8(0..5) {
                0 => {
                    // An invoice and its first payment in one transaction.
                    failed |= tx
                        .exec_drop(
                            "INSERT INTO invoices VALUES (?, ?, 99.99, 'open', NOW())",
                            (new_id, cid),
                        )
                        .await
                        .is_err();
                    failed |= tx
                        .exec_drop(
                            "INSERT INTO payments VALUES (?, ?, 10.01, 'card')",
                            (new_id, new_id),
                        )
                        .await
                        .is_err();
                }
                1 => {
                    failed |= tx.exec_drop("UPDATE invoices SET status = 'paid', amount = amount + 0.01 WHERE customer_id = ? ORDER BY id LIMIT 1", (cid,)).await.is_err();
                }
                2 => {
                    failed |= tx.exec_drop(
                        "INSERT INTO payments (id, invoice_id, amount, method) SELECT ?, id, 5.00, 'cash' FROM invoices WHERE customer_id = ? ORDER BY id DESC LIMIT 1",
                        (new_id, cid),
                    ).await.is_err();
                }
                3 => {
                    failed |= tx.exec_drop("DELETE FROM payments WHERE invoice_id IN (SELECT id FROM invoices WHERE customer_id = ?) ORDER BY id LIMIT 1", (cid,)).await.is_err();
                }
                _ => {
                    failed |= tx.exec_drop("UPDATE payments SET amount = amount + 1 WHERE id = (SELECT id FROM (SELECT MIN(id) AS id FROM payments) x)", ()).await.is_err();
                }
            }
            if failed {
                break;
            }
        }
        if failed {
            // A deadlock with another session: roll back and try again.
            let _ = tx.rollback().await;
            continue;
        }
        if rng.u8(0..12) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(2..25))).await;
        }
        if tx.commit().await.is_ok() {
            i += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_transactions_across_postgres_and_mariadb() {
    let db = unique("fab_x");
    // PostgreSQL database.
    let base = pg_url();
    let mut admin = PgConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let pg = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mut c = PgConnection::connect(&pg).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY, name text, balance numeric(14,2));
         CREATE TABLE addresses (id bigint PRIMARY KEY, customer_id bigint NOT NULL, city text);
         ALTER TABLE customers REPLICA IDENTITY FULL;
         ALTER TABLE addresses REPLICA IDENTITY FULL;
         INSERT INTO customers SELECT i, 'c' || i, 0 FROM generate_series(1, {CUSTOMERS}) i;
         INSERT INTO addresses SELECT i, 1 + i % {CUSTOMERS}, 'city' FROM generate_series(1, 500) i;"
    )))
    .execute(&mut c)
    .await
    .unwrap();
    // MariaDB database.
    let my = mysql_url();
    let mut m = mysql_async::Conn::from_url(my.clone()).await.unwrap();
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!("USE {db}")).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.invoices (id BIGINT PRIMARY KEY, customer_id BIGINT NOT NULL, amount DECIMAL(12,2) NOT NULL, status VARCHAR(16) NOT NULL, issued_at DATETIME NOT NULL, KEY (customer_id))"
    )).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.payments (id BIGINT PRIMARY KEY, invoice_id BIGINT NOT NULL, amount DECIMAL(12,2) NOT NULL, method VARCHAR(16) NOT NULL, KEY (invoice_id))"
    )).await.unwrap();
    m.query_drop(format!(
        "INSERT INTO {db}.invoices SELECT seq, 1 + seq % {CUSTOMERS}, seq / 7, 'open', '2024-05-01 10:00:00' FROM seq_1_to_600"
    )).await.unwrap();
    m.query_drop(format!(
        "INSERT INTO {db}.payments SELECT seq, seq, 1.00, 'card' FROM seq_1_to_400"
    ))
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &pg, &my, &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    // 10,000 transactions: 3 PostgreSQL and 2 MariaDB sessions, 2,000 each.
    let mut load = Vec::new();
    for s in 0..3 {
        load.push(tokio::spawn(pg_workload(pg.clone(), s, 2000)));
    }
    for s in 0..2 {
        load.push(tokio::spawn(my_workload(format!("{my}/{db}"), s, 2000)));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    fabric.kill9();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    for l in load {
        l.await.unwrap();
    }

    let want = expected(&pg, &my, &db).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let bad = mismatches(&fabric, &want).await;
        if bad.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} mismatches, first:\n{}\nlog:\n{}",
            bad.len(),
            bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n"),
            fabric.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "10000 transactions across PostgreSQL and MariaDB, 1 SIGKILL, {} entities equal to the sources",
        want.len()
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
    let _ = m.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await;
}
