//! The status page of the admin endpoint: `GET /status` (one self-contained
//! HTML page, no outside resources, that reads `/status.json` every second)
//! and `GET /status.json` (everything it shows, for scripts too): sources
//! with their state, positions, lag and the progress of an initial
//! snapshot; ingest and read rates over the last five minutes; entities
//! and blocked ids per type; partitions with their offsets and rebuilds;
//! the age of the last snapshot; dead letters per source with the last
//! reasons — never their raw input, and with the values a reason or a
//! source's last error may hold cut out ([`without_values`]): whoever may
//! read the catalog may read the page, and values may be what views mask.

use crate::app::Fabric;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Rate samples kept: one a second for five minutes.
const SAMPLES: usize = 300;
/// Dead letters listed with their reasons.
const RECENT_DEAD_LETTERS: usize = 10;

/// Totals sampled once a second, for the page's rate charts.
#[derive(Default)]
pub struct Rates {
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Clone, Copy)]
struct Sample {
    unix_ms: i64,
    applied: u64,
    reads: u64,
}

impl Rates {
    /// Samples `fabric`'s totals every second until `stop`.
    pub async fn sample(&self, fabric: &Fabric, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = &fabric.metrics;
            let s = Sample {
                unix_ms: crate::sources::now_micros() / 1000,
                applied: m.applied_all.load(Ordering::Relaxed),
                reads: m.reads_all.load(Ordering::Relaxed),
            };
            let mut q = self.samples.lock();
            q.push_back(s);
            while q.len() > SAMPLES {
                q.pop_front();
            }
        }
    }

    /// Per second between consecutive samples: `[unix ms, ingest, reads]`.
    fn series(&self) -> Vec<[f64; 3]> {
        let q = self.samples.lock();
        q.iter()
            .zip(q.iter().skip(1))
            .map(|(a, b)| {
                let secs = ((b.unix_ms - a.unix_ms) as f64 / 1000.0).max(0.001);
                [
                    b.unix_ms as f64,
                    b.applied.saturating_sub(a.applied) as f64 / secs,
                    b.reads.saturating_sub(a.reads) as f64 / secs,
                ]
            })
            .collect()
    }
}

fn progress(r: Option<crate::progress::Report>) -> Value {
    match r {
        None => Value::Null,
        Some(r) => json!({
            "what": r.what,
            "unit": r.unit,
            "done": r.done,
            "total": r.total,
            "per_second": r.per_second.round(),
            "seconds_left": r.left.map(|l| l.as_secs()),
            "elapsed_ms": r.elapsed.as_millis() as u64,
        }),
    }
}

/// Everything the page shows.
pub fn document(f: &Fabric, rates: &Rates) -> Value {
    let routed = f.routed.lock().clone();
    let sources: Vec<Value> = f
        .sources()
        .iter()
        .map(|s| {
            json!({
                "name": &*s.name,
                "kind": s.kind.as_str(),
                "state": s.status.state.lock().clone(),
                "routed": routed.get(&s.name).cloned().flatten().map(|p| p.to_string()),
                "durable": s.durable.borrow().as_ref().map(|p| p.to_string()),
                "lag_ms": s.status.lag_millis(),
                "caught_up": s.status.caught_up(),
                "transactions": s.status.transactions.load(Ordering::Relaxed),
                "changes": s.status.changes.load(Ordering::Relaxed),
                "dead_lettered": f.dead_letters.count(&s.name),
                "last_error": without_quoted(&s.status.last_error.lock()),
                "progress": progress(s.status.progress.report()),
            })
        })
        .collect();
    let types: Vec<Value> = f
        .config()
        .entities
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "description": e.description,
                "owner": e.owner,
                "entities": f.store.entity_count(&e.name),
                "blocked": f.store.blocked_count(&e.name),
            })
        })
        .collect();
    let partitions: Vec<Value> = f
        .partitions
        .iter()
        .enumerate()
        .map(|(p, st)| {
            json!({
                "partition": p,
                "owned": st.owned.load(Ordering::Acquire),
                "serving": st.serving(),
                "entities": f.store.shard_len(p as u32),
                "applied": st.applied.load(Ordering::Acquire),
                "end": f.bus.end_offset(p as u32).0,
                "snapshot": st.snapshot.load(Ordering::Acquire),
                "progress": progress(st.rebuild.report()),
            })
        })
        .collect();
    let now_ms = crate::sources::now_micros() / 1000;
    let last = f.metrics.snapshot_last_unix.get();
    let all_sources = f.sources();
    let by_source: BTreeMap<&str, u64> = all_sources
        .iter()
        .map(|s| (&*s.name, f.dead_letters.count(&s.name)))
        .collect();
    let recent: Vec<Value> = f
        .dead_letters
        .recent_reasons(RECENT_DEAD_LETTERS)
        .into_iter()
        .map(|(time, source, table, reason)| {
            json!({
                "time": time,
                "source": source,
                "table": table,
                "reason": without_values(&reason),
            })
        })
        .collect();
    json!({
        "now_ms": now_ms,
        "ready": f.ready.load(Ordering::Acquire),
        "version": env!("CARGO_PKG_VERSION"),
        "bus": if f.config().bus.kind == crate::config::BusKind::Kafka { "kafka" } else { "embedded" },
        "member": f.member_id,
        "sources": sources,
        "entity_types": types,
        "partitions": partitions,
        "snapshot": {
            "last_unix": (last > 0).then_some(last),
            "age_s": (last > 0).then(|| (now_ms / 1000 - last).max(0)),
            "bytes": f.metrics.snapshot_bytes.get(),
        },
        "dead_letters": { "by_source": by_source, "recent": recent },
        "rates": rates.series(),
    })
}

/// `reason` with the values it may hold cut out, whatever their quoting:
/// spans in double, single or back quotes, in parentheses after `=` (as
/// PostgreSQL's `Key (id)=(42)`), and every word with a digit in it (ids,
/// keys, positions, amounts). Words of letters stay: field and table
/// names, what went wrong.
pub fn without_values(reason: &str) -> String {
    scrubbed(reason, true)
}

/// `text` with its quoted spans cut out (as [`without_values`]), words with
/// digits kept: a source's last error names hosts and ports, and its
/// values, if any, are quoted.
pub fn without_quoted(text: &str) -> String {
    scrubbed(text, false)
}

fn scrubbed(reason: &str, numbers: bool) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut chars = reason.chars().peekable();
    let mut prev = ' ';
    while let Some(c) = chars.next() {
        let close = match c {
            '"' | '\'' | '`' => Some(c),
            '(' if prev == '=' => Some(')'),
            _ => None,
        };
        if let Some(close) = close {
            // An apostrophe inside a word (`can't`) quotes nothing.
            if c == '\'' && prev.is_alphanumeric() {
                out.push(c);
                prev = c;
                continue;
            }
            let mut escaped = false;
            for x in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if x == '\\' {
                    escaped = true;
                } else if x == close {
                    break;
                }
            }
            out.push(c);
            out.push('…');
            out.push(close);
            prev = close;
            continue;
        }
        if is_word(c) {
            let mut word = String::from(c);
            while let Some(&n) = chars.peek() {
                if !is_word(n) {
                    break;
                }
                word.push(n);
                chars.next();
            }
            if numbers && word.chars().any(|x| x.is_ascii_digit()) {
                out.push('…');
            } else {
                out.push_str(&word);
            }
            prev = word.chars().next_back().unwrap_or(c);
            continue;
        }
        out.push(c);
        prev = c;
    }
    out
}

/// A character of a word as [`without_values`] sees words: names with
/// dots and brackets (`entities[0].id`, `router.pending_max`) stay whole.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '[' | ']' | '@' | '+' | ':' | '/')
}

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

/// Shared by the admin server's handlers.
pub struct StatusState {
    pub fabric: Arc<Fabric>,
    pub rates: Arc<Rates>,
    /// Config requests (plan, reload) being answered: a bound.
    pub config_requests: Arc<tokio::sync::Semaphore>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_keep_their_words_and_lose_their_values() {
        assert_eq!(
            without_values(r#"customers.born: bad date "1985-03-02" (expected "YYYY-MM-DD")"#),
            r#"customers.born: bad date "…" (expected "…")"#
        );
        assert_eq!(without_values("no id column"), "no id column");
        assert_eq!(without_values(r#"cut "short"#), r#"cut "…""#);
        // Whatever the quoting, and no quoting at all.
        assert_eq!(
            without_values("bad value 'alice@example.com' in `email`"),
            "bad value '…' in `…`"
        );
        assert_eq!(
            without_values("Key (id)=(42) already exists; can't insert"),
            "Key (id)=(…) already exists; can't insert"
        );
        assert_eq!(
            without_values(
                "no customer.invoices row with key 1042 arrived within 30s to link this row"
            ),
            "no customer.invoices row with key … arrived within … to link this row"
        );
        assert_eq!(
            without_values("id a1b2-c3 is longer than allowed"),
            "id … is longer than allowed"
        );
    }
}
