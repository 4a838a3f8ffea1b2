//! One customer entity assembled from PostgreSQL (customers, addresses) and
//! MariaDB (invoices, and payments found through their invoice), through
//! the real binary: 10,000 random transactions from concurrent sessions that
//! commit out of order, a SIGKILL of the fabric in the middle, and then every
//! entity equals what queries of the two databases return.

mod common;

use common::two_databases::*;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_transactions_across_postgres_and_mariadb() {
    let dbs = TwoDatabases::create("fab_x").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dbs.config(dir.path(), "partitions = 4");
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("a.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;

    // 10,000 transactions: 3 PostgreSQL and 2 MariaDB sessions, 2,000 each.
    let mut load = Vec::new();
    for s in 0..3 {
        load.push(tokio::spawn(pg_workload(
            dbs.pg.clone(),
            s,
            Until::Count(2000),
        )));
    }
    for s in 0..2 {
        load.push(tokio::spawn(my_workload(
            dbs.my_db(),
            s,
            Until::Count(2000),
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    fabric.kill9();
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("b.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    for l in load {
        l.await.unwrap();
    }

    let want = dbs.expected().await;
    converge_to(&fabric, &want, Duration::from_secs(120)).await;
    println!(
        "10000 transactions across PostgreSQL and MariaDB, 1 SIGKILL, {} entities equal to the sources",
        want.len()
    );
    assert!(fabric.terminate());
    dbs.drop_all().await;
}
