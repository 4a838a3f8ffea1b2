//! A schema change reaches every row of its table, not only the rows
//! written after it: the PostgreSQL source re-reads the table in chunks
//! while it streams (docs/sources.md, "Schema changes"). Columns are added
//! (with and without a default), renamed, widened and dropped under a
//! write load; at the end every entity equals `SELECT` of its rows, column
//! for column. Then rows changed while the table was out of the publication
//! (never streamed) come back with `fabric resync`.

mod common;

use common::*;
use entity_fabric::proto::GetEntityRequest;
use sqlx::Connection;
use std::collections::BTreeMap;
use std::time::Duration;

const ROWS: i64 = 6_000;
const OWNERS: i64 = 40;

/// Every row of every owner, as the database has it: owner → id → column →
/// text (NULL as "null").
async fn at_source(url: &str) -> BTreeMap<i64, BTreeMap<i64, BTreeMap<String, String>>> {
    if url.starts_with("mysql://") {
        return at_mariadb(url).await;
    }
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name = 'items' ORDER BY ordinal_position",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let select = columns
        .iter()
        .map(|c| format!("COALESCE(\"{c}\"::text, 'null')"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: Vec<sqlx::postgres::PgRow> =
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {select} FROM items")))
            .fetch_all(&mut c)
            .await
            .unwrap();
    let mut out: BTreeMap<i64, BTreeMap<i64, BTreeMap<String, String>>> = BTreeMap::new();
    for r in rows {
        use sqlx::Row;
        let row: BTreeMap<String, String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), r.get::<String, _>(i)))
            .collect();
        let owner = row["owner"].parse().unwrap();
        let id = row["id"].parse().unwrap();
        out.entry(owner).or_default().insert(id, row);
    }
    out
}

/// [`at_source`] of a MariaDB database.
async fn at_mariadb(url: &str) -> BTreeMap<i64, BTreeMap<i64, BTreeMap<String, String>>> {
    use mysql_async::prelude::*;
    let mut c = mysql_async::Conn::from_url(url).await.unwrap();
    let columns: Vec<String> = c
        .query(
            "SELECT column_name FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = 'items' ORDER BY ordinal_position",
        )
        .await
        .unwrap();
    let select = columns
        .iter()
        .map(|c| format!("COALESCE(CAST(`{c}` AS CHAR), 'null')"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: Vec<mysql_async::Row> = c
        .query(format!("SELECT {select} FROM items"))
        .await
        .unwrap();
    let mut out: BTreeMap<i64, BTreeMap<i64, BTreeMap<String, String>>> = BTreeMap::new();
    for r in rows {
        let row: BTreeMap<String, String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), r.get::<String, usize>(i).unwrap()))
            .collect();
        let owner = row["owner"].parse().unwrap();
        let id = row["id"].parse().unwrap();
        out.entry(owner).or_default().insert(id, row);
    }
    out
}

/// The same, as the fabric serves it.
async fn in_fabric(fabric: &FabricProcess, owner: i64) -> BTreeMap<i64, BTreeMap<String, String>> {
    let mut client = fabric.client().await;
    let e = match client
        .get_entity(GetEntityRequest {
            r#type: "owner".into(),
            id: owner.to_string(),
            ..Default::default()
        })
        .await
    {
        Ok(e) => e,
        Err(e) if e.code() == tonic::Code::NotFound => return BTreeMap::new(),
        Err(e) => panic!("reading owner {owner}: {e:?}"),
    };
    let mut out = BTreeMap::new();
    for t in e.into_inner().tables {
        for r in t.rows {
            let row: BTreeMap<String, String> = r
                .columns
                .iter()
                .map(|(k, v)| {
                    let v = entity_fabric::view::value_from_proto(v).unwrap();
                    (k.clone(), v.to_string())
                })
                .collect();
            out.insert(row["id"].parse().unwrap(), row);
        }
    }
    out
}

/// The first difference between the fabric and the database, if any, and
/// how many rows differ.
async fn difference(fabric: &FabricProcess, url: &str) -> Option<String> {
    let want = at_source(url).await;
    let mut first = None;
    let mut n = 0;
    for owner in 1..=OWNERS {
        let have = in_fabric(fabric, owner).await;
        let empty = BTreeMap::new();
        let want = want.get(&owner).unwrap_or(&empty);
        let bad = want
            .iter()
            .filter(|(id, w)| have.get(id) != Some(w))
            .count();
        n += bad;
        n += have.keys().filter(|id| !want.contains_key(id)).count();
        if first.is_none() {
            first = first_difference(&have, want, owner);
        }
    }
    first.map(|f| format!("{n} rows differ; first: {f}"))
}

fn first_difference(
    have: &BTreeMap<i64, BTreeMap<String, String>>,
    want: &BTreeMap<i64, BTreeMap<String, String>>,
    owner: i64,
) -> Option<String> {
    if have.len() != want.len() {
        return Some(format!(
            "owner {owner}: {} rows in the fabric, {} in the database",
            have.len(),
            want.len()
        ));
    }
    want.iter()
        .find(|(id, w)| have.get(id) != Some(w))
        .map(|(id, w)| {
            format!(
                "owner {owner} item {id}: fabric {:?}, database {w:?}",
                have.get(id)
            )
        })
}

/// Waits until the fabric equals the database, or fails with the last
/// difference and the log.
async fn converge(fabric: &FabricProcess, url: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let Some(d) = difference(fabric, url).await else {
            return;
        };
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: still differs after 120 s: {d}\nlog:\n{}",
            fabric.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_renamed_widened_and_dropped_reach_every_row() {
    let db = unique("fab_ddl");
    let url = pg_fresh_db(&db).await;
    pg_at_source(
        &url,
        &format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, owner bigint NOT NULL, name text,
                                 price numeric(10,2), legacy text);
             ALTER TABLE items REPLICA IDENTITY FULL;
             INSERT INTO items SELECT i, 1 + i % {OWNERS}, 'item ' || i, i * 0.25, 'old'
             FROM generate_series(1, {ROWS}) i;"
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[snapshot]
dir = "{d}/snapshots"
interval = "1s"
[dlq]
file = "{d}/dlq.jsonl"
[[sources]]
name = "shop"
kind = "postgres_cdc"
url = "{url}"
tables = ["public.items"]
slot = "{db}"
publication = "{db}"
[[entities]]
name = "owner"
# An owner is its items: deleting one of them is not deleting the owner.
delete_with_root = false
  [[entities.tables]]
  name = "items"
  source = "shop"
  from = "public.items"
  id_column = "owner"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &url, "the initial snapshot").await;

    // A write load all along: updates, inserts and deletes of random rows,
    // each its own transaction.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut n: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = 1 + (n * 7919) % ROWS;
                let sql = match n % 5 {
                    0 => format!("DELETE FROM items WHERE id = {id}"),
                    1 => format!(
                        "INSERT INTO items (id, owner, price) VALUES ({}, {}, {n}) ON CONFLICT DO NOTHING",
                        ROWS + n,
                        1 + n % OWNERS
                    ),
                    _ => format!("UPDATE items SET price = price + 1 WHERE id = {id}"),
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let ddl = [
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'n/a'",
        "ALTER TABLE items ADD COLUMN rank int",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "ALTER TABLE items ALTER COLUMN price TYPE numeric(14,4)",
        "ALTER TABLE items DROP COLUMN legacy",
    ];
    for sql in ddl {
        tokio::time::sleep(Duration::from_millis(700)).await;
        pg_at_source(&url, sql).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    assert!(writes > 100, "the load wrote {writes} times");

    converge(&fabric, &url, "every row in the new shape").await;
    let log = fabric.log_text();
    assert!(
        log.contains("the table's shape changed"),
        "no re-read was started:\n{log}"
    );
    assert!(
        !std::fs::read_to_string(dir.path().join("dlq.jsonl"))
            .unwrap_or_default()
            .contains("items")
    );

    // By hand: rows changed while the table was out of the publication
    // never reached the fabric; `fabric resync` brings them.
    pg_at_source(
        &url,
        &format!(
            "ALTER PUBLICATION {db} DROP TABLE items;
             UPDATE items SET title = 'renamed behind' WHERE id % 10 = 3;
             ALTER PUBLICATION {db} ADD TABLE items;"
        ),
    )
    .await;
    pg_at_source(
        &url,
        "INSERT INTO items (id, owner, title) VALUES (999999, 2, 'marker')",
    )
    .await;
    eventually(Duration::from_secs(30), "a row written after", || async {
        in_fabric(&fabric, 2)
            .await
            .contains_key(&999_999)
            .then_some(())
    })
    .await;
    assert!(
        difference(&fabric, &url).await.is_some(),
        "the rows changed out of the publication reached the fabric anyway"
    );
    let bin = env!("CARGO_BIN_EXE_fabric");
    let out = std::process::Command::new(bin)
        .args(["resync", "shop", "public.items", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reads public.items again"));
    let out = std::process::Command::new(bin)
        .args(["resync", "shop", "public.nothing", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("does not capture"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    converge(
        &fabric,
        &url,
        "the rows changed out of the publication, re-read",
    )
    .await;
    assert!(fabric.terminate());
    pg_drop_db(&db, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_columns_added_renamed_widened_and_dropped_reach_every_row() {
    use mysql_async::prelude::*;
    let db = unique("fab_ddl_my");
    let base = mysql_url();
    let mut m = mysql_async::Conn::from_url(base.clone()).await.unwrap();
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!("USE {db}")).await.unwrap();
    m.query_drop(
        "CREATE TABLE items (id BIGINT PRIMARY KEY, owner BIGINT NOT NULL, name VARCHAR(100), \
         price DECIMAL(10,2), legacy VARCHAR(10))",
    )
    .await
    .unwrap();
    m.query_drop(format!(
        "INSERT INTO items SELECT seq, 1 + seq % {OWNERS}, CONCAT('item ', seq), seq * 0.25, 'old' \
         FROM seq_1_to_{ROWS}"
    ))
    .await
    .unwrap();
    let url = format!("{base}/{db}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[snapshot]
dir = "{d}/snapshots"
interval = "1s"
[dlq]
file = "{d}/dlq.jsonl"
[[sources]]
name = "shop"
kind = "mysql_binlog"
url = "{base}"
tables = ["{db}.items"]
[[entities]]
name = "owner"
delete_with_root = false
  [[entities.tables]]
  name = "items"
  source = "shop"
  from = "{db}.items"
  id_column = "owner"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    converge(&fabric, &url, "the initial snapshot").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = mysql_async::Conn::from_url(url).await.unwrap();
            let mut n: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = 1 + (n * 7919) % ROWS;
                let sql = match n % 5 {
                    0 => format!("DELETE FROM items WHERE id = {id}"),
                    1 => format!(
                        "INSERT IGNORE INTO items (id, owner, price) VALUES ({}, {}, {n})",
                        ROWS + n,
                        1 + n % OWNERS
                    ),
                    _ => format!("UPDATE items SET price = price + 1 WHERE id = {id}"),
                };
                c.query_drop(sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let ddl = [
        "ALTER TABLE items ADD COLUMN note VARCHAR(20) DEFAULT 'n/a'",
        "ALTER TABLE items ADD COLUMN grade INT",
        "ALTER TABLE items RENAME COLUMN name TO title",
        "ALTER TABLE items MODIFY price DECIMAL(14,4)",
        "ALTER TABLE items DROP COLUMN legacy",
    ];
    for sql in ddl {
        tokio::time::sleep(Duration::from_millis(700)).await;
        m.query_drop(sql).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    assert!(writes > 100, "the load wrote {writes} times");
    converge(&fabric, &url, "every row in the new shape").await;
    assert!(
        fabric.log_text().contains("the table's shape changed"),
        "no re-read was started"
    );

    // By hand: rows changed with the binlog off for the session never
    // reached the fabric; `fabric resync` brings them.
    m.query_drop(
        "SET sql_log_bin = 0; UPDATE items SET title = 'changed unlogged' WHERE id % 10 = 3; \
         SET sql_log_bin = 1",
    )
    .await
    .unwrap();
    m.query_drop("INSERT INTO items (id, owner, title) VALUES (999999, 2, 'marker')")
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "a row written after", || async {
        in_fabric(&fabric, 2)
            .await
            .contains_key(&999_999)
            .then_some(())
    })
    .await;
    assert!(
        difference(&fabric, &url).await.is_some(),
        "the rows changed with the binlog off reached the fabric anyway"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["resync", "shop", &format!("{db}.items"), "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    converge(
        &fabric,
        &url,
        "the rows changed with the binlog off, re-read",
    )
    .await;
    assert!(fabric.terminate());
    m.query_drop(format!("DROP DATABASE {db}")).await.unwrap();
}
