//! `mysql_binlog` against a real MariaDB (ROW/FULL binlog), driving the
//! source directly: change capture with exact types, snapshot-to-stream
//! handoff under concurrent inserts, resume, dead letters, and clear errors
//! for bad setups. Each test uses its own database and source name (so its
//! own replica server_id).

mod common;

use entity_fabric::config::{Config, SourceConfig};
use entity_fabric::event::value::{parse_date, parse_timestamp};
use entity_fabric::event::{Op, Position, Row, RowChange, SourceTxn, Value};
use entity_fabric::sources::mysql_binlog::MysqlBinlogSource;
use entity_fabric::sources::{Source, SourceContext, SourceError, SourceStatus, TxnEnvelope};
use entity_fabric::telemetry::{DeadLetters, Metrics};
use mysql_async::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

struct Harness {
    rx: mpsc::Receiver<TxnEnvelope>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
    dead: Arc<DeadLetters>,
    status: Arc<SourceStatus>,
    name: String,
    _dir: tempfile::TempDir,
    _durable: watch::Sender<Option<Position>>,
}

impl Harness {
    async fn next(&mut self) -> SourceTxn {
        let wait = tokio::time::timeout(Duration::from_secs(20), self.rx.recv());
        match wait.await.expect("a transaction within 20s") {
            Some(env) => env.txn,
            None => panic!("the source ended: {:?}", (&mut self.task).await),
        }
    }

    /// The next transaction with changes (skipping position-only ones).
    async fn next_changes(&mut self) -> SourceTxn {
        loop {
            let t = self.next().await;
            if !t.changes.is_empty() {
                return t;
            }
        }
    }

    async fn streaming(&self) {
        for _ in 0..2000 {
            if *self.status.state.lock() == "streaming" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the source is not streaming after 10s");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        r.expect("stops within 10s").unwrap().unwrap();
    }
}

fn source(name: &str, url: &str, tables: &[String], extra: &str) -> MysqlBinlogSource {
    let text = format!(
        "name = {name:?}\nkind = \"mysql_binlog\"\nurl = {url:?}\ntables = {tables:?}\n{extra}"
    );
    let cfg: SourceConfig = toml::from_str(&text).unwrap();
    let config: Config = toml::from_str("").unwrap();
    MysqlBinlogSource::new(&cfg, &config).unwrap()
}

fn start(src: MysqlBinlogSource, name: &str, resume: Option<Position>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let (durable, durable_rx) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let dead = Arc::new(DeadLetters::new(
        &dir.path().join("dlq.jsonl"),
        10,
        Arc::new(Metrics::new()),
    ));
    let status = Arc::new(SourceStatus::default());
    let ctx = SourceContext::new(
        name.into(),
        resume,
        tx,
        durable_rx,
        status.clone(),
        dead.clone(),
        shutdown.clone(),
    );
    let task = tokio::spawn(Box::new(src).run(ctx));
    Harness {
        rx,
        shutdown,
        task,
        dead,
        status,
        name: name.to_string(),
        _dir: dir,
        _durable: durable,
    }
}

async fn conn() -> mysql_async::Conn {
    let opts = mysql_async::Opts::from_url(&common::mysql_url()).unwrap();
    let opts = mysql_async::OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .setup(vec!["SET time_zone = '+00:00'"]);
    mysql_async::Conn::new(opts).await.unwrap()
}

/// A fresh database with `schema` (statements separated by `;`) run in it.
async fn fresh_db(prefix: &str, schema: &str) -> (String, mysql_async::Conn) {
    let db = common::unique(prefix);
    let mut c = conn().await;
    c.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    c.query_drop(format!("USE {db}")).await.unwrap();
    for stmt in schema.split(';').filter(|s| !s.trim().is_empty()) {
        c.query_drop(stmt).await.unwrap();
    }
    (db, c)
}

async fn drop_db(c: &mut mysql_async::Conn, db: &str) {
    let _ = c.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await;
}

fn row(cols: &[(&str, Value)]) -> Row {
    cols.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn ts(s: &str) -> Value {
    Value::Timestamp(parse_timestamp(s).unwrap())
}

const ITEMS: &str = "CREATE TABLE items (
    id INT PRIMARY KEY, amount DECIMAL(12,2) NOT NULL, created DATETIME(6), seen TIMESTAMP(3) NULL,
    doc JSON, photo BLOB, note VARCHAR(50) NULL, day DATE, big BIGINT UNSIGNED, ratio DOUBLE,
    f FLOAT, status ENUM('new','paid'), tags SET('a','b','c'), flags BIT(4), yr YEAR, dur TIME);
  CREATE TABLE notes (id INT PRIMARY KEY, body TEXT);
  CREATE TABLE other (id INT PRIMARY KEY)";

const ITEM_1: &str = "INSERT INTO items VALUES (1, 12345678.90, '2024-03-01 10:00:00.123456',
    '2024-03-01 10:00:00.250', '{\"a\": [1, 2]}', x'00ff10', NULL, '2024-02-29',
    18446744073709551615, 0.5, 0.1, 'paid', 'a,c', b'1010', 2024, '-26:03:04')";

fn item_1() -> Row {
    row(&[
        ("id", Value::Int(1)),
        ("amount", Value::Decimal("12345678.90".into())),
        ("created", ts("2024-03-01T10:00:00.123456Z")),
        ("seen", ts("2024-03-01T10:00:00.250Z")),
        ("doc", Value::Json("{\"a\": [1, 2]}".into())),
        ("photo", Value::Bytes(vec![0, 255, 16])),
        ("note", Value::Null),
        ("day", Value::Date(parse_date("2024-02-29").unwrap())),
        ("big", Value::Decimal("18446744073709551615".into())),
        ("ratio", Value::Float(0.5)),
        ("f", Value::Float(0.1)),
        ("status", Value::Text("paid".into())),
        ("tags", Value::Text("a,c".into())),
        ("flags", Value::Int(10)),
        ("yr", Value::Int(2024)),
        ("dur", Value::Text("-26:03:04".into())),
    ])
}

fn change(table: &str, op: Op, before: Option<Row>, after: Option<Row>) -> RowChange {
    RowChange {
        table: table.into(),
        op,
        before,
        after,
    }
}

fn binlog_pos(p: &Position) -> (u64, u64) {
    match p {
        Position::Binlog { file, pos, .. } => {
            (file.rsplit('.').next().unwrap().parse().unwrap(), *pos)
        }
        other => panic!("not a binlog position: {other}"),
    }
}

#[tokio::test]
async fn captures_changes_with_exact_types() {
    let (db, mut c) = fresh_db("binlog_types", ITEMS).await;
    let name = common::unique("types");
    let tables = vec![format!("{db}.items"), format!("{db}.notes")];
    let url = common::mysql_url();
    let mut h = start(
        source(&name, &url, &tables, "initial_snapshot = false"),
        &name,
        None,
    );
    // The start position is sent at once, so a restart does not skip anything.
    let first = h.next().await;
    assert!(first.changes.is_empty());
    let mut last = binlog_pos(&first.position);
    h.streaming().await;

    c.query_drop(ITEM_1).await.unwrap();
    c.query_drop("UPDATE items SET note = 'hi', amount = amount + 1 WHERE id = 1")
        .await
        .unwrap();
    c.query_drop(
        "BEGIN; INSERT INTO items(id, amount) VALUES (2, -0.05); INSERT INTO other VALUES (1);
         INSERT INTO notes VALUES (1, 'n'); COMMIT",
    )
    .await
    .unwrap();
    c.query_drop("DELETE FROM items WHERE id = 2")
        .await
        .unwrap();
    c.query_drop("TRUNCATE TABLE notes").await.unwrap();

    let mut txns = Vec::new();
    for _ in 0..5 {
        let t = h.next_changes().await;
        let p = binlog_pos(&t.position);
        assert!(p > last, "positions increase: {last:?} then {p:?}");
        last = p;
        assert!(
            matches!(&t.position, Position::Binlog { gtid: Some(g), .. } if g.split('-').count() == 3),
            "{}",
            t.position
        );
        assert!((entity_fabric::sources::now_micros() - t.commit_micros).abs() < 120_000_000);
        txns.push(t);
    }
    let items = format!("{db}.items");
    let notes = format!("{db}.notes");
    assert_eq!(
        txns[0].changes,
        vec![change(&items, Op::Insert, None, Some(item_1()))]
    );
    let mut updated = item_1();
    updated.insert("note".into(), Value::Text("hi".into()));
    updated.insert("amount".into(), Value::Decimal("12345679.90".into()));
    assert_eq!(
        txns[1].changes,
        vec![change(
            &items,
            Op::Update,
            Some(item_1()),
            Some(updated.clone())
        )]
    );
    let mut two = item_1();
    for v in two.values_mut() {
        *v = Value::Null;
    }
    two.insert("id".into(), Value::Int(2));
    two.insert("amount".into(), Value::Decimal("-0.05".into()));
    let note = row(&[("id", Value::Int(1)), ("body", Value::Text("n".into()))]);
    // One transaction, the table not captured left out.
    assert_eq!(
        txns[2].changes,
        vec![
            change(&items, Op::Insert, None, Some(two.clone())),
            change(&notes, Op::Insert, None, Some(note)),
        ]
    );
    assert_eq!(
        txns[3].changes,
        vec![change(&items, Op::Delete, Some(two), None)]
    );
    assert_eq!(
        txns[4].changes,
        vec![change(&notes, Op::Truncate, None, None)]
    );
    assert_eq!(h.dead.count(&h.name), 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(h.status.caught_up());
    h.stop().await;

    // The snapshot reads the same values the stream decoded.
    let name2 = common::unique("types_snap");
    let mut h = start(source(&name2, &url, &tables, ""), &name2, None);
    let t = h.next().await;
    assert!(
        matches!(t.position, Position::Binlog { .. }),
        "{}",
        t.position
    );
    assert_eq!(
        t.changes,
        vec![change(&items, Op::Read, None, Some(updated))]
    );
    h.stop().await;
    drop_db(&mut c, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_hands_off_to_the_stream_without_loss_or_overlap() {
    let (db, mut c) = fresh_db(
        "binlog_snap",
        "CREATE TABLE seq (id INT PRIMARY KEY, v DECIMAL(10,2) NOT NULL);
         CREATE TABLE pairs (a INT, b INT, PRIMARY KEY (a, b))",
    )
    .await;
    c.query_drop(
        "INSERT INTO seq SELECT seq, seq / 4 FROM seq_1_to_300;
         INSERT INTO pairs SELECT seq % 7, seq FROM seq_1_to_40",
    )
    .await
    .unwrap();
    // Inserts before, during and after the snapshot, each its own transaction.
    let stop = CancellationToken::new();
    let s = stop.clone();
    let wdb = db.clone();
    let writer = tokio::spawn(async move {
        let mut c = conn().await;
        let mut id = 300;
        while !s.is_cancelled() {
            id += 1;
            c.exec_drop(format!("INSERT INTO {wdb}.seq VALUES (?, ? / 4)"), (id, id))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        id
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let name = common::unique("snap");
    let tables = vec![format!("{db}.seq"), format!("{db}.pairs")];
    let mut h = start(
        source(&name, &common::mysql_url(), &tables, "batch_size = 7"),
        &name,
        None,
    );
    let mut seen: std::collections::BTreeMap<i64, usize> = Default::default();
    let mut pairs = 0;
    let mut chunk = 0;
    // The snapshot: chunks of 7, all but the last at snapshot positions.
    loop {
        let t = h.next().await;
        for ch in &t.changes {
            assert_eq!(ch.op, Op::Read);
            let r = ch.after.as_ref().unwrap();
            if ch.table.ends_with(".pairs") {
                pairs += 1;
                continue;
            }
            let Value::Int(id) = r["id"] else { panic!() };
            assert_eq!(
                r["v"],
                Value::Decimal(format!("{}.{:02}", id / 4, (id % 4) * 25))
            );
            *seen.entry(id).or_default() += 1;
        }
        chunk += 1;
        if let Position::Snapshot(n) = t.position {
            assert_eq!((n, t.changes.len()), (chunk, 7));
        } else {
            assert!(matches!(t.position, Position::Binlog { .. }));
            break;
        }
    }
    assert_eq!(pairs, 40);
    let in_snapshot = seen.keys().filter(|id| **id > 300).count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let last_id = writer.await.unwrap();
    assert!(last_id > 320, "the writer wrote {last_id}");
    while seen.len() < last_id as usize {
        for ch in h.next().await.changes {
            assert_eq!(ch.op, Op::Insert, "{ch:?}");
            let Value::Int(id) = ch.after.unwrap()["id"] else {
                panic!()
            };
            *seen.entry(id).or_default() += 1;
        }
    }
    // Rows written while the snapshot ran are in it; later ones streamed.
    assert!(
        in_snapshot > 0,
        "no row inserted before the snapshot started"
    );
    assert!(seen.len() - 300 > in_snapshot, "no row streamed");
    let expected: Vec<i64> = (1..=last_id as i64).collect();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), expected);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "read twice: {twice:?}");
    h.stop().await;
    drop_db(&mut c, &db).await;
}

#[tokio::test]
async fn resume_skips_what_came_before_and_sees_what_came_after() {
    let (db, mut c) = fresh_db("binlog_resume", "CREATE TABLE t (id INT PRIMARY KEY)").await;
    let name = common::unique("resume");
    let tables = vec![format!("{db}.t")];
    let url = common::mysql_url();
    let opts = "initial_snapshot = false\nserver_id = 4242";
    let mut h = start(source(&name, &url, &tables, opts), &name, None);
    h.next().await;
    h.streaming().await;
    c.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    let p1 = h.next_changes().await.position;
    c.query_drop("INSERT INTO t VALUES (2)").await.unwrap();
    let p2 = h.next_changes().await.position;
    h.stop().await;
    c.query_drop("INSERT INTO t VALUES (3)").await.unwrap();

    let id = |t: &SourceTxn| t.changes[0].after.as_ref().unwrap()["id"].clone();
    let mut h = start(source(&name, &url, &tables, opts), &name, Some(p1));
    let t = h.next_changes().await;
    assert_eq!((id(&t), t.position.clone()), (Value::Int(2), p2));
    let t = h.next_changes().await;
    assert_eq!(id(&t), Value::Int(3));
    h.stop().await;

    // A snapshot in progress starts over: truncate, then every row.
    let mut h = start(
        source(&name, &url, &tables, opts),
        &name,
        Some(Position::Snapshot(3)),
    );
    let t = h.next().await;
    assert!(matches!(t.position, Position::Binlog { .. }));
    assert_eq!(t.changes[0], change(&tables[0], Op::Truncate, None, None));
    assert_eq!(t.changes.len(), 4);
    assert!(t.changes[1..].iter().all(|c| c.op == Op::Read));
    h.stop().await;

    // A purged position is lost data: a config error, never a silent snapshot.
    let gone = Position::Binlog {
        file: "binlog.999999".into(),
        pos: 4,
        gtid: None,
    };
    let h = start(source(&name, &url, &tables, opts), &name, Some(gone));
    let e = h.task.await.unwrap().unwrap_err();
    let text = e.to_string();
    assert!(!e.retryable(), "{text}");
    assert!(
        text.contains("binlog.999999") && text.contains("must start over"),
        "{text}"
    );
    drop_db(&mut c, &db).await;
}

#[tokio::test]
async fn undecodable_rows_are_dead_lettered_and_skipped() {
    // Text in a charset other than UTF-8 and latin1 cannot be decoded from the binlog.
    let (db, mut c) = fresh_db(
        "binlog_dead",
        "CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(10) CHARACTER SET latin2)",
    )
    .await;
    let name = common::unique("dead");
    let tables = vec![format!("{db}.t")];
    let mut h = start(
        source(
            &name,
            &common::mysql_url(),
            &tables,
            "initial_snapshot = false",
        ),
        &name,
        None,
    );
    h.next().await;
    h.streaming().await;
    c.query_drop("SET NAMES utf8mb4").await.unwrap();
    c.query_drop("INSERT INTO t VALUES (1, 'łódź')")
        .await
        .unwrap();
    c.query_drop("INSERT INTO t VALUES (2, 'ok')")
        .await
        .unwrap();
    let t = h.next_changes().await;
    assert_eq!(
        t.changes[0].after.as_ref().unwrap()["name"],
        Value::Text("ok".into())
    );
    assert_eq!(h.dead.count(&name), 1);
    let dl = &h.dead.recent()[0];
    assert_eq!(dl.table, tables[0]);
    assert!(dl.reason.contains("column name"), "{}", dl.reason);
    // A session writing statements instead of rows: reported, not decoded.
    c.query_drop("SET SESSION binlog_format = 'STATEMENT'")
        .await
        .unwrap();
    c.query_drop("INSERT INTO t VALUES (3, 'st')")
        .await
        .unwrap();
    c.query_drop("SET SESSION binlog_format = 'ROW'")
        .await
        .unwrap();
    c.query_drop("INSERT INTO t VALUES (4, 'row')")
        .await
        .unwrap();
    let t = h.next_changes().await;
    assert_eq!(t.changes[0].after.as_ref().unwrap()["id"], Value::Int(4));
    assert_eq!(h.dead.count(&name), 2);
    assert!(h.dead.recent()[1].reason.contains("statement-based"));
    h.stop().await;
    drop_db(&mut c, &db).await;
}

#[tokio::test]
async fn bad_setups_are_reported_clearly() {
    let (db, mut c) = fresh_db("binlog_errs", "CREATE TABLE t (id INT PRIMARY KEY)").await;
    let url = common::mysql_url();
    let name = common::unique("errs");

    // A missing table is named.
    let tables = vec![format!("{db}.t"), format!("{db}.missing")];
    let h = start(source(&name, &url, &tables, ""), &name, None);
    let e = h.task.await.unwrap().unwrap_err();
    assert!(!e.retryable(), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("table {db}.missing does not exist")),
        "{e}"
    );

    // Wrong credentials may be fixed while the source waits: retryable.
    let bad = url.replacen("://root@", "://root:wrong@", 1);
    let tables = vec![format!("{db}.t")];
    let h = start(source(&name, &bad, &tables, ""), &name, None);
    let e = h.task.await.unwrap().unwrap_err();
    assert!(e.retryable(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!("source {name}")) && text.contains("Access denied"),
        "{text}"
    );

    // A server that is down may come up: retryable.
    let down = source(&name, "mysql://root@127.0.0.1:1", &tables, "");
    let e = start(down, &name, None).task.await.unwrap().unwrap_err();
    assert!(
        e.retryable() && e.to_string().contains("127.0.0.1:1"),
        "{e}"
    );

    // A user without REPLICATION SLAVE: a config error naming the privilege.
    let user = common::unique("cdc");
    c.query_drop(format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"))
        .await
        .unwrap();
    c.query_drop(format!("GRANT SELECT ON {db}.* TO '{user}'@'%'"))
        .await
        .unwrap();
    let limited = url.replacen("://root@", &format!("://{user}:pw@"), 1);
    let h = start(source(&name, &limited, &tables, ""), &name, None);
    let e = h.task.await.unwrap().unwrap_err();
    c.query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
    assert!(!e.retryable(), "{e}");
    assert!(
        e.to_string().contains("missing privilege") && e.to_string().contains("REPLICATION SLAVE"),
        "{e}"
    );
    drop_db(&mut c, &db).await;
}

#[tokio::test]
async fn a_lost_connection_is_retryable_and_the_restart_resumes_exactly_there() {
    let (db, mut c) = fresh_db("binlog_lost", "CREATE TABLE t (id INT PRIMARY KEY)").await;
    // An own user, so that killing its connection leaves other tests alone.
    let user = common::unique("cdc_lost");
    for sql in [
        format!("CREATE USER '{user}'@'%'"),
        format!("GRANT SELECT ON {db}.* TO '{user}'@'%'"),
        format!("GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{user}'@'%'"),
    ] {
        c.query_drop(sql).await.unwrap();
    }
    let url = common::mysql_url().replacen("://root@", &format!("://{user}@"), 1);
    let name = common::unique("lost");
    let tables = vec![format!("{db}.t")];
    let opts = "initial_snapshot = false";
    let mut h = start(source(&name, &url, &tables, opts), &name, None);
    h.next().await;
    h.streaming().await;
    let id = |t: &SourceTxn| t.changes[0].after.as_ref().unwrap()["id"].clone();
    c.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    let t1 = h.next_changes().await;
    assert_eq!(id(&t1), Value::Int(1));
    // Rotation is followed: the next position is in the next file.
    c.query_drop("FLUSH BINARY LOGS").await.unwrap();
    c.query_drop("INSERT INTO t VALUES (2)").await.unwrap();
    let t2 = h.next_changes().await;
    assert_eq!(id(&t2), Value::Int(2));
    assert!(binlog_pos(&t2.position).0 > binlog_pos(&t1.position).0);

    let dumps: Vec<u64> = c
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND COMMAND LIKE 'Binlog Dump%'",
            (&user,),
        )
        .await
        .unwrap();
    assert_eq!(dumps.len(), 1, "one binlog connection");
    c.query_drop(format!("KILL {}", dumps[0])).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), h.task).await;
    let e = ended
        .expect("the source notices within 20s")
        .unwrap()
        .unwrap_err();
    assert!(e.retryable(), "{e}");
    c.query_drop("INSERT INTO t VALUES (3)").await.unwrap();

    // As the supervisor does: start again from the last routed position.
    let mut h = start(source(&name, &url, &tables, opts), &name, Some(t2.position));
    let t3 = h.next_changes().await;
    assert_eq!(id(&t3), Value::Int(3));
    assert!(binlog_pos(&t3.position) > binlog_pos(&t1.position));
    h.stop().await;
    c.query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
    drop_db(&mut c, &db).await;
}

#[tokio::test]
async fn schema_changes_are_followed() {
    let (db, mut c) = fresh_db(
        "binlog_ddl",
        "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(5))",
    )
    .await;
    let name = common::unique("ddl");
    let tables = vec![format!("{db}.t")];
    let mut h = start(
        source(
            &name,
            &common::mysql_url(),
            &tables,
            "initial_snapshot = false",
        ),
        &name,
        None,
    );
    h.next().await;
    h.streaming().await;
    c.query_drop("INSERT INTO t VALUES (1, 'x')").await.unwrap();
    let t = h.next_changes().await;
    let want = row(&[("id", Value::Int(1)), ("a", Value::Text("x".into()))]);
    assert_eq!(t.changes[0].after.as_ref(), Some(&want));
    c.query_drop("ALTER TABLE t ADD COLUMN doc JSON, DROP COLUMN a")
        .await
        .unwrap();
    c.query_drop("INSERT INTO t VALUES (2, '[1]')")
        .await
        .unwrap();
    let t = h.next_changes().await;
    let want = row(&[("id", Value::Int(2)), ("doc", Value::Json("[1]".into()))]);
    assert_eq!(t.changes[0].after.as_ref(), Some(&want));
    h.stop().await;
    drop_db(&mut c, &db).await;
}
