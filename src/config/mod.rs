//! The operator's config file (TOML).
//!
//! Loading is three steps, none of which does I/O beyond reading the file:
//! parse the TOML, expand `${ENV}` references in strings, deserialize while
//! collecting every unknown field, then [`validate`] the whole thing. Every
//! problem found is reported at once, each with the file, the field path and
//! the reason. Connectivity (can the database be opened?) is checked later,
//! by the sources themselves.
//!
//! Defaults live in the `default_*` functions of this module and nowhere else.

pub mod plan;
mod validate;
pub use validate::can_fetch;

pub use validate::{ConfigError, ConfigErrors, Expanded};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// Network endpoints.
    #[serde(default)]
    pub server: ServerConfig,
    /// The log between sources and micro-DBs.
    #[serde(default)]
    pub bus: BusConfig,
    /// Durable snapshots of the micro-DBs.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// How change events find their entity.
    #[serde(default)]
    pub router: RouterConfig,
    /// Where undecodable or unroutable input goes.
    #[serde(default)]
    pub dlq: DlqConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The key of the `hash` mask.
    #[serde(default)]
    pub masking: MaskingConfig,
    /// Who may call what over gRPC (absent: everyone, everything).
    pub access: Option<AccessConfig>,
    /// When present, `fabric run` creates the demo SQLite sources if missing
    /// and keeps mutating them.
    #[serde(default)]
    pub demo: Option<DemoConfig>,
    /// The systems the fabric reads.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// The business entities the fabric assembles.
    #[serde(default)]
    pub entities: Vec<EntityConfig>,
    /// The file this config was read from (not a TOML field).
    #[serde(skip)]
    pub file: PathBuf,
    /// The strings that held `${...}` references and the values they took
    /// (not a TOML field): what a config posted to the admin endpoint may
    /// reuse and what no answer shows ([`Config::from_posted_toml`]).
    #[serde(skip)]
    pub expanded: std::sync::Arc<Expanded>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ServerConfig {
    /// Address of the gRPC façade.
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: String,
    /// The address other processes of the fabric reach this one's gRPC at
    /// (Kafka mode, several processes: reads are forwarded there). Default:
    /// `grpc_addr`, with the host name in place of an unspecified IP
    /// (`0.0.0.0`, `::`).
    pub advertise_addr: Option<String>,
    /// Address of the admin HTTP endpoint (`/healthz`, `/metrics`).
    #[serde(default = "default_admin_addr")]
    pub admin_addr: String,
    /// How long a graceful stop may take to drain the pipeline and write the
    /// final snapshot before the process stops without it, e.g. `"30s"`.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: String,
    /// How many entity changes a slow `WatchEntities` client may fall behind
    /// before it is told it lagged.
    #[serde(default = "default_watch_buffer")]
    pub watch_buffer: usize,
    /// Keep each entity version's encoding per view after its first read, so
    /// repeated reads of an unchanged entity send bytes without encoding
    /// them again. Costs memory about the size of the entities read.
    #[serde(default = "default_true")]
    pub cache_encoded: bool,
    /// How long a read with `min_positions` waits for them to be applied
    /// when the call carries no deadline of its own, e.g. `"10s"`.
    #[serde(default = "default_min_position_wait")]
    pub min_position_wait: String,
    /// Connections each source keeps open at most for reading entities
    /// straight from it (staleness bounds, `sync = "on_access"`).
    #[serde(default = "default_fetch_connections")]
    pub fetch_connections: usize,
    /// The largest request message the gRPC server decodes, in bytes;
    /// larger ones are refused with OUT_OF_RANGE before they are read into
    /// memory.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// The largest response message the gRPC server sends, in bytes (a
    /// bigger answer is OUT_OF_RANGE: ask for fewer ids or a page).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// HTTP/2 streams (calls in flight, open watches included) one client
    /// connection may have open at once; further calls wait on the client
    /// side until one ends.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// `WatchEntities` streams open at once over all connections; one more
    /// is refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: usize,
    /// TLS for the gRPC façade (absent: plaintext).
    pub tls: Option<TlsConfig>,
    /// Whether the admin endpoint serves TLS too, with `[server.tls]`'s
    /// certificate (a client certificate is verified when presented, never
    /// required: probes and Prometheus present none). Default: when
    /// `[server.tls]` is set.
    pub admin_tls: Option<bool>,
    /// Host names the admin endpoint answers to besides IP addresses and
    /// `localhost` (e.g. `"fabric.internal"`): a request naming another
    /// host in its `Host` header is refused, so a web page cannot reach the
    /// endpoint through a name it controls (DNS rebinding).
    #[serde(default)]
    pub admin_hosts: Vec<String>,
    /// The largest request body the admin endpoint reads, in bytes (a
    /// config posted to `/config/plan`); larger ones are refused (413).
    #[serde(default = "default_admin_max_body_bytes")]
    pub admin_max_body_bytes: usize,
    /// How long one admin request may take before it is answered 503 (a
    /// reload goes on and is logged), e.g. `"60s"`.
    #[serde(default = "default_admin_request_timeout")]
    pub admin_request_timeout: String,
    /// Connections the admin endpoint keeps open at once; further ones wait
    /// to be accepted.
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// Listen beyond loopback with no `[access]` section. Without it such
    /// a config is refused: every client could read every entity and
    /// reload the config. With it, every start logs a warning.
    #[serde(default)]
    pub insecure: bool,
}

/// `[server.tls]`: the server's certificate and, for mutual TLS, the CA
/// its clients' certificates are signed by.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA certificate(s) client certificates must be signed by (mutual
    /// TLS). Absent: clients present no certificate.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `"required"` (every connection presents a
    /// certificate) or `"optional"` (clients may use bearer tokens instead).
    #[serde(default)]
    pub client_cert: ClientCertMode,
    /// Kafka mode, several processes: the CA that signs the other
    /// processes' server certificates, trusted when this one forwards a
    /// read to them (it presents its own certificate). Default:
    /// `client_ca_file`, else `cert_file` (a self-signed certificate).
    pub peer_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    #[default]
    Required,
    Optional,
}

/// `[access]`: who may call what. Absent: every client may call
/// everything (fine on loopback, not on a network).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AccessConfig {
    /// What a call without credentials may do (default: nothing, it is
    /// UNAUTHENTICATED).
    #[serde(default)]
    pub anonymous: Vec<String>,
    /// The known clients.
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
}

/// One client of the fabric and what it may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PrincipalConfig {
    /// Its name in audit log lines.
    pub name: String,
    /// SHA-256 (hex) of each bearer token it presents (`authorization:
    /// Bearer <token>`): the config holds no secret.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// Client certificate names (subject CN or DNS subject alternative
    /// name) that are this principal (mutual TLS).
    #[serde(default)]
    pub cert_names: Vec<String>,
    /// Permissions: `read:TYPE` (the whole entity and every view),
    /// `read:TYPE.VIEW`, `read:TYPE.*` (every view, not the whole entity),
    /// `read:*`, `push:SOURCE`, `push:*`, `catalog`, `*`.
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    Embedded,
    Kafka,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BusConfig {
    /// `embedded` (in-process log) or `kafka`.
    #[serde(default = "default_bus_kind")]
    pub kind: BusKind,
    /// Number of partitions: the unit of ordering, of apply parallelism and
    /// of snapshot files. Changing it re-shards entities (snapshots are
    /// re-read and re-partitioned at start).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Embedded bus settings.
    #[serde(default)]
    pub embedded: EmbeddedBusConfig,
    /// Kafka settings; required when `kind = "kafka"`.
    pub kafka: Option<KafkaConfig>,
}

/// The entities topic's value encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntitiesFormat {
    /// A JSON document (see docs/kafka.md).
    Json,
    /// A `fabric.v1.Entity` protobuf message.
    Protobuf,
}

/// `[bus.kafka]`: the broker, the topics and the client settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topics are `<prefix>.changes`, `<prefix>.entities`, `<prefix>.dlq`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// The consumer group the snapshot offsets are committed to, for lag
    /// monitoring tools (default: the prefix).
    pub group_id: Option<String>,
    /// How long the other processes wait for one that stopped writing its
    /// heartbeats to `<prefix>.members` before its partitions and sources
    /// move to them.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: String,
    /// This process's member id on `<prefix>.members`: a process that
    /// restarts with the same id gets its partitions and sources back at
    /// once, and with them its local snapshots. Each process needs its own.
    /// Default: `<hostname>-<hash of the snapshot directory>`, stable across
    /// restarts and different for processes that do not share a snapshot
    /// directory (which they never may).
    pub instance_id: Option<String>,

    /// Replication factor of topics the fabric creates.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// Publish every entity change on `<prefix>.entities`.
    #[serde(default = "default_true")]
    pub entities_topic: bool,
    /// `json` (default) or `protobuf`.
    #[serde(default = "default_entities_format")]
    pub entities_format: EntitiesFormat,
    /// Create the entities topic compacted (`cleanup.policy=compact`): the
    /// broker then keeps at least the newest message of every entity, and
    /// drops older versions over time. `false` creates it with the broker's
    /// default (time-based retention) so every version stays readable for
    /// the retention period. Applies only when the fabric creates the topic.
    #[serde(default = "default_true")]
    pub entities_compacted: bool,
    /// Keep every micro-DB on `<prefix>.state` (compacted) as it changes,
    /// so a process given a partition restores it from there rather than
    /// replaying the changes topic from its start.
    #[serde(default = "default_true")]
    pub state_topic: bool,
    /// Send dead letters to `<prefix>.dlq` as well as to the DLQ file.
    #[serde(default = "default_true")]
    pub dlq_topic: bool,
    /// librdkafka properties handed on as they are (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, …), for every client the fabric makes.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.topic_prefix)
    }

    pub fn group_id(&self) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| self.topic_prefix.clone())
    }

    pub fn session_timeout(&self) -> Duration {
        humantime::parse_duration(&self.session_timeout).expect("validated")
    }

    /// [`KafkaConfig::instance_id`], or its default for `snapshot_dir`.
    pub fn instance_id(&self, snapshot_dir: &std::path::Path) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        let dir = std::path::absolute(snapshot_dir).unwrap_or_else(|_| snapshot_dir.into());
        // FNV-1a: stable across builds, unlike the standard library's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in dir.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!(
            "{}-{:08x}",
            gethostname::gethostname().to_string_lossy(),
            h as u32
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EmbeddedBusConfig {
    /// Records a partition may hold unapplied before producers wait
    /// (backpressure towards the sources).
    #[serde(default = "default_max_buffered")]
    pub max_buffered: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SnapshotConfig {
    /// Directory of snapshot files.
    #[serde(default = "default_snapshot_dir")]
    pub dir: PathBuf,
    /// Time between snapshots, e.g. `"30s"`.
    #[serde(default = "default_snapshot_interval")]
    pub interval: String,
    /// Snapshot rounds kept on disk (at least 2, so a corrupt newest file has
    /// a predecessor to fall back to).
    #[serde(default = "default_snapshot_keep")]
    pub keep: usize,
    /// Seal every entity in snapshot files under a key of its own
    /// (AES-256-GCM): forgetting an entity deletes its key, so snapshot files
    /// written before, and their copies, cannot be read for it any more.
    /// Absent: snapshot files are not encrypted.
    pub encryption: Option<SnapshotEncryption>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SnapshotEncryption {
    /// The name of an environment variable holding the master key (at
    /// least 16 bytes), which seals the per-entity keys. Wins over `key_file`.
    pub key_env: Option<String>,
    /// A file holding the master key (at least 16 bytes; must exist).
    /// Default, when neither is set: `master.key` in `keys_dir`, created
    /// with 32 random bytes (mode 0600) on first start.
    pub key_file: Option<PathBuf>,
    /// Directory of the per-entity keys (default: `keys` beside the
    /// snapshot directory; on Kafka, in a directory per changes topic, as
    /// snapshots are). Back it up apart from the snapshot files, and never
    /// keep a backup of it longer than erasure allows: a copy of a deleted
    /// key reopens the old snapshots it sealed.
    pub keys_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RouterConfig {
    /// Change events whose `id_via` link is not known yet may wait, at most
    /// this many per source at once; beyond it the source's oldest goes to
    /// the dead-letter output.
    #[serde(default = "default_pending_max")]
    pub pending_max: usize,
    /// As `pending_max`, in bytes of row images per source.
    #[serde(default = "default_pending_max_bytes")]
    pub pending_max_bytes: usize,
    /// How long such an event may wait for its link, e.g. `"30s"`.
    #[serde(default = "default_pending_timeout")]
    pub pending_timeout: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DlqConfig {
    /// In embedded mode, dead letters are appended to this JSON-lines file.
    #[serde(default = "default_dlq_file")]
    pub file: PathBuf,
    /// How many recent dead letters the status APIs keep in memory.
    #[serde(default = "default_dlq_keep_last")]
    pub keep_last: usize,
    /// The file is moved to `<file>.1` once it would grow past this size.
    #[serde(default = "default_dlq_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Rotated files kept (`<file>.1` the newest); older ones are deleted.
    #[serde(default = "default_dlq_keep_files")]
    pub keep_files: usize,
}

fn default_dlq_max_file_bytes() -> u64 {
    64 << 20
}

fn default_dlq_keep_files() -> usize {
    4
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A `tracing` filter, e.g. `"info,entity_fabric=debug"`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Export spans (gRPC calls, snapshot rounds, forgets, source and
    /// applier tasks) to an OpenTelemetry collector over OTLP/gRPC. Absent:
    /// nothing is exported and no span is made per call.
    pub otlp: Option<OtlpConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC address, e.g. `"http://127.0.0.1:4317"`.
    pub endpoint: String,
    /// The `service.name` the spans carry.
    #[serde(default = "default_otlp_service")]
    pub service_name: String,
    /// The share of traces kept, 0 to 1 (a trace begun by a caller that
    /// sampled it is kept whatever this says).
    #[serde(default = "default_otlp_ratio")]
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DemoConfig {
    /// Directory of the three demo SQLite databases.
    #[serde(default = "default_demo_dir")]
    pub dir: PathBuf,
    /// Customers created in a new demo.
    #[serde(default = "default_demo_customers")]
    pub customers: u32,
    /// Source transactions per second the demo mutator commits (0: none).
    #[serde(default = "default_demo_rate")]
    pub mutations_per_second: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Sqlite,
    Jsonl,
    GrpcPush,
    PostgresCdc,
    MysqlBinlog,
    SqlPoll,
    DebeziumKafka,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Sqlite => "sqlite",
            SourceKind::Jsonl => "jsonl",
            SourceKind::GrpcPush => "grpc_push",
            SourceKind::PostgresCdc => "postgres_cdc",
            SourceKind::MysqlBinlog => "mysql_binlog",
            SourceKind::SqlPoll => "sql_poll",
            SourceKind::DebeziumKafka => "debezium_kafka",
        }
    }
}

/// One source. Fields that do not apply to its `kind` are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SourceConfig {
    /// Unique name; entity tables refer to it.
    pub name: String,
    /// The connector.
    pub kind: SourceKind,
    /// `sqlite`, `jsonl`: the file.
    pub path: Option<PathBuf>,
    /// Connection URL (database connectors).
    pub url: Option<String>,
    /// `sqlite`: the tables to capture (`customers` or `main.customers`).
    #[serde(default)]
    pub tables: Vec<String>,
    /// How often to look for new changes, e.g. `"100ms"`.
    pub poll_interval: Option<String>,
    /// `sqlite`: most changelog rows read per poll.
    pub batch_size: Option<usize>,
    /// On first start, read the tables' existing rows (default true).
    pub initial_snapshot: Option<bool>,
    /// `postgres_cdc`: the replication slot (default `fabric_<name>`).
    pub slot: Option<String>,
    /// `postgres_cdc`: the publication (default `fabric_<name>`).
    pub publication: Option<String>,
    /// `postgres_cdc`: create the publication and slot when missing (default true).
    pub create_slot: Option<bool>,
    /// `postgres_cdc`: what to do with a column whose type has no mapping:
    /// `"error"` (default: refuse at start, naming it) or `"text"` (carry its text).
    pub unmapped_types: Option<String>,
    /// `mysql_binlog`: the replica server id this source uses (unique per
    /// server; default derived from the source name).
    pub server_id: Option<u32>,
    /// `sql_poll`: the column that grows with every insert and update
    /// (an integer or a timestamp).
    pub cursor_column: Option<String>,
    /// `sql_poll`: a column whose non-null or true value marks a deleted row.
    pub soft_delete_column: Option<String>,
    /// `debezium_kafka`: the Debezium topics to read.
    #[serde(default)]
    pub topics: Vec<String>,
    /// `debezium_kafka`: bootstrap servers (default: `bus.kafka.brokers`).
    pub brokers: Option<String>,
    /// `debezium_kafka`: the consumer group that commits the acknowledged
    /// offsets (default `<prefix>.source.<name>`).
    pub group_id: Option<String>,
    /// `sql_poll`: how far back each poll re-reads to catch rows committed
    /// out of order (cursor units: a count for integers, e.g. `"5s"` for
    /// timestamps).
    pub safety_window: Option<String>,
    /// The wait before a failed source's first restart (default `"200ms"`);
    /// it doubles while the source keeps failing, up to `reconnect_max`,
    /// and starts over once a run streamed.
    pub reconnect_first: Option<String>,
    /// The longest wait between restarts of a failing source (default `"30s"`).
    pub reconnect_max: Option<String>,
}

impl SourceConfig {
    /// The restart schedule of a failing source: the first wait and the
    /// longest (see `reconnect_first`, `reconnect_max`).
    pub fn reconnect(&self) -> (Duration, Duration) {
        let d = |s: &Option<String>, default: Duration| {
            s.as_deref()
                .and_then(|s| humantime::parse_duration(s).ok())
                .unwrap_or(default)
        };
        (
            d(&self.reconnect_first, Duration::from_millis(200)),
            d(&self.reconnect_max, Duration::from_secs(30)),
        )
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_millis(default_poll_interval_ms()))
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size.unwrap_or(default_batch_size())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdType {
    Int,
    String,
    Uuid,
}

impl IdType {
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::Int => "int",
            IdType::String => "string",
            IdType::Uuid => "uuid",
        }
    }

    /// Parses a client-supplied id into its canonical text form.
    pub fn canonical(self, id: &str) -> Option<String> {
        match self {
            IdType::Int => id.trim().parse::<i64>().ok().map(|i| i.to_string()),
            IdType::String => (!id.is_empty()).then(|| id.to_string()),
            IdType::Uuid => uuid::Uuid::parse_str(id.trim())
                .ok()
                .map(|u| u.hyphenated().to_string()),
        }
    }
}

/// One entity type.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EntityConfig {
    /// Unique name, e.g. `customer`.
    pub name: String,
    /// The type of the entity id.
    #[serde(default = "default_id_type")]
    pub id_type: IdType,
    /// Free text for the catalog.
    pub description: Option<String>,
    /// Who answers for this entity type (a team, a person, an address):
    /// shown by the catalog and the status page.
    pub owner: Option<String>,
    /// Keep, for every row, the position of the change that last wrote it
    /// and when it was applied (the catalog's `GetLineage`). Costs memory
    /// per row; kept in snapshots.
    #[serde(default)]
    pub lineage: bool,
    /// The table whose row is the entity itself (default: the first table).
    pub root_table: Option<String>,
    /// Deleting the root row deletes the whole entity (default true).
    #[serde(default = "default_true")]
    pub delete_with_root: bool,
    /// How long a deleted entity is kept, hidden (default `"24h"`): its
    /// version, so that created again it goes on from there, and (root
    /// row deleted) its other rows, so that a root row inserted again
    /// brings back the whole entity. After it, it is dropped from memory.
    pub keep_deleted: Option<String>,
    /// The micro-DB tables.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Named projections readers ask for.
    #[serde(default)]
    pub views: BTreeMap<String, ViewConfig>,
    /// The view published on the entities topic (default: the whole entity).
    pub publish_view: Option<String>,
    /// Earlier versions of each entity kept in memory besides the current
    /// one, for reads of a given version and watches that resume from one.
    /// 0 keeps none.
    #[serde(default = "default_history")]
    pub history: usize,
    /// How the type's entities are kept: `cdc` (default: current at all
    /// times, from the sources' change capture) or `on_access` (read from the
    /// sources when first asked for, refreshed when older than `max_age`).
    #[serde(default)]
    pub sync: SyncMode,
    /// `on_access`: a read of an entity fetched longer ago than this fetches
    /// it again first, e.g. `"60s"`.
    pub max_age: Option<String>,
    /// `on_access`: an entity not read for this long is dropped from memory,
    /// e.g. `"10m"`.
    pub evict_after: Option<String>,
    /// `on_access`: at most this many entities of the type are held; beyond,
    /// the least recently read are dropped.
    pub max_entities: Option<usize>,
    /// `on_access`: at most about this many bytes of rows of the type are
    /// held; beyond, the least recently read are dropped.
    pub max_bytes: Option<u64>,
}

/// How an entity type's entities are kept current.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    #[default]
    Cdc,
    OnAccess,
}

impl EntityConfig {
    pub fn on_access(&self) -> bool {
        self.sync == SyncMode::OnAccess
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(60))
    }

    /// See [`EntityConfig::keep_deleted`].
    pub fn keep_deleted(&self) -> Duration {
        self.keep_deleted
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(24 * 3600))
    }

    /// How the store retires this type's deleted entities.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            root: self
                .delete_with_root
                .then(|| std::sync::Arc::from(self.root_table())),
            keep: self.keep_deleted(),
        }
    }

    pub fn evict_after(&self) -> Duration {
        self.evict_after
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(600))
    }

    pub fn max_entities(&self) -> usize {
        self.max_entities.unwrap_or(100_000)
    }

    pub fn root_table(&self) -> &str {
        self.root_table
            .as_deref()
            .or_else(|| self.tables.first().map(|t| t.name.as_str()))
            .unwrap_or("")
    }

    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// One micro-DB table of an entity type, filled from one source table.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TableConfig {
    /// The table's name inside the micro-DB.
    pub name: String,
    /// The source it is read from.
    pub source: String,
    /// The source table (`customers`, `public.customers`).
    pub from: String,
    /// The column holding the entity id.
    pub id_column: Option<String>,
    /// Or: a one-hop link through another table of this entity type.
    pub id_via: Option<IdVia>,
    /// The columns that identify a row.
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// The query that reads one entity's rows of this table straight from
    /// the source (staleness bounds, `sync = "on_access"`): it returns the
    /// table's columns and has one placeholder, the entity id as text (`$1`
    /// on PostgreSQL, `?` on MySQL/MariaDB and SQLite). Default: derived
    /// from `id_column` or `id_via`.
    pub fetch: Option<String>,
}

/// `payments.invoice_id -> invoices.<pk> -> invoices.<id_column>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IdVia {
    /// A table of the same entity type that has an `id_column` and a
    /// single-column primary key.
    pub table: String,
    /// The column of this table that holds the linked table's primary key.
    pub column: String,
}

/// How a view shows a masked column (`"hash"`, `"redact"`, `"null"`,
/// `"keep_last:N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Mask {
    /// HMAC-SHA256 of the text under the fabric's masking key, hex:
    /// joinable (the same value hashes alike everywhere under one key),
    /// not readable, and not reversible by hashing a dictionary without
    /// the key.
    Hash,
    /// The text `"***"`.
    Redact,
    /// Null.
    Null,
    /// `"***"` followed by the text's last N characters (all `"***"` when
    /// the text has N characters or fewer), e.g. a card's last 4 digits.
    KeepLast(u8),
}

impl From<Mask> for String {
    fn from(m: Mask) -> String {
        match m {
            Mask::Hash => "hash".into(),
            Mask::Redact => "redact".into(),
            Mask::Null => "null".into(),
            Mask::KeepLast(n) => format!("keep_last:{n}"),
        }
    }
}

/// The most characters `keep_last:N` may keep.
pub const MAX_KEEP_LAST: u8 = 32;

impl TryFrom<String> for Mask {
    type Error = String;
    fn try_from(s: String) -> Result<Mask, String> {
        match s.as_str() {
            "hash" => Ok(Mask::Hash),
            "redact" => Ok(Mask::Redact),
            "null" => Ok(Mask::Null),
            other => {
                let n = other
                    .strip_prefix("keep_last:")
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|n| (1..=MAX_KEEP_LAST).contains(n));
                n.map(Mask::KeepLast).ok_or_else(|| {
                    format!(
                        "unknown mask {other:?}: \"hash\", \"redact\", \"null\" or \"keep_last:N\" \
                         (N from 1 to {MAX_KEEP_LAST})"
                    )
                })
            }
        }
    }
}

/// `[masking]`: the key of the `hash` mask. The key never appears in logs,
/// in `fabric check` or in any answer.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct MaskingConfig {
    /// The name of an environment variable holding the key (at least 16
    /// bytes). Wins over `key_file`.
    pub key_env: Option<String>,
    /// A file holding the key (at least 16 bytes; must exist). Default,
    /// when neither is set: `mask.key` in the snapshot directory, created
    /// with 32 random bytes (mode 0600) on first start. Several processes
    /// on Kafka must share one key, so there one of the two must be set.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ViewConfig {
    /// The tables the view shows.
    #[serde(default)]
    pub tables: Vec<String>,
    /// `table.column` to keep; empty keeps every column of the view's tables.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `table.column` to a mask.
    #[serde(default)]
    pub mask: BTreeMap<String, Mask>,
}

/// The key in `path`, or a new random one written there (mode 0600).
pub(crate) fn read_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(k) => return Ok(k),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(&key)?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "key created");
            Ok(key)
        }
        // Another process made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(std::fs::read(path)?),
        Err(e) => Err(e.into()),
    }
}

/// The largest key or certificate file a config may name.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Why [`read_at_most`] read nothing.
#[derive(Debug)]
pub(crate) enum ReadAtMost {
    Io(std::io::Error),
    /// The file holds more than the bound.
    Larger,
}

/// The bytes of the file at `path` if it holds at most `max` bytes; never
/// reads more than `max + 1` (a path naming `/dev/zero` is an error, not
/// a read that never ends).
pub(crate) fn read_at_most(path: &Path, max: u64) -> Result<Vec<u8>, ReadAtMost> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut out))
        .map_err(ReadAtMost::Io)?;
    if out.len() as u64 > max {
        return Err(ReadAtMost::Larger);
    }
    Ok(out)
}

impl Config {
    /// Reads, expands, deserializes and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one(path, "", format!("cannot read the file: {e}")))?;
        Self::from_toml(path, &text)
    }

    /// As [`Config::load`], from text (`path` names it in errors).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        validate::load(path, text, validate::Env::Process)
    }

    /// As [`Config::from_toml`], for text someone else sent (the admin
    /// endpoint's `POST /config/plan`): its `${...}` references never read
    /// this process's environment or files. A string written exactly as
    /// `running`'s file had it at the same field takes the value the
    /// running config got; any other stays as written. Pass what is
    /// answered through `running.expanded.hide` (see [`Expanded::hide`]).
    pub fn from_posted_toml(
        path: &Path,
        text: &str,
        running: &Config,
    ) -> Result<Config, ConfigErrors> {
        validate::load(path, text, validate::Env::Posted(&running.expanded))
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.grpc_addr.parse().expect("validated")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr.parse().expect("validated")
    }

    /// Whether the admin endpoint serves TLS ([`ServerConfig::admin_tls`]).
    pub fn admin_tls(&self) -> bool {
        self.server.admin_tls.unwrap_or(self.server.tls.is_some())
    }

    pub fn admin_request_timeout(&self) -> Duration {
        humantime::parse_duration(&self.server.admin_request_timeout).expect("validated")
    }

    /// The addresses this config listens on beyond loopback.
    pub fn beyond_loopback(&self) -> Vec<SocketAddr> {
        self.server
            .listens()
            .into_iter()
            .filter_map(|(_, a)| a.parse::<SocketAddr>().ok())
            .filter(|a| !a.ip().is_loopback())
            .collect()
    }

    /// [`ServerConfig::advertise_addr`] or its default.
    pub fn advertise_addr(&self) -> String {
        if let Some(a) = &self.server.advertise_addr {
            return a.clone();
        }
        match self.grpc_addr() {
            a if a.ip().is_unspecified() => {
                format!(
                    "{}:{}",
                    gethostname::gethostname().to_string_lossy(),
                    a.port()
                )
            }
            a => a.to_string(),
        }
    }

    pub fn snapshot_interval(&self) -> Duration {
        humantime::parse_duration(&self.snapshot.interval).expect("validated")
    }

    pub fn min_position_wait(&self) -> Duration {
        humantime::parse_duration(&self.server.min_position_wait).expect("validated")
    }

    pub fn shutdown_timeout(&self) -> Duration {
        humantime::parse_duration(&self.server.shutdown_timeout).expect("validated")
    }

    /// How each captured entity type retires its deleted entities.
    pub fn retention(&self) -> Vec<(std::sync::Arc<str>, crate::store::Retention)> {
        self.entities
            .iter()
            .filter(|e| !e.on_access())
            .map(|e| (std::sync::Arc::from(e.name.as_str()), e.retention()))
            .collect()
    }

    /// How often an applier drops the retired entities kept longer than
    /// their type's `keep_deleted`: a quarter of the shortest, between
    /// 100 ms and a minute.
    pub fn sweep_every(&self) -> Duration {
        self.entities
            .iter()
            .filter(|e| !e.on_access())
            .map(|e| e.keep_deleted() / 4)
            .min()
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    pub fn pending_timeout(&self) -> Duration {
        humantime::parse_duration(&self.router.pending_timeout).expect("validated")
    }

    pub fn entity(&self, name: &str) -> Option<&EntityConfig> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// Whether some view masks a column with `hash` (which needs the key).
    pub fn hashes(&self) -> bool {
        self.entities
            .iter()
            .flat_map(|e| e.views.values())
            .any(|v| v.mask.values().any(|m| *m == Mask::Hash))
    }

    /// Whether some table finds its entity through an `id_via` link.
    pub fn links_rows(&self) -> bool {
        self.entities
            .iter()
            .any(|e| e.tables.iter().any(|t| t.id_via.is_some()))
    }

    /// A secret named by a config section: the environment variable
    /// `key_env`, else the file `key_file`, else the file `default`, created
    /// with 32 random bytes (mode 0600) when missing. `section` names the
    /// section in errors; the secret itself is never printed.
    pub fn secret(
        &self,
        section: &str,
        key_env: Option<&str>,
        key_file: Option<&Path>,
        default: &Path,
    ) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        if let Some(var) = key_env {
            return Ok(std::env::var_os(var)
                .with_context(|| {
                    format!("{section}.key_env: the environment variable {var} is not set")
                })?
                .into_encoded_bytes());
        }
        if let Some(file) = key_file {
            return self.read_file(&format!("{section}.key_file"), file);
        }
        read_or_create_key(default)
            .with_context(|| format!("cannot read or create the key {}", default.display()))
    }

    /// The bytes of the file at `p` (relative to the config's directory),
    /// a key or certificate file of at most [`MAX_CONFIG_FILE`] bytes (a
    /// config naming `/dev/zero` gets an error, not a process that reads
    /// forever); an error names `field` and the path.
    pub fn read_file(&self, field: &str, p: &Path) -> anyhow::Result<Vec<u8>> {
        let path = self.resolve(p);
        read_at_most(&path, MAX_CONFIG_FILE).map_err(|e| match e {
            ReadAtMost::Io(e) => anyhow::anyhow!("{field}: cannot read {}: {e}", path.display()),
            ReadAtMost::Larger => anyhow::anyhow!(
                "{field}: {} is larger than {MAX_CONFIG_FILE} bytes: not a key or certificate file",
                path.display()
            ),
        })
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Resolves a relative path against the config file's directory, and
    /// folds `..` where it can (`config/../data` is `data`).
    pub fn resolve(&self, p: &Path) -> PathBuf {
        let joined = match self.file.parent() {
            Some(dir) if !p.is_absolute() && !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_path_buf(),
        };
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir
                    if matches!(
                        out.components().next_back(),
                        Some(std::path::Component::Normal(_))
                    ) =>
                {
                    out.pop();
                }
                // Above the root is the root.
                std::path::Component::ParentDir
                    if matches!(
                        out.components().next_back(),
                        Some(std::path::Component::RootDir)
                    ) => {}
                other => out.push(other),
            }
        }
        if out.as_os_str().is_empty() {
            out.push(".");
        }
        out
    }
}

impl ServerConfig {
    /// The addresses the fabric listens on, each with its field.
    pub fn listens(&self) -> [(&'static str, &str); 2] {
        [
            ("server.grpc_addr", &self.grpc_addr),
            ("server.admin_addr", &self.admin_addr),
        ]
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: default_grpc_addr(),
            advertise_addr: None,
            admin_addr: default_admin_addr(),
            watch_buffer: default_watch_buffer(),
            cache_encoded: default_true(),
            shutdown_timeout: default_shutdown_timeout(),
            min_position_wait: default_min_position_wait(),
            fetch_connections: default_fetch_connections(),
            max_request_bytes: default_max_request_bytes(),
            max_response_bytes: default_max_response_bytes(),
            max_streams_per_connection: default_max_streams_per_connection(),
            max_watchers: default_max_watchers(),
            tls: None,
            admin_tls: None,
            admin_hosts: Vec::new(),
            admin_max_body_bytes: default_admin_max_body_bytes(),
            admin_request_timeout: default_admin_request_timeout(),
            admin_max_connections: default_admin_max_connections(),
            insecure: false,
        }
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: default_bus_kind(),
            partitions: default_partitions(),
            embedded: EmbeddedBusConfig::default(),
            kafka: None,
        }
    }
}

impl Default for EmbeddedBusConfig {
    fn default() -> Self {
        EmbeddedBusConfig {
            max_buffered: default_max_buffered(),
        }
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            dir: default_snapshot_dir(),
            interval: default_snapshot_interval(),
            keep: default_snapshot_keep(),
            encryption: None,
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            pending_max: default_pending_max(),
            pending_max_bytes: default_pending_max_bytes(),
            pending_timeout: default_pending_timeout(),
        }
    }
}

impl Default for DlqConfig {
    fn default() -> Self {
        DlqConfig {
            file: default_dlq_file(),
            keep_last: default_dlq_keep_last(),
            max_file_bytes: default_dlq_max_file_bytes(),
            keep_files: default_dlq_keep_files(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
            otlp: None,
        }
    }
}

fn default_grpc_addr() -> String {
    "127.0.0.1:50051".into()
}
fn default_admin_addr() -> String {
    "127.0.0.1:9464".into()
}
fn default_shutdown_timeout() -> String {
    "30s".into()
}
fn default_min_position_wait() -> String {
    "10s".into()
}
/// The most earlier versions an entity type may keep per entity.
pub const MAX_HISTORY: usize = 64;

fn default_fetch_connections() -> usize {
    4
}
fn default_max_request_bytes() -> usize {
    4 << 20
}
fn default_max_response_bytes() -> usize {
    64 << 20
}
fn default_max_streams_per_connection() -> u32 {
    256
}
fn default_max_watchers() -> usize {
    10_000
}

fn default_admin_max_body_bytes() -> usize {
    1 << 20
}

fn default_admin_request_timeout() -> String {
    "60s".into()
}

fn default_admin_max_connections() -> usize {
    64
}

fn default_history() -> usize {
    // Opt-in: keeping one earlier version of every entity cost about a
    // quarter more memory after an initial load (BENCHMARKS.md, run 7).
    0
}
fn default_watch_buffer() -> usize {
    4096
}
fn default_bus_kind() -> BusKind {
    BusKind::Embedded
}
fn default_partitions() -> u32 {
    8
}
fn default_topic_prefix() -> String {
    "fabric".into()
}
fn default_session_timeout() -> String {
    "10s".into()
}

fn default_replication() -> i32 {
    1
}
fn default_entities_format() -> EntitiesFormat {
    EntitiesFormat::Json
}
fn default_max_buffered() -> usize {
    100_000
}
fn default_snapshot_dir() -> PathBuf {
    "data/snapshots".into()
}
fn default_snapshot_interval() -> String {
    "30s".into()
}
fn default_snapshot_keep() -> usize {
    3
}
fn default_pending_max_bytes() -> usize {
    256 << 20
}

fn default_pending_max() -> usize {
    100_000
}
fn default_pending_timeout() -> String {
    "30s".into()
}
fn default_dlq_file() -> PathBuf {
    "data/dlq.jsonl".into()
}
fn default_dlq_keep_last() -> usize {
    100
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_otlp_service() -> String {
    "entity-fabric".into()
}
fn default_otlp_ratio() -> f64 {
    1.0
}
fn default_demo_dir() -> PathBuf {
    "data/demo".into()
}
fn default_demo_customers() -> u32 {
    5000
}
fn default_demo_rate() -> f64 {
    20.0
}
fn default_id_type() -> IdType {
    IdType::Int
}
fn default_true() -> bool {
    true
}
/// Default `poll_interval` of polling sources, in milliseconds.
pub fn default_poll_interval_ms() -> u64 {
    50
}
/// Default `batch_size` of polling sources.
pub fn default_batch_size() -> usize {
    10_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let mut c = Config::from_toml(Path::new("config/demo.toml"), "").unwrap();
        assert_eq!(c.resolve(Path::new("../data/x.db")), Path::new("data/x.db"));
        assert_eq!(c.resolve(Path::new("/abs/x.db")), Path::new("/abs/x.db"));
        c.file = "/etc/fabric/fabric.toml".into();
        assert_eq!(
            c.resolve(Path::new("./x.db")),
            Path::new("/etc/fabric/x.db")
        );
        assert_eq!(c.resolve(Path::new("../../../x")), Path::new("/x"));
        c.file = "fabric.toml".into();
        assert_eq!(c.resolve(Path::new("../x")), Path::new("../x"));
    }

    #[test]
    fn a_named_file_that_never_ends_is_refused() {
        let c = Config::from_toml(Path::new("fabric.toml"), "").unwrap();
        let err = c
            .read_file("masking.key_file", Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than 1048576 bytes"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"key").unwrap();
        assert_eq!(
            c.read_file("masking.key_file", &dir.path().join("k"))
                .unwrap(),
            b"key"
        );
    }
}
