//! What every benchmark part needs: the fabric under test as a child process
//! (the same binary, `fabric run`), its resident memory and metrics, and a
//! closed-loop load generator that records latencies in HDR histograms.

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident now (VmRSS), bytes.
    pub rss: u64,
    /// Highest resident so far (VmHWM), bytes.
    pub peak: u64,
}

pub fn memory_of(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// `fabric run` on a generated config, in its own process.
pub struct FabricChild {
    child: tokio::process::Child,
    pub grpc: String,
    pub admin: String,
    pub started: Instant,
    log: PathBuf,
}

impl FabricChild {
    /// Starts this binary as `fabric run --config <config>` (warnings only in
    /// its log: the benchmark measures serving, not logging).
    pub fn start(config: &Path, grpc: &str, admin: &str, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the fabric binary")?;
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let started = Instant::now();
        let child = tokio::process::Command::new(exe)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the fabric")?;
        Ok(FabricChild {
            child,
            grpc: format!("http://{grpc}"),
            admin: admin.to_string(),
            started,
            log: log.to_path_buf(),
        })
    }

    /// Writes `<dir>/<name>.toml` as `config(grpc_addr, admin_addr)` gives
    /// it for two free ports, starts the fabric on it (log `<name>.log`)
    /// and waits until it is ready.
    pub async fn launch(
        dir: &Path,
        name: &str,
        config: impl FnOnce(&str, &str) -> String,
    ) -> anyhow::Result<Self> {
        let grpc = format!("127.0.0.1:{}", free_port()?);
        let admin = format!("127.0.0.1:{}", free_port()?);
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config(&grpc, &admin))
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut f = Self::start(&path, &grpc, &admin, &dir.join(format!("{name}.log")))?;
        f.wait_ready(Duration::from_secs(120)).await?;
        Ok(f)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn memory(&self) -> Memory {
        memory_of(self.pid())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails if the process has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the fabric exited ({status}); its log {} ends:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Waits until `/healthz` answers 200 (restore done, every task runs).
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.alive()?;
            if let Ok((200, _)) = http_get(&self.admin, "/healthz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the fabric was not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sum of every sample of `metric` whose labels contain `labels`.
    pub async fn metric(&mut self, metric: &str, labels: &str) -> anyhow::Result<f64> {
        self.alive()?;
        let (_, body) = http_get(&self.admin, "/metrics").await?;
        Ok(sum_metric(&body, metric, labels))
    }

    /// Waits until `metric` (summed as in [`Self::metric`]) reaches `target`;
    /// returns when it first saw it, polling every 10 ms.
    pub async fn wait_metric(
        &mut self,
        metric: &str,
        labels: &str,
        target: f64,
        within: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        let mut last = 0.0;
        loop {
            let v = self.metric(metric, labels).await?;
            if v >= target {
                return Ok(Instant::now());
            }
            if v != last {
                tracing::debug!(metric, value = v, target, "waiting");
                last = v;
            }
            if Instant::now() > deadline {
                bail!("{metric}{{{labels}}} reached {v} of {target} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM (drain, final snapshot), then waits for the exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.pid();
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the fabric exited with {status}:\n{}", self.log_tail());
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the fabric did not stop within 120s")
            }
        }
    }
}

/// Sums `metric` samples (OpenMetrics text) whose label set contains `labels`.
fn sum_metric(body: &str, metric: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, rest) = match name_labels.split_once('{') {
                Some((n, r)) => (n, r),
                None => (name_labels, ""),
            };
            (name == metric && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A plain HTTP/1.0 GET on loopback: status and body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Latencies in nanoseconds, 3 significant digits, up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// What one closed-loop run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub requests: u64,
    /// Items answered (entities for batches; equal to requests otherwise).
    pub items: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    pub fn items_per_second(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }
    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }
}

/// One client of a system under test: issues one request for entity
/// `id`, returning how many items it got.
#[async_trait::async_trait]
pub trait Client: Send {
    async fn call(&mut self, id: u64) -> anyhow::Result<u64>;
}

/// Runs `clients.len()` closed loops at once (one request in flight each)
/// for `warmup` and then `duration`, asking uniformly random ids in
/// `1..=ids`; only requests started after the warm-up count.
pub async fn closed_loop(
    clients: Vec<Box<dyn Client>>,
    ids: u64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(i as u64 + 1);
            let mut h = histogram();
            let (mut requests, mut items) = (0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let n = c.call(rng.u64(1..=ids)).await?;
                if t0 >= start {
                    h.saturating_record(t0.elapsed().as_nanos() as u64);
                    requests += 1;
                    items += n;
                }
            }
            anyhow::Ok((requests, items, h))
        });
    }
    let mut out = LoadResult {
        requests: 0,
        items: 0,
        elapsed: duration,
        latency: histogram(),
    };
    while let Some(r) = tasks.join_next().await {
        let (requests, items, h) = r??;
        out.requests += requests;
        out.items += items;
        out.latency.add(h)?;
    }
    Ok(out)
}

/// Percentiles of a set of latencies given in nanoseconds.
/// The wall clock, nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Single-row transactions at `per_second` for `run`, each setting `ts_ns`
/// of a random row of `table` (ids 1 to `rows`) to the wall clock just
/// before its commit; returns how many.
pub async fn write_timestamps(
    pg_url: &str,
    table: &str,
    rows: u64,
    per_second: u64,
    run: Duration,
) -> anyhow::Result<u64> {
    use sqlx::Connection;
    let mut pg = sqlx::PgConnection::connect(pg_url).await?;
    // A commit is sent to logical decoding once its WAL is flushed: with
    // `synchronous_commit = off` (the test server's setting, for speed)
    // that waits for the WAL writer, up to `wal_writer_delay` (200 ms).
    super::pg_exec(&mut pg, "SET synchronous_commit = on").await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    let mut rng = fastrand::Rng::with_seed(7);
    // The benchmark's own table name.
    let update = format!("UPDATE {table} SET ts_ns = $1 WHERE id = $2");
    let end = Instant::now() + run;
    let mut n = 0;
    while Instant::now() < end {
        tick.tick().await;
        sqlx::query(sqlx::AssertSqlSafe(update.as_str()))
            .bind(now_ns())
            .bind(rng.u64(1..=rows) as i64)
            .execute(&mut pg)
            .await?;
        n += 1;
    }
    Ok(n)
}

pub fn summarize(latencies_ns: &[u64]) -> Histogram<u64> {
    let mut h = histogram();
    for l in latencies_ns {
        h.saturating_record((*l).max(1));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_matching_labels() {
        let body = "# TYPE fabric_changes_applied counter\n\
                    fabric_changes_applied_total{source=\"a\"} 5\n\
                    fabric_changes_applied_total{source=\"b\"} 7\n\
                    fabric_changes_applied_created{source=\"a\"} 1.7e9\n\
                    fabric_entities{entity_type=\"c\"} 3\n";
        assert_eq!(sum_metric(body, "fabric_changes_applied_total", ""), 12.0);
        assert_eq!(
            sum_metric(body, "fabric_changes_applied_total", "source=\"b\""),
            7.0
        );
        assert_eq!(sum_metric(body, "fabric_entities", ""), 3.0);
        assert_eq!(sum_metric(body, "missing", ""), 0.0);
    }
}
