//! The parallel steps of a Program on the CPU backend: `Shard`, `AllGather` and
//! `SeqAttention` (Ulysses, Ring, USP, and displaced attention with its state across runs
//! in [`stale`]), as specified by their doc comments in `ditto_codegen::program`.
//!
//! Every rank runs the same Program (SPMD); what differs is its rank, from which each step
//! finds its mesh coordinates, its groups and its rows. Communication goes through the
//! [`Communicator`] trait only, so the same code runs over the in-process backend and,
//! later, NCCL or TCP.
//!
//! Collectives over a group of one member are skipped rather than issued: they would
//! move nothing, and skipping them keeps the traffic counters equal to the analytic
//! volumes (Ring attention on a `ulysses = 1` mesh issues no all-to-all at all). That is
//! also why a 1-rank program needs no communicator.

pub mod placement;
pub mod ring;
pub mod segments;
pub mod shard;
pub mod stale;
pub mod ulysses;

use ditto_codegen::{Mesh, MeshAxis, Program, Segment, SeqMethod, Step};

use crate::comm::{Communicator, Group};
use crate::cpu::kernels::attention::attention_masked;
use crate::RuntimeError;
pub use placement::Placement;
use shard::AxisView;
use ulysses::HeadSplit;

/// Counters of the parallel steps a rank ran (see `CpuExecutor::parallel_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParallelStats {
    /// `SeqAttention` steps executed.
    pub seq_attentions: u64,
    /// Zero heads added, summed over those steps, so that the heads divide the Ulysses
    /// degree (heads 3 on Ulysses 2: 1 per step). They cost compute and all-to-all
    /// volume, which is why the report shows them.
    pub padded_heads: u64,
}

/// Zero heads that Ulysses over `degree` ranks adds to `heads` heads.
pub fn ulysses_head_padding(heads: usize, degree: usize) -> usize {
    if degree == 0 {
        return 0;
    }
    HeadSplit::new(heads, 1, degree).padding()
}

/// What a parallel step needs to know about the rank running it.
pub struct RankCtx<'a> {
    pub mesh: Mesh,
    /// The program rank this run plays (with virtual patches, the member of this run's
    /// patch).
    pub rank: usize,
    /// `None` only for single-rank programs, which never need one (see the module doc).
    pub comm: Option<&'a mut dyn Communicator>,
    /// Where the program's ranks are on the communicator; `None`: program rank r is
    /// communicator rank r.
    pub placement: Option<&'a Placement>,
}

impl RankCtx<'_> {
    /// The program ranks of this rank's group along `axis` that run with it, in index
    /// order (with virtual patches, only this patch's members).
    fn members(&self, axis: MeshAxis) -> Vec<usize> {
        match self.placement {
            Some(p) => p.members(&self.mesh, self.rank, axis),
            None => self.mesh.group(self.rank, axis),
        }
    }

    /// The communicator rank of program rank `rank`.
    fn comm_rank(&self, rank: usize) -> usize {
        match self.placement {
            Some(p) => p.comm_rank(&self.mesh, rank),
            None => rank,
        }
    }

    /// This rank on the communicator.
    fn me(&self) -> usize {
        self.comm_rank(self.rank)
    }

    /// The rank's group along `axis` on the communicator, in index order.
    fn group(&self, axis: MeshAxis) -> Group {
        Group::new(
            self.members(axis)
                .into_iter()
                .map(|r| self.comm_rank(r))
                .collect(),
        )
    }

    pub(crate) fn comm(&mut self, step: &str) -> Result<&mut dyn Communicator, RuntimeError> {
        match self.comm.as_deref_mut() {
            Some(c) => Ok(c),
            None => Err(RuntimeError::Unsupported(format!(
                "`{step}` over more than one rank needs a communicator (CpuExecutor::with_comm)"
            ))),
        }
    }
}

fn bad(step: &Step, msg: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Binding(format!("step `{}`: {msg}", step.kind()))
}

/// Checks a parallel step against the program's mesh and value shapes, so that a
/// malformed program fails when the executor is built, on every rank alike, and never
/// half-way through a collective. Other steps pass.
pub fn validate(program: &Program, step: &Step) -> Result<(), RuntimeError> {
    let shape = |v: usize| -> Result<&[usize], RuntimeError> {
        program
            .values
            .get(v)
            .map(|x| x.shape.as_slice())
            .ok_or_else(|| bad(step, format!("value {v} does not exist")))
    };
    let mesh = &program.mesh;
    match step {
        Step::Shard {
            x,
            out,
            axis,
            mesh: mesh_axis,
            parts,
            segments,
        }
        | Step::AllGather {
            x,
            out,
            axis,
            mesh: mesh_axis,
            parts,
            segments,
        } => {
            if *parts != mesh.size(*mesh_axis) {
                return Err(bad(
                    step,
                    format!(
                        "{parts} parts, but the mesh axis `{}` has {} rank(s)",
                        mesh_axis.as_str(),
                        mesh.size(*mesh_axis)
                    ),
                ));
            }
            let (full, split) = if matches!(step, Step::Shard { .. }) {
                (shape(*x)?, shape(*out)?)
            } else {
                (shape(*out)?, shape(*x)?)
            };
            shard::check_shapes(full, split, *axis, *parts, segments).map_err(|e| bad(step, e))
        }
        Step::SeqAttention {
            q,
            k,
            v,
            out,
            batch,
            sq,
            sk,
            heads,
            head_dim,
            key_segments,
            ..
        } => {
            let hd = heads * head_dim;
            let want = [(q, "q", sq), (k, "k", sk), (v, "v", sk), (out, "out", sq)];
            for (val, name, rows) in want {
                let got: usize = shape(*val)?.iter().product();
                if got != batch * rows * hd {
                    return Err(bad(
                        step,
                        format!("{name} has {got} elements, expected {batch} x {rows} rows x {hd}"),
                    ));
                }
            }
            if *heads == 0 || *head_dim == 0 {
                return Err(bad(step, "no heads"));
            }
            if segments::local_rows(key_segments) != *sk {
                return Err(bad(
                    step,
                    format!(
                        "key segments {key_segments:?} hold {} rows, but sk = {sk}",
                        segments::local_rows(key_segments)
                    ),
                ));
            }
            segments::check(key_segments, mesh.sp()).map_err(|e| bad(step, e))
        }
        _ => Ok(()),
    }
}

/// `Step::Shard`: this rank's rows of `x` (no communication: every rank has `x`).
#[allow(clippy::too_many_arguments)]
pub fn shard(
    ctx: &RankCtx,
    x: &[f32],
    x_shape: &[usize],
    axis: usize,
    mesh_axis: MeshAxis,
    segments: &[Segment],
    out: &mut [f32],
) {
    let index = ctx.mesh.index(ctx.rank, mesh_axis);
    shard::shard(x, AxisView::new(x_shape, axis), segments, index, out);
}

/// `Step::AllGather`: every member's rows along `axis`, padding dropped.
pub fn all_gather(
    ctx: &mut RankCtx,
    x: &[f32],
    x_shape: &[usize],
    axis: usize,
    mesh_axis: MeshAxis,
    segments: &[Segment],
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    let group = ctx.group(mesh_axis);
    let view = AxisView::new(x_shape, axis);
    if group.size() == 1 {
        shard::assemble(x, 1, view, segments, out);
        return Ok(());
    }
    // Members' local tensors side by side; re-assembled per segment, which for an axis
    // other than 0 interleaves them (hence the scratch buffer).
    let mut gathered = vec![0.0f32; group.size() * x.len()];
    ctx.comm("all_gather")?
        .all_gather(&group, x, &mut gathered)?;
    shard::assemble(&gathered, group.size(), view, segments, out);
    Ok(())
}

/// The attention parameters of a `Step::SeqAttention`.
#[derive(Clone, Copy, Debug)]
pub struct SeqAttn<'a> {
    pub method: SeqMethod,
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub key_segments: &'a [Segment],
}

impl<'a> SeqAttn<'a> {
    /// The attention parameters of `step`, when it is a `Step::SeqAttention`.
    pub fn of(step: &'a Step) -> Option<SeqAttn<'a>> {
        let Step::SeqAttention {
            method,
            batch,
            sq,
            sk,
            heads,
            head_dim,
            scale,
            key_segments,
            ..
        } = step
        else {
            return None;
        };
        Some(SeqAttn {
            method: *method,
            batch: *batch,
            sq: *sq,
            sk: *sk,
            heads: *heads,
            head_dim: *head_dim,
            scale: *scale,
            key_segments,
        })
    }
}

/// `Step::SeqAttention`: attention of this rank's query rows over every Sp rank's valid
/// keys.
///
/// All three methods are one two-level scheme: a Ulysses group of U members (heads
/// exchanged for rows by all-to-all) inside a ring of R members (K/V blocks rotated).
/// Ulysses is (U, R) = (sp, 1), Ring (1, sp), USP (ulysses, ring). Sp member `r * U + u`
/// is ring member r's Ulysses member u, which tells every key block's padding.
pub fn seq_attention(
    ctx: &mut RankCtx,
    a: &SeqAttn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    stats: &mut ParallelStats,
) -> Result<(), RuntimeError> {
    let SeqGroups {
        ulysses: ugroup,
        ring: rgroup,
        ring_index: ri,
        split,
    } = seq_groups(ctx, a, stats)?;
    let (uc, rc) = (ugroup.size(), rgroup.size());
    let segs = a.key_segments;
    let block_mask = |r: usize| block_mask(segs, uc, r);
    let shape = ring::RingShape {
        batch: a.batch,
        sq: a.sq * uc,
        sk: a.sk * uc,
        heads: if uc > 1 { split.per_member } else { a.heads },
        head_dim: a.head_dim,
        scale: a.scale,
    };
    let attend = |ctx: &mut RankCtx,
                  q: &[f32],
                  k: &[f32],
                  v: &[f32],
                  o: &mut [f32]|
     -> Result<(), RuntimeError> {
        if rc > 1 {
            let comm = ctx.comm("ring attention")?;
            ring::ring_attention(comm, &rgroup, ri, shape, q, k, v, block_mask, o)?;
        } else {
            let mask = block_mask(0);
            let mask = (!mask.iter().all(|&ok| ok)).then_some(mask.as_slice());
            attention_masked(
                q,
                k,
                v,
                shape.batch,
                shape.sq,
                shape.sk,
                shape.heads,
                shape.head_dim,
                shape.scale,
                mask,
                o,
                None,
            );
        }
        Ok(())
    };

    around_ulysses(ctx, &ugroup, split, a, q, k, v, out, attend)
}

/// The groups of a sequence-parallel attention on this rank.
pub(crate) struct SeqGroups {
    /// Heads are exchanged for rows over `ulysses`; K/V blocks go around `ring`.
    pub ulysses: Group,
    pub ring: Group,
    /// This rank's index in `ring`.
    pub ring_index: usize,
    /// How the heads are dealt over `ulysses`.
    pub split: HeadSplit,
}

/// The Ulysses group, the ring and the head split of `a` on this rank (counted in
/// `stats`). Ulysses is (U, R) = (sp, 1), Ring (1, sp), USP (ulysses, ring).
pub(crate) fn seq_groups(
    ctx: &RankCtx,
    a: &SeqAttn,
    stats: &mut ParallelStats,
) -> Result<SeqGroups, RuntimeError> {
    let single = Group::new(vec![ctx.me()]);
    let (ugroup, rgroup) = match a.method {
        SeqMethod::Ulysses => (ctx.group(MeshAxis::Sp), single),
        SeqMethod::Ring => (single, ctx.group(MeshAxis::Sp)),
        SeqMethod::Usp => (ctx.group(MeshAxis::Ulysses), ctx.group(MeshAxis::Ring)),
        SeqMethod::Displaced => {
            return Err(RuntimeError::Unsupported(
                "displaced attention keeps K/V across runs: run the program with \
                 CpuExecutor::run_with_state and a StaleState"
                    .into(),
            ))
        }
    };
    let uc = ugroup.size();
    let (ui, ri) = (
        ugroup.index_of(ctx.me()).unwrap_or(0),
        rgroup.index_of(ctx.me()).unwrap_or(0),
    );
    debug_assert_eq!(ri * uc + ui, ctx.mesh.index(ctx.rank, MeshAxis::Sp));
    let split = HeadSplit::new(a.heads, a.head_dim, uc);
    stats.seq_attentions += 1;
    stats.padded_heads += split.padding() as u64;
    Ok(SeqGroups {
        ulysses: ugroup,
        ring: rgroup,
        ring_index: ri,
        split,
    })
}

/// Which keys of ring member `r`'s block are real: its `uc` Ulysses members' rows,
/// member-major.
pub(crate) fn block_mask(segs: &[Segment], uc: usize, r: usize) -> Vec<bool> {
    (0..uc)
        .flat_map(|u| segments::member_mask(segs, r * uc + u))
        .collect()
}

/// Runs `attend` on this rank's share of the heads (`split`) for the rows of its whole
/// Ulysses group: q/k/v go out in one all-to-all, the output comes back in another. With a
/// group of one, `attend` runs on the local tensors directly. `attend` gets the rank
/// context, q, k, v (rows member-major) and the output to fill.
#[allow(clippy::too_many_arguments)]
pub(crate) fn around_ulysses(
    ctx: &mut RankCtx,
    group: &Group,
    split: HeadSplit,
    a: &SeqAttn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    attend: impl FnOnce(&mut RankCtx, &[f32], &[f32], &[f32], &mut [f32]) -> Result<(), RuntimeError>,
) -> Result<(), RuntimeError> {
    if group.size() == 1 {
        return attend(ctx, q, k, v, out);
    }
    let comm = ctx.comm("ulysses attention")?;
    let s = ulysses::scatter(comm, group, split, a.batch, a.sq, a.sk, q, k, v)?;
    let mut o = vec![0.0f32; a.batch * group.size() * a.sq * split.width()];
    attend(ctx, &s.q, &s.k, &s.v, &mut o)?;
    drop(s);
    let comm = ctx.comm("ulysses attention")?;
    ulysses::gather(comm, group, split, a.batch, a.sq, &o, out)?;
    Ok(())
}
