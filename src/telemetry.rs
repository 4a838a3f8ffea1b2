//! Logging, metrics and dead letters: everything the fabric tells operators.
//!
//! Metric names live in this file and nowhere else. Log levels: `error` — the
//! fabric lost a capability (a source is down for good); `warn` — something
//! is wrong but handled (corrupt snapshot skipped, retry, dead letter);
//! `info` — lifecycle (start, restore, snapshot round); `debug` — per batch;
//! `trace` — per event.

use crate::config::LogConfig;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use tracing_subscriber::EnvFilter;

/// What logging started that must be flushed before the process ends.
#[derive(Default)]
pub struct Logging {
    otel: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Logging {
    /// Exports the spans still buffered (within the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.otel
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: cannot flush the last spans to the OTLP collector: {e}");
        }
    }
}

/// Starts logging to stderr, and with `[log.otlp]` span export to an
/// OpenTelemetry collector. `RUST_LOG` overrides the configured level (for
/// both). Call inside the runtime: the exporter's gRPC client needs it.
pub fn init_logging(cfg: &LogConfig) -> anyhow::Result<Logging> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (text, json) = if cfg.format == "json" {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        )
    } else {
        (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            ),
            None,
        )
    };
    let mut logging = Logging::default();
    let otel = match &cfg.otlp {
        None => None,
        Some(o) => {
            use opentelemetry::trace::TracerProvider;
            use opentelemetry_otlp::WithExportConfig;
            use opentelemetry_sdk::trace::Sampler;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&o.endpoint)
                .with_timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| anyhow::anyhow!("log.otlp: cannot make the span exporter: {e}"))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    o.sample_ratio,
                ))))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(o.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("entity-fabric");
            logging.otel = Some(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    // A second init (tests) is harmless.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    Ok(logging)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceTableLabel {
    pub source: String,
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub entity_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// A method name known at compile time: looking its histogram up on
    /// every request allocates nothing.
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

/// Every metric the fabric exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Row changes applied to micro-DBs, per source.
    pub changes_applied: Family<SourceLabel, Counter>,
    /// Source transactions read, per source.
    pub source_transactions: Family<SourceLabel, Counter>,
    /// How far behind its system each source may be, in seconds
    /// ([`crate::sources::SourceStatus::lag_millis`]).
    pub source_lag: Family<SourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while a source is connected and caught up, else 0.
    pub source_caught_up: Family<SourceLabel, Gauge>,
    /// Dead-lettered inputs, per source.
    pub dead_letters: Family<SourceLabel, Counter>,
    /// Entities held, per entity type.
    pub entities: Family<TypeLabel, Gauge>,
    /// Change events waiting for an `id_via` link.
    pub router_pending: Gauge,
    /// Waiting events given up on (sent to the dead-letter output).
    pub router_pending_expired: Counter,
    /// Config reloads applied, and refused (invalid, or needing a restart).
    pub reloads_applied: Counter,
    pub reloads_refused: Counter,
    /// Bus records not yet applied, per partition.
    pub bus_lag: Family<PartitionLabel, Gauge>,
    /// Duration of a whole snapshot round.
    pub snapshot_duration: Histogram,
    /// Bytes written by the last snapshot round.
    pub snapshot_bytes: Gauge,
    /// Unix time of the last completed snapshot round.
    pub snapshot_last_unix: Gauge,
    /// gRPC request latency, per method.
    pub grpc_latency: Family<MethodLabel, Histogram>,
    /// Queries made to read one entity's rows straight from a source table.
    pub source_fetches: Family<SourceTableLabel, Counter>,
    /// Entities of sync-on-access types dropped from memory (age or bound).
    pub evicted: Family<TypeLabel, Counter>,
    /// gRPC calls whose handler panicked (answered INTERNAL).
    pub grpc_panics: Counter,
    /// `WatchEntities` streams open now (bounded by `server.max_watchers`).
    pub grpc_watchers: Gauge,
    /// gRPC calls refused by access control, per method.
    pub grpc_denied: Family<MethodLabel, Counter>,
    /// Entities forgotten on request (ForgetEntity records applied), per type.
    pub forgotten: Family<TypeLabel, Counter>,
    /// Change sets and fetches of forgotten, blocked entities dropped, per type.
    pub blocked_changes: Family<TypeLabel, Counter>,
    /// Forgotten ids whose changes are blocked, per type (this process's partitions).
    pub blocked: Family<TypeLabel, Gauge>,
    /// Row changes applied, all sources: the status page's ingest rate.
    pub applied_all: std::sync::atomic::AtomicU64,
    /// Entity read calls answered (GetEntity, BatchGetEntities,
    /// ListEntities): the status page's read rate.
    pub reads_all: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("fabric");
        let changes_applied = Family::<SourceLabel, Counter>::default();
        r.register(
            "changes_applied",
            "Row changes applied to micro-DBs",
            changes_applied.clone(),
        );
        let source_transactions = Family::<SourceLabel, Counter>::default();
        r.register(
            "source_transactions",
            "Source transactions read",
            source_transactions.clone(),
        );
        let source_lag = Family::<SourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "source_lag_seconds",
            "How far behind its system a source may be: 0 while connected and caught up, else now minus the later of its last commit read and the moment it stopped being caught up (a disconnect)",
            source_lag.clone(),
        );
        let source_caught_up = Family::<SourceLabel, Gauge>::default();
        r.register(
            "source_caught_up",
            "1 while a source is connected and has read everything its system had, else 0",
            source_caught_up.clone(),
        );
        let dead_letters = Family::<SourceLabel, Counter>::default();
        r.register(
            "dead_letters",
            "Inputs sent to the dead-letter output",
            dead_letters.clone(),
        );
        let entities = Family::<TypeLabel, Gauge>::default();
        r.register("entities", "Entities held in memory", entities.clone());
        let router_pending = Gauge::default();
        r.register(
            "router_pending",
            "Change events waiting for their id_via link",
            router_pending.clone(),
        );
        r.register(
            "kafka_writes_held",
            "Kafka writes held because the broker did not know their topic or partition (deleted, or fewer partitions)",
            crate::bus::kafka::WRITES_HELD.clone(),
        );
        r.register(
            "kafka_writes_held_now",
            "Kafka writers waiting now for a topic or partition the broker does not know",
            crate::bus::kafka::WRITES_HELD_NOW.clone(),
        );
        let router_pending_expired = Counter::default();
        r.register(
            "router_pending_expired",
            "Waiting change events given up on and dead-lettered",
            router_pending_expired.clone(),
        );
        let reloads_applied = Counter::default();
        r.register(
            "config_reloads_applied",
            "Config reloads applied while serving",
            reloads_applied.clone(),
        );
        let reloads_refused = Counter::default();
        r.register(
            "config_reloads_refused",
            "Config reloads refused (invalid, or needing a restart); the running config stayed",
            reloads_refused.clone(),
        );
        let bus_lag = Family::<PartitionLabel, Gauge>::default();
        r.register(
            "bus_lag_records",
            "Bus records not yet applied",
            bus_lag.clone(),
        );
        let snapshot_duration = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        r.register(
            "snapshot_duration_seconds",
            "Duration of a snapshot round",
            snapshot_duration.clone(),
        );
        let snapshot_bytes = Gauge::default();
        r.register(
            "snapshot_bytes",
            "Bytes written by the last snapshot round",
            snapshot_bytes.clone(),
        );
        let snapshot_last_unix = Gauge::default();
        r.register(
            "snapshot_last_unix_seconds",
            "Unix time of the last completed snapshot round",
            snapshot_last_unix.clone(),
        );
        let grpc_latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
        });
        r.register(
            "grpc_request_duration_seconds",
            "gRPC request latency",
            grpc_latency.clone(),
        );
        let source_fetches = Family::<SourceTableLabel, Counter>::default();
        r.register(
            "source_fetches",
            "Queries reading one entity's rows straight from a source table",
            source_fetches.clone(),
        );
        let evicted = Family::<TypeLabel, Counter>::default();
        r.register(
            "entities_evicted",
            "Entities of sync-on-access types dropped from memory",
            evicted.clone(),
        );
        let grpc_panics = Counter::default();
        r.register(
            "grpc_panics",
            "gRPC calls whose handler panicked and were answered INTERNAL",
            grpc_panics.clone(),
        );
        let grpc_watchers = Gauge::default();
        r.register(
            "grpc_watchers",
            "WatchEntities streams open now",
            grpc_watchers.clone(),
        );
        let grpc_denied = Family::<MethodLabel, Counter>::default();
        r.register(
            "grpc_denied",
            "gRPC calls refused by access control (UNAUTHENTICATED or PERMISSION_DENIED)",
            grpc_denied.clone(),
        );
        let forgotten = Family::<TypeLabel, Counter>::default();
        r.register(
            "entities_forgotten",
            "Entities forgotten on request (ForgetEntity)",
            forgotten.clone(),
        );
        let blocked_changes = Family::<TypeLabel, Counter>::default();
        r.register(
            "blocked_changes",
            "Changes and fetches of forgotten entities dropped because the entity is blocked",
            blocked_changes.clone(),
        );
        let blocked = Family::<TypeLabel, Gauge>::default();
        r.register(
            "entities_blocked",
            "Forgotten ids whose later changes are dropped",
            blocked.clone(),
        );
        Metrics {
            registry: Mutex::new(r),
            applied_all: Default::default(),
            reads_all: Default::default(),
            forgotten,
            blocked_changes,
            blocked,
            grpc_denied,
            grpc_panics,
            grpc_watchers,
            source_fetches,
            evicted,
            changes_applied,
            source_transactions,
            source_lag,
            source_caught_up,
            dead_letters,
            entities,
            router_pending,
            router_pending_expired,
            reloads_applied,
            reloads_refused,
            bus_lag,
            snapshot_duration,
            snapshot_bytes,
            snapshot_last_unix,
            grpc_latency,
        }
    }

    pub fn source(name: &str) -> SourceLabel {
        SourceLabel {
            source: name.to_string(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// One dead letter, as kept in memory and written to the file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub time: String,
    pub source: String,
    pub table: String,
    pub reason: String,
    pub raw: String,
}

/// The embedded dead-letter output: a JSON-lines file plus the last few in
/// memory, counted per source.
pub struct DeadLetters {
    file: Mutex<Option<DlqFile>>,
    path: PathBuf,
    /// The file is rotated past this size (`dlq.max_file_bytes`) ...
    max_file_bytes: u64,
    /// ... and this many rotated files are kept (`dlq.keep_files`):
    /// `<file>.1` the newest.
    keep_files: usize,
    recent: Mutex<VecDeque<DeadLetter>>,
    keep_last: usize,
    metrics: std::sync::Arc<Metrics>,
    /// In Kafka mode, `<prefix>.dlq` too.
    topic: std::sync::OnceLock<DlqTopic>,
}

/// The open dead-letter file: its size, and whether lines were written
/// since it was last synced to disk.
struct DlqFile {
    file: File,
    len: u64,
    dirty: bool,
}

/// Opens (appends to) the dead-letter file, created readable by the
/// fabric's user only: dead letters carry rows as the sources sent them.
fn open_dlq(path: &Path) -> std::io::Result<DlqFile> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut open = OpenOptions::new();
    open.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let file = open.open(path)?;
    // A file an older build made readable by others is made private too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    let len = file.metadata()?.len();
    Ok(DlqFile {
        file,
        len,
        dirty: false,
    })
}

/// `<path>.<n>`: a rotated dead-letter file.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The dead-letter topic: raw input as the value, the reason in headers.
pub struct DlqTopic {
    pub producer: crate::bus::kafka::Producer,
    pub topic: String,
}

/// One piece of input that could not be used.
pub struct DeadInput<'a> {
    pub source: &'a str,
    pub table: &'a str,
    pub reason: &'a str,
    /// The input's own key when it had one (a Kafka message's key).
    pub key: Option<&'a [u8]>,
    pub raw: &'a [u8],
    /// Where it was read, e.g. `fabric.changes/3@1207`.
    pub origin: Option<&'a str>,
}

impl DeadLetters {
    /// Opens (appends to) `path`; a file that cannot be opened is reported
    /// once and dead letters are then only counted and kept in memory.
    pub fn new(path: &Path, keep_last: usize, metrics: std::sync::Arc<Metrics>) -> Self {
        let file = match open_dlq(path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the dead-letter file; dead letters are only counted");
                None
            }
        };
        let defaults = crate::config::DlqConfig::default();
        DeadLetters {
            file: Mutex::new(file),
            path: path.to_path_buf(),
            max_file_bytes: defaults.max_file_bytes,
            keep_files: defaults.keep_files,
            recent: Mutex::new(VecDeque::new()),
            keep_last,
            metrics,
            topic: std::sync::OnceLock::new(),
        }
    }

    /// Rotates the file past `max_file_bytes`, keeping `keep_files` rotated
    /// files: what dead letters take on disk stays bounded however many
    /// there are.
    pub fn rotating(mut self, max_file_bytes: u64, keep_files: usize) -> Self {
        self.max_file_bytes = max_file_bytes.max(1);
        self.keep_files = keep_files;
        self
    }

    /// Syncs the lines written since the last sync to disk. Called before
    /// sources' checkpoints are published: a checkpoint past an input that
    /// was dead-lettered means the source will not send it again, so its
    /// dead letter must not be lost with the page cache.
    pub fn sync(&self) {
        if let Some(f) = self.file.lock().as_mut()
            && f.dirty
        {
            match f.file.sync_data() {
                Ok(()) => f.dirty = false,
                // Still dirty: tried again before the next checkpoint.
                Err(e) => tracing::warn!(error = %e, "cannot sync the dead-letter file"),
            }
        }
    }

    /// Moves the full file to `<file>.1` (and each older one a number up,
    /// the oldest beyond `keep_files` gone) and opens a new one.
    fn rotate(&self, slot: &mut Option<DlqFile>) -> std::io::Result<()> {
        if let Some(f) = slot.take() {
            f.file.sync_data()?;
        }
        if self.keep_files == 0 {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, self.keep_files));
            for n in (1..self.keep_files).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            match std::fs::rename(&self.path, rotated(&self.path, 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        *slot = Some(open_dlq(&self.path)?);
        Ok(())
    }

    /// Sends every dead letter from now on to `topic` as well.
    pub fn attach_topic(&self, topic: DlqTopic) {
        let _ = self.topic.set(topic);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self, source: &str, table: &str, reason: &str, raw: &str) {
        self.record_input(DeadInput {
            source,
            table,
            reason,
            key: None,
            raw: raw.as_bytes(),
            origin: None,
        });
    }

    /// Records one dead letter: counted, kept in memory, appended to the
    /// file and, in Kafka mode, produced to the DLQ topic (without waiting:
    /// a dead letter never holds the pipeline up).
    pub fn record_input(&self, input: DeadInput<'_>) {
        let DeadInput {
            source,
            table,
            reason,
            key,
            raw,
            origin,
        } = input;
        let time = crate::event::value::format_timestamp(crate::sources::now_micros());
        if let Some(t) = self.topic.get() {
            use rdkafka::message::{Header, OwnedHeaders};
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: "fabric.reason",
                    value: Some(reason),
                })
                .insert(Header {
                    key: "fabric.source",
                    value: Some(source),
                })
                .insert(Header {
                    key: "fabric.table",
                    value: Some(table),
                })
                .insert(Header {
                    key: "fabric.time",
                    value: Some(&time),
                });
            if let Some(o) = origin {
                headers = headers.insert(Header {
                    key: "fabric.origin",
                    value: Some(o),
                });
            }
            let default_key = format!("{source}/{table}");
            let record = rdkafka::producer::FutureRecord::to(&t.topic)
                .key(key.unwrap_or(default_key.as_bytes()))
                .payload(raw)
                .headers(headers);
            if let Err((e, _)) = t.producer.send_result(record) {
                tracing::warn!(error = %e, "cannot queue a dead letter for the dlq topic");
            }
        }
        let dl = DeadLetter {
            time,
            source: source.to_string(),
            table: table.to_string(),
            reason: reason.to_string(),
            raw: String::from_utf8_lossy(raw).into_owned(),
        };
        tracing::warn!(source, table, reason, origin, "dead letter");
        self.metrics
            .dead_letters
            .get_or_create(&Metrics::source(source))
            .inc();
        let mut slot = self.file.lock();
        let line = serde_json::to_string(&dl).unwrap_or_default() + "\n";
        let full = slot
            .as_ref()
            .is_some_and(|f| f.len > 0 && f.len + line.len() as u64 > self.max_file_bytes);
        if full && let Err(e) = self.rotate(&mut slot) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot rotate the dead-letter file; writing on to it");
            // Never left without a file: the lines go on to the path as
            // it is (reopened), and the next line tries rotating again.
            if slot.is_none() {
                match open_dlq(&self.path) {
                    Ok(f) => *slot = Some(f),
                    Err(e) => {
                        tracing::warn!(error = %e, path = %self.path.display(), "cannot open the dead-letter file")
                    }
                }
            }
        }
        if let Some(f) = slot.as_mut() {
            match f.file.write_all(line.as_bytes()) {
                Ok(()) => {
                    f.len += line.len() as u64;
                    f.dirty = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot write the dead-letter file"),
            }
        }
        drop(slot);
        let mut recent = self.recent.lock();
        recent.push_back(dl);
        while recent.len() > self.keep_last {
            recent.pop_front();
        }
    }

    /// The most recent dead letters, oldest first.
    pub fn recent(&self) -> Vec<DeadLetter> {
        self.recent.lock().iter().cloned().collect()
    }

    /// The newest `n` dead letters, newest first, without their raw input:
    /// (time, source, table, reason).
    pub fn recent_reasons(&self, n: usize) -> Vec<(String, String, String, String)> {
        self.recent
            .lock()
            .iter()
            .rev()
            .take(n)
            .map(|d| {
                (
                    d.time.clone(),
                    d.source.clone(),
                    d.table.clone(),
                    d.reason.clone(),
                )
            })
            .collect()
    }

    /// Dead letters recorded for one source since start.
    pub fn count(&self, source: &str) -> u64 {
        self.metrics
            .dead_letters
            .get_or_create(&Metrics::source(source))
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters(dir: &Path, max: u64, keep: usize) -> DeadLetters {
        DeadLetters::new(
            &dir.join("dlq.jsonl"),
            10,
            std::sync::Arc::new(Metrics::new()),
        )
        .rotating(max, keep)
    }

    /// The dead-letter file is its owner's only, moves to `.1` when full,
    /// keeps `keep_files` rotated files and no more, and loses no line of
    /// those it keeps.
    #[test]
    fn the_dead_letter_file_is_private_rotated_and_bounded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dlq = letters(dir.path(), 1000, 2);
        let raw = "x".repeat(200);
        for i in 0..40 {
            dlq.record("pg", "t", &format!("bad row {i}"), &raw);
        }
        dlq.sync();
        let path = dir.path().join("dlq.jsonl");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["dlq.jsonl", "dlq.jsonl.1", "dlq.jsonl.2"]);
        let mut reasons = Vec::new();
        for name in ["dlq.jsonl.2", "dlq.jsonl.1", "dlq.jsonl"] {
            let p = dir.path().join(name);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.len() <= 1000, "{name}: {} bytes", text.len());
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
            for line in text.lines() {
                let d: DeadLetter = serde_json::from_str(line).unwrap();
                reasons.push(d.reason);
            }
        }
        // The newest lines, in order, with none missing between them.
        let first: usize = reasons[0].trim_start_matches("bad row ").parse().unwrap();
        let want: Vec<String> = (first..40).map(|i| format!("bad row {i}")).collect();
        assert_eq!(reasons, want);
        assert!(first > 0, "nothing was rotated away");
        // A restart appends to the file it finds (and its size counts).
        drop(dlq);
        let again = letters(dir.path(), 1000, 2);
        again.record("pg", "t", "after restart", &raw);
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.len() <= 1000);
        assert!(last.lines().last().unwrap().contains("after restart"));
    }

    /// A file gone from under it (deleted by hand) does not stop the dead
    /// letters reaching disk: rotating finds nothing to move and goes on.
    #[test]
    fn a_dead_letter_file_deleted_by_hand_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        for keep in [0, 2] {
            let dlq = letters(dir.path(), 600, keep);
            dlq.record("pg", "t", "first", &"x".repeat(200));
            std::fs::remove_file(&path).unwrap();
            for i in 0..6 {
                dlq.record("pg", "t", &format!("after {i}"), &"x".repeat(200));
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("after 5"), "keep_files {keep}: {text}");
            let _ = std::fs::remove_file(&path);
        }
    }
}
