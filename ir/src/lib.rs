//! ditto-ir: the graph IR of ditto.
//!
//! - [`Op`]: the op language, an `egg` language whose attributes are leaf children;
//! - [`Meta`]: per-value shape, dtype and distribution, inferred by [`infer::infer`], which
//!   both the [`Graph`] builder and the e-graph [`ShapeAnalysis`] use;
//! - [`Graph`]: a hash-consed DAG with named outputs and fused-kernel bodies;
//! - [`text`]: the SSA printer and parser (they round-trip), [`dot`]: Graphviz export;
//! - [`verify()`]: the checks run after every pass;
//! - [`cut`]: a model graph cut at its block boundaries into parts (pipeline stages, the
//!   block stack that step caching skips).

pub mod analysis;
pub mod cut;
pub mod dot;
mod dtype;
mod error;
mod graph;
pub mod infer;
pub mod mesh;
pub mod meta;
mod op;
pub mod text;
mod verify;

pub use analysis::{IrEGraph, ShapeAnalysis};
pub use dtype::DType;
pub use egg::{Id, RecExpr, Symbol};
pub use error::{IrError, Result};
pub use graph::Graph;
pub use meta::{Dist, Meta, TensorMeta};
pub use op::{Float, Op};
pub use verify::verify;
