//! End to end on the demo config: the real `fabric` binary, three SQLite
//! sources, real gRPC clients over loopback.

mod common;

use common::*;
use entity_fabric::proto::entity_change::Operation;
use entity_fabric::proto::{GetEntityRequest, WatchEntitiesRequest};
use std::time::Duration;
use tonic::Code;

const WITHIN: Duration = Duration::from_secs(30);

async fn get(
    client: &mut entity_fabric::proto::entity_service_client::EntityServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    view: &str,
) -> Result<entity_fabric::proto::Entity, tonic::Status> {
    client
        .get_entity(GetEntityRequest {
            r#type: "customer".into(),
            id: id.into(),
            view: view.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn table<'a>(
    e: &'a entity_fabric::proto::Entity,
    name: &str,
) -> Option<&'a entity_fabric::proto::Table> {
    e.tables.iter().find(|t| t.name == name)
}

fn text(row: &entity_fabric::proto::Row, col: &str) -> String {
    entity_fabric::view::value_from_proto(&row.columns[col])
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_from_three_sources_changes_live() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(dir.path(), &DemoSettings::default());
    let data = dir.path().join("data");
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut client = fabric.client().await;

    // A customer with rows in all three sources.
    let mut db = demo_db(&data).await;
    let id: i64 = sqlx::query_scalar(
        "SELECT c.id FROM customers c
         WHERE EXISTS (SELECT 1 FROM addresses a WHERE a.customer_id = c.id)
           AND EXISTS (SELECT 1 FROM billing.invoices i JOIN billing.payments p ON p.invoice_id = i.id WHERE i.customer_id = c.id)
           AND EXISTS (SELECT 1 FROM support.tickets t WHERE t.customer_id = c.id)
         ORDER BY c.id LIMIT 1",
    )
    .fetch_one(&mut db)
    .await
    .expect("the demo has a customer with rows in every source");
    let sid = id.to_string();

    // The initial snapshot of all three sources lands, equal to the sources.
    let want = expected_customers(&data).await.remove(&id).unwrap();
    let e = eventually(WITHIN, "the customer with all five tables", || {
        let mut c = client.clone();
        let sid = sid.clone();
        async move {
            let e = get(&mut c, &sid, "").await.ok()?;
            (e.tables.len() == 5).then_some(e)
        }
    })
    .await;
    assert_eq!(
        diff_entity(id, &want, &entity_tables(&e)),
        Vec::<String>::new()
    );
    let sources: Vec<&str> = e.positions.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(sources, vec!["billing", "crm", "support"]);

    // Watch it, then change rows in all three SQLite files.
    let mut watch = client
        .watch_entities(WatchEntitiesRequest {
            r#type: "customer".into(),
            id: sid.clone(),
            from_version: 0,
            view: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WITHIN, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.operation, Operation::Upsert as i32);
    assert_eq!(first.entity.as_ref().unwrap().id, sid);

    let new_email = format!("changed-{id}@example.org");
    sqlx::query("UPDATE customers SET email = ? WHERE id = ?")
        .bind(&new_email)
        .bind(id)
        .execute(&mut db)
        .await
        .unwrap();
    let ticket_id: i64 = sqlx::query_scalar(
        "INSERT INTO support.tickets (customer_id, subject, status, priority, opened_at)
         VALUES (?, 'Cannot log in', 'open', 'high', '2026-11-27 10:00:00') RETURNING id",
    )
    .bind(id)
    .fetch_one(&mut db)
    .await
    .unwrap();
    let invoice_id: i64 = sqlx::query_scalar(
        "SELECT id FROM billing.invoices WHERE customer_id = ? ORDER BY id LIMIT 1",
    )
    .bind(id)
    .fetch_one(&mut db)
    .await
    .unwrap();
    let payment_id: i64 = sqlx::query_scalar(
        "INSERT INTO billing.payments (invoice_id, amount, method, paid_at)
         VALUES (?, '12.34', 'card', '2026-11-27 10:00:01') RETURNING id",
    )
    .bind(invoice_id)
    .fetch_one(&mut db)
    .await
    .unwrap();

    // GetEntity shows all three changes.
    let e = eventually(WITHIN, "the three changes through GetEntity", || {
        let mut c = client.clone();
        let sid = sid.clone();
        let new_email = new_email.clone();
        async move {
            let e = get(&mut c, &sid, "").await.ok()?;
            let email_ok = text(&table(&e, "customer")?.rows[0], "email") == new_email;
            let ticket_ok = table(&e, "tickets")?
                .rows
                .iter()
                .any(|r| text(r, "id") == ticket_id.to_string());
            let pay_ok = table(&e, "payments")?
                .rows
                .iter()
                .any(|r| text(r, "id") == payment_id.to_string());
            (email_ok && ticket_ok && pay_ok).then_some(e)
        }
    })
    .await;
    let pay = table(&e, "payments")
        .unwrap()
        .rows
        .iter()
        .find(|r| text(r, "id") == payment_id.to_string())
        .unwrap();
    assert_eq!(text(pay, "amount"), "12.34", "decimals stay exact");

    // The watch stream saw the e-mail change.
    let seen = tokio::time::timeout(WITHIN, async {
        loop {
            let c = watch.message().await.unwrap().unwrap();
            let ent = c.entity.unwrap();
            if let Some(t) = table(&ent, "customer")
                && text(&t.rows[0], "email") == new_email
            {
                return (c.operation, c.changed_tables);
            }
        }
    })
    .await
    .expect("WatchEntities delivered the e-mail change");
    assert_eq!(seen.0, Operation::Upsert as i32);
    assert!(seen.1.contains(&"customer".to_string()), "{:?}", seen.1);

    // The support view hides billing and hashes the e-mail.
    let v = get(&mut client, &sid, "support").await.unwrap();
    assert_eq!(v.view, "support");
    let names: Vec<&str> = v.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["customer", "tickets"]);
    let email = text(&table(&v, "customer").unwrap().rows[0], "email");
    assert_eq!(email.len(), 64);
    assert_ne!(email, new_email);

    // Deleting the root row deletes the entity; the watcher is told.
    sqlx::query("DELETE FROM customers WHERE id = ?")
        .bind(id)
        .execute(&mut db)
        .await
        .unwrap();
    let deleted = tokio::time::timeout(WITHIN, async {
        loop {
            let c = watch.message().await.unwrap().unwrap();
            if c.operation == Operation::Delete as i32 {
                return c;
            }
        }
    })
    .await
    .expect("WatchEntities delivered the delete");
    assert_eq!(deleted.entity.unwrap().id, sid);
    let err = get(&mut client, &sid, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    assert!(
        fabric.terminate(),
        "graceful shutdown failed:\n{}",
        fabric.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_health_reflection_metrics_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 50,
            ..Default::default()
        },
    );
    let mut fabric = FabricProcess::start(&config, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let mut client = fabric.client().await;
    eventually(WITHIN, "customer 1", || {
        let mut c = client.clone();
        async move { get(&mut c, "1", "").await.ok() }
    })
    .await;

    let e = get(&mut client, "999999", "").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "customer 999999 not found");
    let e = client
        .get_entity(GetEntityRequest {
            r#type: "custmer".into(),
            id: "1".into(),
            view: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("unknown entity type \"custmer\" (known: customer)"),
        "{}",
        e.message()
    );
    let e = get(&mut client, "abc", "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("id \"abc\" is not a valid int id"),
        "{}",
        e.message()
    );
    let e = get(&mut client, "1", "finance").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("has no view \"finance\" (views: billing, support)"),
        "{}",
        e.message()
    );

    // Server reflection lists our services, so a stock client needs no .proto.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(fabric.channel().await.unwrap());
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "fabric.v1.EntityService",
        "fabric.v1.CatalogService",
        "fabric.v1.IngestService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_string()), "{s} not in {names:?}");
    }

    // Catalog: sources with positions, entity counts, partitions.
    use entity_fabric::proto::catalog_service_client::CatalogServiceClient;
    let mut cat = CatalogServiceClient::connect(fabric.grpc.clone())
        .await
        .unwrap();
    // The initial snapshots of all three sources are in once every source streams.
    let srcs = eventually(WITHIN, "every source streaming", || {
        let mut cat = cat.clone();
        async move {
            let srcs = cat
                .list_sources(entity_fabric::proto::ListSourcesRequest {})
                .await
                .ok()?
                .into_inner();
            srcs.sources
                .iter()
                .all(|s| s.state == "streaming")
                .then_some(srcs)
        }
    })
    .await;
    assert_eq!(srcs.sources.len(), 3);
    for s in &srcs.sources {
        assert_eq!(s.kind, "sqlite");
        assert!(s.routed_position.starts_with("seq:"), "{s:?}");
        assert_eq!(s.last_error, "", "{s:?}");
    }
    let types = eventually(WITHIN, "all 50 customers applied", || {
        let mut cat = cat.clone();
        async move {
            let types = cat
                .list_entity_types(entity_fabric::proto::ListEntityTypesRequest {})
                .await
                .ok()?
                .into_inner();
            (types.entity_types[0].entity_count == 50).then_some(types)
        }
    })
    .await;
    assert_eq!(types.entity_types[0].name, "customer");
    assert_eq!(types.entity_types[0].tables.len(), 5);
    assert_eq!(
        types.entity_types[0]
            .views
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        vec!["billing", "support"]
    );
    let parts = cat
        .list_partitions(entity_fabric::proto::ListPartitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parts.partitions.len(), 4);
    assert_eq!(
        parts.partitions.iter().map(|p| p.entity_count).sum::<u64>(),
        50
    );

    // Admin HTTP.
    let (status, body) = http_get(&fabric.admin, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(&fabric.admin, "/metrics").await;
    assert_eq!(status, 200);
    for m in [
        "fabric_changes_applied_total{source=\"crm\"}",
        "fabric_entities{entity_type=\"customer\"} 50",
        "fabric_source_lag_seconds{source=\"billing\"}",
        "fabric_grpc_request_duration_seconds_count{method=\"GetEntity\"}",
        "fabric_dead_letters_total",
        "fabric_snapshot_duration_seconds",
    ] {
        assert!(body.contains(m), "{m} missing from /metrics:\n{body}");
    }

    // The CLI reads through the same API.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["health", "--addr", &fabric.grpc])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["get", "customer", "1", "--json", "--addr", &fabric.grpc])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["id"], "1");
    assert_eq!(doc["tables"]["customer"][0]["id"], 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["get", "customer", "424242", "--addr", &fabric.grpc])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("customer 424242 not found"));

    // `fabric watch` prints each change as a JSON line.
    let mut watcher = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["watch", "customer", "2", "--addr", &fabric.grpc])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // The first line is the current state: the watch is established.
    let first = tokio::time::timeout(WITHIN, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["entity"]["id"], "2");
    let mut db = demo_db(&dir.path().join("data")).await;
    sqlx::query("UPDATE customers SET tier = 'gold-plus' WHERE id = 2")
        .execute(&mut db)
        .await
        .unwrap();
    let line = tokio::time::timeout(WITHIN, async {
        loop {
            let l = rx.recv().await.unwrap();
            if l.contains("gold-plus") {
                return l;
            }
        }
    })
    .await
    .expect("fabric watch printed the change");
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["operation"], "upsert");
    assert_eq!(doc["changed_tables"], serde_json::json!(["customer"]));
    assert_eq!(doc["entity"]["tables"]["customer"][0]["tier"], "gold-plus");
    let _ = watcher.kill();
    let _ = watcher.wait();

    let addr = fabric.grpc.clone();
    assert!(fabric.terminate());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["health", "--addr", &addr])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a stopped fabric must not report healthy"
    );
}
