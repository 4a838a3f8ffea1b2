//! What a new config changes against the running one, and what each change
//! costs (`fabric plan`, and every reload before it applies anything).
//!
//! A change is either applied live, while the fabric serves, or needs a
//! restart. A reload applies a new config only when every change in it can
//! be applied live; otherwise it refuses the whole of it and the running
//! config stays (see `docs/config.md`, "Changing the config while it runs").
//!
//! Live, on the embedded bus:
//! - views added, removed or altered (masks included), descriptions, owners,
//!   the published view;
//! - sources added (they read their tables from the start), removed (the
//!   rows their tables fed are dropped) or altered (they restart: from their
//!   checkpoint when what they read is the same, from the start otherwise);
//! - entity types (kept by `cdc`) added or removed, tables added, removed or
//!   altered: a removed or altered table's rows are dropped from every entity
//!   of its type, and the source of an added or altered table reads all its
//!   tables again from the start (an initial snapshot that replaces their
//!   rows).
//!
//! Everything else (addresses, the bus, snapshots, access, an entity type's
//! id type, history, lineage or sync mode, …) needs a restart. On the Kafka
//! bus, processes share sources and partitions and learn the config each
//! from its own file: only views, descriptions and owners change live there;
//! the rest takes a rolling restart.

use super::{Config, EntityConfig, SourceConfig};
use serde_json::Value;
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One difference between the running config and a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `+` added, `-` removed, `~` altered.
    pub sign: char,
    /// What changes, e.g. `source shop`, `view customer.support`.
    pub subject: String,
    /// What applying it does and costs.
    pub effect: String,
    /// Applied while the fabric serves (else: needs a restart).
    pub live: bool,
}

/// A table whose rows a reload drops from every entity of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedTable {
    pub entity_type: String,
    pub table: String,
    /// The source that fed it (its rows carry that source's positions).
    pub source: String,
}

/// What applying a plan does to sources and data, in this order: stop
/// `stop` and the sources in `start_over` and `restart` that run; drop
/// `drop_tables`; start `start_over` from nothing and `restart` from their
/// checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actions {
    /// Sources removed.
    pub stop: Vec<String>,
    /// Sources (of the new config) that read their tables from the start:
    /// new ones, and those whose reading changed.
    pub start_over: Vec<String>,
    /// Sources that restart from their checkpoints (settings that do not
    /// change what they read, such as the poll interval).
    pub restart: Vec<String>,
    pub drop_tables: Vec<DroppedTable>,
    /// Entity types removed and added.
    pub removed_types: Vec<String>,
    pub added_types: Vec<String>,
}

/// The changes between two configs.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub actions: Actions,
    /// Sources that read all their tables again because a table they
    /// feed was added or altered.
    reread: BTreeSet<String>,
}

impl Plan {
    /// Every change of `new` against `running`. `entities` counts the
    /// entities held per type (for what dropping them costs); `kafka` is
    /// true on the Kafka bus.
    pub fn between(
        running: &Config,
        new: &Config,
        entities: &dyn Fn(&str) -> u64,
        kafka: bool,
    ) -> Plan {
        let mut plan = Plan::default();
        plan.sections(running, new);
        plan.entity_types(running, new, entities, kafka);
        plan.sources(running, new, kafka);
        if kafka {
            for c in &mut plan.changes {
                if c.live
                    && !c.subject.starts_with("view ")
                    && !c.subject.contains("description")
                    && !c.subject.contains("owner")
                {
                    c.live = false;
                    c.effect = format!(
                        "{}; on the Kafka bus this takes a rolling restart",
                        c.effect
                    );
                }
            }
            if plan.changes.iter().any(|c| !c.live) {
                plan.actions = Actions::default();
            }
        }
        plan
    }

    /// True when the new config can be applied while serving.
    pub fn live(&self) -> bool {
        self.changes.iter().all(|c| c.live)
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn push(&mut self, sign: char, subject: String, effect: impl Into<String>, live: bool) {
        self.changes.push(Change {
            sign,
            subject,
            effect: effect.into(),
            live,
        });
    }

    /// The sections other than sources and entities: any change needs a restart.
    fn sections(&mut self, running: &Config, new: &Config) {
        let except = ["sources", "entities"];
        let (a, b) = (
            to_value_without(running, &except),
            to_value_without(new, &except),
        );
        for path in differing_paths(&a, &b, "") {
            self.push('~', path, "needs a restart", false);
        }
    }

    fn entity_types(
        &mut self,
        running: &Config,
        new: &Config,
        entities: &dyn Fn(&str) -> u64,
        kafka: bool,
    ) {
        for old in &running.entities {
            if new.entity(&old.name).is_none() {
                let n = entities(&old.name);
                self.push(
                    '-',
                    format!("entity type {}", old.name),
                    format!("its {n} entities are dropped; reads of it fail with INVALID_ARGUMENT"),
                    !old.on_access(),
                );
                self.actions.removed_types.push(old.name.clone());
                for t in &old.tables {
                    self.actions.drop_tables.push(DroppedTable {
                        entity_type: old.name.clone(),
                        table: t.name.clone(),
                        source: t.source.clone(),
                    });
                }
            }
        }
        for e in &new.entities {
            let Some(old) = running.entity(&e.name) else {
                let sources: BTreeSet<&str> = e.tables.iter().map(|t| t.source.as_str()).collect();
                let (effect, live) = if e.on_access() {
                    (
                        "sync = \"on_access\" types are added with a restart".to_string(),
                        false,
                    )
                } else if e.history > 0 || e.lineage {
                    (
                        "a type keeping history or lineage is added with a restart".to_string(),
                        false,
                    )
                } else {
                    let effect = format!(
                        "filled by an initial snapshot of {}",
                        sources.iter().copied().collect::<Vec<_>>().join(", ")
                    );
                    (effect, true)
                };
                self.push('+', format!("entity type {}", e.name), effect, live);
                self.reread.extend(sources.into_iter().map(String::from));
                self.actions.added_types.push(e.name.clone());
                continue;
            };
            self.entity_type(old, e, entities, kafka);
        }
    }

    fn entity_type(
        &mut self,
        old: &EntityConfig,
        new: &EntityConfig,
        entities: &dyn Fn(&str) -> u64,
        kafka: bool,
    ) {
        let name = &new.name;
        // Fields a live reload changes by themselves.
        for (field, a, b) in [
            ("description", &old.description, &new.description),
            ("owner", &old.owner, &new.owner),
        ] {
            if a != b {
                self.push('~', format!("{field} of {name}"), "shown at once", true);
            }
        }
        if old.publish_view != new.publish_view {
            self.push(
                '~',
                format!("published view of {name}"),
                if kafka {
                    "the entities topic's next messages"
                } else {
                    "no entities topic on the embedded bus: nothing to do"
                },
                !kafka,
            );
        }
        // The rest of the type (not its tables and views): restart.
        let live_fields = ["tables", "views", "description", "owner", "publish_view"];
        let restart_fields = differing_paths(
            &to_value_without(old, &live_fields),
            &to_value_without(new, &live_fields),
            &format!("entities.{name}"),
        );
        for path in &restart_fields {
            self.push('~', path.clone(), "needs a restart", false);
        }
        let on_access = old.on_access() || new.on_access();
        let held = entities(name);
        for t in &old.tables {
            match new.table(&t.name) {
                None => {
                    self.push(
                        '-',
                        format!("table {name}.{}", t.name),
                        format!("its rows are dropped from the {held} {name} entities held"),
                        !on_access,
                    );
                    self.actions.drop_tables.push(DroppedTable {
                        entity_type: name.clone(),
                        table: t.name.clone(),
                        source: t.source.clone(),
                    });
                }
                Some(n) if to_value(n) != to_value(t) && only_fetch_differs(n, t) => {
                    self.push(
                        '~',
                        format!("fetch query of table {name}.{}", t.name),
                        "reads straight from its source use it at once",
                        true,
                    );
                }
                Some(n) if to_value(n) != to_value(t) => {
                    self.reread.insert(n.source.clone());
                    self.push(
                        '~',
                        format!("table {name}.{}", t.name),
                        format!(
                            "its rows are dropped from the {held} {name} entities held, then \
                             source {} reads all its tables from the start",
                            n.source
                        ),
                        !on_access,
                    );
                    self.actions.drop_tables.push(DroppedTable {
                        entity_type: name.clone(),
                        table: t.name.clone(),
                        source: t.source.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        for t in &new.tables {
            if old.table(&t.name).is_none() {
                self.reread.insert(t.source.clone());
                self.push(
                    '+',
                    format!("table {name}.{}", t.name),
                    format!(
                        "source {} reads all its tables from the start (initial snapshot)",
                        t.source
                    ),
                    !on_access,
                );
            }
        }
        for (v, cfg) in &old.views {
            match new.views.get(v) {
                None => self.push(
                    '-',
                    format!("view {name}.{v}"),
                    "reads asking for it fail with INVALID_ARGUMENT",
                    true,
                ),
                Some(n) if to_value(n) != to_value(cfg) => {
                    let published = kafka && new.publish_view.as_deref() == Some(v.as_str());
                    self.push(
                        '~',
                        format!("view {name}.{v}"),
                        if published {
                            "the entities topic publishes this view: on the Kafka bus this takes \
                             a rolling restart"
                        } else {
                            "the next reads and watch messages show the new view"
                        },
                        !published,
                    )
                }
                Some(_) => {}
            }
        }
        for v in new.views.keys() {
            if !old.views.contains_key(v) {
                self.push('+', format!("view {name}.{v}"), "readable at once", true);
            }
        }
    }

    fn sources(&mut self, running: &Config, new: &Config, _kafka: bool) {
        for old in &running.sources {
            if new.source(&old.name).is_none() {
                self.push(
                    '-',
                    format!("source {}", old.name),
                    "stops; the rows it fed are dropped with their tables",
                    true,
                );
                self.actions.stop.push(old.name.clone());
            }
        }
        for s in &new.sources {
            let Some(old) = running.source(&s.name) else {
                self.push(
                    '+',
                    format!("source {} ({})", s.name, s.kind.as_str()),
                    if feeds(new, &s.name).is_empty() {
                        "starts; feeds no table yet"
                    } else {
                        "starts and reads its tables from the start (initial snapshot)"
                    },
                    true,
                );
                self.actions.start_over.push(s.name.clone());
                continue;
            };
            let covered = match (Reading::of(running, &old.name), Reading::of(new, &s.name)) {
                (Some(a), Some(b)) => a.covers(&b),
                _ => false,
            };
            let altered = to_value(&resolved(running, old)) != to_value(&resolved(new, s));
            if (!covered || self.reread.contains(&s.name)) && s.initial_snapshot == Some(false) {
                self.push(
                    '~',
                    format!("source {}", s.name),
                    "would have to read its tables again, but initial_snapshot = false: \
                     set it to true for this change",
                    false,
                );
            } else if !covered || self.reread.contains(&s.name) {
                let said = format!("source {} ", s.name);
                if altered || !self.changes.iter().any(|c| c.effect.contains(&said)) {
                    self.push(
                        '~',
                        format!("source {}", s.name),
                        "restarts and reads all its tables again from the start (initial \
                         snapshot, replacing their rows)",
                        true,
                    );
                }
                self.actions.start_over.push(s.name.clone());
            } else if altered {
                self.push(
                    '~',
                    format!("source {}", s.name),
                    "restarts from its checkpoint",
                    true,
                );
                self.actions.restart.push(s.name.clone());
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes");
        }
        let restart = self.changes.iter().filter(|c| !c.live).count();
        if restart == 0 {
            writeln!(f, "{} change(s), all applied live:", self.changes.len())?;
        } else {
            writeln!(
                f,
                "{} change(s), {restart} of which need(s) a restart (a reload refuses this config):",
                self.changes.len()
            )?;
        }
        for c in &self.changes {
            writeln!(
                f,
                "  {} {}: {}{}",
                c.sign,
                c.subject,
                c.effect,
                if c.live { "" } else { " [restart]" }
            )?;
        }
        Ok(())
    }
}

/// The source tables `source` feeds in `config` (captured types only),
/// each with how its rows find their entity.
fn feeds(config: &Config, source: &str) -> BTreeSet<String> {
    config
        .entities
        .iter()
        .filter(|e| !e.on_access())
        .flat_map(|e| e.tables.iter().map(move |t| (e, t)))
        .filter(|(_, t)| t.source == source)
        .map(|(e, t)| {
            serde_json::json!({
                "entity_type": e.name,
                "table": t.name,
                "from": t.from.trim_start_matches("public."),
                "id_column": t.id_column,
                "id_via": to_value(&t.id_via),
                "primary_key": t.primary_key,
            })
            .to_string()
        })
        .collect()
}

/// A source's settings with its file paths resolved (a file moved is
/// another file).
fn resolved(config: &Config, s: &SourceConfig) -> SourceConfig {
    let mut s = s.clone();
    s.path = s.path.as_deref().map(|p| config.resolve(p));
    s
}

/// What a source reads, as far as its checkpoint is concerned: where from
/// (connection, slot, publication, topics, cursor) and which source tables
/// feed which entity tables, as digests. A checkpoint taken while reading
/// `a` may be resumed to read `b` when [`Reading::covers`] says so;
/// otherwise the source starts over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    pub from: String,
    pub feeds: BTreeSet<String>,
}

impl Reading {
    pub fn of(config: &Config, source: &str) -> Option<Reading> {
        let s = resolved(config, config.source(source)?);
        let from = serde_json::json!({
            "kind": s.kind.as_str(),
            "url": s.url,
            "path": s.path,
            "slot": s.slot,
            "publication": s.publication,
            "cursor_column": s.cursor_column,
            "soft_delete_column": s.soft_delete_column,
            "topics": s.topics,
            "brokers": s.brokers,
            "group_id": s.group_id,
        });
        // The tables it captures count as what it feeds: one more was
        // never read; one fewer changes nothing read before.
        let captured = s.tables.iter().map(|t| format!("captures {t}"));
        Some(Reading {
            from: digest(&from.to_string()),
            feeds: feeds(config, source)
                .into_iter()
                .chain(captured)
                .map(|f| digest(&f))
                .collect(),
        })
    }

    /// Whether a checkpoint taken while reading `self` covers reading
    /// `new`: the same place, and no table fed that was not fed before
    /// (its existing rows were never read).
    pub fn covers(&self, new: &Reading) -> bool {
        self.from == new.from && new.feeds.is_subset(&self.feeds)
    }
}

fn digest(s: &str) -> String {
    hex::encode(&sha2::Sha256::digest(s.as_bytes())[..12])
}

/// What every source of `config` reads.
pub fn readings(config: &Config) -> BTreeMap<String, Reading> {
    config
        .sources
        .iter()
        .filter_map(|s| Reading::of(config, &s.name).map(|r| (s.name.clone(), r)))
        .collect()
}

/// Whether two versions of a table differ in their `fetch` query alone
/// (what is captured and how it is routed stay the same).
fn only_fetch_differs(a: &super::TableConfig, b: &super::TableConfig) -> bool {
    to_value_without(a, &["fetch"]) == to_value_without(b, &["fetch"])
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `v` as JSON without the fields `except`.
fn to_value_without<T: serde::Serialize>(v: &T, except: &[&str]) -> Value {
    let mut v = to_value(v);
    if let Value::Object(m) = &mut v {
        for k in except {
            m.remove(*k);
        }
    }
    v
}

/// The leaf paths where `a` and `b` differ (arrays compared whole).
fn differing_paths(a: &Value, b: &Value, prefix: &str) -> Vec<String> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            let null = Value::Null;
            keys.into_iter()
                .flat_map(|k| {
                    differing_paths(
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        &join(k),
                    )
                })
                .collect()
        }
        _ if a == b => Vec::new(),
        _ => vec![if prefix.is_empty() {
            "(config)".to_string()
        } else {
            prefix.to_string()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
        [[sources]]
        name = "crm"
        kind = "sqlite"
        path = "crm.db"
        tables = ["customers", "orders"]

        [[entities]]
        name = "customer"
        description = "A customer"
        [[entities.tables]]
        name = "customer"
        source = "crm"
        from = "customers"
        id_column = "id"
        primary_key = ["id"]
        [entities.views.support]
        tables = ["customer"]
    "#;

    fn cfg(text: &str) -> Config {
        Config::from_toml(Path::new("/etc/fabric/f.toml"), text).unwrap()
    }

    fn plan(a: &str, b: &str) -> Plan {
        Plan::between(&cfg(a), &cfg(b), &|_| 7, false)
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let p = plan(BASE, BASE);
        assert!(p.is_empty() && p.live(), "{p}");
        assert_eq!(p.to_string(), "no changes\n");
    }

    #[test]
    fn views_descriptions_and_owners_change_live_without_touching_sources() {
        let new = BASE
            .replace(
                "description = \"A customer\"",
                "description = \"Who buys\"\n owner = \"crm-team\"",
            )
            .replace(
                "[entities.views.support]",
                "[entities.views.billing]\n tables = [\"customer\"]\n [entities.views.support]",
            );
        let p = plan(BASE, &new);
        assert!(p.live(), "{p}");
        let subjects: Vec<&str> = p.changes.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "description of customer",
                "owner of customer",
                "view customer.billing"
            ]
        );
        assert_eq!(p.actions, Actions::default());
    }

    #[test]
    fn an_added_table_makes_its_source_start_over_and_a_removed_one_drops_rows() {
        let added = format!(
            "{BASE}\n[[entities.tables]]\nname = \"orders\"\nsource = \"crm\"\nfrom = \"orders\"\n\
             id_column = \"customer_id\"\nprimary_key = [\"id\"]\n"
        );
        let p = plan(BASE, &added);
        assert!(p.live(), "{p}");
        assert_eq!(p.actions.start_over, ["crm"]);
        assert!(
            p.to_string()
                .contains("+ table customer.orders: source crm reads all"),
            "{p}"
        );
        let p = plan(&added, BASE);
        assert!(p.live(), "{p}");
        assert_eq!(
            p.actions.drop_tables,
            [DroppedTable {
                entity_type: "customer".into(),
                table: "orders".into(),
                source: "crm".into()
            }]
        );
        assert!(p.actions.start_over.is_empty(), "{:?}", p.actions);
        assert!(
            p.to_string()
                .contains("dropped from the 7 customer entities"),
            "{p}"
        );
        let (small, big) = (
            Reading::of(&cfg(BASE), "crm").unwrap(),
            Reading::of(&cfg(&added), "crm").unwrap(),
        );
        assert!(big.covers(&small) && !small.covers(&big));
    }

    #[test]
    fn a_poll_interval_restarts_from_the_checkpoint_and_a_new_file_starts_over() {
        let slower = BASE.replace(
            "path = \"crm.db\"",
            "path = \"crm.db\"\npoll_interval = \"1s\"",
        );
        let p = plan(BASE, &slower);
        assert_eq!(p.actions.restart, ["crm"]);
        assert!(p.actions.start_over.is_empty());
        let moved = BASE.replace("crm.db", "crm2.db");
        let p = plan(BASE, &moved);
        assert_eq!(p.actions.start_over, ["crm"]);
        assert!(
            p.to_string()
                .contains("~ source crm: restarts and reads all"),
            "{p}"
        );
    }

    #[test]
    fn a_fetch_query_changes_live_and_a_new_type_with_history_needs_a_restart() {
        let fetch = BASE.replace(
            "primary_key = [\"id\"]\n",
            "primary_key = [\"id\"]\nfetch = \"SELECT * FROM customers WHERE id = ?\"\n",
        );
        let p = plan(BASE, &fetch);
        assert!(p.live(), "{p}");
        assert_eq!(
            p.actions,
            Actions::default(),
            "nothing dropped or read again"
        );
        let typed = format!(
            "{BASE}\n[[entities]]\nname = \"account\"\nhistory = 2\n[[entities.tables]]\n\
             name = \"account\"\nsource = \"crm\"\nfrom = \"orders\"\nid_column = \"id\"\n\
             primary_key = [\"id\"]\n"
        );
        let p = plan(BASE, &typed);
        assert!(!p.live(), "{p}");
        assert!(p.to_string().contains("history or lineage"), "{p}");
    }

    #[test]
    fn addresses_and_the_id_type_need_a_restart() {
        let new = format!("[server]\ngrpc_addr = \"127.0.0.1:7000\"\n{BASE}").replace(
            "description = \"A customer\"",
            "id_type = \"string\"\ndescription = \"A customer\"",
        );
        let p = plan(BASE, &new);
        assert!(!p.live(), "{p}");
        let text = p.to_string();
        assert!(
            text.contains("~ server.grpc_addr: needs a restart [restart]"),
            "{text}"
        );
        assert!(text.contains("entities.customer.id_type"), "{text}");
    }

    #[test]
    fn on_the_kafka_bus_only_views_descriptions_and_owners_are_live() {
        let new = BASE.replace("crm.db", "crm2.db");
        let p = Plan::between(&cfg(BASE), &cfg(&new), &|_| 0, true);
        assert!(!p.live(), "{p}");
        assert!(p.to_string().contains("rolling restart"), "{p}");
        assert_eq!(p.actions, Actions::default());
    }
}
