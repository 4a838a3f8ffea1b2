//! One customer entity assembled from PostgreSQL (customers, addresses) and
//! MariaDB (invoices, and payments found through their invoice): the
//! databases, the fabric config that captures them, workloads of random
//! transactions (addresses, invoices with their payments, and payments
//! moving between customers among them), and the comparison of every
//! entity with the sources.
//! Shared by the cross-database and chaos tests.

use super::*;
use mysql_async::prelude::*;
use sqlx::{Connection, PgConnection, Row};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub const CUSTOMERS: i64 = 300;

/// A PostgreSQL and a MariaDB database of the same (unique) name.
pub struct TwoDatabases {
    pub db: String,
    /// URL of the PostgreSQL database.
    pub pg: String,
    /// URL of the MariaDB server (the database is `db`).
    pub my: String,
}

impl TwoDatabases {
    /// Creates both databases with their tables and first rows.
    pub async fn create(prefix: &str) -> TwoDatabases {
        let db = unique(prefix);
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
        let my = mysql_url();
        let mut m = mysql_async::Conn::from_url(my.clone()).await.unwrap();
        m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
        // The seq_1_to_N tables (the SEQUENCE engine) need a current database.
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
        TwoDatabases { db, pg, my }
    }

    /// The config of process `name` of a fabric of these databases on the
    /// Kafka broker of the test services (`FABRIC_TEST_KAFKA`): 4 partitions,
    /// topics under `prefix`, its own directory under `dir`, and
    /// `node-<name>` as its member id (ids sort as the names do).
    pub fn kafka_config(&self, dir: &Path, prefix: &str, name: &str) -> PathBuf {
        let brokers = std::env::var("FABRIC_TEST_KAFKA").expect(
            "FABRIC_TEST_KAFKA is not set: run the tests with ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first",
        );
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        self.config(
            &d,
            &format!(
                "kind = \"kafka\"\npartitions = 4\n[bus.kafka]\nbrokers = \"{brokers}\"\n\
                 topic_prefix = \"{prefix}\"\nsession_timeout = \"6s\"\ninstance_id = \"node-{name}\"\n"
            ),
        )
    }

    /// URL of the MariaDB database.
    pub fn my_db(&self) -> String {
        format!("{}/{}", self.my, self.db)
    }

    /// A fabric config capturing both into `customer`, with `bus` as the
    /// body of its `[bus]` section (and any sections after it).
    pub fn config(&self, dir: &Path, bus: &str) -> PathBuf {
        let text = format!(
            r#"{server}
[bus]
{bus}

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
            server = loopback_server(),
            d = dir.display(),
            pg = self.pg,
            my = self.my,
            db = self.db,
        );
        write_config(dir, &text)
    }

    /// Every customer as queries of the two databases return it.
    pub async fn expected(&self) -> Expected {
        let mut out = Expected::new();
        let mut c = PgConnection::connect(&self.pg).await.unwrap();
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
        let mut m = mysql_async::Conn::from_url(self.my_db()).await.unwrap();
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

    /// Drops both databases and the replication slot.
    pub async fn drop_all(self) {
        let base = pg_url();
        if let Ok(mut admin) = PgConnection::connect(&base).await {
            let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.db)
                .execute(&mut admin)
                .await;
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db
            )))
            .execute(&mut admin)
            .await;
        }
        if let Ok(mut m) = mysql_async::Conn::from_url(self.my.clone()).await {
            let _ = m
                .query_drop(format!("DROP DATABASE IF EXISTS {}", self.db))
                .await;
        }
    }
}

/// Waits until every customer equals `want`; panics with the first
/// differences (and the log) after `within`.
pub async fn converge_to(fabric: &FabricProcess, want: &Expected, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let bad = compare_with(&mut fabric.client().await, want).await;
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} mismatches, first:\n{}\nlog:\n{}",
            bad.len(),
            bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n"),
            fabric.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long a workload runs: a number of committed transactions, or until
/// the flag is set.
#[derive(Clone)]
pub enum Until {
    Count(usize),
    Stopped(Arc<AtomicBool>),
}

impl Until {
    fn done(&self, committed: usize) -> bool {
        match self {
            Until::Count(n) => committed >= *n,
            Until::Stopped(f) => f.load(Ordering::Relaxed),
        }
    }
}

/// A connection, retried while the server is away (restarting).
async fn pg_connect(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "PostgreSQL not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn my_connect(url: &str) -> mysql_async::Conn {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match mysql_async::Conn::from_url(url).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "MariaDB not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Random transactions on the PostgreSQL side from one session; returns
/// how many committed. A lost connection (the server restarting) is
/// reconnected; only commits that succeeded are counted.
pub async fn pg_workload(url: String, session: u64, until: Until) -> usize {
    let mut rng = fastrand::Rng::with_seed(100 + session);
    let mut c = pg_connect(&url).await;
    let mut broken = false;
    let mut i = 0;
    while !until.done(i) {
        if broken {
            c = pg_connect(&url).await;
            broken = false;
        }
        let Ok(mut tx) = c.begin().await else {
            broken = true;
            continue;
        };
        let mut failed = false;
        for k in 0..rng.usize(1..4) {
            let cid = rng.i64(1..=CUSTOMERS);
            failed |= match rng.u8(0..5) {
                0 | 1 => sqlx::query("UPDATE customers SET balance = balance + 1.25, name = 'n' || $2 WHERE id = $1")
                    .bind(cid).bind(i as i64).execute(&mut *tx).await.is_err(),
                2 => {
                    let aid = 100_000 * (session as i64 + 1) + (i * 4 + k) as i64;
                    sqlx::query("INSERT INTO addresses VALUES ($1, $2, 'new') ON CONFLICT (id) DO NOTHING")
                        .bind(aid)
                        .bind(cid)
                        .execute(&mut *tx)
                        .await
                        .is_err()
                }
                3 => sqlx::query("DELETE FROM addresses WHERE id = (SELECT min(id) FROM addresses WHERE customer_id = $1)")
                    .bind(cid).execute(&mut *tx).await.is_err(),
                _ => sqlx::query("UPDATE addresses SET customer_id = $2 WHERE id = (SELECT max(id) FROM addresses WHERE customer_id = $1)")
                    .bind(cid).bind(rng.i64(1..=CUSTOMERS)).execute(&mut *tx).await.is_err(),
            };
            if failed {
                break;
            }
        }
        if failed {
            // A deadlock with another session, or the server went away:
            // roll back and try again (on a new connection if need be).
            broken = tx.rollback().await.is_err();
            continue;
        }
        if rng.u8(0..12) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(2..25))).await;
        }
        match tx.commit().await {
            Ok(()) => i += 1,
            Err(_) => broken = true,
        }
    }
    i
}

/// Random transactions on the MariaDB side from one session (`url` names
/// the database); as [`pg_workload`].
pub async fn my_workload(url: String, session: u64, until: Until) -> usize {
    let mut rng = fastrand::Rng::with_seed(200 + session);
    // Kinds 5 and 6: invoices moving between customers (their payments
    // follow) and payments between invoices (issue 21).
    let kinds = 7;
    let mut c = my_connect(&url).await;
    let mut broken = false;
    let mut i = 0;
    while !until.done(i) {
        if broken {
            c = my_connect(&url).await;
            broken = false;
        }
        let mut failed = false;
        let Ok(mut tx) = c.start_transaction(mysql_async::TxOpts::default()).await else {
            broken = true;
            continue;
        };
        for k in 0..rng.usize(1..4) {
            let cid = rng.i64(1..=CUSTOMERS);
            let new_id = 1_000_000 * (session as i64 + 1) + (i * 4 + k) as i64;
            failed |= match rng.u8(0..kinds) {
                // An invoice and its first payment in one transaction.
                0 => {
                    tx.exec_drop(
                        "INSERT IGNORE INTO invoices VALUES (?, ?, 99.99, 'open', NOW())",
                        (new_id, cid),
                    )
                    .await
                    .is_err()
                        || tx
                            .exec_drop(
                                "INSERT IGNORE INTO payments VALUES (?, ?, 10.01, 'card')",
                                (new_id, new_id),
                            )
                            .await
                            .is_err()
                }
                1 => tx.exec_drop("UPDATE invoices SET status = 'paid', amount = amount + 0.01 WHERE customer_id = ? ORDER BY id LIMIT 1", (cid,)).await.is_err(),
                2 => tx.exec_drop(
                    "INSERT IGNORE INTO payments (id, invoice_id, amount, method) SELECT ?, id, 5.00, 'cash' FROM invoices WHERE customer_id = ? ORDER BY id DESC LIMIT 1",
                    (new_id, cid),
                ).await.is_err(),
                3 => tx.exec_drop("DELETE FROM payments WHERE invoice_id IN (SELECT id FROM invoices WHERE customer_id = ?) ORDER BY id LIMIT 1", (cid,)).await.is_err(),
                // An invoice moves to another customer, its payments with it.
                5 => tx.exec_drop(
                    "UPDATE invoices SET customer_id = ? WHERE id = ?",
                    (cid, rng.i64(1..=600)),
                ).await.is_err(),
                // A payment moves to another invoice (maybe another customer's).
                6 => tx.exec_drop(
                    "UPDATE payments SET invoice_id = ? WHERE id = (SELECT id FROM (SELECT MIN(p.id) AS id FROM payments p JOIN invoices i ON i.id = p.invoice_id WHERE i.customer_id = ?) x)",
                    (rng.i64(1..=600), cid),
                ).await.is_err(),
                _ => tx.exec_drop("UPDATE payments SET amount = amount + 1 WHERE id = (SELECT id FROM (SELECT MIN(id) AS id FROM payments) x)", ()).await.is_err(),
            };
            if failed {
                break;
            }
        }
        if failed {
            broken = tx.rollback().await.is_err();
            continue;
        }
        if rng.u8(0..12) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(2..25))).await;
        }
        match tx.commit().await {
            Ok(()) => i += 1,
            Err(_) => broken = true,
        }
    }
    i
}
