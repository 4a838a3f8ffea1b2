//! Entities equal their sources when rows change owner (issue 21), through
//! the real binary on PostgreSQL (customers, addresses) and MariaDB
//! (invoices, payments through their invoice): invoices merged into
//! another customer take their payments with them; a customer deleted and
//! inserted again comes back whole, its versions never go back, and a
//! deleted customer leaves memory after `keep_deleted` without its next
//! life starting below a version readers saw.

mod common;

use common::two_databases::*;
use common::*;
use entity_fabric::proto::GetEntityRequest;
use mysql_async::prelude::*;
use sqlx::Connection;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

async fn get(
    fabric: &FabricProcess,
    id: i64,
) -> Result<entity_fabric::proto::Entity, tonic::Status> {
    fabric
        .client()
        .await
        .get_entity(GetEntityRequest {
            r#type: "customer".into(),
            id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Waits until reads of customer `id` answer NOT_FOUND.
async fn wait_gone(fabric: &FabricProcess, id: i64) {
    eventually(WITHIN, "the customer deleted", || async move {
        match get(fabric, id).await {
            Err(s) if s.code() == tonic::Code::NotFound => Some(()),
            _ => None,
        }
    })
    .await;
}

async fn pg_exec(dbs: &TwoDatabases, sql: &str) {
    let mut c = sqlx::PgConnection::connect(&dbs.pg).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut c)
        .await
        .unwrap();
}

/// An account merge: one MariaDB transaction moves the 50 invoices of 25
/// customers, with their payments, to another customer; a payment of one
/// of them is updated after. The fabric is killed, restarts from its
/// snapshots (the linked rows it keeps are rebuilt from them), and a
/// second merge moves the merged invoices on. Every customer equals its
/// sources after each. Before rows followed their link (issue 21) the
/// payments stayed with their old customers (51 customers differed), and
/// the update made a payment appear in two customers: without the move
/// this test fails at the first comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_follow_their_invoices_when_accounts_merge() {
    let dbs = TwoDatabases::create("fab_merge").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dbs.config(dir.path(), "partitions = 4");
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(WITHIN).await;
    converge_to(&fabric, &dbs.expected().await, WITHIN).await;
    let mut m = mysql_async::Conn::from_url(dbs.my_db()).await.unwrap();
    let moving: i64 = m
        .query_first("SELECT COUNT(*) FROM payments p JOIN invoices i ON i.id = p.invoice_id WHERE i.customer_id BETWEEN 10 AND 34")
        .await
        .unwrap()
        .unwrap();
    assert!(moving >= 25, "{moving} payments move");
    m.query_drop("UPDATE invoices SET customer_id = 9 WHERE customer_id BETWEEN 10 AND 34")
        .await
        .unwrap();
    m.query_drop("UPDATE payments SET amount = amount + 1 WHERE invoice_id = (SELECT MIN(id) FROM invoices WHERE customer_id = 9 AND id > 9)")
        .await
        .unwrap();
    let want = dbs.expected().await;
    assert_eq!(want[&9]["invoices"].len(), 52);
    converge_to(&fabric, &want, WITHIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fabric.kill9();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(WITHIN).await;
    m.query_drop("UPDATE invoices SET customer_id = 8 WHERE customer_id = 9")
        .await
        .unwrap();
    let want = dbs.expected().await;
    assert_eq!(want[&8]["invoices"].len(), 54);
    converge_to(&fabric, &want, WITHIN).await;
    println!(
        "50 invoices with {moving} payments merged into one customer, a payment updated, SIGKILL, 52 invoices merged on: {} customers equal to the sources",
        want.len()
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    dbs.drop_all().await;
}

/// Customer 2 of the two databases has 2 addresses, 2 invoices and a
/// payment for each. Its root row is deleted; while it is gone its other
/// rows change at their sources; the fabric is killed and restarts from
/// its snapshots; the root row is inserted again: the whole customer is
/// back, equal to the sources, one version above its delete. Before this
/// (issue 21) it came back with its root row alone, at version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_deleted_and_inserted_again_comes_back_whole_one_version_on() {
    let dbs = TwoDatabases::create("fab_back").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dbs.config(dir.path(), "partitions = 4");
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(WITHIN).await;
    let want = dbs.expected().await;
    converge_to(&fabric, &want, WITHIN).await;
    let before = get(&fabric, 2).await.unwrap();
    let tables: Vec<(&str, usize)> = before
        .tables
        .iter()
        .map(|t| (t.name.as_str(), t.rows.len()))
        .collect();
    assert_eq!(
        tables,
        vec![
            ("addresses", 2),
            ("customer", 1),
            ("invoices", 2),
            ("payments", 2)
        ]
    );

    // The root row goes: readers no longer get the customer.
    pg_exec(&dbs, "DELETE FROM customers WHERE id = 2").await;
    wait_gone(&fabric, 2).await;
    // Meanwhile its other rows change at their sources.
    pg_exec(&dbs, "UPDATE addresses SET city = 'moved' WHERE id = 1").await;
    let mut m = mysql_async::Conn::from_url(dbs.my_db()).await.unwrap();
    m.query_drop("DELETE FROM payments WHERE id = 301")
        .await
        .unwrap();
    m.query_drop("INSERT INTO invoices VALUES (9001, 2, 5.00, 'open', '2024-06-01 10:00:00')")
        .await
        .unwrap();
    // Applied (a later change of another customer is there), snapshotted
    // (every 500 ms), then the process dies.
    m.query_drop("UPDATE invoices SET status = 'marker' WHERE id = 3")
        .await
        .unwrap();
    eventually(WITHIN, "the marker applied", || async {
        let e = get(&fabric, 4).await.ok()?;
        format!("{e:?}").contains("marker").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fabric.kill9();
    let fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    let mut fabric = fabric;
    fabric.wait_serving(WITHIN).await;
    wait_gone(&fabric, 2).await;

    // The root row again: the whole customer, as its sources hold it now.
    pg_exec(&dbs, "INSERT INTO customers VALUES (2, 'c2 again', 0)").await;
    let want = dbs.expected().await;
    let back = want.get(&2).expect("customer 2 is in the sources");
    assert_eq!(back["addresses"].len(), 2);
    assert_eq!(back["invoices"].len(), 3);
    assert_eq!(back["payments"].len(), 1);
    converge_to(&fabric, &want, WITHIN).await;
    let after = get(&fabric, 2).await.unwrap();
    assert_eq!(
        after.version,
        before.version + 2,
        "one version for the delete, one for its return; none for the hidden changes"
    );
    println!(
        "customer 2 deleted at version {}, its rows changed while hidden, the fabric SIGKILLed, the root inserted again: back at version {} with {} rows, {} customers equal to the sources",
        before.version + 1,
        after.version,
        after.tables.iter().map(|t| t.rows.len()).sum::<usize>(),
        want.len()
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    dbs.drop_all().await;
}

/// With `keep_deleted = "2s"` a deleted customer leaves memory after two
/// seconds (its hidden rows with it), the partition's floor keeps its
/// version through a restart, and the customer created again starts above
/// the version of its delete: with only the rows its sources send after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_customer_leaves_memory_after_keep_deleted_and_its_versions_still_go_on() {
    let dbs = TwoDatabases::create("fab_keep").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dbs.config(dir.path(), "partitions = 4");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replacen(
        "name = \"customer\"\n",
        "name = \"customer\"\nkeep_deleted = \"2s\"\n",
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(WITHIN).await;
    converge_to(&fabric, &dbs.expected().await, WITHIN).await;
    // Some versions first, so that starting again at 1 would show.
    for i in 0..3 {
        pg_exec(
            &dbs,
            &format!("UPDATE customers SET name = 'v{i}' WHERE id = 5"),
        )
        .await;
    }
    let before = eventually(WITHIN, "three more versions", || async {
        let e = get(&fabric, 5).await.ok()?;
        format!("{e:?}").contains("\"v2\"").then_some(e)
    })
    .await;
    assert!(before.version >= 4, "{}", before.version);
    pg_exec(&dbs, "DELETE FROM customers WHERE id = 5").await;
    wait_gone(&fabric, 5).await;
    // Kept 2 s, swept every 500 ms; then a snapshot (every 500 ms) without
    // it, and a restart from the snapshots.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(fabric.terminate(), "{}", fabric.log_text());
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(WITHIN).await;
    pg_exec(&dbs, "INSERT INTO customers VALUES (5, 'again', 0)").await;
    let after = eventually(WITHIN, "customer 5 created again", || async {
        get(&fabric, 5).await.ok()
    })
    .await;
    // Its addresses, invoices and payments left memory with it: only what
    // its sources sent since is there.
    let names: Vec<&str> = after.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["customer"], "dropped after keep_deleted");
    assert!(
        after.version > before.version + 1,
        "created again at version {}, deleted at {}",
        after.version,
        before.version + 1
    );
    println!(
        "customer 5 deleted at version {}, dropped after keep_deleted = 2s, the fabric restarted, created again at version {}",
        before.version + 1,
        after.version
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    dbs.drop_all().await;
}

/// A `sql_poll` source sends no old image: an invoice moved to another
/// customer leaves the old one by what the router's link index says, and
/// its payments follow it, and their refunds (a chain of links: refunds ->
/// payments -> invoices). A payment moved to another customer's invoice
/// takes its refund along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sql_poll_an_invoice_moves_without_an_old_image_and_its_payments_follow() {
    let db = common::unique("fab_poll");
    let base = pg_url();
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE SEQUENCE rev;
         CREATE TABLE customers (id bigint PRIMARY KEY, name text, rev bigint NOT NULL DEFAULT nextval('rev'));
         CREATE TABLE invoices (id bigint PRIMARY KEY, customer_id bigint NOT NULL, rev bigint NOT NULL DEFAULT nextval('rev'));
         CREATE TABLE payments (id bigint PRIMARY KEY, invoice_id bigint NOT NULL, rev bigint NOT NULL DEFAULT nextval('rev'));
         CREATE TABLE refunds (id bigint PRIMARY KEY, payment_id bigint NOT NULL, rev bigint NOT NULL DEFAULT nextval('rev'));
         INSERT INTO customers (id, name) VALUES (1, 'a'), (2, 'b');
         INSERT INTO invoices (id, customer_id) VALUES (10, 1), (11, 1);
         INSERT INTO payments (id, invoice_id) VALUES (100, 10), (101, 10), (110, 11);
         INSERT INTO refunds (id, payment_id) VALUES (1000, 100);",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"{server}
[bus]
partitions = 4
[snapshot]
dir = "{d}/snapshots"
[dlq]
file = "{d}/dlq.jsonl"

[[sources]]
name = "poll"
kind = "sql_poll"
url = "{url}"
tables = ["public.customers", "public.invoices", "public.payments", "public.refunds"]
cursor_column = "rev"
poll_interval = "20ms"

[[entities]]
name = "customer"
  [[entities.tables]]
  name = "customer"
  source = "poll"
  from = "public.customers"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "invoices"
  source = "poll"
  from = "public.invoices"
  id_column = "customer_id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "payments"
  source = "poll"
  from = "public.payments"
  id_via = {{ table = "invoices", column = "invoice_id" }}
  primary_key = ["id"]
  [[entities.tables]]
  name = "refunds"
  source = "poll"
  from = "public.refunds"
  id_via = {{ table = "payments", column = "payment_id" }}
  primary_key = ["id"]
"#,
            server = loopback_server(),
            d = dir.path().display(),
        ),
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(WITHIN).await;
    // (table, row count) of each table of a customer.
    let shape = |e: &entity_fabric::proto::Entity| -> Vec<(String, usize)> {
        e.tables
            .iter()
            .map(|t| (t.name.clone(), t.rows.len()))
            .collect()
    };
    let want = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
        v.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    };
    let first = want(&[
        ("customer", 1),
        ("invoices", 2),
        ("payments", 3),
        ("refunds", 1),
    ]);
    eventually(
        WITHIN,
        "customer 1 with its invoices and payments",
        || async {
            let e = get(&fabric, 1).await.ok()?;
            (shape(&e) == first).then_some(())
        },
    )
    .await;
    sqlx::raw_sql("UPDATE invoices SET customer_id = 2, rev = nextval('rev') WHERE id = 10")
        .execute(&mut c)
        .await
        .unwrap();
    let (one, two) = (
        want(&[("customer", 1), ("invoices", 1), ("payments", 1)]),
        want(&[
            ("customer", 1),
            ("invoices", 1),
            ("payments", 2),
            ("refunds", 1),
        ]),
    );
    eventually(
        WITHIN,
        "invoice 10, its payments and their refund in customer 2 only",
        || async {
            let (a, b) = (get(&fabric, 1).await.ok()?, get(&fabric, 2).await.ok()?);
            (shape(&a) == one && shape(&b) == two).then_some(())
        },
    )
    .await;
    // Payment 100 moves to invoice 11, back in customer 1: its refund too.
    sqlx::raw_sql("UPDATE payments SET invoice_id = 11, rev = nextval('rev') WHERE id = 100")
        .execute(&mut c)
        .await
        .unwrap();
    let (one, two) = (
        want(&[
            ("customer", 1),
            ("invoices", 1),
            ("payments", 2),
            ("refunds", 1),
        ]),
        want(&[("customer", 1), ("invoices", 1), ("payments", 1)]),
    );
    eventually(
        WITHIN,
        "payment 100 and its refund back in customer 1 only",
        || async {
            let (a, b) = (get(&fabric, 1).await.ok()?, get(&fabric, 2).await.ok()?);
            (shape(&a) == one && shape(&b) == two).then_some(())
        },
    )
    .await;
    println!(
        "sql_poll: invoice 10 moved from customer 1 to 2 with its 2 payments and a refund, then a payment back with its refund, no old images"
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}

/// The SQLite source (the demo's billing database, captured through its
/// changelog): invoices move to other customers and payments to other
/// invoices while the fabric runs, then it is SIGKILLed and started again;
/// every customer ends equal to the sources, payments counted where their
/// invoice is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sqlite_invoices_and_payments_move_and_every_customer_equals_its_sources() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 120,
            snapshot_interval: "300ms",
            ..Default::default()
        },
    );
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("a.log"));
    fabric.wait_serving(WITHIN).await;
    assert_eq!(converge_within(&fabric, &data, WITHIN).await, 120);
    let mut db = demo_db(&data).await;
    let mut moved = (0, 0);
    for round in 0..3i64 {
        // Invoices that have payments, to the next customer over.
        moved.0 += sqlx::query(
            "UPDATE billing.invoices SET customer_id = customer_id % 120 + 1 \
             WHERE id IN (SELECT invoice_id FROM billing.payments ORDER BY invoice_id LIMIT 10 OFFSET ?)",
        )
        .bind(round * 10)
        .execute(&mut db)
        .await
        .unwrap()
        .rows_affected();
        // Payments to another customer's invoice.
        moved.1 += sqlx::query(
            "UPDATE billing.payments SET invoice_id = \
               (SELECT id FROM billing.invoices WHERE customer_id = 60 + ? LIMIT 1) \
             WHERE id IN (SELECT id FROM billing.payments ORDER BY id DESC LIMIT 5 OFFSET ?)",
        )
        .bind(round)
        .bind(round * 5)
        .execute(&mut db)
        .await
        .unwrap()
        .rows_affected();
        if round == 1 {
            fabric.kill9();
            fabric = FabricProcess::start(&config, &dir.path().join("b.log"));
            fabric.wait_serving(WITHIN).await;
        }
    }
    assert!(moved.0 >= 20 && moved.1 >= 10, "moved {moved:?}");
    assert_eq!(converge_within(&fabric, &data, WITHIN).await, 120);
    println!(
        "sqlite: {} invoices with payments and {} payments moved, one SIGKILL: 120 customers equal to the sources",
        moved.0, moved.1
    );
    assert!(fabric.terminate(), "{}", fabric.log_text());
}

/// What a process of a Kafka fabric says of source `name` (its state:
/// "elsewhere" when another process runs it).
async fn source_state(fabric: &FabricProcess, name: &str) -> Option<String> {
    use entity_fabric::proto::ListSourcesRequest;
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    let mut c = CatalogServiceClient::connect(fabric.grpc.clone())
        .await
        .ok()?;
    let sources = c
        .list_sources(ListSourcesRequest {})
        .await
        .ok()?
        .into_inner();
    sources
        .sources
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.state)
}

/// Waits until `billing` runs on `here` (and not on `there`).
async fn wait_billing_on(here: &FabricProcess, there: Option<&FabricProcess>) {
    eventually(WITHIN, "billing to move", || async move {
        let h = source_state(here, "billing").await?;
        let t = match there {
            Some(t) => source_state(t, "billing").await?,
            None => "elsewhere".into(),
        };
        (h != "elsewhere" && h != "starting" && t == "elsewhere").then_some(())
    })
    .await;
}

/// On Kafka a source runs on one process and may move to another and back
/// (a rebalance, a lease that ran out while a process stalled). Process B
/// runs billing; process A joins and takes it (its instance id sorts
/// first); 100 payments are deleted while A routes billing; A stops and
/// billing comes back to B; then the 100 invoices of those payments move to
/// another customer. The deleted payments stay deleted. Before the router
/// forgot what it held of a source's tables when the source came back, B's
/// index still listed them under their invoices, and the move brought them
/// back into customer 9: 99 mismatches, "in the fabric, not in the source"
/// (checked with the forgetting taken out), the symptom of the two-process
/// chaos test's failures in CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_back_on_a_process_does_not_bring_back_rows_deleted_while_it_was_away() {
    let dbs = TwoDatabases::create("fab_back").await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("back");
    let config = |name: &str| dbs.kafka_config(dir.path(), &prefix, name);
    let (cfg_a, cfg_b) = (config("a"), config("b"));
    let mut b = FabricProcess::start(&cfg_b, &dir.path().join("b.log"));
    b.wait_serving(WITHIN).await;
    converge_to(&b, &dbs.expected().await, WITHIN).await;

    let mut a = FabricProcess::start(&cfg_a, &dir.path().join("a.log"));
    a.wait_serving(WITHIN).await;
    wait_billing_on(&a, Some(&b)).await;
    let mut m = mysql_async::Conn::from_url(dbs.my_db()).await.unwrap();
    m.query_drop("DELETE FROM payments WHERE id <= 100")
        .await
        .unwrap();
    let want = dbs.expected().await;
    converge_to(&a, &want, WITHIN).await;
    converge_to(&b, &want, WITHIN).await;

    assert!(a.terminate(), "{}", a.log_text());
    wait_billing_on(&b, None).await;
    m.query_drop("UPDATE invoices SET customer_id = 9 WHERE id <= 100")
        .await
        .unwrap();
    let want = dbs.expected().await;
    assert!(want[&9]["invoices"].len() > 100);
    converge_to(&b, &want, WITHIN).await;
    println!(
        "billing moved to another process and back, 100 payments deleted while away, their invoices moved: {} customers equal to the sources",
        want.len()
    );
    assert!(b.terminate(), "{}", b.log_text());
    dbs.drop_all().await;
}
