//! The admin endpoint's side doors, against the real binary over loopback:
//! who may plan, reload and read the status (the same principals as gRPC,
//! plain and over TLS), what a web page in an operator's browser cannot do
//! (simple content types, other origins, other host names), bounds on
//! bodies, that a posted config never reads the server's environment, and
//! that the fabric refuses to listen beyond loopback with no `[access]`.

mod common;

use common::*;
use entity_fabric::admin::client::{self, Call, Credentials};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ADMIN_TOKEN: &str = "admin-token-5b1f0c93a7e24d68";
const READER_TOKEN: &str = "reader-token-0e9d8c7b6a5f4e3d";

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn token(t: &str) -> Credentials {
    Credentials {
        token: Some(t.to_string()),
        ..Default::default()
    }
}

/// The demo config with `[access]` (an `admin` and a `reader` principal),
/// a `${HOME}` reference in a string, and a small body bound.
fn config(dir: &Path) -> std::path::PathBuf {
    let path = demo_config(dir, &DemoSettings::default());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("owner = \"customer-data team <customer-data@example.com>\""));
    let text =
        text.replace(
            "owner = \"customer-data team <customer-data@example.com>\"",
            "owner = \"kept in ${HOME}\"",
        )
        .replace(
            "[server]\n",
            "[server]\nadmin_max_body_bytes = 4096\nadmin_max_connections = 2\n",
        ) + &format!(
            r#"
[access]
anonymous = []

[[access.principals]]
name = "ops"
token_sha256 = ["{admin}"]
allow = ["admin"]

[[access.principals]]
name = "app"
token_sha256 = ["{reader}"]
allow = ["read:*"]
"#,
            admin = sha(ADMIN_TOKEN),
            reader = sha(READER_TOKEN),
        );
    std::fs::write(&path, text).unwrap();
    path
}

async fn send(call: Call<'_>, creds: &Credentials) -> (u16, String) {
    client::call(call, creds).await.unwrap()
}

fn fabric_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .env_remove("FABRIC_TOKEN")
        .env_remove("FABRIC_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_plan_and_reload_and_no_web_page_can() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut fabric = FabricProcess::start(&cfg, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let admin = fabric.admin.clone();
    let home = std::env::var("HOME").unwrap();
    let nobody = Credentials::default();
    let ops = token(ADMIN_TOKEN);
    let app = token(READER_TOKEN);

    // Probes and scrapers need no credentials.
    assert_eq!(send(Call::get(&admin, "/healthz"), &nobody).await.0, 200);
    let (code, metrics) = send(Call::get(&admin, "/metrics"), &nobody).await;
    assert_eq!(code, 200);
    assert!(metrics.contains("fabric_config_reloads_applied_total"));
    // The page itself holds no data; its data needs `catalog` or `admin`.
    assert_eq!(send(Call::get(&admin, "/status"), &nobody).await.0, 200);
    let (code, said) = send(Call::get(&admin, "/status.json"), &nobody).await;
    assert_eq!(code, 401, "{said}");
    assert_eq!(send(Call::get(&admin, "/status.json"), &app).await.0, 403);
    let (code, status) = send(Call::get(&admin, "/status.json"), &ops).await;
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["entity_types"][0]["name"], "customer");

    // The finding: a reload posted as text/plain with no credentials (what
    // a web page's form can send) was applied. Now refused, and nothing is
    // applied. (The file changes first, so that a reload has work to do.)
    let original = std::fs::read_to_string(&cfg).unwrap();
    let described =
        "description = \"A customer with their addresses, invoices, payments and support tickets\"";
    assert!(original.contains(described));
    std::fs::write(
        &cfg,
        original.replace(described, "description = \"customers, reloaded\""),
    )
    .unwrap();
    let reload = |ct: &'static str| Call::post(&admin, "/config/reload", ct, String::new());
    let (code, said) = send(reload("text/plain"), &nobody).await;
    assert_eq!(code, 415, "{said}");
    let (code, said) = send(reload("text/plain; charset=utf-8"), &ops).await;
    assert_eq!(code, 415, "even an admin's form post is refused: {said}");
    let (code, said) = send(reload("application/x-www-form-urlencoded"), &ops).await;
    assert_eq!(code, 415, "{said}");
    let (code, said) = send(reload("application/json"), &nobody).await;
    assert_eq!(code, 401, "{said}");
    assert!(said.contains("needs credentials"), "{said}");
    let (code, said) = send(reload("application/json"), &app).await;
    assert_eq!(code, 403, "{said}");
    assert!(said.contains("may not admin"), "{said}");
    let (_, metrics) = send(Call::get(&admin, "/metrics"), &nobody).await;
    assert_eq!(metric(&metrics, "fabric_config_reloads_applied_total"), 0.0);
    // An admin's reload goes through.
    let (code, said) = send(reload("application/json"), &ops).await;
    assert_eq!(code, 200, "{said}");
    let (_, metrics) = send(Call::get(&admin, "/metrics"), &nobody).await;
    assert_eq!(metric(&metrics, "fabric_config_reloads_applied_total"), 1.0);

    // A table re-read (`fabric resync`) is an admin's too; a source kind
    // that cannot is told so.
    let resync = |path: &'static str| Call::post(&admin, path, "application/json", String::new());
    let (code, said) = send(
        resync("/sources/resync?source=crm&table=customers"),
        &nobody,
    )
    .await;
    assert_eq!(code, 401, "{said}");
    let (code, said) = send(resync("/sources/resync?source=crm&table=customers"), &app).await;
    assert_eq!(code, 403, "{said}");
    let (code, said) = send(resync("/sources/resync?source=crm&table=customers"), &ops).await;
    assert_eq!(code, 400, "{said}");
    assert!(
        said.contains("only postgres_cdc and mysql_binlog"),
        "{said}"
    );
    let (code, said) = send(resync("/sources/resync?source=nope&table=customers"), &ops).await;
    assert_eq!(code, 404, "{said}");

    // Another origin, another host name (DNS rebinding): refused, whatever
    // the credentials.
    let from = |headers: Vec<(&'static str, String)>| Call {
        headers,
        ..Call::post(&admin, "/config/reload", "application/json", String::new())
    };
    let (code, said) = send(from(vec![("origin", "http://evil.example".into())]), &ops).await;
    assert_eq!(code, 403, "{said}");
    let (code, said) = send(from(vec![("host", "evil.example:9464".into())]), &ops).await;
    assert_eq!(code, 403, "{said}");
    assert!(said.contains("server.admin_hosts"), "{said}");
    let (code, _) = send(from(vec![("sec-fetch-site", "cross-site".into())]), &ops).await;
    assert_eq!(code, 403);
    let (code, _) = send(from(vec![("origin", format!("http://{admin}"))]), &ops).await;
    assert_eq!(code, 200, "the status page's own origin may");

    // The finding: a posted config was expanded with the server's
    // environment and the value echoed. Never read now, never shown.
    let running = std::fs::read_to_string(&cfg).unwrap();
    let plan = |body: String| Call::post(&admin, "/config/plan", "application/toml", body);
    let probe = running.replacen("[server]\n", "[server]\nadvertise_addr = \"${HOME}\"\n", 1);
    let (code, said) = send(plan(probe), &ops).await;
    assert_eq!(code, 422, "{said}");
    assert!(said.contains("server.advertise_addr"), "{said}");
    assert!(!said.contains(&home), "the server's HOME echoed: {said}");
    // Not read at all (not read and then hidden): the text as written.
    assert!(said.contains("\"${HOME}\" is not host:port"), "{said}");
    assert!(said.contains("are not expanded"), "{said}");
    // The running file's own text: its `${HOME}` is the running value, so
    // nothing changes, and the answer shows no value of it either.
    let (code, said) = send(plan(running.clone()), &ops).await;
    assert_eq!(code, 200, "{said}");
    assert!(said.contains("no changes"), "{said}");
    // The same reference moved to another field is not expanded.
    let moved = running.replace(
        "owner = \"kept in ${HOME}\"",
        "description = \"kept in ${HOME}\"\nowner = \"someone\"",
    );
    let moved = moved.replacen("description = \"customers, reloaded\"\n", "", 1);
    let (code, said) = send(plan(moved), &ops).await;
    assert_eq!(code, 200, "{said}");
    assert!(!said.contains(&home), "{said}");
    // Bounded: a body over server.admin_max_body_bytes.
    let (code, _) = send(plan("#".repeat(10_000)), &ops).await;
    assert_eq!(code, 413);
    // Only admins plan.
    assert_eq!(send(plan(running.clone()), &app).await.0, 403);

    // The CLI presents the same tokens.
    let config = cfg.to_str().unwrap();
    let (code, out) = fabric_cli(&["plan", "--config", config], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("needs credentials"), "{out}");
    let (code, out) = fabric_cli(
        &["plan", "--config", config],
        &[("FABRIC_TOKEN", ADMIN_TOKEN)],
    );
    assert_eq!(code, 0, "{out}");
    std::fs::write(dir.path().join("ops.token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let token_file = dir.path().join("ops.token");
    let (code, out) = fabric_cli(
        &[
            "reload",
            "--config",
            config,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");

    // One request a connection, and a client that opens connections and
    // sits on them does not hold the endpoint: with both slots taken by
    // idle connections, a probe is still answered once their header time
    // runs out.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut one = tokio::net::TcpStream::connect(&admin).await.unwrap();
    one.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), one.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection after one answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let idle: Vec<tokio::net::TcpStream> = vec![
        tokio::net::TcpStream::connect(&admin).await.unwrap(),
        tokio::net::TcpStream::connect(&admin).await.unwrap(),
    ];
    let t0 = std::time::Instant::now();
    let probe = tokio::time::timeout(
        Duration::from_secs(60),
        client::call(Call::get(&admin, "/healthz"), &nobody),
    )
    .await
    .expect("a probe waits at most for the idle connections' header time");
    assert_eq!(probe.unwrap().0, 200);
    // Held back by the idle connections, not answered at once.
    assert!(t0.elapsed() >= Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(idle);

    // Every refusal is an audit line; no token is.
    let log = fabric.log_text();
    assert!(log.contains("admin request refused"), "{log}");
    assert!(log.contains("call denied"), "{log}");
    assert!(!log.contains(ADMIN_TOKEN) && !log.contains(READER_TOKEN));
    assert!(fabric.terminate());
}

/// With `[server.tls]` the admin endpoint serves the same certificate, and
/// a deployment's secrets made by `fabric init-secrets` (tokens read by
/// `${file:…}`) work end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_serves_tls_with_the_deployment_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let (code, out) = fabric_cli(&["init-secrets", secrets.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}");
    let path = demo_config(dir.path(), &DemoSettings::default());
    let s = secrets.display();
    let text = std::fs::read_to_string(&path).unwrap()
        + &format!(
            r#"
[server.tls]
cert_file = "{s}/server.pem"
key_file = "{s}/server.key"

[access]
[[access.principals]]
name = "admin"
token_sha256 = ["${{file:{s}/admin.token.sha256}}"]
allow = ["*"]
"#
        );
    std::fs::write(&path, text).unwrap();
    let fabric = FabricProcess::start(&path, &dir.path().join("fabric.log"));
    let admin = format!("https://{}", fabric.admin);
    let verified = Credentials {
        ca: Some(secrets.join("ca.pem")),
        ..Default::default()
    };
    eventually(Duration::from_secs(60), "admin endpoint up", || async {
        let r = client::call(Call::get(&admin, "/healthz"), &verified).await;
        matches!(r, Ok((200, _))).then_some(())
    })
    .await;
    // Plain HTTP to the TLS port gets no answer.
    let plain = client::call(
        Call::get(&fabric.admin, "/healthz"),
        &Credentials::default(),
    )
    .await;
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    // The token made at init, from its file.
    let with_token = Credentials {
        token: Some(
            std::fs::read_to_string(secrets.join("admin.token"))
                .unwrap()
                .trim()
                .to_string(),
        ),
        ..verified.clone()
    };
    let (code, _) = send(Call::get(&admin, "/status.json"), &verified).await;
    assert_eq!(code, 401);
    let (code, said) = send(Call::get(&admin, "/status.json"), &with_token).await;
    assert_eq!(code, 200, "{said}");
    // The CLI finds TLS in the config file, and the token in its file.
    let config = path.to_str().unwrap();
    let token_file = secrets.join("admin.token");
    let ca = secrets.join("ca.pem");
    let (code, out) = fabric_cli(
        &["reload", "--config", config],
        &[
            ("FABRIC_TOKEN_FILE", token_file.to_str().unwrap()),
            ("FABRIC_CA", ca.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = fabric_cli(
        &["reload", "--config", config],
        &[("FABRIC_TOKEN_FILE", token_file.to_str().unwrap())],
    );
    assert_eq!(code, 1, "no CA, no TLS: {out}");
    assert!(out.contains("--ca"), "{out}");
}

/// Beyond loopback with no `[access]`: refused unless the config says
/// `server.insecure = true`, which every start then logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_fabric_beyond_loopback_is_refused_unless_said() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_config(dir.path(), &DemoSettings::default());
    let text = std::fs::read_to_string(&path).unwrap();
    let port = free_port();
    let exposed = text.replace(
        "admin_addr = \"127.0.0.1:",
        &format!("admin_addr = \"0.0.0.0:{port}\"\n#"),
    );
    std::fs::write(&path, &exposed).unwrap();
    let config = path.to_str().unwrap();
    let (code, out) = fabric_cli(&["check", "--config", config], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("server.admin_addr") && out.contains("no [access] section"),
        "{out}"
    );
    let (code, out) = fabric_cli(&["run", "--config", config], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("server.insecure"), "{out}");

    let insecure = exposed.replacen("[server]\n", "[server]\ninsecure = true\n", 1);
    std::fs::write(&path, &insecure).unwrap();
    let mut fabric = FabricProcess::start(&path, &dir.path().join("fabric.log"));
    fabric.wait_serving(Duration::from_secs(60)).await;
    let log = fabric.log_text();
    assert!(
        log.contains("server.insecure = true: listening beyond loopback"),
        "{log}"
    );
    assert!(fabric.terminate());
}
