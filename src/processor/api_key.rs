//! API-key accounts: the key as `x-api-key`, and nothing else changed.

use super::{Outgoing, Processor};
use crate::secret::Secret;

pub struct ApiKey<'a>(pub &'a Secret);

impl Processor for ApiKey<'_> {
    fn prepare(&self, out: &mut Outgoing<'_>) -> Result<(), super::Unfit> {
        out.set_header("x-api-key", self.0.expose());
        Ok(())
    }
}
