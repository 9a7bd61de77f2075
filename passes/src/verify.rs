//! `verify`: runs the IR verifier and hands the graph back unchanged.
//!
//! It exists as a pass so a pipeline can say where verification happens — first, to refuse a
//! malformed input (for example a hand-edited IR file) before any rewrite touches it, and
//! last, to check what codegen receives — independently of `RunOptions::verify_each`.

use ditto_ir::Graph;

use crate::{Pass, PassError, PassOutcome};

#[derive(Debug, Clone, Copy, Default)]
pub struct Verify;

impl Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }

    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError> {
        ditto_ir::verify(g).map_err(|error| PassError::Verify {
            pass: self.name(),
            error,
        })?;
        Ok(PassOutcome::new(g.clone(), vec![]))
    }
}
