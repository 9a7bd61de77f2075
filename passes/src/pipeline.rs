//! The pipeline: an explicit, ordered list of passes, run one after the other.
//!
//! Nothing is scheduled implicitly: what runs is exactly the list, in its order, so a dump
//! directory shows every intermediate graph (`00-input.ir`, `01-verify.ir`, ...) and a bug
//! can be pinned on one pass. Each `.ir` dump starts with `# pass NAME: NOTE` comment lines
//! and re-parses with `ditto_ir::text::parse`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ditto_ir::{dot, text, Graph};

use crate::{Canonicalize, FuseElementwise, Pass, PassError, Verify};

/// Names [`pass_by_name`] knows, in no particular order.
pub const PASS_NAMES: &[&str] = &["verify", "canonicalize", "fuse_elementwise"];

/// A fresh pass with default settings, by its name.
pub fn pass_by_name(name: &str) -> Option<Box<dyn Pass>> {
    match name {
        "verify" => Some(Box::new(Verify)),
        "canonicalize" => Some(Box::new(Canonicalize::default())),
        "fuse_elementwise" => Some(Box::new(FuseElementwise)),
        _ => None,
    }
}

/// How [`Pipeline::run`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write `NN-<pass>.ir` and `NN-<pass>.dot` after every pass (and `00-input.*` first).
    pub dump_dir: Option<PathBuf>,
    /// Run `ditto_ir::verify` on the output of every pass.
    pub verify_each: bool,
}

/// What one pass did, for logs and `--timings`.
#[derive(Debug, Clone)]
pub struct PassReport {
    pub name: &'static str,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub millis: f64,
    pub notes: Vec<String>,
}

/// An ordered list of passes.
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::default_cpu()
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Pipeline {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> Self {
        Pipeline { passes }
    }

    /// The pipeline for the CPU backend, in this order:
    /// 1. `verify` — refuse a malformed input before anything rewrites it;
    /// 2. `canonicalize` — fold reshapes/permutes and identities, so fusion sees clean chains;
    /// 3. `fuse_elementwise` — every elementwise op ends up in a `fused` kernel;
    /// 4. `verify` — the result is what codegen gets.
    pub fn default_cpu() -> Self {
        Pipeline::new(vec![
            Box::new(Verify),
            Box::new(Canonicalize::default()),
            Box::new(FuseElementwise),
            Box::new(Verify),
        ])
    }

    /// A pipeline from pass names (see [`PASS_NAMES`]), in the given order.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, PassError> {
        names
            .iter()
            .map(|n| {
                pass_by_name(n.as_ref()).ok_or_else(|| PassError::UnknownPass {
                    name: n.as_ref().to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Pipeline::new)
    }

    /// Appends a pass.
    pub fn push(&mut self, pass: Box<dyn Pass>) {
        self.passes.push(pass);
    }

    /// The passes' names, in running order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass in order. Returns the final graph and one report per pass.
    pub fn run(&self, g: Graph, opts: &RunOptions) -> Result<(Graph, Vec<PassReport>), PassError> {
        if let Some(dir) = &opts.dump_dir {
            std::fs::create_dir_all(dir).map_err(|error| PassError::Dump {
                pass: "input",
                path: dir.clone(),
                error,
            })?;
            dump(dir, "00-input", "input", &g, &[])?;
        }
        let mut g = g;
        let mut reports = Vec::with_capacity(self.passes.len());
        for (i, pass) in self.passes.iter().enumerate() {
            let name = pass.name();
            let before = g.len();
            let start = Instant::now();
            let span = tracing::info_span!("pass", name);
            let outcome = span.in_scope(|| pass.run(&g))?;
            let millis = start.elapsed().as_secs_f64() * 1e3;
            if opts.verify_each {
                ditto_ir::verify(&outcome.graph)
                    .map_err(|error| PassError::Verify { pass: name, error })?;
            }
            tracing::debug!(
                pass = name,
                nodes_before = before,
                nodes_after = outcome.graph.len(),
                millis,
                notes = ?outcome.notes,
                "pass done"
            );
            if let Some(dir) = &opts.dump_dir {
                let stem = format!("{:02}-{name}", i + 1);
                dump(dir, &stem, name, &outcome.graph, &outcome.notes)?;
            }
            reports.push(PassReport {
                name,
                nodes_before: before,
                nodes_after: outcome.graph.len(),
                millis,
                notes: outcome.notes,
            });
            g = outcome.graph;
        }
        Ok((g, reports))
    }
}

/// The comment header of a dump: one line per note, newlines flattened so each stays a comment.
fn header(prefix: &str, name: &str, notes: &[String]) -> String {
    if notes.is_empty() {
        return format!("{prefix} pass {name}\n");
    }
    notes
        .iter()
        .map(|n| format!("{prefix} pass {name}: {}\n", n.replace(['\n', '\r'], " ")))
        .collect()
}

fn dump(
    dir: &Path,
    stem: &str,
    pass: &'static str,
    g: &Graph,
    notes: &[String],
) -> Result<(), PassError> {
    let write = |ext: &str, body: String| {
        let path = dir.join(format!("{stem}.{ext}"));
        std::fs::write(&path, body).map_err(|error| PassError::Dump { pass, path, error })
    };
    write("ir", header("#", pass, notes) + &text::print(g))?;
    write("dot", header("//", pass, notes) + &dot::to_dot(g))
}
