//! `Model`: a checkpoint (a folder, or bytes in memory), its family and its weights, compiled
//! to Programs on demand.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ditto_codegen::Program;
use ditto_ir::cut::Span;
use ditto_ir::mesh::Mesh;
use ditto_ir::Graph;
use ditto_models::checkpoint::Checkpoint;
use ditto_models::family::{self, ModelFamily};
use ditto_models::tensor_file::HostTensor;
use ditto_models::{BuildOptions, Shapes};
use ditto_passes::shard_sequence::Link;
use ditto_passes::{
    Canonicalize, FuseElementwise, MethodChoice, PassReport, Pipeline, RunOptions, ShardSequence,
    Verify,
};
use ditto_runtime::comm::{CommStats, Communicator};
use ditto_runtime::cpu::executor::Weights;
use ditto_runtime::parallel::stale::StaleState;

use crate::backend::{Backend, Executor};
use crate::parallel::{RankOptions, Ranks};
use crate::Error;

/// A model in diffusers' layout (`config.json` + safetensors weights), usually a folder.
pub struct Model {
    dir: PathBuf,
    family: Box<dyn ModelFamily>,
    checkpoint: Checkpoint,
}

#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Also output every block's results (`block.<list>.<i>.out<j>`).
    pub block_outputs: bool,
    /// Write the IR after every pass (text + DOT) here.
    pub dump_dir: Option<PathBuf>,
    /// Run the verifier after every pass.
    pub verify: bool,
    /// How the program is split across ranks (one rank by default).
    pub parallel: Parallel,
}

/// The parallel layout to compile for.
#[derive(Clone, Debug)]
pub struct Parallel {
    pub mesh: Mesh,
    /// Forced: the mesh's own method at every attention; Auto: the cost model picks.
    pub choice: MethodChoice,
    /// The link preset of the cost model (`nvlink`, `pcie`, `ethernet`).
    pub link: Link,
    /// Displaced patch parallelism (DistriFusion, PCPP) over the mesh's Sp ranks: every
    /// attention over the image becomes displaced attention (`MethodChoice::Stale`, whatever
    /// `choice` says), exact for the first `warmup_steps` denoising steps and one step stale
    /// after. `None`: exact parallelism only.
    pub stale: Option<StaleConfig>,
}

/// What a generation with displaced attention needs besides the mesh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StaleConfig {
    /// PCPP: each patch attends, in stale steps, to itself and to this portion
    /// (0 < F <= 1) of each neighbouring patch, and exchanges only those edge rows;
    /// `None`: DistriFusion (every patch, all-gathered).
    pub pcpp_portion: Option<f32>,
    /// Denoising steps run exactly (K/V gathered synchronously) before the stale ones.
    pub warmup_steps: usize,
}

impl StaleConfig {
    /// Checks the PCPP portion.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(f) = self.pcpp_portion {
            if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                return Err(Error::Input(format!(
                    "the PCPP portion must be in (0, 1], got {f}"
                )));
            }
        }
        Ok(())
    }
}

impl Default for Parallel {
    fn default() -> Self {
        Parallel {
            mesh: Mesh::default(),
            choice: MethodChoice::Forced,
            link: ditto_passes::shard_sequence::NVLINK,
            stale: None,
        }
    }
}

impl Parallel {
    /// The attention forms the sharding pass may choose from: displaced attention when
    /// staleness is asked for, else `choice`.
    pub fn method_choice(&self) -> MethodChoice {
        match self.stale {
            Some(_) => MethodChoice::Stale,
            None => self.choice.clone(),
        }
    }
}

/// A compiled program with the pass pipeline's report.
pub struct Compiled {
    pub program: Program,
    pub reports: Vec<PassReport>,
    pub graph: Graph,
}

impl Model {
    /// Opens a model folder: reads `config.json`, picks the family from `_class_name`, checks
    /// the config, and maps the weights (nothing is read until a program needs them).
    pub fn load(dir: impl AsRef<Path>) -> Result<Model, Error> {
        let dir = dir.as_ref().to_path_buf();
        let config = ditto_models::read_config(&dir)?;
        let checkpoint = Checkpoint::open(&dir)?;
        Model::from_parts(dir, &config, checkpoint)
    }

    /// A model from a parsed `config.json` and its weights, wherever they come from (a
    /// folder, or bytes in memory: [`Checkpoint::from_static_bytes`]). `dir` is the folder
    /// the model stands for; it only names `config.json` in errors and is what
    /// [`Model::dir`] returns.
    pub fn from_parts(
        dir: PathBuf,
        config: &serde_json::Value,
        checkpoint: Checkpoint,
    ) -> Result<Model, Error> {
        let path = dir.join("config.json").display().to_string();
        let family = family::from_config(config, &path)?;
        Ok(Model {
            dir,
            family,
            checkpoint,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn family(&self) -> &dyn ModelFamily {
        self.family.as_ref()
    }
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The forward graph for `shapes`, before any pass.
    pub fn graph(&self, shapes: &Shapes, block_outputs: bool) -> Result<Graph, Error> {
        Ok(self.family.build(shapes, &BuildOptions { block_outputs })?)
    }

    /// Builds the graph, runs the pass pipeline and lowers it to a Program.
    pub fn compile(&self, shapes: &Shapes, opts: &CompileOptions) -> Result<Compiled, Error> {
        let graph = self.graph(shapes, opts.block_outputs)?;
        self.compile_graph(graph, opts)
    }

    /// The part of the forward graph between two block boundaries (see
    /// [`ditto_ir::cut`]), with the named taps as extra outputs.
    pub fn part_graph(&self, shapes: &Shapes, span: Span, taps: &[&str]) -> Result<Graph, Error> {
        let full = self.graph(shapes, false)?;
        let nb = full.num_blocks();
        for b in [span.from, span.to].into_iter().flatten() {
            if b > nb {
                return Err(Error::Input(format!(
                    "block boundary {b} is past the last block: the model has {nb} block(s)"
                )));
            }
        }
        Ok(full.part(span, taps)?)
    }

    /// Runs the pass pipeline on a graph of this model (the whole forward, or a part of
    /// it) and lowers it to a Program.
    pub fn compile_graph(&self, graph: Graph, opts: &CompileOptions) -> Result<Compiled, Error> {
        let p = &opts.parallel;
        if let Some(stale) = &p.stale {
            stale.validate()?;
            check_equal_patches(&graph, p.mesh.sp())?;
        }
        let shard = ShardSequence::new(p.mesh, p.method_choice(), p.link);
        let pipeline = Pipeline::new(vec![
            Box::new(Verify),
            Box::new(shard),
            Box::new(Canonicalize::default()),
            Box::new(FuseElementwise),
            Box::new(Verify),
        ]);
        let (graph, reports) = pipeline.run(
            graph,
            &RunOptions {
                dump_dir: opts.dump_dir.clone(),
                verify_each: opts.verify,
            },
        )?;
        if let Some(dir) = &opts.dump_dir {
            if p.mesh.world_size() > 1 {
                write_rank_dumps(&graph, p.mesh, dir)?;
            }
        }
        let program = ditto_codegen::lower_for_mesh(&graph, p.mesh)?;
        Ok(Compiled {
            program,
            reports,
            graph,
        })
    }

    /// Reads the weights `program` needs, checking each against the shape the model expects.
    pub fn load_weights(&self, program: &Program) -> Result<Weights, Error> {
        let weights = program
            .weights
            .iter()
            .map(|b| self.checkpoint.load_f32(&b.name, &b.shape))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(weights))
    }

    /// Picks the mesh for `world_size` ranks with the cost model: every CFG degree (2 when
    /// the batch is a pair) and every Ring x Ulysses factorization of the rest is sharded and
    /// costed; the cheapest wins. Returns the choice and every candidate's predicted seconds.
    pub fn choose_parallel(
        &self,
        shapes: &Shapes,
        world_size: usize,
        link: Link,
    ) -> Result<(Parallel, Vec<(Mesh, f64)>), Error> {
        if world_size == 0 {
            return Err(Error::Input("--world-size must be at least 1".into()));
        }
        let graph = self.graph(shapes, false)?;
        let mut candidates = Vec::new();
        for cfg in [1, 2] {
            if world_size % cfg != 0 || (cfg == 2 && shapes.batch % 2 != 0) {
                continue;
            }
            let sp = world_size / cfg;
            for ulysses in (1..=sp).filter(|u| sp % u == 0) {
                let mesh = Mesh {
                    cfg,
                    ring: sp / ulysses,
                    ulysses,
                };
                let shard = ShardSequence::new(mesh, MethodChoice::Auto, link);
                let predicted = shard.plan(&graph)?.1.predicted_s;
                candidates.push((mesh, predicted));
            }
        }
        let best = candidates
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(m, _)| *m)
            .unwrap_or_default();
        Ok((
            Parallel {
                mesh: best,
                choice: MethodChoice::Auto,
                link,
                stale: None,
            },
            candidates,
        ))
    }

    /// The ranks of a (possibly parallel) program for `shapes`, ready to run in-process.
    pub fn ranks(
        &self,
        shapes: &Shapes,
        opts: &CompileOptions,
        rank_opts: RankOptions,
    ) -> Result<Ranks, Error> {
        let compiled = self.compile(shapes, opts)?;
        let weights = self.load_weights(&compiled.program)?;
        let mut ranks = Ranks::new(Arc::new(compiled.program), weights, rank_opts);
        configure_stale(&mut ranks, &opts.parallel);
        Ok(ranks)
    }

    /// The ranks of a program compiled from a graph of this model (e.g. a
    /// [`part_graph`](Self::part_graph)), with only the weights that graph reads.
    pub fn ranks_for_graph(
        &self,
        graph: Graph,
        opts: &CompileOptions,
        rank_opts: RankOptions,
    ) -> Result<Ranks, Error> {
        let compiled = self.compile_graph(graph, opts)?;
        let weights = self.load_weights(&compiled.program)?;
        let mut ranks = Ranks::new(Arc::new(compiled.program), weights, rank_opts);
        configure_stale(&mut ranks, &opts.parallel);
        Ok(ranks)
    }

    /// A ready-to-run session for `shapes`.
    pub fn session(&self, shapes: &Shapes, opts: &CompileOptions) -> Result<Session, Error> {
        let compiled = self.compile(shapes, opts)?;
        let weights = self.load_weights(&compiled.program)?;
        Session::new(Arc::new(compiled.program), weights)
    }

    /// One forward pass on named inputs (diffusers' forward-argument names); returns
    /// `sample` (and nothing else).
    pub fn forward(
        &self,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<BTreeMap<String, HostTensor>, Error> {
        self.forward_with(inputs, &CompileOptions::default())
    }

    /// [`forward`](Self::forward) with compile options (e.g. block outputs).
    pub fn forward_with(
        &self,
        inputs: &BTreeMap<String, HostTensor>,
        opts: &CompileOptions,
    ) -> Result<BTreeMap<String, HostTensor>, Error> {
        let shapes: BTreeMap<String, Vec<usize>> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        let shapes = self.family.shapes_from_inputs(&shapes)?;
        Ok(self
            .ranks(&shapes, opts, RankOptions::default())?
            .run(inputs)?
            .0)
    }
}

/// A generation's schedule of displaced attention: PCPP portion and warmup steps.
fn configure_stale(ranks: &mut Ranks, parallel: &Parallel) {
    if let Some(st) = parallel.stale {
        ranks.set_pcpp_portion(st.pcpp_portion);
        ranks.set_warmup_steps(st.warmup_steps);
    }
}

/// DistriFusion cuts the image into equal patches, one per Sp rank: the image tokens (the
/// model's first token sequence) must divide by the degree. (Other sequences, such as
/// text tokens in joint attention, are padded and masked.)
fn check_equal_patches(graph: &Graph, parts: usize) -> Result<(), Error> {
    use ditto_ir::Op;
    let image = graph
        .nodes()
        .iter()
        .enumerate()
        .find(|(_, n)| matches!(n, Op::Seq(_)))
        .map(|(i, _)| {
            graph
                .shape(ditto_ir::Id::from(i))
                .get(1)
                .copied()
                .unwrap_or(0)
        });
    match image {
        None => Err(Error::Input(
            "displaced patch parallelism needs a token sequence, and this model marks none".into(),
        )),
        Some(tokens) if parts == 0 || tokens % parts != 0 => Err(Error::Input(format!(
            "the displaced-patch degree {parts} does not divide the {tokens} image tokens: \
             the image is cut into equal patches, one per rank (pick a degree that divides, \
             or another image size)"
        ))),
        Some(_) => Ok(()),
    }
}

/// A compiled program bound to its weights on a backend.
pub struct Session {
    executor: Executor,
    /// For programs with displaced attention run through [`run`](Self::run): their K/V
    /// across runs, in exact mode (one forward pass is exact).
    stale: Option<StaleState>,
}

impl Session {
    pub fn new(program: Arc<Program>, weights: Weights) -> Result<Session, Error> {
        Self::on(Backend::Cpu, program, weights)
    }

    /// A single-rank program on `backend` (on the GPU: its kernels compiled, its weights
    /// uploaded).
    pub fn on(backend: Backend, program: Arc<Program>, weights: Weights) -> Result<Session, Error> {
        Ok(Self::from_executor(Executor::on(
            backend, program, weights,
        )?))
    }

    fn from_executor(executor: Executor) -> Session {
        let stale = match &executor {
            Executor::Cpu(e) => e.needs_stale_state().then(StaleState::default),
            Executor::Cuda(_) => None,
        };
        Session { executor, stale }
    }

    /// Rank `rank` of a multi-rank program on `backend`, talking to the others through
    /// `comm` (on the GPU see `ditto_runtime::gpu` for how the ranks exchange).
    pub fn with_comm_on(
        backend: Backend,
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        comm: Box<dyn Communicator>,
    ) -> Result<Session, Error> {
        Ok(Self::from_executor(Executor::with_comm_on(
            backend, program, weights, rank, comm,
        )?))
    }

    /// Rank `rank` of a multi-rank program, talking to the others through `comm`.
    pub fn with_comm(
        program: Arc<Program>,
        weights: Weights,
        rank: usize,
        comm: Box<dyn Communicator>,
    ) -> Result<Session, Error> {
        Self::with_comm_on(Backend::Cpu, program, weights, rank, comm)
    }

    /// Bytes this rank sent, per collective (multi-rank sessions).
    pub fn comm_stats(&self) -> Option<&CommStats> {
        self.executor.comm_stats()
    }

    pub fn program(&self) -> &Program {
        self.executor.program()
    }

    /// Runs on named inputs, checking names and shapes against the program. A program
    /// with displaced attention runs exactly, with a state of the session's own.
    pub fn run(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
    ) -> Result<BTreeMap<String, HostTensor>, Error> {
        let mut own = self.stale.take();
        let out = self.run_inner(inputs, own.as_mut());
        self.stale = own;
        out
    }

    /// [`run`](Self::run) with the displaced attentions' state across runs (see
    /// `ditto_runtime::parallel::stale`): its mode, PCPP portion and stored K/V.
    pub fn run_with_state(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
        state: &mut StaleState,
    ) -> Result<BTreeMap<String, HostTensor>, Error> {
        self.run_inner(inputs, Some(state))
    }

    fn run_inner(
        &mut self,
        inputs: &BTreeMap<String, HostTensor>,
        state: Option<&mut StaleState>,
    ) -> Result<BTreeMap<String, HostTensor>, Error> {
        let program = self.program();
        for name in inputs.keys() {
            if !program.inputs.iter().any(|b| &b.name == name) {
                let known: Vec<&str> = program.inputs.iter().map(|b| b.name.as_str()).collect();
                return Err(Error::Input(format!(
                    "input `{name}` is not an argument of this model (it takes: {})",
                    known.join(", ")
                )));
            }
        }
        let mut bound: Vec<&[f32]> = Vec::with_capacity(program.inputs.len());
        for b in &program.inputs {
            let t = inputs.get(&b.name).ok_or_else(|| {
                Error::Input(format!(
                    "missing input `{}` (expected shape {:?})",
                    b.name, b.shape
                ))
            })?;
            if t.shape != b.shape {
                return Err(Error::Input(format!(
                    "input `{}` has shape {:?} but the model expects {:?}",
                    b.name, t.shape, b.shape
                )));
            }
            bound.push(&t.data);
        }
        let outs = match (&mut self.executor, state) {
            (Executor::Cpu(e), Some(st)) => e.run_with_state(&bound, st)?,
            (e, _) => e.run(&bound)?,
        };
        let program = self.program();
        Ok(program
            .outputs
            .iter()
            .zip(outs)
            .map(|((name, v), data)| {
                (
                    name.clone(),
                    HostTensor::new(program.values[*v].shape.clone(), data),
                )
            })
            .collect())
    }
}

/// `--dump-dir` for a parallel program: `rank<r>.ir` per rank, the (SPMD) IR after the last
/// pass headed by the rank's place in the mesh and the rows each shard gives it.
fn write_rank_dumps(graph: &Graph, mesh: Mesh, dir: &Path) -> Result<(), Error> {
    use ditto_ir::mesh::MeshAxis;
    use ditto_ir::Op;
    let body = ditto_ir::text::print(graph);
    for rank in 0..mesh.world_size() {
        let (c, r, u) = mesh.coords(rank);
        let mut head = format!(
            "# rank {rank} of {}: cfg {c}, ring {r}, ulysses {u} (sequence-parallel index {})\n",
            mesh.world_size(),
            mesh.index(rank, MeshAxis::Sp)
        );
        for (i, node) in graph.nodes().iter().enumerate() {
            let Op::Shard(ch) = node else { continue };
            let axis_name = graph.node(ch[2]).name();
            let Some(axis) = MeshAxis::parse(&axis_name) else {
                continue;
            };
            let idx = mesh.index(rank, axis);
            let rows: Vec<String> = ch[4..]
                .chunks(2)
                .map(|p| {
                    let local = graph.int_attr(p[0]).unwrap_or(0) as usize;
                    let valid = graph.int_attr(p[1]).unwrap_or(0) as usize;
                    let (lo, hi) = (idx * local, ((idx + 1) * local).min(valid));
                    if lo >= hi {
                        format!("none of {valid} (all padding)")
                    } else {
                        format!("[{lo}, {hi}) of {valid}")
                    }
                })
                .collect();
            head.push_str(&format!(
                "# shard %{i} over {axis_name}: rows {}\n",
                rows.join(", ")
            ));
        }
        let path = dir.join(format!("rank{rank}.ir"));
        std::fs::write(&path, format!("{head}{body}")).map_err(|e| Error::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}
