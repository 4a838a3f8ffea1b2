//! The Debezium peer: `scripts/debezium_peer.py` (Debezium's embedded
//! engine through `pydbzengine`, in one Python process with its JVM), run
//! and read by its JSON-lines protocol. Installed on first use by
//! `scripts/debezium_setup.sh`; only the benchmark asks for it.

use super::harness::memory_of;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Installs the peer when missing; the venv's python.
pub async fn setup() -> anyhow::Result<PathBuf> {
    let out = tokio::process::Command::new("bash")
        .arg(scripts().join("debezium_setup.sh"))
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run scripts/debezium_setup.sh")?;
    if !out.status.success() {
        bail!("scripts/debezium_setup.sh failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let python = text.lines().last().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !python.is_empty(),
        "debezium_setup.sh printed no python path"
    );
    Ok(PathBuf::from(python))
}

/// Where Debezium reads from.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub database: &'a str,
    pub slot: &'a str,
    pub publication: &'a str,
    pub tables: &'a str,
    pub offsets: &'a Path,
}

/// A running peer.
pub struct Peer {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<serde_json::Value>,
    pub started: Instant,
    peak: Arc<AtomicU64>,
}

impl Peer {
    pub fn start(
        python: &Path,
        t: &Target<'_>,
        extra: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(log)?;
        let started = Instant::now();
        let mut child = tokio::process::Command::new(python)
            .arg(scripts().join("debezium_peer.py"))
            .args([
                "--host",
                t.host,
                "--port",
                &t.port.to_string(),
                "--user",
                t.user,
            ])
            .args([
                "--database",
                t.database,
                "--slot",
                t.slot,
                "--publication",
                t.publication,
            ])
            .args(["--tables", t.tables, "--offset-file"])
            .arg(t.offsets)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the Debezium peer")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        let peak = Arc::new(AtomicU64::new(0));
        let pid = child.id().unwrap_or(0);
        let p = peak.clone();
        tokio::spawn(async move {
            // VmHWM only grows; sampled until the process is gone.
            loop {
                let m = memory_of(pid);
                if m.peak == 0 {
                    return;
                }
                p.fetch_max(m.peak, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Peer {
            child,
            lines,
            started,
            peak,
        })
    }

    /// The highest resident memory seen so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The next JSON line, or an error when the process ended or `within` passed.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<serde_json::Value> {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => {
                let status = self.child.wait().await?;
                bail!("the Debezium peer exited ({status}); see its log")
            }
            Err(_) => bail!("nothing from the Debezium peer within {within:?}"),
        }
    }

    /// Reads lines until `{"event":"done"}`; returns it and when it came.
    pub async fn done(&mut self, within: Duration) -> anyhow::Result<(serde_json::Value, Instant)> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next(left.max(Duration::from_millis(1))).await?;
            if v["event"] == "done" {
                return Ok((v, Instant::now()));
            }
        }
    }

    /// Every JSON line that has arrived so far.
    pub fn drain(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(v) = self.lines.try_recv() {
            out.push(v);
        }
        out
    }

    /// SIGTERM (the engine flushes its offsets), then waits for the exit.
    pub async fn stop(mut self) -> anyhow::Result<u64> {
        let peak = self.peak();
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        Ok(peak)
    }
}
