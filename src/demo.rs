//! placeholder (being written)
pub async fn ensure(_dir: &std::path::Path, _customers: u32) -> anyhow::Result<bool> { Ok(false) }
pub async fn mutate(_dir: &std::path::Path, _rate: f64, _s: tokio_util::sync::CancellationToken) -> anyhow::Result<u64> { Ok(0) }
