//! The `sql_poll` connector against a real PostgreSQL and MariaDB (started by
//! `scripts/services.sh`) and a SQLite file: rows arrive typed, updates and
//! soft deletes arrive, a transaction that commits after a higher cursor
//! value was seen is not lost, resuming from a cursor position skips nothing
//! after it, and config mistakes are config errors naming the object.

mod common;

use entity_fabric::config::{Config, SourceConfig};
use entity_fabric::event::value::parse_timestamp;
use entity_fabric::event::{Op, Position, RowChange, SourceTxn, Value};
use entity_fabric::sources::sql_poll::SqlPollSource;
use entity_fabric::sources::{Source, SourceContext, SourceError, SourceStatus, TxnEnvelope};
use entity_fabric::telemetry::{DeadLetters, Metrics};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

struct Harness {
    rx: mpsc::Receiver<TxnEnvelope>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
    status: Arc<SourceStatus>,
    _durable: watch::Sender<Option<Position>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn next(&mut self) -> SourceTxn {
        let wait = tokio::time::timeout(Duration::from_secs(10), self.rx.recv());
        wait.await
            .expect("a transaction within 10s")
            .expect("the source is running")
            .txn
    }

    /// Transactions until one holds a change of row `id` of `table`; every
    /// change on the way, and the position of the last transaction.
    async fn until(&mut self, table: &str, id: i64) -> (Vec<RowChange>, Position) {
        let mut all = Vec::new();
        loop {
            let t = self.next().await;
            let hit = t.changes.iter().any(|c| c.table == table && id_of(c) == id);
            all.extend(t.changes);
            if hit {
                return (all, t.position);
            }
        }
    }

    /// Every change that arrives within `d`.
    async fn drain(&mut self, d: Duration) -> Vec<RowChange> {
        let mut all = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(env)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            all.extend(env.txn.changes);
        }
        all
    }

    async fn streaming(&self) {
        for _ in 0..1000 {
            if *self.status.state.lock() == "streaming" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the source is not streaming after 10s");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// The error the source stopped with.
    async fn error(self) -> SourceError {
        let wait = tokio::time::timeout(Duration::from_secs(20), self.task);
        wait.await.expect("the source stops").unwrap().unwrap_err()
    }
}

/// A `sql_poll` source named `poll` from TOML lines (url, tables, ...).
fn source(lines: &str, dir: &Path) -> Result<SqlPollSource, SourceError> {
    let text = format!("name = \"poll\"\nkind = \"sql_poll\"\npoll_interval = \"10ms\"\n{lines}\n");
    let cfg: SourceConfig = toml::from_str(&text).unwrap();
    let config = Config::from_toml(&dir.join("fabric.toml"), "").unwrap();
    SqlPollSource::new(&cfg, &config)
}

fn start(lines: &str, resume: Option<Position>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(256);
    let (durable, durable_rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let dead = Arc::new(DeadLetters::new(
        &dir.path().join("dlq.jsonl"),
        10,
        Arc::new(Metrics::new()),
    ));
    let status = Arc::new(SourceStatus::default());
    let ctx = SourceContext::new(
        "poll".into(),
        resume,
        tx,
        durable_rx,
        status.clone(),
        dead,
        shutdown.clone(),
    );
    let src = source(lines, dir.path()).unwrap();
    let task = tokio::spawn(Box::new(src).run(ctx));
    Harness {
        rx,
        shutdown,
        task,
        status,
        _durable: durable,
        _dir: dir,
    }
}

fn id_of(c: &RowChange) -> i64 {
    match c.image().and_then(|r| r.get("id")) {
        Some(Value::Int(i)) => *i,
        other => panic!("no integer id in {c:?}: {other:?}"),
    }
}

fn ids(changes: &[RowChange]) -> BTreeSet<i64> {
    changes.iter().map(id_of).collect()
}

async fn pg() -> PgConnection {
    PgConnection::connect(&common::pg_url()).await.unwrap()
}

async fn pg_exec(c: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(c)
        .await
        .unwrap();
}

/// A fresh schema on the test PostgreSQL, created by `ddl` (`{s}` is the schema).
async fn pg_schema(ddl: &str) -> (PgConnection, String) {
    let mut c = pg().await;
    let s = common::unique("poll");
    pg_exec(
        &mut c,
        &format!("CREATE SCHEMA {s}; {}", ddl.replace("{s}", &s)),
    )
    .await;
    (c, s)
}

async fn mysql_db(ddl: &str) -> (MySqlConnection, String) {
    let mut c = MySqlConnection::connect(&common::mysql_url())
        .await
        .unwrap();
    let db = common::unique("poll");
    let sql = format!("CREATE DATABASE {db}");
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut c)
        .await
        .unwrap();
    let url = format!("{}/{db}", common::mysql_url());
    let mut c = MySqlConnection::connect(&url).await.unwrap();
    my_exec(&mut c, ddl).await;
    (c, url)
}

async fn my_exec(c: &mut MySqlConnection, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(c)
        .await
        .unwrap();
}

#[tokio::test]
async fn postgres_snapshot_types_updates_and_soft_deletes() {
    let (mut c, s) = pg_schema(
        "CREATE SEQUENCE {s}.rev; \
         CREATE TABLE {s}.items(id int PRIMARY KEY, name text, amount numeric(10,2), ratio float8, \
           active bool, born date, seen_at timestamptz, local_at timestamp, uid uuid, doc jsonb, \
           tags text[], photo bytea, deleted_at timestamptz, \
           rev bigint NOT NULL DEFAULT nextval('{s}.rev')); \
         INSERT INTO {s}.items(id, name, amount, ratio, active, born, seen_at, local_at, uid, doc, tags, photo) \
           VALUES (1, 'Ada', 12.50, 0.1, true, '2024-03-01', '2024-03-01 10:00:00.5+00', \
           '2024-03-01 10:00:00', '67e55044-10b1-426f-9247-bb680e5fe0c8', '{\"a\": 1}', \
           ARRAY['x','y'], '\\x00ff'); \
         INSERT INTO {s}.items(id, name) VALUES (2, 'Bob'), (3, 'Cy');",
    )
    .await;
    let lines = format!(
        "url = \"{}\"\ntables = [\"{s}.items\"]\ncursor_column = \"rev\"\n\
         soft_delete_column = \"deleted_at\"\nbatch_size = 2",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    // Three rows in chunks of two: a snapshot position, then the stream position.
    let first = h.next().await;
    assert_eq!(first.position, Position::Snapshot(1));
    let second = h.next().await;
    // rev 1..3 seen, window 1000: the safe cursor is 3 - 1000.
    assert_eq!(second.position, Position::Cursor(-997));
    let snap: Vec<RowChange> = first.changes.into_iter().chain(second.changes).collect();
    assert!(snap.iter().all(|c| c.op == Op::Read));
    assert_eq!(ids(&snap), BTreeSet::from([1, 2, 3]));
    let ada = snap[0].after.as_ref().unwrap();
    let ts = |s| Value::Timestamp(parse_timestamp(s).unwrap());
    let uid = uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap();
    for (col, want) in [
        ("id", Value::Int(1)),
        ("name", Value::Text("Ada".into())),
        ("amount", Value::Decimal("12.50".into())),
        ("ratio", Value::Float(0.1)),
        ("active", Value::Bool(true)),
        ("born", Value::Date(19783)),
        ("seen_at", ts("2024-03-01T10:00:00.5Z")),
        ("local_at", ts("2024-03-01 10:00:00")),
        ("uid", Value::Uuid(*uid.as_bytes())),
        ("doc", Value::Json("{\"a\": 1}".into())),
        ("tags", Value::Json("[\"x\", \"y\"]".into())),
        ("photo", Value::Bytes(vec![0, 255])),
        ("deleted_at", Value::Null),
        ("rev", Value::Int(1)),
    ] {
        assert_eq!(ada[col], want, "{col}");
    }
    h.streaming().await;
    pg_exec(
        &mut c,
        &format!(
            "INSERT INTO {s}.items(id, name) VALUES (4, 'Di'); \
             UPDATE {s}.items SET name = 'Bo', rev = nextval('{s}.rev') WHERE id = 2; \
             UPDATE {s}.items SET deleted_at = now(), rev = nextval('{s}.rev') WHERE id = 3;"
        ),
    )
    .await;
    let (changes, _) = h.until(&format!("{s}.items"), 3).await;
    let got: Vec<(i64, Op)> = changes.iter().map(|c| (id_of(c), c.op)).collect();
    assert_eq!(got, vec![(4, Op::Update), (2, Op::Update), (3, Op::Delete)]);
    assert_eq!(
        changes[1].after.as_ref().unwrap()["name"],
        Value::Text("Bo".into())
    );
    assert!(changes[2].after.is_none() && changes[2].before.is_some());
    // Re-read inside the window, but unchanged: nothing is sent again.
    let again = h.drain(Duration::from_millis(300)).await;
    assert!(again.is_empty(), "{again:?}");
    assert!(h.status.caught_up());
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

/// Session A takes id 1 and holds its transaction open; session B takes id 2
/// and commits; the poller sees 2; then A commits. Returns whether row 1 arrived.
async fn pg_out_of_order(window: &str) -> bool {
    let (mut c, s) = pg_schema("CREATE TABLE {s}.orders(id serial PRIMARY KEY, note text);").await;
    let table = format!("{s}.orders");
    let lines = format!(
        "url = \"{}\"\ntables = [\"{table}\"]\ncursor_column = \"id\"\nsafety_window = \"{window}\"",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    h.streaming().await;
    let mut a = pg().await;
    pg_exec(
        &mut a,
        &format!("BEGIN; INSERT INTO {table}(note) VALUES ('a')"),
    )
    .await;
    pg_exec(&mut c, &format!("INSERT INTO {table}(note) VALUES ('b')")).await;
    let (seen, _) = h.until(&table, 2).await;
    assert_eq!(ids(&seen), BTreeSet::from([2]), "id 1 is not committed yet");
    // Let the poller go past 2 a few times before A commits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    pg_exec(&mut a, "COMMIT").await;
    let late = h.drain(Duration::from_millis(800)).await;
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
    let got = ids(&late);
    assert!(!got.contains(&2), "row 2 was sent twice: {late:?}");
    got.contains(&1)
}

#[tokio::test]
async fn postgres_out_of_order_commit_is_not_lost() {
    assert!(
        pg_out_of_order("1000").await,
        "row 1 committed late and was lost"
    );
}

#[tokio::test]
async fn postgres_without_a_window_a_late_commit_is_lost() {
    // The naive `id > last` poller: shows that the test above can fail.
    assert!(!pg_out_of_order("0").await);
}

#[tokio::test]
async fn postgres_timestamp_cursor_survives_a_late_commit() {
    // now() is the transaction's start: A's row is older than B's but commits later.
    let (mut c, s) = pg_schema(
        "CREATE TABLE {s}.events(id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());",
    )
    .await;
    let table = format!("{s}.events");
    let lines = format!(
        "url = \"{}\"\ntables = [\"{table}\"]\ncursor_column = \"at\"\nsafety_window = \"5s\"",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    h.streaming().await;
    let mut a = pg().await;
    pg_exec(
        &mut a,
        &format!("BEGIN; INSERT INTO {table}(id) VALUES (1)"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    pg_exec(&mut c, &format!("INSERT INTO {table}(id) VALUES (2)")).await;
    h.until(&table, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    pg_exec(&mut a, "COMMIT").await;
    let (late, pos) = h.until(&table, 1).await;
    assert!(!ids(&late).contains(&2), "{late:?}");
    let Position::Cursor(p) = pos else {
        panic!("{pos}")
    };
    // The position trails the clock by the window, so row 1 is above it.
    let at = match late.last().unwrap().after.as_ref().unwrap()["at"] {
        Value::Timestamp(t) => t,
        ref other => panic!("{other:?}"),
    };
    assert!(p < at, "position {p} passed row 1 at {at}");
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

#[tokio::test]
async fn postgres_more_rows_of_one_cursor_value_than_a_batch_all_arrive() {
    // One transaction: every row has the same now(), so pages cannot split them.
    let (mut c, s) = pg_schema(
        "CREATE TABLE {s}.bulk(id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());",
    )
    .await;
    let table = format!("{s}.bulk");
    let lines = format!(
        "url = \"{}\"\ntables = [\"{table}\"]\ncursor_column = \"at\"\nbatch_size = 10",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    h.streaming().await;
    pg_exec(
        &mut c,
        &format!("INSERT INTO {table}(id) SELECT generate_series(1, 25)"),
    )
    .await;
    let mut changes = Vec::new();
    while ids(&changes).len() < 25 {
        changes.extend(h.next().await.changes);
    }
    changes.extend(h.drain(Duration::from_millis(300)).await);
    assert_eq!(changes.len(), 25, "each row once");
    assert!(changes.iter().all(|c| c.op == Op::Update));
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

#[tokio::test]
async fn postgres_resume_from_a_cursor_skips_nothing_after_it() {
    let (mut c, s) = pg_schema(
        "CREATE SEQUENCE {s}.rev; \
         CREATE TABLE {s}.items(id int PRIMARY KEY, name text, \
           rev bigint NOT NULL DEFAULT nextval('{s}.rev')); \
         INSERT INTO {s}.items(id, name) SELECT i, 'n' || i FROM generate_series(1, 10) i;",
    )
    .await;
    let table = format!("{s}.items");
    let lines = format!(
        "url = \"{}\"\ntables = [\"{table}\"]\ncursor_column = \"rev\"\nsafety_window = \"5\"",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    let first = h.next().await;
    assert_eq!(first.changes.len(), 10);
    // rev 1..10 seen, window 5: everything up to 5 is safe.
    assert_eq!(first.position, Position::Cursor(5));
    h.stop().await;
    // While the source is down: A takes rev 11 and holds it, row 1 is updated
    // (rev 12), row 11 inserted (rev 13).
    let mut a = pg().await;
    pg_exec(
        &mut a,
        &format!("BEGIN; INSERT INTO {table}(id, name) VALUES (12, 'late')"),
    )
    .await;
    pg_exec(
        &mut c,
        &format!(
            "UPDATE {table} SET name = 'one', rev = nextval('{s}.rev') WHERE id = 1; \
             INSERT INTO {table}(id, name) VALUES (11, 'eleven');"
        ),
    )
    .await;
    let mut h = start(&lines, Some(Position::Cursor(5)));
    let (changes, _) = h.until(&table, 11).await;
    pg_exec(&mut a, "COMMIT").await;
    let (late, _) = h.until(&table, 12).await;
    let all: Vec<RowChange> = changes.into_iter().chain(late).collect();
    // Rows 6..10 (rev 6..10) are re-read from the position; 2..5 are not.
    assert_eq!(ids(&all), BTreeSet::from([1, 6, 7, 8, 9, 10, 11, 12]));
    let one = all.iter().find(|c| id_of(c) == 1).unwrap();
    assert_eq!(
        one.after.as_ref().unwrap()["name"],
        Value::Text("one".into())
    );
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

#[tokio::test]
async fn postgres_tables_are_polled_in_lockstep_under_one_position() {
    let (mut c, s) = pg_schema(
        "CREATE SEQUENCE {s}.rev; \
         CREATE TABLE {s}.a(id int PRIMARY KEY, rev bigint NOT NULL DEFAULT nextval('{s}.rev')); \
         CREATE TABLE {s}.b(id int PRIMARY KEY, rev bigint NOT NULL DEFAULT nextval('{s}.rev'));",
    )
    .await;
    let lines = format!(
        "url = \"{}\"\ntables = [\"{s}.a\", \"{s}.b\"]\ncursor_column = \"rev\"\n\
         safety_window = \"2\"\nbatch_size = 3",
        common::pg_url()
    );
    let mut h = start(&lines, None);
    h.streaming().await;
    pg_exec(
        &mut c,
        &format!(
            "BEGIN; INSERT INTO {s}.a(id) SELECT generate_series(1, 5); \
             INSERT INTO {s}.b(id) VALUES (100); COMMIT;"
        ),
    )
    .await;
    // Round 1: a page of 3 from a and b's one row, in one transaction.
    let t = h.next().await;
    assert_eq!(t.changes.len(), 4, "{t:?}");
    let mut seen = ids(&t.changes);
    let mut positions = vec![t.position];
    while seen.len() < 6 {
        let t = h.next().await;
        seen.extend(ids(&t.changes));
        positions.push(t.position);
    }
    assert_eq!(seen, BTreeSet::from([1, 2, 3, 4, 5, 100]));
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");
    // a: rev 1..5, b: rev 6; the position is the lower table's safe cursor.
    let mut last = positions.pop().unwrap();
    while let Ok(Some(env)) = tokio::time::timeout(Duration::from_millis(1500), h.rx.recv()).await {
        last = env.txn.position;
    }
    assert_eq!(last, Position::Cursor(3));
    h.stop().await;
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

#[tokio::test]
async fn postgres_config_and_connection_errors() {
    let (mut c, s) =
        pg_schema("CREATE TABLE {s}.items(id int PRIMARY KEY, rev bigint, name text);").await;
    let url = common::pg_url();
    let e = start(
        &format!(
            "url = \"{url}\"\ntables = [\"{s}.items\", \"{s}.orders\"]\ncursor_column = \"rev\""
        ),
        None,
    )
    .error()
    .await;
    assert!(!e.retryable(), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("table {s}.orders does not exist")),
        "{e}"
    );
    let e = start(
        &format!("url = \"{url}\"\ntables = [\"{s}.items\"]\ncursor_column = \"updated_at\""),
        None,
    )
    .error()
    .await;
    assert!(!e.retryable(), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("table {s}.items has no column updated_at")),
        "{e}"
    );
    let e = start(
        &format!(
            "url = \"{url}\"\ntables = [\"{s}.items\"]\ncursor_column = \"rev\"\nsoft_delete_column = \"gone\""
        ),
        None,
    )
    .error()
    .await;
    assert!(
        !e.retryable() && e.to_string().contains("no column gone"),
        "{e}"
    );
    // Nobody listens on port 1: retry later.
    let e = start(
        "url = \"postgres://postgres@127.0.0.1:1/postgres\"\ntables = [\"t\"]\ncursor_column = \"rev\"",
        None,
    )
    .error()
    .await;
    assert!(e.retryable(), "{e}");
    pg_exec(&mut c, &format!("DROP SCHEMA {s} CASCADE")).await;
}

#[tokio::test]
async fn mariadb_types_updates_and_soft_deletes() {
    let (mut c, url) = mysql_db(
        "CREATE TABLE items(id int PRIMARY KEY, name varchar(20), amount decimal(10,2), \
           ratio double, small float, flag tinyint(1), doc json, photo blob, born date, \
           gone tinyint(1) NOT NULL DEFAULT 0, big bigint unsigned, \
           updated_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)); \
         INSERT INTO items(id, name, amount, ratio, small, flag, doc, photo, born, big) VALUES \
           (1, 'Ada', 12.50, 0.1e0 + 0.2e0, 0.1, 1, '{\"a\": 1}', x'00ff', '2024-03-01', 18446744073709551615);",
    )
    .await;
    let lines = format!(
        "url = \"{url}\"\ntables = [\"items\"]\ncursor_column = \"updated_at\"\nsoft_delete_column = \"gone\""
    );
    let mut h = start(&lines, None);
    let t = h.next().await;
    assert!(matches!(t.position, Position::Cursor(_)), "{}", t.position);
    let ada = t.changes[0].after.as_ref().unwrap();
    for (col, want) in [
        ("name", Value::Text("Ada".into())),
        ("amount", Value::Decimal("12.50".into())),
        ("ratio", Value::Float(0.1 + 0.2)),
        ("small", Value::Float(0.1)),
        ("flag", Value::Bool(true)),
        ("doc", Value::Json("{\"a\": 1}".into())),
        ("photo", Value::Bytes(vec![0, 255])),
        ("born", Value::Date(19783)),
        ("gone", Value::Bool(false)),
        ("big", Value::Decimal("18446744073709551615".into())),
    ] {
        assert_eq!(ada[col], want, "{col}");
    }
    assert!(matches!(ada["updated_at"], Value::Timestamp(_)));
    h.streaming().await;
    my_exec(
        &mut c,
        "INSERT INTO items(id, name) VALUES (2, 'Bob'); \
         UPDATE items SET name = 'Ada L' WHERE id = 1; \
         UPDATE items SET gone = 1 WHERE id = 2;",
    )
    .await;
    let mut changes = Vec::new();
    while !changes
        .iter()
        .any(|c: &RowChange| c.op == Op::Delete && id_of(c) == 2)
    {
        changes.extend(h.next().await.changes);
    }
    // Row 2 may be seen inserted, or only deleted if both landed in one poll.
    let ada = changes.iter().rev().find(|c| id_of(c) == 1).unwrap();
    assert_eq!(
        (ada.op, &ada.after.as_ref().unwrap()["name"]),
        (Op::Update, &Value::Text("Ada L".into()))
    );
    let again = h.drain(Duration::from_millis(300)).await;
    assert!(again.is_empty(), "{again:?}");
    h.stop().await;
}

#[tokio::test]
async fn mariadb_out_of_order_commit_is_not_lost() {
    let (mut c, url) =
        mysql_db("CREATE TABLE orders(id int AUTO_INCREMENT PRIMARY KEY, note text);").await;
    let lines = format!("url = \"{url}\"\ntables = [\"orders\"]\ncursor_column = \"id\"");
    let mut h = start(&lines, None);
    h.streaming().await;
    let mut a = MySqlConnection::connect(&url).await.unwrap();
    my_exec(&mut a, "BEGIN; INSERT INTO orders(note) VALUES ('a');").await;
    my_exec(&mut c, "INSERT INTO orders(note) VALUES ('b')").await;
    let (seen, _) = h.until("orders", 2).await;
    assert_eq!(ids(&seen), BTreeSet::from([2]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    my_exec(&mut a, "COMMIT").await;
    let (late, _) = h.until("orders", 1).await;
    assert_eq!(ids(&late), BTreeSet::from([1]));
    h.stop().await;
}

#[tokio::test]
async fn mariadb_missing_table_is_a_config_error() {
    let (_c, url) = mysql_db("CREATE TABLE items(id int PRIMARY KEY, rev bigint);").await;
    let e = start(
        &format!("url = \"{url}\"\ntables = [\"items\", \"orders\"]\ncursor_column = \"rev\""),
        None,
    )
    .error()
    .await;
    assert!(
        !e.retryable() && e.to_string().contains("table orders does not exist"),
        "{e}"
    );
}

#[tokio::test]
async fn sqlite_file_is_polled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    let exec = |sql: &'static str| sqlx::raw_sql(sql);
    exec(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, rev INTEGER NOT NULL); \
          INSERT INTO items VALUES (1, 'a', 1);",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let lines = format!(
        "url = \"sqlite:{}\"\ntables = [\"items\"]\ncursor_column = \"rev\"",
        path.display()
    );
    let mut h = start(&lines, None);
    let t = h.next().await;
    assert_eq!((t.changes[0].op, id_of(&t.changes[0])), (Op::Read, 1));
    exec(
        "INSERT INTO items VALUES (2, 'b', 2); UPDATE items SET name = 'A', rev = 3 WHERE id = 1;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let (changes, _) = h.until("items", 1).await;
    assert_eq!(ids(&changes), BTreeSet::from([1, 2]));
    h.stop().await;
}
