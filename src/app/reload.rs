//! Live config changes: `fabric plan`, SIGHUP and the admin endpoint's
//! `POST /config/reload`.
//!
//! A reload reads the config file the fabric was started with again,
//! validates it whole, and compares it with the running config
//! ([`Plan`]). An invalid file, or one with a change that needs a restart,
//! is refused: the running config stays and the reason is logged (and
//! answered to the admin call). Otherwise, on the main task (so no snapshot
//! round or ownership change runs meanwhile):
//!
//! 1. the sources removed, starting over or restarting stop, and what they
//!    sent reaches the bus;
//! 2. the router routes by the new config; truncates of the tables dropped
//!    go on the bus behind everything routed, so every partition drops
//!    those rows in order;
//! 3. the config, the views (under a new epoch: encodings cached under the
//!    old views are never served) and the source list are swapped;
//! 4. new sources and those starting over start from nothing (their
//!    initial snapshot replaces their tables' rows), the others from their
//!    checkpoints;
//! 5. a snapshot round writes the new state with the checkpoints it
//!    belongs to.
//!
//! Reads never stop: every call takes the config and views current when it
//! begins. Entity types the plan does not touch are served as before,
//! current throughout; those whose source starts over show its tables as
//! that source's initial snapshot fills them again.

use super::Fabric;
use super::RouterControl;
use super::cluster;
use super::snapshots::Snapshotter;
use crate::config::Config;
use crate::config::plan::Plan;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What a reload answers: applied (or nothing to apply), or refused.
#[derive(Debug, Clone)]
pub struct Answer {
    pub applied: bool,
    pub text: String,
}

/// A request to reload, with where to answer (none for SIGHUP).
pub type Request = Option<oneshot::Sender<Answer>>;

/// The plan of `new` (a config text, as if it were the running file)
/// against the running config; Err: the text is not a valid config. The
/// text's `${...}` references never read this process's environment (see
/// [`Config::from_posted_toml`]).
pub fn plan_text(fabric: &Fabric, named: &std::path::Path, text: &str) -> Result<Plan, String> {
    let running = fabric.config();
    // Validated where the running file is (its relative paths resolve
    // there, never against a path the caller names); errors name the file
    // the caller posted.
    let new = Config::from_posted_toml(&running.file, text, &running).map_err(|mut e| {
        for one in &mut e.0 {
            one.file = named.to_path_buf();
        }
        let mut said = e.to_string();
        if text.contains("${") {
            said.push_str(
                "note: a posted config's ${...} references are not expanded (the admin endpoint \
                 never reads the server's environment or files), except those written exactly \
                 as the running file has them at the same field\n",
            );
        }
        said
    })?;
    Ok(plan_of(fabric, &running, &new))
}

fn plan_of(fabric: &Fabric, running: &Config, new: &Config) -> Plan {
    Plan::between(
        running,
        new,
        &|t| fabric.store.entity_count(t),
        running.bus.kind == crate::config::BusKind::Kafka,
    )
}

/// Reads the running config's file again and applies it (see the module
/// docs). Runs on the main task.
pub async fn apply(
    fabric: &Arc<Fabric>,
    sources: &mut cluster::Sources,
    router: &mpsc::UnboundedSender<RouterControl>,
    snapshotter: &mut Snapshotter,
) -> Answer {
    let refused = |text: String| {
        tracing::error!("config reload refused; the running config stays: {text}");
        fabric.metrics.reloads_refused.inc();
        Answer {
            applied: false,
            text,
        }
    };
    let running = fabric.config();
    let path = running.file.clone();
    let new = match tokio::task::spawn_blocking(move || Config::load(&path)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refused(format!("the config file is invalid:\n{e}")),
        Err(e) => return refused(format!("the config file could not be read: {e}")),
    };
    let plan = plan_of(fabric, &running, &new);
    if plan.is_empty() {
        tracing::info!(file = %running.file.display(), "config reloaded: no changes");
        return Answer {
            applied: true,
            text: plan.to_string(),
        };
    }
    if !plan.live() {
        return refused(format!("{plan}restart the fabric to apply this config"));
    }
    // Views first: a `hash` mask new to the config needs the masking key.
    let key = match &fabric.mask_key {
        Some(k) => Some(k.clone()),
        None => match crate::view::MaskKey::load(&new) {
            Ok(k) => k,
            Err(e) => return refused(format!("the masking key cannot be loaded: {e}")),
        },
    };
    let views = crate::view::Views::compile(&new, key.as_ref(), fabric.views().epoch + 1);
    // Reads with staleness bounds go to the sources of the new config.
    if let Err(e) = fabric.fetcher.replan(&new) {
        return refused(format!("cannot read the new sources by query: {e}"));
    }
    let new = Arc::new(new);
    let a = &plan.actions;

    // 1. Stop what stops or restarts; what they sent reaches the bus.
    let stopping: Vec<Arc<str>> = a
        .stop
        .iter()
        .chain(&a.start_over)
        .chain(&a.restart)
        .map(|s| Arc::<str>::from(s.as_str()))
        .collect();
    sources.stop_sources(&stopping).await;

    // 2. Route by the new config; drop the tables that go.
    let forget: Vec<Arc<str>> = a
        .stop
        .iter()
        .chain(&a.start_over)
        .map(|s| Arc::<str>::from(s.as_str()))
        .collect();
    let (done, landed) = oneshot::channel();
    let sent = router.send(RouterControl::Reconfigure {
        config: new.clone(),
        forget: forget.clone(),
        drop: a.drop_tables.clone(),
        done,
    });
    if sent.is_err() || landed.await.is_err() {
        // The router is gone: the fabric is stopping.
        return refused("the fabric is stopping".into());
    }
    {
        let mut routed = fabric.routed.lock();
        for s in &forget {
            routed.remove(s);
        }
    }
    snapshotter.forget_sources(&forget);

    // 3. Swap config, views, sources.
    fabric
        .store
        .add_entity_types(a.added_types.iter().map(String::as_str));
    fabric.store.set_retention(new.retention());
    let old_sources = fabric.sources();
    let list: Vec<Arc<super::SourceRuntime>> = new
        .sources
        .iter()
        .map(|s| {
            match old_sources.iter().find(|o| *o.name == *s.name) {
                Some(o) if o.kind == s.kind => {
                    if a.start_over.contains(&s.name) {
                        // Nothing of the new run is acknowledged yet.
                        o.durable.send_replace(None);
                    }
                    o.clone()
                }
                _ => Arc::new(super::SourceRuntime::new(s)),
            }
        })
        .collect();
    fabric.sources.store(Arc::new(list));
    fabric.views.store(Arc::new(views));
    fabric.config.store(new.clone());

    // 4. Start what starts.
    for name in &a.start_over {
        sources.start(name, None, true);
    }
    for name in &a.restart {
        let resume = fabric.routed.lock().get(name.as_str()).cloned().flatten();
        sources.start(name, resume, false);
    }

    // 5. A round with the new state and the checkpoints it belongs to.
    if let Err(e) = snapshotter.round().await {
        tracing::error!(error = %e, "snapshot round after a reload failed; the next one retries");
    }
    fabric.metrics.reloads_applied.inc();
    for c in &plan.changes {
        tracing::info!(change = %format!("{} {}", c.sign, c.subject), effect = %c.effect, "config change applied");
    }
    tracing::info!(file = %new.file.display(), changes = plan.changes.len(), "config reloaded");
    Answer {
        applied: true,
        text: plan.to_string(),
    }
}
