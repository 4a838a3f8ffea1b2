//! placeholder: the `postgres_cdc` connector is being written.
use super::{Source, SourceContext, SourceError};
use crate::config::{Config, SourceConfig};

pub struct PostgresCdcSource;

impl PostgresCdcSource {
    pub fn new(cfg: &SourceConfig, _config: &Config) -> Result<Self, SourceError> {
        Err(SourceError::Config {
            source_name: cfg.name.clone(),
            reason: "not part of this build yet".into(),
        })
    }
}

#[async_trait::async_trait]
impl Source for PostgresCdcSource {
    async fn run(self: Box<Self>, _ctx: SourceContext) -> Result<(), SourceError> {
        Ok(())
    }
}
