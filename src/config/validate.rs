//! Config loading and validation: every problem at once, each with its field path.

use super::{BusKind, Config, SourceKind};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the field, e.g. `entities[0].tables[2].source`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.reason
            )
        }
    }
}

/// Every problem found in a config file (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn one(file: &Path, field: &str, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            field: field.to_string(),
            reason: reason.into(),
        }])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid config: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

struct Collector<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn err(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

pub(super) fn load(path: &Path, text: &str, env: Env<'_>) -> Result<Config, ConfigErrors> {
    let mut c = Collector {
        file: path,
        errors: Vec::new(),
    };
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| ConfigErrors::one(path, "", format!("not valid TOML: {}", e.message())))?;
    let mut expanded = Expanded::default();
    expand_env(&mut c, env, &mut expanded, "", &mut doc);
    // No error shows a value a reference took (a secret in a log line, or
    // in an answer to whoever posted the text).
    let hidden = |mut errors: Vec<ConfigError>, expanded: &Expanded| {
        let values = match env {
            Env::Process => expanded,
            Env::Posted(running) => running,
        };
        for e in &mut errors {
            e.reason = values.hide(&e.reason);
        }
        ConfigErrors(errors)
    };
    let mut unknown = Vec::new();
    let parsed: Result<Config, _> =
        serde_ignored::deserialize(toml::Value::Table(doc), |p: serde_ignored::Path<'_>| {
            unknown.push(render_path(&p.to_string()));
        });
    for u in unknown {
        c.err(u, "unknown field");
    }
    let mut config = match parsed {
        Ok(cfg) => cfg,
        Err(e) => {
            c.err("", e.to_string().trim().replace('\n', " "));
            return Err(hidden(c.errors, &expanded));
        }
    };
    config.file = path.to_path_buf();
    check(&mut c, &config);
    if c.errors.is_empty() {
        config.expanded = std::sync::Arc::new(expanded);
        Ok(config)
    } else {
        Err(hidden(c.errors, &expanded))
    }
}

/// `sources.1.url` -> `sources[1].url`.
fn render_path(p: &str) -> String {
    let mut out = String::new();
    for part in p.split('.') {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Where the `${...}` references in a config's strings take their values.
#[derive(Clone, Copy)]
pub(super) enum Env<'a> {
    /// A file the operator wrote: `${NAME}` is the process's environment
    /// variable, `${file:PATH}` the file's content (a mounted secret).
    Process,
    /// Text posted to the admin endpoint: never the process's environment
    /// or files. A string that is, at the same field, the very text the
    /// running config's file had there takes the value the running config
    /// got for it; any other reference stays as written.
    Posted(&'a Expanded),
}

/// The strings of a config that held `${...}` references, and the values
/// they took: what a posted config may reuse, and what no answer to it may
/// show. Its `Debug` names the fields only.
#[derive(Clone, Default)]
pub struct Expanded {
    /// Field path -> (the text as written, as expanded).
    fields: HashMap<String, (String, String)>,
    /// Every value a reference took.
    values: Vec<String>,
}

impl fmt::Debug for Expanded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut paths: Vec<&String> = self.fields.keys().collect();
        paths.sort();
        f.debug_struct("Expanded").field("fields", &paths).finish()
    }
}

/// Values shorter than this are not cut out of answers (they cannot be
/// told apart from the rest of the text, and hold no secret worth one).
const HIDDEN_MIN_CHARS: usize = 4;

impl Expanded {
    /// `text` with every value a reference took replaced by `<hidden>`, as
    /// written and as a quoted (`Debug`) string shows it.
    pub fn hide(&self, text: &str) -> String {
        let mut values: Vec<String> = self
            .values
            .iter()
            .filter(|v| v.chars().count() >= HIDDEN_MIN_CHARS)
            .flat_map(|v| {
                let quoted = format!("{v:?}");
                [v.clone(), quoted[1..quoted.len() - 1].to_string()]
            })
            .collect();
        // Longest first: a value that contains another goes whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        let mut out = text.to_string();
        for v in &values {
            out = out.replace(v.as_str(), "<hidden>");
        }
        out
    }
}

/// The largest file a `${file:PATH}` reference reads.
const MAX_REFERENCED_FILE: u64 = 64 * 1024;

/// Replaces `${NAME}` and `${file:PATH}` in every string (see [`Env`]);
/// `$${` stands for a literal `${`.
fn expand_env(
    c: &mut Collector<'_>,
    env: Env<'_>,
    out: &mut Expanded,
    path: &str,
    table: &mut toml::Table,
) {
    for (k, v) in table.iter_mut() {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        expand_value(c, env, out, &p, v);
    }
}

fn expand_value(
    c: &mut Collector<'_>,
    env: Env<'_>,
    out: &mut Expanded,
    path: &str,
    v: &mut toml::Value,
) {
    match v {
        toml::Value::String(s) if s.contains("${") => match env {
            Env::Process => {
                let dir = c.file.parent().map(Path::to_path_buf).unwrap_or_default();
                match expand_str(s, &mut |name| lookup(&dir, name)) {
                    Ok((x, values)) => {
                        out.fields.insert(path.to_string(), (s.clone(), x.clone()));
                        out.values.extend(values);
                        *s = x;
                    }
                    Err(e) => c.err(path, e),
                }
            }
            Env::Posted(running) => {
                if let Some((raw, expanded)) = running.fields.get(path)
                    && raw == s
                {
                    out.fields
                        .insert(path.to_string(), (raw.clone(), expanded.clone()));
                    *s = expanded.clone();
                }
            }
        },
        toml::Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                expand_value(c, env, out, &format!("{path}[{i}]"), x);
            }
        }
        toml::Value::Table(t) => expand_env(c, env, out, path, t),
        _ => {}
    }
}

/// The value of one reference: an environment variable, or with `file:`
/// a file's content (relative to the config's directory, one trailing
/// newline dropped).
fn lookup(dir: &Path, name: &str) -> Result<String, String> {
    use super::ReadAtMost;
    let Some(file) = name.strip_prefix("file:") else {
        return std::env::var(name).map_err(|_| format!("environment variable {name} is not set"));
    };
    let path = dir.join(file);
    let bytes = super::read_at_most(&path, MAX_REFERENCED_FILE).map_err(|e| match e {
        ReadAtMost::Io(e) => format!("cannot read {} (${{file:{file}}}): {e}", path.display()),
        ReadAtMost::Larger => format!(
            "{} (${{file:{file}}}) is larger than {MAX_REFERENCED_FILE} bytes",
            path.display()
        ),
    })?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| format!("{} (${{file:{file}}}) is not UTF-8 text", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// `s` with its references replaced, and the values they took.
fn expand_str(
    s: &str,
    lookup: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<(String, Vec<String>), String> {
    let mut out = String::with_capacity(s.len());
    let mut values = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                .ok_or_else(|| "unterminated ${...} reference".to_string())?;
            let val = lookup(&tail[..end])?;
            out.push_str(&val);
            values.push(val);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok((out, values))
}

fn check(c: &mut Collector<'_>, cfg: &Config) {
    for (field, addr) in cfg.server.listens() {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            c.err(
                field,
                format!("{addr:?} is not a socket address (ip:port, e.g. 127.0.0.1:50051)"),
            );
        }
    }
    if let Some(a) = &cfg.server.advertise_addr
        && !a
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    {
        c.err(
            "server.advertise_addr",
            format!("{a:?} is not host:port (e.g. fabric-0.fabric-headless:50051)"),
        );
    }
    if cfg.server.watch_buffer == 0 {
        c.err("server.watch_buffer", "must be at least 1");
    }
    match (&cfg.bus.kafka, cfg.bus.kind) {
        (None, BusKind::Kafka) => c.err(
            "bus.kafka",
            "the kafka bus needs a [bus.kafka] section with at least `brokers`",
        ),
        (Some(k), _) => check_kafka(c, k),
        (None, BusKind::Embedded) => {}
    }
    if cfg.hashes()
        && cfg.bus.kind == BusKind::Kafka
        && cfg.masking.key_env.is_none()
        && cfg.masking.key_file.is_none()
    {
        c.err(
            "masking",
            "a view masks with \"hash\" on the kafka bus: every process must hash with one key, \
             so set masking.key_env or masking.key_file (the default key is made per process)",
        );
    }
    check_tls(c, cfg);
    if let Some(a) = &cfg.access {
        check_access(c, cfg, a);
    }
    check_exposure(c, cfg);
    if !(1..=4096).contains(&cfg.bus.partitions) {
        c.err("bus.partitions", "must be between 1 and 4096");
    }
    if cfg.bus.embedded.max_buffered == 0 {
        c.err("bus.embedded.max_buffered", "must be at least 1");
    }
    if let Some(o) = &cfg.log.otlp {
        if o.endpoint.starts_with("https://") {
            c.err(
                "log.otlp.endpoint",
                "TLS to the collector is not built in: send to a collector or agent on \
                 loopback or a private network (http://…)",
            );
        } else if !o.endpoint.starts_with("http://") || url::Url::parse(&o.endpoint).is_err() {
            c.err(
                "log.otlp.endpoint",
                format!(
                    "{:?} is not an http:// address (e.g. http://127.0.0.1:4317)",
                    o.endpoint
                ),
            );
        }
        if !(0.0..=1.0).contains(&o.sample_ratio) {
            c.err("log.otlp.sample_ratio", "must be between 0 and 1");
        }
        if o.service_name.is_empty() {
            c.err("log.otlp.service_name", "must not be empty");
        }
    }
    check_duration(c, "snapshot.interval", &cfg.snapshot.interval);
    if cfg.snapshot.keep < 2 {
        c.err(
            "snapshot.keep",
            "must be at least 2, so that a corrupt newest snapshot has a predecessor",
        );
    }
    check_duration(c, "router.pending_timeout", &cfg.router.pending_timeout);
    check_duration(c, "server.shutdown_timeout", &cfg.server.shutdown_timeout);
    check_duration(c, "server.min_position_wait", &cfg.server.min_position_wait);
    check_duration(
        c,
        "server.admin_request_timeout",
        &cfg.server.admin_request_timeout,
    );
    if cfg.server.admin_max_connections == 0 {
        c.err("server.admin_max_connections", "must be at least 1");
    }
    if cfg.server.admin_max_body_bytes < 1024 {
        c.err("server.admin_max_body_bytes", "must be at least 1024");
    }
    for (i, h) in cfg.server.admin_hosts.iter().enumerate() {
        if h.is_empty() || h.contains([':', '/', ' ', '@']) {
            c.err(
                format!("server.admin_hosts[{i}]"),
                format!("{h:?} is not a host name (no port, scheme or path)"),
            );
        }
    }
    if cfg.server.fetch_connections == 0 {
        c.err("server.fetch_connections", "must be at least 1");
    }
    if cfg.server.max_request_bytes < 1024 {
        c.err("server.max_request_bytes", "must be at least 1024");
    }
    if cfg.server.max_response_bytes < 65536 {
        c.err("server.max_response_bytes", "must be at least 65536");
    }
    if cfg.server.max_streams_per_connection == 0 {
        c.err("server.max_streams_per_connection", "must be at least 1");
    }
    if !matches!(cfg.log.format.as_str(), "text" | "json") {
        c.err("log.format", "must be \"text\" or \"json\"");
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&cfg.log.level) {
        c.err("log.level", format!("not a valid filter: {e}"));
    }
    if let Some(d) = &cfg.demo
        && !(d.mutations_per_second.is_finite() && d.mutations_per_second >= 0.0)
    {
        c.err("demo.mutations_per_second", "must be a number >= 0");
    }

    let mut source_names = HashMap::new();
    for (i, s) in cfg.sources.iter().enumerate() {
        let p = format!("sources[{i}]");
        if s.name.is_empty() {
            c.err(format!("{p}.name"), "must not be empty");
        } else if let Some(j) = source_names.insert(s.name.as_str(), i) {
            c.err(
                format!("{p}.name"),
                format!("duplicate source name {:?} (also sources[{j}])", s.name),
            );
        }
        // A source only sync-on-access types read (by query) captures nothing.
        let fetch_only = cfg
            .entities
            .iter()
            .any(|e| e.on_access() && e.tables.iter().any(|t| t.source == s.name))
            && !cfg
                .entities
                .iter()
                .any(|e| !e.on_access() && e.tables.iter().any(|t| t.source == s.name));
        check_source(c, &p, s, cfg.bus.kafka.is_some(), fetch_only);
    }

    let mut entity_names = HashSet::new();
    for (i, e) in cfg.entities.iter().enumerate() {
        let p = format!("entities[{i}]");
        if e.name.is_empty() || e.name.contains('/') {
            c.err(format!("{p}.name"), "must be non-empty and contain no '/'");
        } else if !entity_names.insert(e.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate entity type {:?}", e.name),
            );
        }
        if e.tables.is_empty() {
            c.err(
                format!("{p}.tables"),
                "an entity type needs at least one table",
            );
        }
        let mut table_names = HashMap::new();
        let mut source_tables = HashMap::new();
        for (j, t) in e.tables.iter().enumerate() {
            let tp = format!("{p}.tables[{j}]");
            if t.name.is_empty() {
                c.err(format!("{tp}.name"), "must not be empty");
            } else if let Some(k) = table_names.insert(t.name.as_str(), j) {
                c.err(
                    format!("{tp}.name"),
                    format!("duplicate table {:?} (also {p}.tables[{k}])", t.name),
                );
            }
            match cfg.source(&t.source) {
                None => c.err(
                    format!("{tp}.source"),
                    format!(
                        "unknown source {:?} (known: {})",
                        t.source,
                        known(cfg.sources.iter().map(|s| s.name.as_str()))
                    ),
                ),
                Some(s) if !s.tables.is_empty() && !e.on_access() => {
                    let listed = s
                        .tables
                        .iter()
                        .any(|x| strip_main(x) == strip_main(&t.from));
                    if !listed {
                        c.err(
                            format!("{tp}.from"),
                            format!(
                                "table {:?} is not in the tables of source {:?}",
                                t.from, s.name
                            ),
                        );
                    }
                }
                Some(_) => {}
            }
            if let Some(k) = source_tables.insert((t.source.as_str(), t.from.as_str()), j) {
                c.err(
                    format!("{tp}.from"),
                    format!(
                        "source table {:?} of {:?} is already mapped by {p}.tables[{k}]",
                        t.from, t.source
                    ),
                );
            }
            if t.primary_key.is_empty() {
                c.err(format!("{tp}.primary_key"), "needs at least one column");
            }
            match (&t.id_column, &t.id_via) {
                (Some(_), Some(_)) => c.err(
                    format!("{tp}.id_via"),
                    "set either id_column or id_via, not both",
                ),
                (None, None) => c.err(
                    format!("{tp}.id_column"),
                    "set id_column (the column holding the entity id) or id_via",
                ),
                (Some(col), None) if col.is_empty() => {
                    c.err(format!("{tp}.id_column"), "must not be empty")
                }
                (None, Some(via)) => match e.table(&via.table) {
                    None => c.err(
                        format!("{tp}.id_via.table"),
                        format!(
                            "links to table {:?}, which entity type {:?} does not have",
                            via.table, e.name
                        ),
                    ),
                    Some(target) if target.name == t.name => c.err(
                        format!("{tp}.id_via.table"),
                        "a table cannot link to itself",
                    ),
                    Some(_) if link_cycle(e, t).is_some() => c.err(
                        format!("{tp}.id_via.table"),
                        format!(
                            "the links form a cycle ({}): some table of a chain must find its entity by id_column",
                            link_cycle(e, t).unwrap_or_default()
                        ),
                    ),
                    Some(target) if target.primary_key.len() != 1 => c.err(
                        format!("{tp}.id_via.table"),
                        format!(
                            "table {:?} must have a single-column primary key to be linked to",
                            target.name
                        ),
                    ),
                    Some(_) => {}
                },
                _ => {}
            }
        }
        if let Some(root) = &e.root_table
            && e.table(root).is_none()
        {
            c.err(
                format!("{p}.root_table"),
                format!("no table {root:?} in entity type {:?}", e.name),
            );
        }
        if let Some(root) = e.table(e.root_table())
            && root.id_via.is_some()
        {
            c.err(
                format!("{p}.root_table"),
                "the root table must find its entity by id_column",
            );
        }
        if let Some(pv) = &e.publish_view
            && !e.views.contains_key(pv)
        {
            c.err(
                format!("{p}.publish_view"),
                format!("no view {pv:?} in entity type {:?}", e.name),
            );
        }
        check_sync(c, cfg, &p, e);
        if e.history > super::MAX_HISTORY {
            c.err(
                format!("{p}.history"),
                format!(
                    "{} versions kept per entity is more than the {} allowed: \
                     each costs the memory of the tables that changed in it",
                    e.history,
                    super::MAX_HISTORY
                ),
            );
        }
        for (name, v) in &e.views {
            let vp = format!("{p}.views.{name}");
            let mut in_view = BTreeSet::new();
            for (k, t) in v.tables.iter().enumerate() {
                if e.table(t).is_none() {
                    c.err(
                        format!("{vp}.tables[{k}]"),
                        format!("no table {t:?} in entity type {:?}", e.name),
                    );
                }
                in_view.insert(t.as_str());
            }
            if v.tables.is_empty() {
                c.err(format!("{vp}.tables"), "a view needs at least one table");
            }
            for (k, col) in v.columns.iter().enumerate() {
                check_column_ref(c, &format!("{vp}.columns[{k}]"), col, &in_view);
            }
            for col in v.mask.keys() {
                check_column_ref(c, &format!("{vp}.mask.\"{col}\""), col, &in_view);
            }
        }
    }
}

fn check_column_ref(c: &mut Collector<'_>, field: &str, col: &str, in_view: &BTreeSet<&str>) {
    match col.split_once('.') {
        Some((t, cname)) if !cname.is_empty() => {
            if !in_view.contains(t) {
                c.err(
                    field,
                    format!("table {t:?} is not one of the view's tables"),
                );
            }
        }
        _ => c.err(field, format!("{col:?} is not of the form table.column")),
    }
}

fn check_kafka(c: &mut Collector<'_>, k: &super::KafkaConfig) {
    if k.brokers.trim().is_empty() {
        c.err("bus.kafka.brokers", "must name at least one host:port");
    }
    let legal = |t: &str| {
        !t.is_empty()
            && t.len() <= 200
            && t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
    };
    if !legal(&k.topic_prefix) {
        c.err(
            "bus.kafka.topic_prefix",
            format!(
                "{:?} must be 1 to 200 ASCII letters, digits, '.', '_' or '-' (Kafka's topic name rule)",
                k.topic_prefix
            ),
        );
    }
    if k.group_id.as_deref().is_some_and(|g| g.trim().is_empty()) {
        c.err("bus.kafka.group_id", "must not be empty");
    }
    if k.instance_id
        .as_deref()
        .is_some_and(|g| g.trim().is_empty())
    {
        c.err("bus.kafka.instance_id", "must not be empty");
    }
    if k.replication < 1 {
        c.err("bus.kafka.replication", "must be at least 1");
    }
    check_duration(c, "bus.kafka.session_timeout", &k.session_timeout);
    if humantime::parse_duration(&k.session_timeout)
        .is_ok_and(|d| d < std::time::Duration::from_secs(1))
    {
        c.err(
            "bus.kafka.session_timeout",
            "must be at least 1s (heartbeats go every fifth of it)",
        );
    }
    for key in k.properties.keys() {
        if matches!(
            key.as_str(),
            "bootstrap.servers"
                | "group.id"
                | "enable.auto.commit"
                | "enable.idempotence"
                | "acks"
                | "transactional.id"
        ) {
            c.err(
                format!("bus.kafka.properties.\"{key}\""),
                "set by the fabric itself (brokers and group_id have fields of their own)",
            );
        }
    }
}

fn check_source(
    c: &mut Collector<'_>,
    p: &str,
    s: &super::SourceConfig,
    bus_kafka: bool,
    fetch_only: bool,
) {
    let allowed: &[&str] = match s.kind {
        SourceKind::Sqlite => &[
            "path",
            "tables",
            "poll_interval",
            "batch_size",
            "initial_snapshot",
        ],
        SourceKind::Jsonl => &["path", "poll_interval"],
        SourceKind::GrpcPush => &[],
        SourceKind::PostgresCdc => &[
            "url",
            "tables",
            "batch_size",
            "initial_snapshot",
            "slot",
            "publication",
            "create_slot",
            "unmapped_types",
        ],
        SourceKind::MysqlBinlog => &[
            "url",
            "tables",
            "batch_size",
            "initial_snapshot",
            "server_id",
        ],
        SourceKind::SqlPoll => &[
            "url",
            "tables",
            "poll_interval",
            "batch_size",
            "cursor_column",
            "soft_delete_column",
            "safety_window",
        ],
        SourceKind::DebeziumKafka => &["topics", "brokers", "group_id"],
    };
    if !crate::sources::available(s.kind) {
        c.err(
            format!("{p}.kind"),
            format!(
                "source kind {:?} is not part of this build yet",
                s.kind.as_str()
            ),
        );
    }
    let present = [
        ("path", s.path.is_some()),
        ("url", s.url.is_some()),
        ("tables", !s.tables.is_empty()),
        ("poll_interval", s.poll_interval.is_some()),
        ("batch_size", s.batch_size.is_some()),
        ("initial_snapshot", s.initial_snapshot.is_some()),
        ("slot", s.slot.is_some()),
        ("publication", s.publication.is_some()),
        ("create_slot", s.create_slot.is_some()),
        ("unmapped_types", s.unmapped_types.is_some()),
        ("server_id", s.server_id.is_some()),
        ("cursor_column", s.cursor_column.is_some()),
        ("soft_delete_column", s.soft_delete_column.is_some()),
        ("safety_window", s.safety_window.is_some()),
        ("topics", !s.topics.is_empty()),
        ("brokers", s.brokers.is_some()),
        ("group_id", s.group_id.is_some()),
        ("reconnect_first", s.reconnect_first.is_some()),
        ("reconnect_max", s.reconnect_max.is_some()),
    ];
    // Every source that connects somewhere restarts after a failure.
    let restarts = s.kind != SourceKind::GrpcPush;
    for (field, is_set) in present {
        if is_set && !allowed.contains(&field) && !(restarts && field.starts_with("reconnect_")) {
            c.err(
                format!("{p}.{field}"),
                format!("not a field of a {} source", s.kind.as_str()),
            );
        }
    }
    if matches!(s.kind, SourceKind::Sqlite | SourceKind::Jsonl) && s.path.is_none() {
        c.err(
            format!("{p}.path"),
            format!("a {} source needs a path", s.kind.as_str()),
        );
    }
    let scheme = match s.kind {
        SourceKind::PostgresCdc => Some(&["postgres://", "postgresql://"][..]),
        SourceKind::MysqlBinlog => Some(&["mysql://", "mariadb://"][..]),
        SourceKind::SqlPoll => Some(
            &[
                "postgres://",
                "postgresql://",
                "mysql://",
                "mariadb://",
                "sqlite:",
            ][..],
        ),
        _ => None,
    };
    if let Some(schemes) = scheme {
        match &s.url {
            None => c.err(
                format!("{p}.url"),
                format!("a {} source needs a url", s.kind.as_str()),
            ),
            Some(u) if !schemes.iter().any(|x| u.starts_with(x)) => c.err(
                format!("{p}.url"),
                format!(
                    "a {} source needs a url starting with {}",
                    s.kind.as_str(),
                    schemes.join(" or ")
                ),
            ),
            Some(_) => {}
        }
    }
    if matches!(
        s.kind,
        SourceKind::Sqlite
            | SourceKind::PostgresCdc
            | SourceKind::MysqlBinlog
            | SourceKind::SqlPoll
    ) && s.tables.is_empty()
        && !fetch_only
    {
        c.err(
            format!("{p}.tables"),
            format!("a {} source needs the tables to capture", s.kind.as_str()),
        );
    }
    if s.kind == SourceKind::DebeziumKafka {
        if s.topics.is_empty() {
            c.err(
                format!("{p}.topics"),
                "a debezium_kafka source needs the topics to read",
            );
        }
        for (i, t) in s.topics.iter().enumerate() {
            if t.trim().is_empty() {
                c.err(format!("{p}.topics[{i}]"), "must not be empty");
            }
        }
        if s.group_id.as_deref().is_some_and(|g| g.trim().is_empty()) {
            c.err(format!("{p}.group_id"), "must not be empty");
        }
        if s.brokers.is_none() && !bus_kafka {
            c.err(
                format!("{p}.brokers"),
                "a debezium_kafka source needs brokers (or a [bus.kafka] section to take them from)",
            );
        }
    }
    if s.kind == SourceKind::SqlPoll && s.cursor_column.is_none() {
        c.err(
            format!("{p}.cursor_column"),
            "a sql_poll source needs the column that grows with every change",
        );
    }
    for (field, v) in [("slot", &s.slot), ("publication", &s.publication)] {
        if let Some(name) = v
            && (name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'))
        {
            c.err(
                format!("{p}.{field}"),
                format!("{name:?} must be lower-case letters, digits and underscores"),
            );
        }
    }
    if let Some(u) = &s.unmapped_types
        && u != "error"
        && u != "text"
    {
        c.err(
            format!("{p}.unmapped_types"),
            format!("{u:?} is neither \"error\" nor \"text\""),
        );
    }
    if s.server_id == Some(0) {
        c.err(format!("{p}.server_id"), "must not be 0");
    }
    for (field, d) in [
        ("reconnect_first", &s.reconnect_first),
        ("reconnect_max", &s.reconnect_max),
    ] {
        if let Some(d) = d {
            check_duration(c, &format!("{p}.{field}"), d);
        }
    }
    let (first, max) = s.reconnect();
    if first > max {
        c.err(
            format!("{p}.reconnect_first"),
            format!("{first:?} is longer than reconnect_max ({max:?})"),
        );
    }
    if let Some(d) = &s.poll_interval {
        check_duration(c, &format!("{p}.poll_interval"), d);
    }
    if s.batch_size == Some(0) {
        c.err(format!("{p}.batch_size"), "must be at least 1");
    }
}

/// Whether the fabric can read an entity's rows straight from a source of
/// this kind (fetches: staleness bounds, `sync = "on_access"`).
pub fn can_fetch(kind: SourceKind) -> bool {
    matches!(
        kind,
        SourceKind::PostgresCdc
            | SourceKind::MysqlBinlog
            | SourceKind::SqlPoll
            | SourceKind::Sqlite
    )
}

fn check_sync(c: &mut Collector<'_>, cfg: &Config, p: &str, e: &super::EntityConfig) {
    if let Some(v) = &e.keep_deleted {
        check_duration(c, &format!("{p}.keep_deleted"), v);
    }
    if !e.on_access() {
        for (field, set) in [
            ("max_age", e.max_age.is_some()),
            ("evict_after", e.evict_after.is_some()),
            ("max_entities", e.max_entities.is_some()),
            ("max_bytes", e.max_bytes.is_some()),
        ] {
            if set {
                c.err(
                    format!("{p}.{field}"),
                    "applies to sync = \"on_access\" entity types only",
                );
            }
        }
    } else {
        for (field, v) in [("max_age", &e.max_age), ("evict_after", &e.evict_after)] {
            if let Some(v) = v {
                check_duration(c, &format!("{p}.{field}"), v);
            }
        }
        if e.max_entities == Some(0) {
            c.err(format!("{p}.max_entities"), "must be at least 1");
        }
        if e.max_bytes == Some(0) {
            c.err(format!("{p}.max_bytes"), "must be at least 1");
        }
    }
    for (j, t) in e.tables.iter().enumerate() {
        let tp = format!("{p}.tables[{j}]");
        let Some(s) = cfg.source(&t.source) else {
            continue;
        };
        if !can_fetch(s.kind) {
            if e.on_access() {
                c.err(
                    format!("{tp}.source"),
                    format!(
                        "entity type {:?} is sync = \"on_access\": its tables are read straight from their sources, \
                         and a {} source cannot be read that way (use postgres_cdc, mysql_binlog, sql_poll or sqlite)",
                        e.name,
                        s.kind.as_str()
                    ),
                );
            } else if t.fetch.is_some() {
                c.err(
                    format!("{tp}.fetch"),
                    format!("a {} source cannot be read by query", s.kind.as_str()),
                );
            }
            continue;
        }
        if let Some(q) = &t.fetch
            && q.trim().is_empty()
        {
            c.err(format!("{tp}.fetch"), "must not be empty");
        }
        if t.fetch.is_none()
            && let Some(via) = &t.id_via
            && let Some(link) = e.table(&via.table)
            && link.id_via.is_some()
            && e.on_access()
        {
            c.err(
                format!("{tp}.fetch"),
                format!(
                    "the link table {:?} finds its entity through id_via itself: the fetch query of a chain \
                     of links is not derived; write it (`fetch`, one placeholder for the entity id)",
                    via.table
                ),
            );
        }
        if t.fetch.is_none()
            && let Some(via) = &t.id_via
            && let Some(link) = e.table(&via.table)
            && link.source != t.source
            && e.on_access()
        {
            c.err(
                format!("{tp}.fetch"),
                format!(
                    "the link table {:?} is in source {:?}, not {:?}: the fetch query cannot be derived; \
                     write it (`fetch`, one placeholder for the entity id)",
                    via.table, link.source, t.source
                ),
            );
        }
    }
}

/// The chain of `id_via` links from table `t`, when it comes back to a
/// table it passed (`"a -> b -> a"`); `None` when it ends at a table that
/// finds its entity by `id_column` (or at a table the type lacks, reported
/// on its own).
fn link_cycle(e: &super::EntityConfig, t: &super::TableConfig) -> Option<String> {
    let mut chain = vec![t.name.as_str()];
    let mut at = t;
    while let Some(via) = &at.id_via {
        let next = e.table(&via.table)?;
        let seen = chain.contains(&next.name.as_str());
        chain.push(next.name.as_str());
        if seen {
            return Some(chain.join(" -> "));
        }
        at = next;
    }
    None
}

fn check_tls(c: &mut Collector<'_>, cfg: &Config) {
    let Some(t) = &cfg.server.tls else {
        if cfg.server.admin_tls == Some(true) {
            c.err(
                "server.admin_tls",
                "needs [server.tls]: the admin endpoint serves its certificate",
            );
        }
        return;
    };
    let files = [
        ("cert_file", Some(&t.cert_file)),
        ("key_file", Some(&t.key_file)),
        ("client_ca_file", t.client_ca_file.as_ref()),
        ("peer_ca_file", t.peer_ca_file.as_ref()),
    ];
    for (field, file) in files {
        if let Some(f) = file
            && !cfg.resolve(f).is_file()
        {
            c.err(
                format!("server.tls.{field}"),
                format!("no file at {}", cfg.resolve(f).display()),
            );
        }
    }
    if t.client_cert == super::ClientCertMode::Optional && t.client_ca_file.is_none() {
        c.err(
            "server.tls.client_cert",
            "\"optional\" client certificates need client_ca_file (the CA that signs them)",
        );
    }
}

/// A fabric that listens beyond loopback needs `[access]`, unless the
/// config says `server.insecure = true` (docs/security.md).
fn check_exposure(c: &mut Collector<'_>, cfg: &Config) {
    if cfg.access.is_some() || cfg.server.insecure {
        return;
    }
    for (field, addr) in cfg.server.listens() {
        if let Ok(a) = addr.parse::<std::net::SocketAddr>()
            && !a.ip().is_loopback()
        {
            c.err(
                field,
                format!(
                    "{a} is beyond loopback and there is no [access] section: every client \
                     could read every entity and change the config. Add [access] with \
                     principals (docs/security.md), or set server.insecure = true to \
                     accept that"
                ),
            );
        }
    }
}

fn check_access(c: &mut Collector<'_>, cfg: &Config, a: &super::AccessConfig) {
    let known = |ty: &str, view: Option<&str>| -> Result<(), String> {
        let e = cfg
            .entity(ty)
            .ok_or_else(|| format!("no entity type {ty:?}"))?;
        match view {
            Some(v) if !e.views.contains_key(v) => {
                Err(format!("entity type {ty:?} has no view {v:?}"))
            }
            _ => Ok(()),
        }
    };
    let push_source = |name: &str| {
        cfg.sources
            .iter()
            .any(|s| s.name == name && s.kind == SourceKind::GrpcPush)
    };
    let check_list = |c: &mut Collector<'_>, field: &str, list: &[String]| {
        for (i, p) in list.iter().enumerate() {
            if let Err(e) = crate::access::check_permission(p, &known, &push_source) {
                c.err(format!("{field}[{i}]"), e);
            }
        }
    };
    check_list(c, "access.anonymous", &a.anonymous);
    let mut names = HashSet::new();
    let mut tokens: HashMap<String, usize> = HashMap::new();
    let mut certs: HashMap<&str, usize> = HashMap::new();
    let mtls = cfg
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_file.is_some());
    for (i, p) in a.principals.iter().enumerate() {
        let at = format!("access.principals[{i}]");
        if p.name.is_empty() || p.name == "anonymous" {
            c.err(format!("{at}.name"), "needs a name (not \"anonymous\")");
        } else if !names.insert(p.name.as_str()) {
            c.err(format!("{at}.name"), format!("{:?} is named twice", p.name));
        }
        if p.token_sha256.is_empty() && p.cert_names.is_empty() {
            c.err(
                &at,
                "neither token_sha256 nor cert_names: nobody can be this principal",
            );
        }
        for (j, t) in p.token_sha256.iter().enumerate() {
            // Never echoed: a token pasted here by mistake stays unprinted.
            if !crate::access::is_sha256_hex(t) {
                c.err(
                    format!("{at}.token_sha256[{j}]"),
                    "is not 64 hex digits: give the SHA-256 of the token \
                     (e.g. `printf %s \"$TOKEN\" | sha256sum`), never the token",
                );
            } else if let Some(other) = tokens.insert(t.to_ascii_lowercase(), i) {
                c.err(
                    format!("{at}.token_sha256[{j}]"),
                    format!("the same token is also access.principals[{other}]'s"),
                );
            }
        }
        for (j, n) in p.cert_names.iter().enumerate() {
            if let Some(other) = certs.insert(n, i) {
                c.err(
                    format!("{at}.cert_names[{j}]"),
                    format!("{n:?} is also access.principals[{other}]'s"),
                );
            }
        }
        if !p.cert_names.is_empty() && !mtls {
            c.err(
                format!("{at}.cert_names"),
                "client certificates need mutual TLS: set server.tls.client_ca_file",
            );
        }
        check_list(c, &format!("{at}.allow"), &p.allow);
    }
}

fn check_duration(c: &mut Collector<'_>, field: &str, s: &str) {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => c.err(field, "must be longer than zero"),
        Ok(_) => {}
        Err(e) => c.err(
            field,
            format!("{s:?} is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\""),
        ),
    }
}

fn strip_main(t: &str) -> &str {
    t.strip_prefix("main.").unwrap_or(t)
}

fn known<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(s: &str) -> Result<String, String> {
        expand_str(s, &mut |n| lookup(Path::new("."), n)).map(|(x, _)| x)
    }

    #[test]
    fn env_references_expand() {
        assert_eq!(expand("a$${b}").unwrap(), "a${b}");
        assert!(expand("${ENTITY_FABRIC_SURELY_UNSET_VAR}").is_err());
        assert!(expand("${UNTERMINATED").is_err());
        let home = std::env::var("PATH").unwrap();
        assert_eq!(expand("x${PATH}y").unwrap(), format!("x{home}y"));
    }

    #[test]
    fn file_references_read_the_file_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.sha256"), "abc\n").unwrap();
        let got = expand_str("x${file:token.sha256}y", &mut |n| lookup(dir.path(), n)).unwrap();
        assert_eq!(got, ("xabcy".to_string(), vec!["abc".to_string()]));
        let missing = expand_str("${file:nope}", &mut |n| lookup(dir.path(), n)).unwrap_err();
        assert!(
            missing.contains("cannot read") && missing.contains("nope"),
            "{missing}"
        );
    }

    /// A config posted to the admin endpoint never takes a value from the
    /// server's environment: only a reference written the same at the same
    /// field as in the running file takes the running value, and answers
    /// show no value a reference took.
    #[test]
    fn posted_configs_never_read_the_environment() {
        let home = std::env::var("PATH").unwrap();
        let text = "[server]\ngrpc_addr = \"127.0.0.1:50051\"\n[snapshot]\ndir = \"/x${PATH}\"\n";
        let running = load(Path::new("f.toml"), text, Env::Process).unwrap();
        assert_eq!(running.snapshot.dir, format!("/x{home}"));
        // The same reference at the same field: the running value.
        let same = load(Path::new("p.toml"), text, Env::Posted(&running.expanded)).unwrap();
        assert_eq!(same.snapshot.dir, running.snapshot.dir);
        // Anywhere else: as written, and the answer hides the values.
        let moved = text.replace("127.0.0.1:50051", "${PATH}");
        let err = load(Path::new("p.toml"), &moved, Env::Posted(&running.expanded))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"${PATH}\" is not a socket address"), "{err}");
        assert!(!err.contains(&home));
        let echoed = format!("seen {home} and {:?}", home);
        let hidden = running.expanded.hide(&echoed);
        assert!(!hidden.contains(&home), "{hidden}");
        assert!(!format!("{:?}", running.expanded).contains(&home));
    }

    /// Chains of links are fine; a chain that comes back to a table it
    /// passed is refused, naming the chain.
    #[test]
    fn chains_of_links_are_accepted_and_cycles_refused() {
        let config = |refunds_to: &str, payments_to: &str| {
            format!(
                r#"
[[sources]]
name = "billing"
kind = "grpc_push"

[[entities]]
name = "customer"
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
  id_via = {{ table = "{payments_to}", column = "link_id" }}
  primary_key = ["id"]
  [[entities.tables]]
  name = "refunds"
  source = "billing"
  from = "refunds"
  id_via = {{ table = "{refunds_to}", column = "link_id" }}
  primary_key = ["id"]
"#
            )
        };
        let chain = config("payments", "invoices");
        Config::from_toml(Path::new("c.toml"), &chain).unwrap();
        let cycle = config("payments", "refunds");
        let err = Config::from_toml(Path::new("c.toml"), &cycle)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the links form a cycle (payments -> refunds -> payments)"),
            "{err}"
        );
    }

    #[test]
    fn paths_render_with_indexes() {
        assert_eq!(
            render_path("entities.0.tables.2.foo"),
            "entities[0].tables[2].foo"
        );
    }
}
