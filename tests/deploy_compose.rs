//! deploy/compose.yaml tried for real, as far as a machine without a
//! container engine allows: Apache Kafka started with the compose file's
//! broker settings (those that apply outside a container), the two
//! databases set up by deploy/sql/*.sql, and the fabric run with
//! `deploy/fabric-compose.toml` and the secrets `fabric init-secrets`
//! makes, on loopback. A client with the reader token reads a customer
//! assembled from both databases over TLS, sees a change made after the
//! start, and the entities topic carries it.
//!
//! What is rewritten, and only that: container host names and ports to
//! loopback ones, `/var/lib/...` paths to the test's directory, and names
//! other tests could share on these servers (PostgreSQL database and slot,
//! MariaDB database, topic prefix).

mod common;

use common::*;
use entity_fabric::proto::GetEntityRequest;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The kafka service's `KAFKA_*` environment as broker properties (the
/// apache/kafka image's own mapping: `KAFKA_FOO_BAR` is `foo.bar`), with
/// the container's addresses moved to loopback ports and its log directory
/// to `data`.
fn compose_broker_properties(port: u16, controller: u16, data: &Path) -> String {
    let text = std::fs::read_to_string(deploy().join("compose.yaml")).unwrap();
    let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    // The image's release is the one the tests run.
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"))
            .unwrap();
    let version = script
        .split("FABRIC_KAFKA_VERSION:-")
        .nth(1)
        .and_then(|r| r.split('}').next())
        .expect("scripts/kafka.sh names its default release");
    assert_eq!(
        doc["services"]["kafka"]["image"],
        format!("apache/kafka:{version}"),
        "compose.yaml's broker is another release than the tests'"
    );
    let env = doc["services"]["kafka"]["environment"]
        .as_object()
        .expect("the kafka service sets its environment as a map");
    let mut props = BTreeMap::new();
    for (k, v) in env {
        let key = k
            .strip_prefix("KAFKA_")
            .unwrap_or_else(|| panic!("{k}: not a broker setting"))
            .to_lowercase()
            .replace('_', ".");
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let value = value
            .replace("://:", "://127.0.0.1:")
            .replace("kafka:", "127.0.0.1:")
            .replace(":9092", &format!(":{port}"))
            .replace(":9093", &format!(":{controller}"));
        props.insert(key, value);
    }
    assert!(
        props.contains_key("log.dirs"),
        "compose.yaml names the broker's log directory"
    );
    props.insert("log.dirs".into(), data.display().to_string());
    props
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>()
}

async fn tls_client(grpc: &str, ca: &str) -> Option<EntityServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let endpoint = Channel::from_shared(grpc.replace("http://", "https://"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let ch = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
        .await
        .ok()?
        .ok()?;
    Some(EntityServiceClient::new(ch))
}

type Tables = BTreeMap<String, BTreeMap<i64, serde_json::Value>>;

/// Customer `id` as the reader sees it (table → row id → row), or None
/// while the fabric does not serve it yet.
async fn customer(
    client: &mut EntityServiceClient<Channel>,
    token: &str,
    id: &str,
) -> Option<Tables> {
    let mut req = tonic::Request::new(GetEntityRequest {
        r#type: "customer".into(),
        id: id.into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let e = client.get_entity(req).await.ok()?.into_inner();
    Some(entity_tables(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_deployment_serves_a_customer_from_both_databases() {
    let dir = tempfile::tempdir().unwrap();

    // The broker, from the compose file's settings.
    let (port, controller) = (free_port(), free_port());
    let props = dir.path().join("server.properties");
    std::fs::write(
        &props,
        compose_broker_properties(port, controller, &dir.path().join("kafka-data")),
    )
    .unwrap();
    let _broker = Broker::start_with(&dir.path().join("kafka"), port, &props);

    // The databases, from deploy/sql.
    let pg_db = unique("compose_crm");
    let pg = pg_fresh_db(&pg_db).await;
    {
        use sqlx::Connection;
        let sql = std::fs::read_to_string(deploy().join("sql/postgres-init.sql")).unwrap();
        let mut c = sqlx::PgConnection::connect(&pg).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    }
    let billing = unique("compose_billing");
    {
        use sqlx::Connection;
        let sql = std::fs::read_to_string(deploy().join("sql/mariadb-init.sql"))
            .unwrap()
            .replace("billing", &billing);
        let mut c = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut c)
            .await
            .unwrap();
    }

    // Secrets as the first start makes them, and the compose config.
    let secrets = dir.path().join("secrets");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .arg("init-secrets")
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pg_host = pg
        .split_once('@')
        .unwrap()
        .1
        .rsplit_once('/')
        .unwrap()
        .0
        .to_string();
    let my_host = mysql_url().split_once('@').unwrap().1.to_string();
    let prefix = unique("compose");
    let slot = unique("compose_slot");
    let text = std::fs::read_to_string(deploy().join("fabric-compose.toml")).unwrap();
    for must in [
        "/var/lib/fabric/secrets",
        "0.0.0.0:50051",
        "0.0.0.0:9464",
        "\"kafka:9092\"",
        "topic_prefix = \"fabric\"",
        "@postgres:5432/postgres\"",
        "@mariadb:3306/billing\"",
        "kind = \"postgres_cdc\"",
    ] {
        assert!(
            text.contains(must),
            "fabric-compose.toml no longer says {must}"
        );
    }
    let text = text
        .replace("/var/lib/fabric/secrets", &secrets.display().to_string())
        .replace(
            "/var/lib/fabric",
            &dir.path().join("fabric").display().to_string(),
        )
        .replace("0.0.0.0:50051", &format!("127.0.0.1:{}", free_port()))
        .replace("0.0.0.0:9464", &format!("127.0.0.1:{}", free_port()))
        .replace("\"kafka:9092\"", &format!("\"127.0.0.1:{port}\""))
        .replace(
            "topic_prefix = \"fabric\"",
            &format!("topic_prefix = \"{prefix}\""),
        )
        .replace(
            "@postgres:5432/postgres\"",
            &format!("@{pg_host}/{pg_db}\""),
        )
        .replace(
            "@mariadb:3306/billing\"",
            &format!("@{my_host}/{billing}\""),
        )
        .replace("billing.", &format!("{billing}."))
        .replace(
            "kind = \"postgres_cdc\"",
            &format!("kind = \"postgres_cdc\"\nslot = \"{slot}\""),
        );
    let config = dir.path().join("fabric.toml");
    std::fs::write(&config, text).unwrap();

    // The test servers: PostgreSQL trusts loopback, MariaDB's root has no
    // password. The variables are set as compose.yaml sets them.
    let mut fabric = FabricProcess::start_env(
        &config,
        &dir.path().join("fabric.log"),
        &[
            ("POSTGRES_PASSWORD", "fabric"),
            ("MARIADB_ROOT_PASSWORD", ""),
        ],
    );
    let ca = std::fs::read_to_string(secrets.join("ca.pem")).unwrap();
    let token = std::fs::read_to_string(secrets.join("reader.token")).unwrap();
    let token = token.trim();
    let client = eventually(Duration::from_secs(60), "the fabric serving TLS", || {
        tls_client(&fabric.grpc, &ca)
    })
    .await;

    // Ada: CRM row and address from PostgreSQL, two invoices and a payment
    // from MariaDB.
    let ada = eventually(
        Duration::from_secs(90),
        "customer 1 with her address, invoices and payment",
        || {
            let mut c = client.clone();
            async move {
                let t = customer(&mut c, token, "1").await?;
                let n = |name: &str| t.get(name).map_or(0, BTreeMap::len);
                // The two sources load independently: wait for both.
                (n("customer") == 1
                    && n("addresses") == 1
                    && n("invoices") == 2
                    && n("payments") == 1)
                    .then_some(t)
            }
        },
    )
    .await;
    assert_eq!(ada["customer"][&1]["name"], "Ada Lovelace", "{ada:?}");
    assert_eq!(ada["addresses"][&1]["city"], "London", "{ada:?}");
    assert_eq!(ada["payments"][&1]["invoice_id"], 1, "{ada:?}");

    // Without a token: refused.
    let anon = client
        .clone()
        .get_entity(GetEntityRequest {
            r#type: "customer".into(),
            id: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(anon.code(), tonic::Code::Unauthenticated, "{anon:?}");

    // A change after the start arrives, and is on the entities topic.
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&pg).await.unwrap();
        sqlx::query("UPDATE customers SET tier = 'diamond' WHERE id = 3")
            .execute(&mut c)
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(60), "Grace's new tier", || {
        let mut c = client.clone();
        async move {
            let t = customer(&mut c, token, "3").await?;
            (t["customer"][&3]["tier"] == "diamond").then_some(())
        }
    })
    .await;
    let brokers = format!("127.0.0.1:{port}");
    let consumer = consumer_from_start(&brokers, &format!("{prefix}.entities"));
    eventually(
        Duration::from_secs(60),
        "Grace's new tier on the entities topic",
        || {
            let consumer = &consumer;
            async move {
                use rdkafka::message::Message;
                let m = tokio::time::timeout(Duration::from_secs(2), consumer.recv())
                    .await
                    .ok()?
                    .ok()?;
                let body = String::from_utf8_lossy(m.payload()?).to_string();
                body.contains("diamond").then_some(())
            }
        },
    )
    .await;
    assert!(fabric.terminate(), "{}", fabric.log_text());
    pg_drop_db(&pg_db, &slot).await;
    {
        use sqlx::Connection;
        let mut c = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {billing}")))
            .execute(&mut c)
            .await
            .unwrap();
    }
    println!(
        "compose deployment on loopback: customer 1 assembled from both databases over TLS, a change reached gRPC and {prefix}.entities"
    );
}
