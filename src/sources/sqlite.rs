//! placeholder
use super::{Source, SourceContext, SourceError};
use crate::config::{Config, SourceConfig};
pub struct SqliteSource;
impl SqliteSource {
    pub fn new(_cfg: &SourceConfig, _config: &Config) -> Result<Self, SourceError> { Ok(SqliteSource) }
}
#[async_trait::async_trait]
impl Source for SqliteSource {
    async fn run(self: Box<Self>, _ctx: SourceContext) -> Result<(), SourceError> { Ok(()) }
}
