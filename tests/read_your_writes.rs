//! Read-your-writes and entity history, through the real binary against
//! real PostgreSQL and MariaDB.
//!
//! A client commits in PostgreSQL, takes `pg_current_wal_lsn()`, and reads
//! the entity with that position as its minimum: it always sees its write,
//! thousands of times in a row, while other sessions write to a database
//! the fabric does not capture (so the position is usually past the
//! client's own commit, and only the server's keepalives say it was
//! reached). The same against MariaDB with `@@last_gtid`,
//! `@@gtid_binlog_pos` and binlog `file:pos`. A position not reached within
//! the deadline is DEADLINE_EXCEEDED, saying how far the fabric got; bad
//! positions are INVALID_ARGUMENT. Reads by version return exactly what was
//! served at that version, and a watch resumes from a kept version.

mod common;

use common::*;
use entity_fabric::proto::entity_change::Operation;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use entity_fabric::proto::{
    BatchGetEntitiesRequest, Entity, GetEntityRequest, SourcePosition, WatchEntitiesRequest,
};
use mysql_async::prelude::*;
use sqlx::{Connection, PgConnection, Row};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::transport::Channel;

const PG_ROUNDS: i64 = 2000;
const MY_ROUNDS: i64 = 1000;
const ACCOUNTS: i64 = 20;

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

[[sources]]
name = "crm"
kind = "postgres_cdc"
url = "{pg}"
tables = ["public.accounts"]
slot = "{db}"
publication = "{db}"

[[sources]]
name = "billing"
kind = "mysql_binlog"
url = "{my}"
tables = ["{db}.orders"]

[[entities]]
name = "account"
history = 3
  [[entities.tables]]
  name = "account"
  source = "crm"
  from = "public.accounts"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "orders"
  source = "billing"
  from = "{db}.orders"
  id_column = "account_id"
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

async fn pg_admin() -> PgConnection {
    PgConnection::connect(&pg_url()).await.unwrap()
}

/// A fresh PostgreSQL database running `schema`; returns its URL.
async fn pg_db(name: &str, schema: &str) -> String {
    let mut c = pg_admin().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .unwrap();
    let (prefix, _) = pg_url()
        .rsplit_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let url = format!("{prefix}/{name}");
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_string()))
        .execute(&mut c)
        .await
        .unwrap();
    url
}

async fn pg_drop(name: &str) {
    pg_drop_db(name, name).await;
}

async fn my_conn(db: Option<&str>) -> mysql_async::Conn {
    let url = match db {
        Some(db) => format!("{}/{db}", mysql_url()),
        None => mysql_url(),
    };
    mysql_async::Conn::from_url(url).await.unwrap()
}

fn pos(source: &str, position: &str) -> SourcePosition {
    SourcePosition {
        source: source.into(),
        position: position.into(),
    }
}

/// A client's session. The test server runs with `synchronous_commit =
/// off` (for speed), where a commit returns before its WAL is written and
/// `pg_current_wal_lsn()` may be short of it; a client session uses the
/// server default, `on`, where the position taken after a commit covers it.
async fn client_session(url: &str) -> PgConnection {
    let mut p = PgConnection::connect(url).await.unwrap();
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut p)
        .await
        .unwrap();
    p
}

/// GetEntity of an account with minimum positions, within `timeout`.
async fn get_at(
    client: &mut EntityServiceClient<Channel>,
    id: i64,
    min: Vec<SourcePosition>,
    timeout: Duration,
) -> Result<Entity, tonic::Status> {
    let mut req = tonic::Request::new(GetEntityRequest {
        r#type: "account".into(),
        id: id.to_string(),
        min_positions: min,
        ..Default::default()
    });
    req.set_timeout(timeout);
    client.get_entity(req).await.map(|r| r.into_inner())
}

/// The text of `column` in the first row of `table` with `pk` (first column).
fn cell(e: &Entity, table: &str, pk: i64, column: &str) -> Option<String> {
    let t = e.tables.iter().find(|t| t.name == table)?;
    t.rows.iter().find_map(|r| {
        let id = entity_fabric::view::value_from_proto(r.columns.get("id")?).ok()?;
        if id.to_string() != pk.to_string() {
            return None;
        }
        let v = entity_fabric::view::value_from_proto(r.columns.get(column)?).ok()?;
        Some(v.to_string())
    })
}

fn balance(e: &Entity, id: i64) -> Option<String> {
    cell(e, "account", id, "balance")
}

/// Writes to tables the fabric does not capture, in another PostgreSQL
/// database and another MariaDB database, until `stop`: WAL and binlog
/// move past every client's own write. Returns how many writes it made.
fn noise(pg: String, my_db: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut p = client_session(&pg).await;
        let mut m = my_conn(Some(&my_db)).await;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            sqlx::query("INSERT INTO noise (v) VALUES ($1)")
                .bind(n as i64)
                .execute(&mut p)
                .await
                .unwrap();
            m.exec_drop("INSERT INTO noise (v) VALUES (?)", (n,))
                .await
                .unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        n
    })
}

struct Setup {
    dir: tempfile::TempDir,
    db: String,
    pg: String,
    fabric: FabricProcess,
    client: EntityServiceClient<Channel>,
}

/// Databases `<prefix>_…` in PostgreSQL (accounts) and MariaDB (orders),
/// and the fabric reading them, past its initial snapshot.
async fn setup(prefix: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = unique(prefix);
    let pg = pg_db(
        &db,
        &format!(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             ALTER TABLE accounts REPLICA IDENTITY FULL;
             INSERT INTO accounts SELECT i, 0 FROM generate_series(1, {ACCOUNTS}) i;"
        ),
    )
    .await;
    let mut m = my_conn(None).await;
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.orders (id BIGINT PRIMARY KEY, account_id BIGINT NOT NULL, amount BIGINT NOT NULL)"
    ))
    .await
    .unwrap();
    let cfg = config(dir.path(), &pg, &mysql_url(), &db);
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let client = fabric.client().await;
    eventually(Duration::from_secs(60), "the initial snapshot", || {
        let mut c = client.clone();
        async move {
            let e = get_at(&mut c, ACCOUNTS, Vec::new(), Duration::from_secs(5))
                .await
                .ok()?;
            balance(&e, ACCOUNTS).filter(|b| b == "0")
        }
    })
    .await;
    Setup {
        dir,
        db,
        pg,
        fabric,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_always_reads_its_own_writes() {
    let Setup {
        dir: _dir,
        db,
        pg,
        mut fabric,
        mut client,
    } = setup("ryw").await;
    let noise_db = format!("{db}_noise");
    let pg_noise = pg_db(
        &noise_db,
        "CREATE TABLE noise (id bigserial PRIMARY KEY, v bigint)",
    )
    .await;
    let mut m = my_conn(None).await;
    m.query_drop(format!("CREATE DATABASE {noise_db}"))
        .await
        .unwrap();
    m.query_drop(format!(
        "CREATE TABLE {noise_db}.noise (id BIGINT AUTO_INCREMENT PRIMARY KEY, v BIGINT)"
    ))
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let noise_task = noise(pg_noise.clone(), noise_db.clone(), stop.clone());

    // PostgreSQL: commit, take the WAL position, read with it.
    let mut p = client_session(&pg).await;
    let (mut misses, mut stale_without) = (Vec::new(), 0u64);
    for i in 1..=PG_ROUNDS {
        let id = 1 + i % ACCOUNTS;
        sqlx::query("UPDATE accounts SET balance = $2 WHERE id = $1")
            .bind(id)
            .bind(i)
            .execute(&mut p)
            .await
            .unwrap();
        let lsn: String = sqlx::query("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut p)
            .await
            .unwrap()
            .get(0);
        // Without the position: may or may not be there yet.
        let plain = get_at(&mut client, id, Vec::new(), Duration::from_secs(5))
            .await
            .unwrap();
        if balance(&plain, id) != Some(i.to_string()) {
            stale_without += 1;
        }
        let e = get_at(
            &mut client,
            id,
            vec![pos("crm", &lsn)],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|s| panic!("round {i}: {s:?}\n{}", fabric.log_text()));
        if balance(&e, id) != Some(i.to_string()) {
            misses.push(format!(
                "round {i}: account {id} balance {:?} at {lsn}",
                balance(&e, id)
            ));
        }
        // The entity's own positions chain on to a read of another entity.
        if i % 100 == 0 {
            let chained: Vec<SourcePosition> = e.positions.clone();
            assert!(!chained.is_empty(), "an entity carries its positions");
            get_at(
                &mut client,
                1 + (i + 7) % ACCOUNTS,
                chained,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        }
    }
    println!(
        "postgres: {PG_ROUNDS} writes read back with their LSN, {} misses; \
         {stale_without} plain reads did not show the write yet",
        misses.len()
    );
    assert!(
        misses.is_empty(),
        "reads missed their own writes: {misses:#?}"
    );

    // A batch with the position sees the write too.
    sqlx::query("UPDATE accounts SET balance = -1 WHERE id = 3")
        .execute(&mut p)
        .await
        .unwrap();
    let lsn: String = sqlx::query("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut p)
        .await
        .unwrap()
        .get(0);
    let mut req = tonic::Request::new(BatchGetEntitiesRequest {
        r#type: "account".into(),
        ids: (1..=ACCOUNTS).map(|i| i.to_string()).collect(),
        min_positions: vec![pos("crm", &lsn)],
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(10));
    let batch = client.batch_get_entities(req).await.unwrap().into_inner();
    let three = batch.entities.iter().find(|e| e.id == "3").unwrap();
    assert_eq!(balance(three, 3).as_deref(), Some("-1"));

    // MariaDB: insert, take the GTID (or binlog position), read with it.
    let mut my = my_conn(Some(&db)).await;
    let mut misses = Vec::new();
    for i in 1..=MY_ROUNDS {
        let id = 1 + i % ACCOUNTS;
        my.exec_drop(
            "INSERT INTO orders (id, account_id, amount) VALUES (?, ?, ?)",
            (i, id, i * 10),
        )
        .await
        .unwrap();
        let token = match i % 10 {
            // What the server's binlog holds now (others' writes included).
            0..=1 => {
                let g: String = my
                    .query_first("SELECT @@gtid_binlog_pos")
                    .await
                    .unwrap()
                    .unwrap();
                g
            }
            2 => {
                let row: mysql_async::Row =
                    my.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
                let file: String = row.get(0).unwrap();
                let pos: u64 = row.get(1).unwrap();
                format!("{file}:{pos}")
            }
            // This session's own last transaction.
            _ => {
                let g: String = my.query_first("SELECT @@last_gtid").await.unwrap().unwrap();
                g
            }
        };
        let e = get_at(
            &mut client,
            id,
            vec![pos("billing", &token)],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|s| panic!("round {i} ({token}): {s:?}\n{}", fabric.log_text()));
        if cell(&e, "orders", i, "amount") != Some((i * 10).to_string()) {
            misses.push(format!(
                "round {i}: account {id} without order {i} at {token}"
            ));
        }
    }
    println!(
        "mariadb: {MY_ROUNDS} writes read back with their GTID or binlog position, {} misses",
        misses.len()
    );
    assert!(
        misses.is_empty(),
        "reads missed their own writes: {misses:#?}"
    );

    stop.store(true, Ordering::Relaxed);
    let noise_writes = noise_task.await.unwrap();
    println!("noise: {noise_writes} writes to tables not captured, meanwhile");

    // Both positions at once.
    let lsn: String = sqlx::query("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut p)
        .await
        .unwrap()
        .get(0);
    let g: String = my
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .unwrap()
        .unwrap();
    get_at(
        &mut client,
        1,
        vec![pos("crm", &lsn), pos("billing", &g)],
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // A position the source has not reached: DEADLINE_EXCEEDED, saying how far.
    let (hi, lo) = lsn.split_once('/').unwrap();
    let far = format!("{:X}/{lo}", u64::from_str_radix(hi, 16).unwrap() + 16);
    let started = std::time::Instant::now();
    let err = get_at(
        &mut client,
        1,
        vec![pos("crm", &far)],
        Duration::from_millis(800),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message()
            .contains("source crm has been read up to lsn:"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Bad positions and unknown sources are the caller's error.
    for (min, what) in [
        (pos("crm", "seq:5"), "expected an LSN"),
        (pos("crm", "not-a-position"), "expected an LSN"),
        (pos("billing", "0-x-1"), "expected a GTID"),
        (pos("ledger", "0/1"), "unknown source \"ledger\""),
    ] {
        let err = get_at(&mut client, 1, vec![min], Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{err:?}");
    }

    assert!(
        fabric.terminate(),
        "clean exit; log:\n{}",
        fabric.log_text()
    );
    drop(m);
    let mut m = my_conn(None).await;
    for d in [&db, &noise_db] {
        let _ = m.query_drop(format!("DROP DATABASE IF EXISTS {d}")).await;
    }
    pg_drop(&db).await;
    pg_drop(&noise_db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_by_version_return_what_was_served_and_watches_resume() {
    let Setup {
        dir: _dir,
        db,
        pg,
        mut fabric,
        mut client,
    } = setup("hist").await;
    let mut m = my_conn(None).await;
    let mut p = client_session(&pg).await;

    // Ten versions of account 5, each read (with its write's position) as
    // it was served.
    let mut served: Vec<Entity> = Vec::new();
    for i in 1..=10i64 {
        sqlx::query("UPDATE accounts SET balance = $1 WHERE id = 5")
            .bind(i * 100)
            .execute(&mut p)
            .await
            .unwrap();
        let lsn: String = sqlx::query("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut p)
            .await
            .unwrap()
            .get(0);
        let e = get_at(
            &mut client,
            5,
            vec![pos("crm", &lsn)],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(
            balance(&e, 5),
            Some((i * 100).to_string()),
            "read at {lsn}: {e:?}; log:\n{}",
            fabric.log_text()
        );
        served.push(e);
    }
    let current = served.last().unwrap().version;
    // The current version and the three before it (history = 3) are kept.
    for e in served.iter().filter(|e| e.version + 3 >= current) {
        let got = client
            .get_entity(GetEntityRequest {
                r#type: "account".into(),
                id: "5".into(),
                version: e.version,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got, e, "version {} as it was served", e.version);
    }
    let gone = served[0].version;
    let err = client
        .get_entity(GetEntityRequest {
            r#type: "account".into(),
            id: "5".into(),
            version: gone,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let kept: Vec<String> = (current - 3..=current).map(|v| v.to_string()).collect();
    assert!(
        err.message()
            .contains(&format!("versions kept: {}", kept.join(", "))),
        "{err:?}"
    );

    // A watch resuming from a kept version gets it and every later one,
    // then live changes.
    let from = current - 2;
    let mut stream = client
        .watch_entities(WatchEntitiesRequest {
            r#type: "account".into(),
            id: "5".into(),
            from_version: from,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    for _ in from..=current {
        let c = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(c.operation, Operation::Upsert as i32);
        got.push(c.entity.unwrap());
    }
    let want: Vec<&Entity> = served.iter().filter(|e| e.version >= from).collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    sqlx::query("UPDATE accounts SET balance = 7 WHERE id = 5")
        .execute(&mut p)
        .await
        .unwrap();
    let live = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .entity
        .unwrap();
    assert_eq!(live.version, current + 1);
    assert_eq!(balance(&live, 5).as_deref(), Some("7"));

    assert!(
        fabric.terminate(),
        "clean exit; log:\n{}",
        fabric.log_text()
    );
    let _ = m.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await;
    pg_drop(&db).await;
}
