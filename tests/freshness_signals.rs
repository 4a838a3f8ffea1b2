//! Freshness signals that tell the truth while a source's connection is cut
//! (its database stays up): a TCP proxy sits between the fabric and the
//! database, and the test closes every connection through it and refuses
//! new ones for a few seconds.
//!
//! Checked, for PostgreSQL and MariaDB, in every place a user sees it:
//! `CatalogService.ListSources` (not caught up, lag growing), `/metrics`
//! (`fabric_source_caught_up` 0, `fabric_source_lag_seconds` growing), the
//! status page's `/status.json`, and the staleness-bound decision (a read
//! with `max_staleness_ms` is not answered from memory while the source is
//! down). Then, with writes made while it was down and the connection back:
//! no read with a bound sees the value from before the outage, and the
//! source says it is caught up only once memory holds those writes.

mod common;

use common::*;
use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
use entity_fabric::proto::{GetEntityRequest, ListSourcesRequest, SourceInfo};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Written while the source is down: this many single-row transactions on
/// other accounts, then account 1's new balance, so that the source has a
/// backlog to read after its connection comes back.
const BACKLOG: i64 = 2_000;

fn config(dir: &std::path::Path, source: &str, table: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{}"
admin_addr = "127.0.0.1:{}"
[snapshot]
dir = "{d}/snapshots"
interval = "1s"
keep = 2
[dlq]
file = "{d}/dlq.jsonl"
{source}
reconnect_first = "200ms"
reconnect_max = "500ms"
[[entities]]
name = "account"
  [[entities.tables]]
  name = "account"
  source = "ledger"
  from = "{table}"
  id_column = "id"
  primary_key = ["id"]
"#,
            free_port(),
            free_port(),
            d = dir.display()
        ),
    )
}

async fn ledger(catalog: &mut CatalogServiceClient<Channel>) -> SourceInfo {
    catalog
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources
        .into_iter()
        .find(|s| s.name == "ledger")
        .expect("source ledger listed")
}

/// Account `id`'s balance, read with `max_staleness_ms` = `bound` (or from
/// memory as it is when `None`).
async fn balance(
    fabric: &FabricProcess,
    id: &str,
    bound: Option<u64>,
) -> Result<Option<String>, tonic::Status> {
    let mut client = fabric.client().await;
    let mut req = tonic::Request::new(GetEntityRequest {
        r#type: "account".into(),
        id: id.into(),
        max_staleness_ms: bound,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(20));
    let e = client.get_entity(req).await?.into_inner();
    Ok(e.tables
        .first()
        .and_then(|t| t.rows.first())
        .and_then(|r| r.columns.get("balance"))
        .and_then(|v| entity_fabric::view::value_from_proto(v).ok())
        .map(|v| v.to_string()))
}

/// A metric's value for source `ledger`, from `/metrics`.
async fn metric(fabric: &FabricProcess, name: &str) -> f64 {
    let (code, body) = http_get(&fabric.admin, "/metrics").await;
    assert_eq!(code, 200);
    let prefix = format!("{name}{{source=\"ledger\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("{name} for ledger not in /metrics:\n{body}"))
}

/// The status page's entry for source `ledger`.
async fn status_entry(fabric: &FabricProcess) -> serde_json::Value {
    let (code, body) = http_get(&fabric.admin, "/status.json").await;
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ledger")
        .cloned()
        .expect("ledger on the status page")
}

/// The whole check, once the fabric serves with its source behind `proxy`.
/// `write` runs SQL on the source database directly (not through the proxy).
async fn outage<W, F>(fabric: &FabricProcess, proxy: &Proxy, write: W)
where
    W: Fn(String) -> F,
    F: std::future::Future<Output = ()>,
{
    let mut catalog = CatalogServiceClient::new(fabric.channel().await.unwrap());

    // Connected: caught up, no lag, bounded reads answered from memory.
    write("UPDATE accounts SET balance = 1 WHERE id = 1".into()).await;
    eventually(
        Duration::from_secs(60),
        "the first update, caught up",
        || {
            let mut catalog = catalog.clone();
            async move {
                let s = ledger(&mut catalog).await;
                let b = balance(fabric, "1", None).await.ok().flatten();
                (s.caught_up && s.state == "streaming" && b.as_deref() == Some("1")).then_some(())
            }
        },
    )
    .await;
    let s = ledger(&mut catalog).await;
    assert_eq!(s.lag_millis, 0, "{s:?}");
    assert_eq!(metric(fabric, "fabric_source_caught_up").await, 1.0);
    assert_eq!(metric(fabric, "fabric_source_lag_seconds").await, 0.0);
    assert_eq!(status_entry(fabric).await["caught_up"], true);
    let fetches = |body: String| {
        body.lines()
            .filter(|l| l.starts_with("fabric_source_fetches_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = fetches(http_get(&fabric.admin, "/metrics").await.1);
    assert_eq!(
        balance(fabric, "1", Some(60_000)).await.unwrap().as_deref(),
        Some("1")
    );
    assert_eq!(
        fetches(http_get(&fabric.admin, "/metrics").await.1),
        before,
        "a bounded read of a caught-up source was not answered from memory"
    );

    // Cut: every signal says the source is behind, and more so as it stays down.
    let cut = Instant::now();
    proxy.cut();
    let first = eventually(Duration::from_secs(30), "the source seen down", || {
        let mut catalog = catalog.clone();
        async move {
            let s = ledger(&mut catalog).await;
            (s.state != "streaming" && !s.caught_up && s.lag_millis >= 1_500).then_some(s)
        }
    })
    .await;
    assert!(
        first.last_error.contains("ledger"),
        "no error said why: {first:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let later = ledger(&mut catalog).await;
    assert!(!later.caught_up, "{later:?}");
    assert!(
        later.lag_millis >= first.lag_millis + 800,
        "the lag does not grow while the source is down: {} then {} ms",
        first.lag_millis,
        later.lag_millis
    );
    assert!(
        later.lag_millis as u128 <= cut.elapsed().as_millis() + 5_000,
        "the lag counts from before the cut: {later:?}"
    );
    assert_eq!(metric(fabric, "fabric_source_caught_up").await, 0.0);
    assert!(metric(fabric, "fabric_source_lag_seconds").await >= 2.0);
    let entry = status_entry(fabric).await;
    assert_eq!(entry["caught_up"], false, "{entry}");
    assert!(entry["lag_ms"].as_i64().unwrap() >= 2_000, "{entry}");
    // Memory may be older than a 1 s bound: the sources are asked, and
    // they cannot be reached.
    let e = balance(fabric, "1", Some(1_000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Without a bound, memory answers as it is.
    assert_eq!(
        balance(fabric, "1", None).await.unwrap().as_deref(),
        Some("1")
    );

    // Written while the source is down, then older than the bound below
    // before the connection comes back.
    for i in 0..BACKLOG {
        let id = 2 + i % 40;
        write(format!(
            "UPDATE accounts SET balance = balance + 1 WHERE id = {id}"
        ))
        .await;
    }
    write("UPDATE accounts SET balance = 2 WHERE id = 1".into()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Back: no bounded read sees the balance from before the outage, and a
    // caught-up source means memory holds what was written meanwhile.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = ledger(&mut catalog).await;
        match balance(fabric, "1", Some(1_000)).await {
            Ok(b) => {
                assert_eq!(
                    b.as_deref(),
                    Some("2"),
                    "a read bounded to 1 s saw the balance from before the outage ({s:?}); log:\n{}",
                    fabric.log_text()
                );
            }
            Err(e) => assert!(
                matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ),
                "{e:?}"
            ),
        }
        if s.caught_up {
            // Caught up was said after the source read the backlog: what it
            // read is applied within moments, never lost.
            eventually(Duration::from_secs(10), "the backlog applied", || async {
                (balance(fabric, "1", None).await.ok().flatten().as_deref() == Some("2"))
                    .then_some(())
            })
            .await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up 90 s after the connection came back: {s:?}"
        );
    }
    eventually(Duration::from_secs(30), "lag 0 again", || {
        let mut catalog = catalog.clone();
        async move {
            let s = ledger(&mut catalog).await;
            (s.caught_up && s.lag_millis == 0 && s.state == "streaming").then_some(s)
        }
    })
    .await;
    assert_eq!(metric(fabric, "fabric_source_caught_up").await, 1.0);
    assert_eq!(status_entry(fabric).await["caught_up"], true);
    // Every backlog write arrived.
    let total: i64 = {
        let mut sum = 0;
        for id in 2..42 {
            sum += balance(fabric, &id.to_string(), None)
                .await
                .unwrap()
                .unwrap()
                .parse::<i64>()
                .unwrap();
        }
        sum
    };
    assert_eq!(total, BACKLOG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_cut_off_reports_lag_and_is_not_read_from_memory() {
    let db = unique("fab_cut_pg");
    let url = pg_fresh_db(&db).await;
    pg_at_source(
        &url,
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
         ALTER TABLE accounts REPLICA IDENTITY FULL;
         INSERT INTO accounts SELECT i, 0 FROM generate_series(1, 50) i;",
    )
    .await;
    let proxy = Proxy::start(&url_address(&url)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            r#"[[sources]]
name = "ledger"
kind = "postgres_cdc"
url = "{}"
tables = ["public.accounts"]
slot = "{db}"
publication = "{db}""#,
            proxy.url(&url)
        ),
        "public.accounts",
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let conn = std::sync::Arc::new(tokio::sync::Mutex::new(
        <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap(),
    ));
    outage(&fabric, &proxy, |sql| {
        let conn = conn.clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn.lock().await)
                .await
                .unwrap();
        }
    })
    .await;
    assert!(fabric.terminate());
    drop(conn);
    pg_drop_db(&db, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_source_cut_off_reports_lag_and_is_not_read_from_memory() {
    use mysql_async::prelude::*;
    let db = unique("fab_cut_my");
    let my = mysql_url();
    let mut m = mysql_async::Conn::from_url(my.clone()).await.unwrap();
    m.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    m.query_drop(format!(
        "CREATE TABLE {db}.accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)"
    ))
    .await
    .unwrap();
    m.query_drop(format!("USE {db}")).await.unwrap();
    m.query_drop("INSERT INTO accounts SELECT seq, 0 FROM seq_1_to_50")
        .await
        .unwrap();
    let proxy = Proxy::start(&url_address(&my)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            r#"[[sources]]
name = "ledger"
kind = "mysql_binlog"
url = "{}"
tables = ["{db}.accounts"]"#,
            proxy.url(&my)
        ),
        &format!("{db}.accounts"),
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let conn = std::sync::Arc::new(tokio::sync::Mutex::new(m));
    outage(&fabric, &proxy, |sql| {
        let conn = conn.clone();
        async move {
            conn.lock().await.query_drop(sql).await.unwrap();
        }
    })
    .await;
    assert!(fabric.terminate());
    let mut m = mysql_async::Conn::from_url(my).await.unwrap();
    m.query_drop(format!("DROP DATABASE {db}")).await.unwrap();
}
