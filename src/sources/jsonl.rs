//! placeholder
use super::{Source, SourceContext, SourceError};
use crate::config::{Config, SourceConfig};
pub struct JsonlSource;
impl JsonlSource {
    pub fn new(_cfg: &SourceConfig, _config: &Config) -> Result<Self, SourceError> { Ok(JsonlSource) }
}
#[async_trait::async_trait]
impl Source for JsonlSource {
    async fn run(self: Box<Self>, _ctx: SourceContext) -> Result<(), SourceError> { Ok(()) }
}
