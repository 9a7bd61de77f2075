//! ditto-codegen: lowering of an optimized graph to a per-rank [`Program`] — the list of
//! steps (fused kernels, GEMMs, attention, norms, layout and embedding ops) over buffers from
//! a liveness-based memory plan — and its on-disk form.

pub mod cuda;
mod kernel;
mod lower;
mod memory;
pub mod program;

use std::path::Path;

use thiserror::Error;

pub use kernel::compile_kernel;
pub use lower::{lower, lower_for_mesh};
pub use program::{
    Binding, KInstr, Kernel, Mesh, MeshAxis, Program, Segment, SeqMethod, Step, Storage, Value,
    ValueId,
};

#[derive(Debug, Error)]
pub enum CodegenError {
    #[error("cannot lower node %{node} (`{op}`): {reason}")]
    Lower {
        node: usize,
        op: String,
        reason: String,
    },
    #[error("kernel `{kernel}`: {reason}")]
    Kernel { kernel: String, reason: String },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
}

const PROGRAM_FILE: &str = "program.json";

/// Writes `program` as `<dir>/program.json` (creating `dir`).
pub fn save_program(program: &Program, dir: &Path) -> Result<(), CodegenError> {
    let io = |e: &dyn std::fmt::Display| CodegenError::Io {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
    let json = serde_json::to_string(program).map_err(|e| io(&e))?;
    std::fs::write(dir.join(PROGRAM_FILE), json).map_err(|e| io(&e))
}

/// Reads a program written by [`save_program`], checking its format version.
pub fn load_program(dir: &Path) -> Result<Program, CodegenError> {
    let path = dir.join(PROGRAM_FILE);
    let err = |reason: String| CodegenError::Io {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
    let p: Program =
        serde_json::from_str(&text).map_err(|e| err(format!("not a ditto plan: {e}")))?;
    if p.format_version != program::FORMAT_VERSION {
        return Err(err(format!(
            "plan format {} but this ditto reads format {}",
            p.format_version,
            program::FORMAT_VERSION
        )));
    }
    Ok(p)
}
