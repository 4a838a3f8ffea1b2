//! Config mistakes, one test per class: `fabric check` refuses the file and
//! names the file, the field and the reason; every example under `config/` passes.

use std::path::{Path, PathBuf};
use std::process::Command;

const GOOD: &str = r#"
[server]
grpc_addr = "127.0.0.1:50051"

[snapshot]
interval = "5s"

[[sources]]
name = "crm"
kind = "sqlite"
path = "crm.db"
tables = ["customers"]

[[sources]]
name = "billing"
kind = "sqlite"
path = "billing.db"
tables = ["invoices", "payments"]

[[entities]]
name = "customer"
  [[entities.tables]]
  name = "customer"
  source = "crm"
  from = "customers"
  id_column = "id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "invoices"
  source = "billing"
  from = "invoices"
  id_column = "customer_id"
  primary_key = ["id"]
  [[entities.tables]]
  name = "payments"
  source = "billing"
  from = "payments"
  id_via = { table = "invoices", column = "invoice_id" }
  primary_key = ["id"]
  [entities.views.support]
  tables = ["customer"]
  mask = { "customer.email" = "hash" }
"#;

/// Runs `fabric check` on `text`; returns (success, stdout, stderr, file path).
fn check(text: &str) -> (bool, String, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fabric.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("FABRIC_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
        path,
    )
}

/// Asserts `text` is refused with a line naming the file, `field` and `reason`.
fn refused(text: &str, field: &str, reason: &str) -> String {
    let (ok, _, err, path) = check(text);
    assert!(!ok, "config was accepted:\n{text}");
    let line = err
        .lines()
        .find(|l| l.contains(&format!(": {field}: ")))
        .unwrap_or_else(|| panic!("no error names field {field:?}:\n{err}"));
    assert!(
        line.contains(&path.display().to_string()),
        "file not named: {line}"
    );
    assert!(line.contains(reason), "reason {reason:?} missing: {line}");
    err
}

#[test]
fn good_config_passes() {
    let (ok, out, err, _) = check(GOOD);
    assert!(ok, "{err}");
    assert!(out.starts_with("OK: "), "{out}");
}

#[test]
fn every_example_config_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The secrets the examples take from the environment.
            let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
                .args(["check", "--config"])
                .arg(&path)
                .env("CRM_URL", "postgres://fabric:secret@localhost:5432/crm")
                .env("BILLING_URL", "mysql://cdc:secret@localhost:3306")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} example configs found");
}

#[test]
fn unknown_field() {
    refused(
        &GOOD.replace("interval = \"5s\"", "interval = \"5s\"\nintervall = \"5s\""),
        "snapshot.intervall",
        "unknown field",
    );
    refused(
        &GOOD.replace(
            "  id_column = \"id\"",
            "  id_column = \"id\"\n  colour = \"red\"",
        ),
        "entities[0].tables[0].colour",
        "unknown field",
    );
}

#[test]
fn field_not_of_this_source_kind() {
    refused(
        &GOOD.replace(
            "path = \"crm.db\"",
            "path = \"crm.db\"\nurl = \"postgres://x\"",
        ),
        "sources[0].url",
        "not a field of a sqlite source",
    );
}

#[test]
fn unknown_source() {
    refused(
        &GOOD.replace("source = \"crm\"", "source = \"crmm\""),
        "entities[0].tables[0].source",
        "unknown source \"crmm\" (known: crm, billing)",
    );
}

#[test]
fn duplicate_table() {
    refused(
        &GOOD.replace("name = \"invoices\"", "name = \"customer\""),
        "entities[0].tables[1].name",
        "duplicate table \"customer\"",
    );
}

#[test]
fn duplicate_source() {
    refused(
        &GOOD.replace("name = \"billing\"", "name = \"crm\""),
        "sources[1].name",
        "duplicate source name",
    );
}

#[test]
fn link_to_missing_table() {
    refused(
        &GOOD.replace("table = \"invoices\"", "table = \"bills\""),
        "entities[0].tables[2].id_via.table",
        "links to table \"bills\", which entity type \"customer\" does not have",
    );
}

#[test]
fn table_not_captured_by_its_source() {
    refused(
        &GOOD.replace("from = \"payments\"", "from = \"refunds\""),
        "entities[0].tables[2].from",
        "is not in the tables of source \"billing\"",
    );
}

#[test]
fn bad_duration() {
    refused(
        &GOOD.replace("interval = \"5s\"", "interval = \"5 parsecs\""),
        "snapshot.interval",
        "is not a duration",
    );
}

#[test]
fn span_export_settings_are_checked() {
    refused(
        &format!("{GOOD}\n[log.otlp]\nendpoint = \"https://collector:4317\"\n"),
        "log.otlp.endpoint",
        "TLS to the collector is not built in",
    );
    refused(
        &format!("{GOOD}\n[log.otlp]\nendpoint = \"collector:4317\"\n"),
        "log.otlp.endpoint",
        "is not an http:// address",
    );
    refused(
        &format!("{GOOD}\n[log.otlp]\nendpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 2.0\n"),
        "log.otlp.sample_ratio",
        "between 0 and 1",
    );
}

#[test]
fn bad_address() {
    refused(
        &GOOD.replace("127.0.0.1:50051", "localhost-50051"),
        "server.grpc_addr",
        "is not a socket address",
    );
}

#[test]
fn view_of_missing_table_and_bad_mask_column() {
    let err = refused(
        &GOOD.replace(
            "tables = [\"customer\"]\n",
            "tables = [\"customer\", \"orders\"]\n",
        ),
        "entities[0].views.support.tables[1]",
        "no table \"orders\"",
    );
    assert!(!err.is_empty());
    refused(
        &GOOD.replace("\"customer.email\" = \"hash\"", "\"email\" = \"hash\""),
        "entities[0].views.support.mask.\"email\"",
        "is not of the form table.column",
    );
}

#[test]
fn missing_id_rule() {
    refused(
        &GOOD.replace("  id_column = \"customer_id\"\n", ""),
        "entities[0].tables[1].id_column",
        "set id_column",
    );
}

#[test]
fn missing_environment_variable() {
    refused(
        &GOOD.replace(
            "path = \"crm.db\"",
            "path = \"${FABRIC_TEST_SURELY_UNSET}/crm.db\"",
        ),
        "sources[0].path",
        "environment variable FABRIC_TEST_SURELY_UNSET is not set",
    );
}

#[test]
fn environment_variables_expand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fabric.toml");
    std::fs::write(
        &path,
        GOOD.replace("path = \"crm.db\"", "path = \"${FABRIC_TEST_DIR}/crm.db\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["check", "--config"])
        .arg(&path)
        .env("FABRIC_TEST_DIR", "/var/data")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = GOOD
        .replace("interval = \"5s\"", "interval = \"soon\"")
        .replace("source = \"crm\"", "source = \"nope\"")
        .replace("table = \"invoices\"", "table = \"bills\"")
        .replace("[server]", "[server]\nport = 1");
    let (ok, _, err, _) = check(&text);
    assert!(!ok);
    for field in [
        "snapshot.interval",
        "entities[0].tables[0].source",
        "entities[0].tables[2].id_via.table",
        "server.port",
    ] {
        assert!(
            err.contains(&format!(": {field}: ")),
            "{field} missing from:\n{err}"
        );
    }
    assert!(err.starts_with("invalid config: 4 problems"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["check", "--config", "/nonexistent/fabric.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/fabric.toml: cannot read the file"),
        "{err}"
    );
}

#[test]
fn bad_toml_syntax() {
    let (ok, _, err, path) = check("[server\ngrpc_addr = 1");
    assert!(!ok);
    assert!(
        err.contains(&format!("{}: not valid TOML", path.display())),
        "{err}"
    );
}

#[test]
fn database_sources_need_a_url_of_their_kind() {
    let text = GOOD.replace(
        "kind = \"sqlite\"\npath = \"crm.db\"",
        "kind = \"postgres_cdc\"\nurl = \"mysql://x@localhost/crm\"\nslot = \"Bad-Slot\"",
    );
    let err = refused(
        &text,
        "sources[0].url",
        "a postgres_cdc source needs a url starting with postgres:// or postgresql://",
    );
    assert!(
        err.contains(
            ": sources[0].slot: \"Bad-Slot\" must be lower-case letters, digits and underscores"
        ),
        "{err}"
    );
    refused(
        &GOOD.replace(
            "kind = \"sqlite\"\npath = \"billing.db\"",
            "kind = \"mysql_binlog\"\nserver_id = 0",
        ),
        "sources[1].url",
        "a mysql_binlog source needs a url",
    );
}

#[test]
fn advertise_addr_is_checked() {
    for bad in ["50051", ":50051", "fabric-0:port"] {
        refused(
            &GOOD.replace(
                "grpc_addr = \"127.0.0.1:50051\"",
                &format!("grpc_addr = \"127.0.0.1:50051\"\nadvertise_addr = \"{bad}\""),
            ),
            "server.advertise_addr",
            "is not host:port",
        );
    }
    let good = GOOD.replace(
        "grpc_addr = \"127.0.0.1:50051\"",
        "grpc_addr = \"0.0.0.0:50051\"\ninsecure = true\nadvertise_addr = \"fabric-0.fabric-headless:50051\"",
    );
    let (ok, _, err, _) = check(&good);
    assert!(ok, "{err}");
}

#[test]
fn kafka_settings_are_checked() {
    let kafka = GOOD.replace("[snapshot]", "[bus]\nkind = \"kafka\"\n\n[snapshot]");
    refused(&kafka, "bus.kafka", "needs a [bus.kafka] section");
    let bad = GOOD.replace(
        "[snapshot]",
        "[bus]\nkind = \"kafka\"\n[bus.kafka]\nbrokers = \"\"\ntopic_prefix = \"my topics\"\nreplication = 0\nsession_timeout = \"soon\"\ninstance_id = \" \"\nentities_format = \"avro\"\n\n[snapshot]",
    );
    let (ok, _, err, _) = check(&bad);
    assert!(!ok);
    assert!(err.contains("unknown variant `avro`"), "{err}");
    let bad = bad.replace(
        "entities_format = \"avro\"\n",
        "[bus.kafka.properties]\n\"bootstrap.servers\" = \"elsewhere:9092\"\n",
    );
    let err = refused(
        &bad,
        "bus.kafka.brokers",
        "must name at least one host:port",
    );
    for (field, reason) in [
        ("bus.kafka.topic_prefix", "Kafka's topic name rule"),
        ("bus.kafka.replication", "must be at least 1"),
        ("bus.kafka.session_timeout", "is not a duration"),
        ("bus.kafka.instance_id", "must not be empty"),
        (
            "bus.kafka.properties.\"bootstrap.servers\"",
            "set by the fabric itself",
        ),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!(": {field}: ")) && l.contains(reason)),
            "{field}: {reason} missing:\n{err}"
        );
    }
    let kafka = "[bus]\nkind = \"kafka\"\n[bus.kafka]\nbrokers = \"k1:9092,k2:9092\"\n[bus.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\n";
    // A view hashes: the processes on the bus must share the key.
    refused(
        &GOOD.replace("[snapshot]", &format!("{kafka}[snapshot]")),
        "masking",
        "every process must hash with one key",
    );
    let good = GOOD.replace(
        "[snapshot]",
        &format!("{kafka}[masking]\nkey_env = \"FABRIC_MASK_KEY\"\n\n[snapshot]"),
    );
    let (ok, out, err, _) = check(&good);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "bus: kafka at k1:9092,k2:9092 (topics fabric.changes, fabric.entities, fabric.dlq, fabric.checkpoints, fabric.state, fabric.members; member "
        ),
        "{out}"
    );
}

#[test]
fn debezium_kafka_sources_and_publish_views_are_checked() {
    let dbz = GOOD.replace(
        "kind = \"sqlite\"\npath = \"crm.db\"\ntables = [\"customers\"]",
        "kind = \"debezium_kafka\"",
    );
    let err = refused(&dbz, "sources[0].topics", "needs the topics to read");
    assert!(
        err.contains(": sources[0].brokers: a debezium_kafka source needs brokers"),
        "{err}"
    );
    let ok_text = dbz.replace(
        "kind = \"debezium_kafka\"",
        "kind = \"debezium_kafka\"\ntopics = [\"dbserver1.crm.customers\"]\nbrokers = \"localhost:9092\"",
    );
    let (ok, _, err, _) = check(&ok_text);
    assert!(ok, "{err}");
    refused(
        &GOOD.replace(
            "[[entities]]\nname = \"customer\"",
            "[[entities]]\nname = \"customer\"\npublish_view = \"billing\"",
        ),
        "entities[0].publish_view",
        "no view \"billing\" in entity type \"customer\"",
    );
}

#[test]
fn freshness_and_sync_settings() {
    refused(
        &GOOD.replace(
            "[[entities]]\nname = \"customer\"\n",
            "[[entities]]\nname = \"customer\"\nmax_age = \"5s\"\n",
        ),
        "entities[0].max_age",
        "applies to sync = \"on_access\" entity types only",
    );
    refused(
        &GOOD.replace(
            "[[entities]]\nname = \"customer\"\n",
            "[[entities]]\nname = \"customer\"\nhistory = 65\n",
        ),
        "entities[0].history",
        "more than the 64 allowed",
    );
    refused(
        &GOOD.replace(
            "grpc_addr = \"127.0.0.1:50051\"",
            "grpc_addr = \"127.0.0.1:50051\"\nmin_position_wait = \"soon\"",
        ),
        "server.min_position_wait",
        "is not a duration",
    );
    refused(
        &GOOD.replace(
            "grpc_addr = \"127.0.0.1:50051\"",
            "grpc_addr = \"127.0.0.1:50051\"\nmax_request_bytes = 100",
        ),
        "server.max_request_bytes",
        "must be at least 1024",
    );
    refused(
        &GOOD.replace(
            "grpc_addr = \"127.0.0.1:50051\"",
            "grpc_addr = \"127.0.0.1:50051\"\nmax_streams_per_connection = 0",
        ),
        "server.max_streams_per_connection",
        "must be at least 1",
    );
    // A sync-on-access type reads its tables by query: a file source cannot.
    let jsonl = GOOD
        .replace(
            "kind = \"sqlite\"\npath = \"billing.db\"",
            "kind = \"jsonl\"\npath = \"billing.jsonl\"",
        )
        .replace(
            "[[entities]]\nname = \"customer\"\n",
            "[[entities]]\nname = \"customer\"\nsync = \"on_access\"\n",
        );
    refused(
        &jsonl,
        "entities[0].tables[1].source",
        "a jsonl source cannot be read that way",
    );
    // Its tables need not be captured, and a source only it reads needs no tables.
    let on_access = GOOD
        .replace(
            "[[entities]]\nname = \"customer\"\n",
            "[[entities]]\nname = \"customer\"\nsync = \"on_access\"\nmax_age = \"30s\"\nmax_entities = 1000\n",
        )
        .replace("tables = [\"invoices\", \"payments\"]\n", "")
        .replace("from = \"payments\"", "from = \"refunds\"");
    let (ok, _, err, _) = check(&on_access);
    assert!(ok, "{err}");
}
