//! The status page of the admin endpoint, through the real binary on the
//! demo sources (writing all the time) and read the way an operator reads
//! it: in a real headless browser (Debian's Chromium, installed by
//! `scripts/services.sh`). The page loads, shows the live numbers the JSON
//! behind it has (sources streaming, entities per type, partitions, the
//! snapshot's age, the ingest and read rates), refreshes itself every
//! second, and a later look shows the numbers moved on.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(60);

fn chromium() -> String {
    let c = std::env::var("FABRIC_TEST_CHROMIUM").unwrap_or_default();
    assert!(
        !c.is_empty(),
        "FABRIC_TEST_CHROMIUM is not set (or Chromium is not installed): run the tests with \
         ./scripts/test.sh, or eval \"$(scripts/services.sh start)\" first"
    );
    c
}

/// The page's DOM after it ran for `ms` milliseconds of (virtual) time.
fn rendered(url: &str, ms: u32, profile: &Path) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of the element with `id` in `dom` (tags stripped).
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    // Up to the element's closing tag (the elements read here do not nest
    // their own kind).
    let tag = dom[..at]
        .rsplit('<')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let end = rest.find(&format!("</{tag}>")).unwrap();
    let inner = &rest[start..end];
    let mut out = String::new();
    let mut in_tag = false;
    for c in inner.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn refreshes(dom: &str) -> u32 {
    let at = dom
        .find("data-refreshes=\"")
        .expect("the body's refresh count")
        + 16;
    dom[at..].split('"').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_live_numbers_in_a_browser_and_updates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(
        dir.path(),
        &DemoSettings {
            customers: 300,
            mutations_per_second: 40.0,
            snapshot_interval: "1s",
            ..Default::default()
        },
    );
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(WITHIN).await;
    converge_within(&fabric, &dir.path().join("data"), WITHIN).await;
    // Reads for the read rate.
    let mut client = fabric.client().await;
    for id in 1..=200 {
        let _ = client
            .get_entity(entity_fabric::proto::GetEntityRequest {
                r#type: "customer".into(),
                id: id.to_string(),
                ..Default::default()
            })
            .await;
    }

    // The JSON behind the page.
    let doc: serde_json::Value = eventually(WITHIN, "status.json with rates", || async {
        let (code, body) = http_get(&fabric.admin, "/status.json").await;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && doc["rates"].as_array()?.len() >= 3).then_some(doc)
    })
    .await;
    assert_eq!(doc["ready"], true);
    let states: Vec<(&str, &str)> = doc["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("crm", "streaming"),
            ("billing", "streaming"),
            ("support", "streaming")
        ]
    );
    assert_eq!(doc["entity_types"][0]["name"], "customer");
    assert_eq!(
        doc["entity_types"][0]["owner"],
        "customer-data team <customer-data@example.com>"
    );
    let held = doc["entity_types"][0]["entities"].as_u64().unwrap();
    assert!(held >= 300, "{held} customers held");
    assert_eq!(doc["partitions"].as_array().unwrap().len(), 4);
    assert!(doc["snapshot"]["age_s"].as_i64().is_some_and(|a| a < 30));
    let rates = doc["rates"].as_array().unwrap();
    assert!(
        rates.iter().any(|r| r[1].as_f64().unwrap() > 0.0),
        "no ingest rate"
    );
    assert!(
        rates.iter().any(|r| r[2].as_f64().unwrap() > 0.0),
        "no read rate"
    );
    // A dead letter's raw input never reaches the page.
    assert!(!doc.to_string().contains("\"raw\""));

    // In a browser: the page loads and shows what the JSON says.
    let url = format!("http://{}/status", fabric.admin);
    let profile = tempfile::tempdir().unwrap();
    let first = rendered(&url, 4000, profile.path());
    assert!(
        refreshes(&first) >= 3,
        "the page refreshed {} times",
        refreshes(&first)
    );
    let sources = text_of(&first, "sources");
    for s in [
        "crm sqlite streaming",
        "billing sqlite streaming",
        "support sqlite streaming",
    ] {
        assert!(sources.contains(s), "{s:?} not in: {sources}");
    }
    let types = text_of(&first, "types");
    assert!(types.starts_with("customer "), "{types}");
    let shown: u64 = types
        .split_whitespace()
        .nth(1)
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(shown >= 300, "{types}");
    assert_eq!(
        text_of(&first, "partitions").matches(" yes yes ").count(),
        4
    );
    assert!(text_of(&first, "snap-age").ends_with("s ago"));
    let ingest: f64 = text_of(&first, "ingest-now")
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(ingest >= 0.0);
    let crm_changes = |dom: &str| -> u64 {
        let row = text_of(dom, "sources");
        let after = row.split("crm sqlite streaming").nth(1).unwrap();
        // lag, transactions, changes
        let fields: Vec<&str> = after.split_whitespace().collect();
        let lag_words = if fields[0] == "now" { 1 } else { 2 };
        fields[lag_words + 1].replace(',', "").parse().unwrap()
    };
    let before = crm_changes(&first);
    let updated = text_of(&first, "updated");

    // A later look: the numbers moved on (the demo writes all the time).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = rendered(&url, 2500, profile.path());
    assert_ne!(text_of(&second, "updated"), updated);
    let after = crm_changes(&second);
    assert!(after > before, "crm changes {before} then {after}");

    // The sample dashboard (deploy/grafana) and the README's metrics table
    // name only metrics the fabric exports.
    let (_, metrics) = http_get(&fabric.admin, "/metrics").await;
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/grafana/entity-fabric.json", "README.md"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let named = metric_names(&text);
        assert!(named.len() >= 10, "{file} names {} metrics", named.len());
        for name in named {
            assert!(
                exported.contains(name.as_str()),
                "{file} names {name}, which /metrics does not export ({exported:?})"
            );
        }
    }
    assert!(fabric.terminate());
}

/// The metric families `fabric_…` a text names (sample suffixes removed).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fabric_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(text.len() - start);
        // A whole word: not the tail of another name.
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            let mut name = &text[start..end];
            for suffix in ["_total", "_bucket", "_count", "_sum"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}
