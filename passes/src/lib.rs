//! ditto-passes: graph-to-graph passes over the ditto IR, run as an explicit ordered list.
//!
//! Every pass is a [`Pass`]: it takes a [`Graph`] and returns a new one plus human-readable
//! notes (what an e-graph did, which bound stopped it, what got fused). Passes live one per
//! file; a [`Pipeline`] runs them in the order it lists, optionally verifying after each one
//! and dumping the IR text and a DOT file after each one (`--dump-dir`), so every step of
//! compilation can be read, diffed and re-parsed.
//!
//! The passes:
//! - [`verify::Verify`]: runs [`ditto_ir::verify()`], changes nothing;
//! - [`canonicalize::Canonicalize`]: semantics-preserving simplification by equality
//!   saturation (reshape/permute folding, algebraic identities), bounded;
//! - [`fuse_elementwise::FuseElementwise`]: groups elementwise chains into `fused` kernels.

pub mod canonicalize;
pub mod fuse_elementwise;
mod order;
mod pipeline;
pub mod shard_sequence;
pub mod verify;

use ditto_ir::{Graph, IrError};
use thiserror::Error;

pub use canonicalize::{Canonicalize, Limits};
pub use fuse_elementwise::FuseElementwise;
pub(crate) use order::{ordered, pruned_in_order, retain_used_kernels};
pub use pipeline::{pass_by_name, PassReport, Pipeline, RunOptions, PASS_NAMES};
pub use shard_sequence::{MethodChoice, ShardPlan, ShardSequence};
pub use verify::Verify;

/// One graph-to-graph step of the compiler.
pub trait Pass: Send + Sync {
    /// The name used in dumps, reports, errors and [`pass_by_name`].
    fn name(&self) -> &'static str;
    /// Runs the pass. The input is left untouched; the result is a new graph.
    fn run(&self, g: &Graph) -> Result<PassOutcome, PassError>;
}

/// What a pass returns: the new graph and notes for the dump header and the report (for
/// example `e-graph: 5 iterations, 1234 nodes, 300 classes, saturated`).
#[derive(Debug, Clone)]
pub struct PassOutcome {
    pub graph: Graph,
    pub notes: Vec<String>,
}

impl PassOutcome {
    pub fn new(graph: Graph, notes: Vec<String>) -> Self {
        PassOutcome { graph, notes }
    }
}

/// A pass failure. Every variant names the pass it came from.
#[derive(Debug, Error)]
pub enum PassError {
    /// The pass hit an IR error (a shape error while rebuilding, a bad attribute, ...).
    #[error("pass `{pass}`: {error}")]
    Ir { pass: &'static str, error: IrError },
    /// The pass found something it cannot handle, or one of its own checks failed.
    #[error("pass `{pass}`: {reason}")]
    Failed { pass: &'static str, reason: String },
    /// `ditto_ir::verify` rejected the graph a pass produced (with `verify_each`).
    #[error("verification after pass `{pass}` failed: {error}")]
    Verify { pass: &'static str, error: IrError },
    /// Writing a dump file failed.
    #[error("pass `{pass}`: cannot write dump {}: {error}", path.display())]
    Dump {
        pass: &'static str,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    /// `Pipeline::from_names` got a name no pass has.
    #[error("unknown pass `{name}` (known: {})", PASS_NAMES.join(", "))]
    UnknownPass { name: String },
}

impl PassError {
    /// The pass this error came from (`"input"` for the pre-pass dump, the unknown name for
    /// [`PassError::UnknownPass`]).
    pub fn pass(&self) -> &str {
        match self {
            PassError::Ir { pass, .. }
            | PassError::Failed { pass, .. }
            | PassError::Verify { pass, .. }
            | PassError::Dump { pass, .. } => pass,
            PassError::UnknownPass { name } => name,
        }
    }
}
