//! The `fabric` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use entity_fabric::config::Config;
use entity_fabric::proto;
use entity_fabric::proto::entity_service_client::EntityServiceClient;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fabric",
    version,
    about = "Entity Fabric: one live micro-database per business entity"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the fabric: sources, bus, micro-DBs, snapshots, gRPC and admin HTTP.
    Run {
        /// The config file.
        #[arg(long, short, env = "FABRIC_CONFIG", default_value = "config/demo.toml")]
        config: PathBuf,
        /// Before reading the config, make what is missing in this
        /// directory as `fabric init-secrets` does (a certificate for
        /// localhost, 127.0.0.1 and this host's name): the container
        /// image's first start.
        #[arg(long)]
        init_secrets: Option<PathBuf>,
    },
    /// Validates a config file: prints OK or every problem, exits non-zero on problems.
    Check {
        #[arg(long, short, env = "FABRIC_CONFIG", default_value = "config/demo.toml")]
        config: PathBuf,
    },
    /// Reads one entity over gRPC.
    Get {
        /// Entity type, e.g. `customer`.
        entity_type: String,
        /// Entity id.
        id: String,
        /// A view of the entity type.
        #[arg(long)]
        view: Option<String>,
        /// Print the entity as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints entity changes as they happen, one JSON document per line.
    Watch {
        entity_type: String,
        /// Only this entity.
        id: Option<String>,
        #[arg(long)]
        view: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints where every row of one entity came from: source, table,
    /// position of the change that last wrote it, and when it was applied
    /// (its type must keep lineage).
    Lineage {
        entity_type: String,
        id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forgets one entity (right to erasure): gone from memory, from
    /// snapshots from now on (with snapshot encryption, from older ones
    /// too), tombstoned on the entities topic; its later changes are
    /// dropped unless --allow-rebuild. Needs the permission forget:TYPE.
    Forget {
        entity_type: String,
        id: String,
        /// Let later changes from the sources build the entity again.
        #[arg(long)]
        allow_rebuild: bool,
        /// Why (e.g. a ticket number), for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lets later changes build a forgotten entity again.
    Unblock {
        entity_type: String,
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shows what a config file would change against the running fabric's
    /// config, and what each change costs; applies nothing. Exits 1 when the
    /// file is invalid, 2 when some change needs a restart.
    Plan {
        /// The new config file.
        #[arg(long, short, env = "FABRIC_CONFIG", default_value = "config/demo.toml")]
        config: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Makes the running fabric read its config file again and apply it
    /// while it serves (as SIGHUP does), printing what changed; exits 1 when
    /// it refused (the running config stays).
    Reload {
        /// The config file the fabric runs with (for its admin address).
        #[arg(long, short, env = "FABRIC_CONFIG", default_value = "config/demo.toml")]
        config: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Asks the running fabric to read a table of a source again while the
    /// source streams (postgres_cdc or mysql_binlog; done by itself after a schema
    /// change): every row then has the table's shape now. Progress shows on
    /// the status page and in ListSources.
    Resync {
        /// The source, as named in the config.
        source: String,
        /// The table, as listed in the source's `tables`.
        table: String,
        /// The config file the fabric runs with (for its admin address).
        #[arg(long, short, env = "FABRIC_CONFIG", default_value = "config/demo.toml")]
        config: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Makes what a deployment needs to start secure, once: a private CA,
    /// a server certificate for the given names, and `admin` and `reader`
    /// bearer tokens with their SHA-256 (for `token_sha256 =
    /// ["${file:DIR/admin.token.sha256}"]`). Files that exist are kept.
    InitSecrets {
        /// Where the files go (created 0600 for keys and tokens).
        dir: PathBuf,
        /// DNS names and IP addresses the server certificate carries.
        #[arg(long = "name", default_values = entity_fabric::secrets::LOCAL_NAMES)]
        names: Vec<String>,
    },
    /// Asks a running fabric whether it serves (gRPC health); exits 0 if it does.
    Health {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Measures the fabric against Redis, PostgreSQL, the Kafka broker and
    /// Debezium on this machine and prints the tables (see BENCHMARKS.md).
    Bench(entity_fabric::bench::BenchArgs),
    /// Creates the demo SQLite sources (CRM, billing, support) and keeps changing them.
    Demo {
        /// Where the three databases go.
        #[arg(long, default_value = "data/demo")]
        dir: PathBuf,
        /// Customers to create when the databases do not exist yet.
        #[arg(long, default_value_t = 5000)]
        customers: u32,
        /// Source transactions per second (0: create only).
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
}

/// mimalloc rather than the system allocator: the fabric allocates and frees
/// many small rows and encodings, where glibc's malloc spent a fifth of the
/// CPU of a read benchmark and kept freed memory fragmented (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(entity_fabric::memory::on_thread_park)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run {
            config,
            init_secrets,
        } => {
            if let Some(dir) = init_secrets {
                let mut names: Vec<String> = entity_fabric::secrets::LOCAL_NAMES
                    .map(String::from)
                    .to_vec();
                names.push(gethostname::gethostname().to_string_lossy().into_owned());
                let made = entity_fabric::secrets::init(&dir, &names)?;
                if !made.created.is_empty() {
                    eprintln!(
                        "made {} files of secrets in {} (the tokens: admin.token, reader.token)",
                        made.created.len(),
                        dir.display()
                    );
                }
            }
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let logging = entity_fabric::telemetry::init_logging(&cfg.log)?;
            let shutdown = CancellationToken::new();
            let s = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received");
                s.cancel();
            });
            let result = entity_fabric::app::run(cfg, shutdown).await;
            tokio::task::spawn_blocking(move || logging.shutdown()).await?;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "OK: {} ({} sources, {} entity types, {} partitions)",
                    config.display(),
                    c.sources.len(),
                    c.entities.len(),
                    c.bus.partitions
                );
                match &c.bus.kafka {
                    Some(k) if c.bus.kind == entity_fabric::config::BusKind::Kafka => println!(
                        "  bus: kafka at {} (topics {}, {}, {}, {}, {}, {}; member {})",
                        k.brokers,
                        k.topic("changes"),
                        k.topic("entities"),
                        k.topic("dlq"),
                        k.topic("checkpoints"),
                        k.topic("state"),
                        k.topic("members"),
                        k.instance_id(&c.resolve(&c.snapshot.dir).join(k.topic("changes"))),
                    ),
                    _ => println!("  bus: embedded"),
                }
                for s in &c.sources {
                    if let Some(note) = entity_fabric::sources::limits(s.kind) {
                        println!("  note: source {}: {note}", s.name);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprint!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Get {
            entity_type,
            id,
            view,
            json,
            client: args,
        } => {
            let mut client = EntityServiceClient::new(args.channel().await?);
            let resp = client
                .get_entity(args.request(proto::GetEntityRequest {
                    r#type: entity_type,
                    id,
                    view: view.unwrap_or_default(),
                    ..Default::default()
                })?)
                .await;
            match resp {
                Ok(r) => {
                    let e = r.into_inner();
                    let text = if json {
                        serde_json::to_string_pretty(&entity_json(&e))?
                    } else {
                        render_entity(&e)
                    };
                    // A closed pipe (`| head`) is not an error.
                    let _ = print_line(&text);
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Watch {
            entity_type,
            id,
            view,
            client: args,
        } => {
            let mut client = EntityServiceClient::new(args.channel().await?);
            let mut stream = client
                .watch_entities(args.stream_request(proto::WatchEntitiesRequest {
                    r#type: entity_type,
                    id: id.unwrap_or_default(),
                    from_version: 0,
                    view: view.unwrap_or_default(),
                })?)
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            loop {
                tokio::select! {
                    _ = wait_for_signal() => return Ok(ExitCode::SUCCESS),
                    msg = stream.message() => match msg {
                        Ok(Some(c)) => {
                            let op = proto::entity_change::Operation::try_from(c.operation)
                                .map(|o| o.as_str_name().to_lowercase())
                                .unwrap_or_default();
                            let doc = serde_json::json!({
                                "operation": op,
                                "changed_tables": c.changed_tables,
                                "entity": c.entity.as_ref().map(entity_json),
                            });
                            if !print_line(&doc.to_string()) {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        Ok(None) => return Ok(ExitCode::SUCCESS),
                        Err(s) => {
                            eprintln!("error: {}", s.message());
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                }
            }
        }
        Command::Lineage {
            entity_type,
            id,
            json,
            client: args,
        } => {
            let mut client =
                proto::catalog_service_client::CatalogServiceClient::new(args.channel().await?);
            let resp = client
                .get_lineage(args.request(proto::GetLineageRequest {
                    r#type: entity_type,
                    id,
                })?)
                .await;
            let l = match resp {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    return Ok(ExitCode::FAILURE);
                }
            };
            let micros = |m: i64| {
                chrono::DateTime::from_timestamp_micros(m)
                    .filter(|_| m != 0)
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
                    .unwrap_or_default()
            };
            let key = |r: &proto::RowLineage| {
                r.primary_key
                    .iter()
                    .map(|v| {
                        entity_fabric::view::value_from_proto(v)
                            .map(|v| v.to_string())
                            .unwrap_or_default()
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let text = if json {
                let rows: Vec<serde_json::Value> = l
                    .rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "table": r.table, "primary_key": key(r),
                            "source": r.source, "source_table": r.source_table,
                            "position": r.position, "fetched": r.fetched, "recorded": r.recorded,
                            "committed_at": micros(r.commit_time_micros),
                            "applied_at": micros(r.applied_time_micros),
                        })
                    })
                    .collect();
                serde_json::to_string_pretty(&serde_json::json!({
                    "type": l.r#type, "id": l.id, "version": l.version, "rows": rows,
                }))?
            } else {
                let mut out = format!("{} {} (version {})\n", l.r#type, l.id, l.version);
                for r in &l.rows {
                    let from = if !r.recorded {
                        "(not recorded: written before the type kept lineage)".to_string()
                    } else if r.fetched {
                        format!("fetched at {}", micros(r.commit_time_micros))
                    } else {
                        format!("{} committed {}", r.position, micros(r.commit_time_micros))
                    };
                    out.push_str(&format!(
                        "  {}[{}] <- {}.{} {} applied {}\n",
                        r.table,
                        key(r),
                        r.source,
                        r.source_table,
                        from,
                        micros(r.applied_time_micros)
                    ));
                }
                out
            };
            let _ = print_line(text.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget {
            entity_type,
            id,
            allow_rebuild,
            reason,
            client: args,
        } => {
            let mut client = EntityServiceClient::new(args.channel().await?);
            let resp = client
                .forget_entity(args.request(proto::ForgetEntityRequest {
                    r#type: entity_type.clone(),
                    id: id.clone(),
                    allow_rebuild,
                    reason,
                })?)
                .await;
            match resp {
                Ok(r) => {
                    let r = r.into_inner();
                    println!(
                        "forgotten: {entity_type} {id} ({}; {}; {}{})",
                        if r.was_held {
                            "was held, now removed"
                        } else {
                            "was not held"
                        },
                        if r.blocked {
                            "later changes are dropped until `fabric unblock`"
                        } else {
                            "later changes build it again"
                        },
                        if r.snapshot_written {
                            "snapshot written without it"
                        } else {
                            "left out of the next snapshot"
                        },
                        if r.key_deleted {
                            "; its snapshot key is deleted"
                        } else {
                            ""
                        },
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Unblock {
            entity_type,
            id,
            reason,
            client: args,
        } => {
            let mut client = EntityServiceClient::new(args.channel().await?);
            let resp = client
                .unblock_entity(args.request(proto::UnblockEntityRequest {
                    r#type: entity_type.clone(),
                    id: id.clone(),
                    reason,
                })?)
                .await;
            match resp {
                Ok(r) => {
                    println!(
                        "unblocked: {entity_type} {id}{}",
                        if r.into_inner().was_blocked {
                            ""
                        } else {
                            " (it was not blocked)"
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(s) => {
                    eprintln!("error: {}", s.message());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Plan { config, admin } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let file = std::path::absolute(&config).unwrap_or(config.clone());
            let path = format!(
                "/config/plan?file={}",
                percent_encoding::utf8_percent_encode(
                    &file.display().to_string(),
                    percent_encoding::NON_ALPHANUMERIC
                )
            );
            let (status, body) = admin
                .post(&config, &path, "application/toml", &text)
                .await?;
            print!("{}", with_newline(&body));
            Ok(match status {
                200 if body.contains("[restart]") => ExitCode::from(2),
                200 => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            })
        }
        Command::Reload { config, admin } => {
            let (status, body) = admin
                .post(&config, "/config/reload", "application/json", "{}")
                .await?;
            print!("{}", with_newline(&body));
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Resync {
            source,
            table,
            config,
            admin,
        } => {
            let enc = |s: &str| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            };
            let path = format!(
                "/sources/resync?source={}&table={}",
                enc(&source),
                enc(&table)
            );
            let (status, body) = admin.post(&config, &path, "application/json", "{}").await?;
            print!("{}", with_newline(&body));
            Ok(if status == 202 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::InitSecrets { dir, names } => {
            let made = entity_fabric::secrets::init(&dir, &names)?;
            for p in &made.created {
                println!("created {}", p.display());
            }
            if !made.kept.is_empty() {
                println!(
                    "kept {} existing files in {}",
                    made.kept.len(),
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { client } => {
            use tonic_health::pb::health_check_response::ServingStatus;
            let channel = client.channel().await?;
            let status = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("health check failed: {}", s.message()))?
                .into_inner()
                .status;
            let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
            println!("{}", status.as_str_name());
            Ok(if status == ServingStatus::Serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bench(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        // sqlx warns of the slow statements that build the data sets.
                        .unwrap_or_else(|_| "warn,sqlx=error".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let report = entity_fabric::bench::run(args).await?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            dir,
            customers,
            rate,
        } => {
            entity_fabric::telemetry::init_logging(&Default::default())?;
            if entity_fabric::demo::ensure(&dir, customers).await? {
                println!(
                    "created demo databases in {} ({customers} customers)",
                    dir.display()
                );
            } else {
                println!("demo databases already in {}", dir.display());
            }
            if rate > 0.0 {
                println!("committing {rate} transactions per second; Ctrl-C stops");
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    s.cancel();
                });
                let n = entity_fabric::demo::mutate(&dir, rate, stop).await?;
                println!("{n} transactions committed");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How the CLI's gRPC commands reach the fabric.
#[derive(clap::Args)]
struct ClientArgs {
    /// The fabric's gRPC address (`https://…` when it serves TLS).
    #[arg(long, env = "FABRIC_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[command(flatten)]
    creds: CredentialArgs,
    /// How long a call may take (its gRPC deadline), e.g. `30s`: a call
    /// for an entity whose partition is moving between processes waits for
    /// it within this time. Streams (`watch`) have none.
    #[arg(long, env = "FABRIC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// Who the CLI is to the fabric, and how it checks the fabric's
/// certificate: shared by the gRPC and the admin commands.
#[derive(clap::Args)]
struct CredentialArgs {
    /// A bearer token (`[access]`); prefer the environment variable or
    /// --token-file to the command line, which other users of the machine
    /// can see.
    #[arg(long, env = "FABRIC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token (e.g. one `fabric init-secrets` made).
    #[arg(long, env = "FABRIC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificate the server's certificate is verified against (TLS).
    #[arg(long, env = "FABRIC_CA")]
    ca: Option<PathBuf>,
    /// PEM client certificate (mutual TLS), with --key.
    #[arg(long, env = "FABRIC_CERT")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "FABRIC_KEY")]
    key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the
    /// address's host).
    #[arg(long, env = "FABRIC_TLS_NAME")]
    tls_name: Option<String>,
}

impl CredentialArgs {
    /// The bearer token, from --token or --token-file.
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            None => Ok(None),
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the token file {}", p.display()))?;
                Ok(Some(t.trim().to_string()))
            }
        }
    }

    fn credentials(&self) -> anyhow::Result<entity_fabric::admin::client::Credentials> {
        Ok(entity_fabric::admin::client::Credentials {
            token: self.token()?,
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            tls_name: self.tls_name.clone(),
        })
    }
}

impl ClientArgs {
    async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut endpoint = tonic::transport::Channel::from_shared(self.addr.clone())
            .with_context(|| format!("{:?} is not a gRPC address", self.addr))?;
        if self.addr.starts_with("https://") {
            let c = &self.creds;
            let ca = c.ca.as_ref().context(
                "--ca (FABRIC_CA) is needed to verify the server's certificate over https",
            )?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            match (&c.cert, &c.key) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => anyhow::bail!("--cert and --key (FABRIC_CERT, FABRIC_KEY) go together"),
            }
            if let Some(n) = &c.tls_name {
                tls = tls.domain_name(n);
            }
            endpoint = endpoint.tls_config(tls)?;
        } else if self.creds.ca.is_some() || self.creds.cert.is_some() {
            anyhow::bail!("TLS files given for {}: use an https:// address", self.addr);
        }
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the fabric at {}", self.addr))
    }

    /// `msg` with the token, if any.
    /// A unary call's request: credentials and the deadline.
    fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = self.stream_request(msg)?;
        r.set_timeout(self.timeout);
        Ok(r)
    }

    /// A stream's request: credentials, no deadline.
    fn stream_request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.creds.token()? {
            let value = format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
            r.metadata_mut().insert("authorization", value);
        }
        Ok(r)
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn value_json(v: &proto::Value) -> serde_json::Value {
    entity_fabric::view::value_from_proto(v)
        .map(|v| v.to_json())
        .unwrap_or(serde_json::Value::Null)
}

fn entity_json(e: &proto::Entity) -> serde_json::Value {
    let tables: serde_json::Map<String, serde_json::Value> = e
        .tables
        .iter()
        .map(|t| {
            let rows: Vec<serde_json::Value> = t
                .rows
                .iter()
                .map(|r| {
                    let mut cols: Vec<(&String, &proto::Value)> = r.columns.iter().collect();
                    cols.sort_by(|a, b| a.0.cmp(b.0));
                    serde_json::Value::Object(
                        cols.into_iter()
                            .map(|(k, v)| (k.clone(), value_json(v)))
                            .collect(),
                    )
                })
                .collect();
            (t.name.clone(), serde_json::Value::Array(rows))
        })
        .collect();
    serde_json::json!({
        "type": e.r#type,
        "id": e.id,
        "version": e.version,
        "view": e.view,
        "updated_at": entity_fabric::event::value::format_timestamp(e.updated_at_micros),
        "positions": e.positions.iter().map(|p| (p.source.clone(), serde_json::Value::String(p.position.clone()))).collect::<serde_json::Map<_,_>>(),
        "tables": tables,
    })
}

/// Writes one line to stdout; false once stdout is closed (e.g. `| head`).
fn print_line(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|_| out.flush()).is_ok()
}

fn render_entity(e: &proto::Entity) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} {}  version {}", e.r#type, e.id, e.version);
    let positions: Vec<String> = e
        .positions
        .iter()
        .map(|p| format!("{}@{}", p.source, p.position))
        .collect();
    let _ = writeln!(s, "  sources: {}", positions.join(", "));
    for t in &e.tables {
        let n = t.rows.len();
        let _ = writeln!(s, "  {} ({n} row{})", t.name, if n == 1 { "" } else { "s" });
        for r in &t.rows {
            let mut cols: Vec<(&String, &proto::Value)> = r.columns.iter().collect();
            cols.sort_by(|a, b| a.0.cmp(b.0));
            let text: Vec<String> = cols
                .into_iter()
                .map(|(k, v)| format!("{k}={}", compact(&value_json(v))))
                .collect();
            let _ = writeln!(s, "    {}", text.join("  "));
        }
    }
    s.truncate(s.trim_end().len());
    s
}

fn compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// How to reach a running fabric's admin HTTP endpoint.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin address, `host:port` or `https://host:port` (default: the
    /// config file's `server.admin_addr`, over TLS when the file has
    /// `[server.tls]`).
    #[arg(long)]
    admin: Option<String>,
    /// How long to wait for the answer, e.g. `"30s"`.
    #[arg(long, default_value = "120s")]
    timeout: humantime::Duration,
    #[command(flatten)]
    creds: CredentialArgs,
}

impl AdminArgs {
    /// POSTs `body` to `path`; the status code and the answer's body.
    async fn post(
        &self,
        config: &std::path::Path,
        path: &str,
        content_type: &'static str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        use entity_fabric::admin::client;
        let (addr, tls) = client::target(config, self.admin.as_deref());
        let call = client::Call {
            tls,
            ..client::Call::post(&addr, path, content_type, body.to_string())
        };
        let creds = self.creds.credentials()?;
        tokio::time::timeout(*self.timeout, client::call(call, &creds))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {addr} within {}", self.timeout))?
    }
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}
