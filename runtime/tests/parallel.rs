//! Multi-rank execution of the parallel Program steps (`Shard`, `AllGather`,
//! `SeqAttention`) on in-process ranks: results against a serial float64 reference, exact
//! shard/gather round trips, traffic against the analytic volumes of ALGORITHMS.md, and
//! failure propagation.
//!
//! Programs are built directly (no IR): a few values, one buffer each.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ditto_codegen::program::FORMAT_VERSION;
use ditto_codegen::{
    Binding, Mesh, MeshAxis, Program, Segment, SeqMethod, Step, Storage, Value, ValueId,
};
use ditto_runtime::comm::{
    in_process_world, run_ranks, CommError, CommOp, CommStats, Communicator, Group, InProcessComm,
};
use ditto_runtime::cpu::executor::CpuExecutor;
use ditto_runtime::parallel::ParallelStats;
use ditto_runtime::RuntimeError;

/// Bounds a broken test; passing tests never wait for it.
const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Program building

#[derive(Default)]
struct Builder {
    inputs: Vec<Binding>,
    weights: Vec<Binding>,
    buffers: Vec<usize>,
    values: Vec<Value>,
    steps: Vec<Step>,
    outputs: Vec<(String, ValueId)>,
}

impl Builder {
    fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.inputs.push(Binding {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.value(Storage::Input(self.inputs.len() - 1), shape)
    }

    fn weight(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.weights.push(Binding {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.value(Storage::Weight(self.weights.len() - 1), shape)
    }

    /// A fresh buffer of `shape`.
    fn buffer(&mut self, shape: &[usize]) -> ValueId {
        self.buffers.push(shape.iter().product());
        self.value(Storage::Buffer(self.buffers.len() - 1), shape)
    }

    fn value(&mut self, storage: Storage, shape: &[usize]) -> ValueId {
        self.values.push(Value {
            storage,
            shape: shape.to_vec(),
        });
        self.values.len() - 1
    }

    /// A reshape: another view of `v`'s storage.
    fn view(&mut self, v: ValueId, shape: &[usize]) -> ValueId {
        let storage = self.values[v].storage;
        self.value(storage, shape)
    }

    fn shard(
        &mut self,
        x: ValueId,
        axis: usize,
        mesh: &Mesh,
        on: MeshAxis,
        segs: &[Segment],
    ) -> ValueId {
        let mut shape = self.values[x].shape.clone();
        shape[axis] = segs.iter().map(|s| s.local).sum();
        let out = self.buffer(&shape);
        self.steps.push(Step::Shard {
            x,
            out,
            axis,
            mesh: on,
            parts: mesh.size(on),
            segments: segs.to_vec(),
        });
        out
    }

    fn all_gather(
        &mut self,
        x: ValueId,
        axis: usize,
        mesh: &Mesh,
        on: MeshAxis,
        segs: &[Segment],
    ) -> ValueId {
        let mut shape = self.values[x].shape.clone();
        shape[axis] = segs.iter().map(|s| s.valid).sum();
        let out = self.buffer(&shape);
        self.steps.push(Step::AllGather {
            x,
            out,
            axis,
            mesh: on,
            parts: mesh.size(on),
            segments: segs.to_vec(),
        });
        out
    }

    fn output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.into(), v));
    }

    fn finish(self, mesh: Mesh) -> Arc<Program> {
        Arc::new(Program {
            format_version: FORMAT_VERSION,
            mesh,
            inputs: self.inputs,
            weights: self.weights,
            buffers: self.buffers,
            values: self.values,
            kernels: Vec::new(),
            steps: self.steps,
            outputs: self.outputs,
        })
    }
}

/// Segments of lengths `valid` split evenly over `parts` (padded where they don't divide).
fn split_segments(valid: &[usize], parts: usize) -> Vec<Segment> {
    valid
        .iter()
        .map(|&v| Segment {
            local: v.div_ceil(parts),
            valid: v,
        })
        .collect()
}

fn mesh(cfg: usize, ring: usize, ulysses: usize) -> Mesh {
    Mesh { cfg, ring, ulysses }
}

// ---------------------------------------------------------------------------------------
// Data and reference

/// SplitMix64, uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                2.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0
            })
            .collect()
    }
}

/// Serial attention in float64 over `[batch, seq, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
    scale: f64,
) -> Vec<f64> {
    let w = heads * hd;
    let mut out = vec![0.0f64; batch * seq * w];
    let mut s = vec![0.0f64; seq];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let qi = &q[(b * seq + i) * w + h * hd..][..hd];
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = &k[(b * seq + j) * w + h * hd..][..hd];
                    *sj = qi
                        .iter()
                        .zip(kj)
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>()
                        * scale;
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|&x| (x - m).exp()).sum();
                for d in 0..hd {
                    let acc: f64 = s
                        .iter()
                        .enumerate()
                        .map(|(j, &sj)| (sj - m).exp() * v[(b * seq + j) * w + h * hd + d] as f64)
                        .sum();
                    out[(b * seq + i) * w + h * hd + d] = acc / z;
                }
            }
        }
    }
    out
}

/// `max|a - b| / max|b|`.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let den = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let num = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| {
        let d = (x as f64 - y).abs();
        if d.is_nan() || d > m {
            d
        } else {
            m
        }
    });
    num / den
}

// ---------------------------------------------------------------------------------------
// Sequence-parallel attention

struct AttnCase {
    mesh: Mesh,
    method: SeqMethod,
    batch: usize,
    heads: usize,
    head_dim: usize,
    /// Lengths of the sequence's segments (e.g. image then text).
    seq: Vec<usize>,
}

/// What one rank returns from an attention program.
struct RankOut {
    outputs: Vec<Vec<f32>>,
    stats: ParallelStats,
    comm: Option<CommStats>,
}

/// Full q/k/v in, per rank: (optional CFG shard on the batch) -> Sp shard of the sequence
/// -> SeqAttention -> gathers back. Outputs: "local" (this rank's attention rows) and
/// "full" (everything gathered).
fn attention_program(c: &AttnCase) -> Arc<Program> {
    let m = c.mesh;
    let s: usize = c.seq.iter().sum();
    let w = c.heads * c.head_dim;
    let mut b = Builder::default();
    let mut x = [
        b.input("q", &[c.batch, s, w]),
        b.input("k", &[c.batch, s, w]),
        b.input("v", &[c.batch, s, w]),
    ];
    let cfg_segs = split_segments(&[c.batch], m.cfg);
    if m.cfg > 1 {
        for t in &mut x {
            *t = b.shard(*t, 0, &m, MeshAxis::Cfg, &cfg_segs);
        }
    }
    let segs = split_segments(&c.seq, m.sp());
    for t in &mut x {
        *t = b.shard(*t, 1, &m, MeshAxis::Sp, &segs);
    }
    let bl = c.batch / m.cfg;
    let sl: usize = segs.iter().map(|s| s.local).sum();
    let out = b.buffer(&[bl, sl, w]);
    b.steps.push(Step::SeqAttention {
        q: x[0],
        k: x[1],
        v: x[2],
        out,
        method: c.method,
        batch: bl,
        sq: sl,
        sk: sl,
        heads: c.heads,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        key_segments: segs.clone(),
    });
    b.output("local", out);
    let mut full = b.all_gather(out, 1, &m, MeshAxis::Sp, &segs);
    if m.cfg > 1 {
        full = b.all_gather(full, 0, &m, MeshAxis::Cfg, &cfg_segs);
    }
    b.output("full", full);
    b.finish(m)
}

fn run_program(program: &Arc<Program>, inputs: &[Vec<f32>]) -> Vec<RankOut> {
    let world = program.mesh.world_size();
    run_ranks(world, TIMEOUT, |comm| {
        let rank = comm.rank();
        let mut ex =
            CpuExecutor::with_comm(program.clone(), Arc::new(vec![]), rank, Box::new(comm))?;
        let refs: Vec<&[f32]> = inputs.iter().map(|x| x.as_slice()).collect();
        let outputs = ex.run(&refs)?;
        Ok::<_, RuntimeError>(RankOut {
            outputs,
            stats: ex.parallel_stats(),
            comm: ex.comm_stats().cloned(),
        })
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the case on every rank and checks each rank's own attention rows and the
/// gathered output against the serial reference over the unpadded sequence. Returns the
/// worst relative error and the ranks' outputs.
fn check_attention(c: &AttnCase, seed: u64) -> (f64, Vec<RankOut>) {
    let s: usize = c.seq.iter().sum();
    let w = c.heads * c.head_dim;
    let mut rng = Rng(seed);
    let n = c.batch * s * w;
    let inputs = [rng.vec(n), rng.vec(n), rng.vec(n)];
    let want = reference(
        &inputs[0],
        &inputs[1],
        &inputs[2],
        c.batch,
        s,
        c.heads,
        c.head_dim,
        1.0 / (c.head_dim as f64).sqrt(),
    );
    let program = attention_program(c);
    let outs = run_program(&program, &inputs);

    let m = c.mesh;
    let segs = split_segments(&c.seq, m.sp());
    let sl: usize = segs.iter().map(|s| s.local).sum();
    let bl = c.batch / m.cfg;
    let mut worst = 0.0f64;
    for (rank, out) in outs.iter().enumerate() {
        let full = &out.outputs[1];
        let e = rel_err(full, &want);
        assert!(e <= 1e-5, "rank {rank}: gathered output rel err {e:e}");
        worst = worst.max(e);

        // This rank's rows, one by one, against the reference rows they stand for.
        let local = &out.outputs[0];
        assert_eq!(local.len(), bl * sl * w);
        assert!(
            local.iter().all(|x| x.is_finite()),
            "rank {rank}: non-finite output"
        );
        let (ci, si) = (m.index(rank, MeshAxis::Cfg), m.index(rank, MeshAxis::Sp));
        let (mut got, mut exp) = (Vec::new(), Vec::new());
        for bb in 0..bl {
            let gb = ci * bl + bb;
            let (mut l0, mut g0) = (0, 0);
            for seg in &segs {
                for o in 0..seg.local {
                    let g = si * seg.local + o;
                    if g < seg.valid {
                        got.extend_from_slice(&local[(bb * sl + l0 + o) * w..][..w]);
                        exp.extend_from_slice(&want[(gb * s + g0 + g) * w..][..w]);
                    }
                }
                l0 += seg.local;
                g0 += seg.valid;
            }
        }
        // Relative to the whole reference's scale: a rank may hold few rows, or none.
        let den = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let e = got
            .iter()
            .zip(&exp)
            .fold(0.0f64, |a, (&x, &y)| a.max((x as f64 - y).abs()))
            / den;
        assert!(e <= 1e-5, "rank {rank}: local rows rel err {e:e}");
        worst = worst.max(e);
    }
    (worst, outs)
}

fn case(mesh: Mesh, method: SeqMethod, heads: usize, seq: &[usize]) -> AttnCase {
    AttnCase {
        mesh,
        method,
        batch: 2,
        heads,
        head_dim: 8,
        seq: seq.to_vec(),
    }
}

#[test]
fn seq_attention_matches_serial_on_all_meshes() {
    use SeqMethod::{Ring, Ulysses, Usp};
    let cases = [
        // Sequences that divide.
        case(mesh(1, 1, 2), Ulysses, 4, &[64]),
        case(mesh(1, 2, 1), Ring, 4, &[64]),
        case(mesh(1, 2, 2), Usp, 4, &[64]),
        case(mesh(1, 1, 4), Ulysses, 4, &[64]),
        case(mesh(1, 4, 1), Ring, 4, &[64]),
        // Padded: 62 on 4 ranks (local 16, 2 padding rows on the last rank).
        case(mesh(1, 1, 4), Ulysses, 4, &[62]),
        case(mesh(1, 4, 1), Ring, 4, &[62]),
        // Two segments: image 60 + text 7 (text local 2, one padding row).
        case(mesh(1, 1, 4), Ulysses, 4, &[60, 7]),
        case(mesh(1, 4, 1), Ring, 4, &[60, 7]),
        case(mesh(1, 2, 2), Usp, 4, &[60, 7]),
        // CFG pair around a 2x2 USP mesh (8 ranks).
        case(mesh(2, 2, 2), Usp, 4, &[60, 7]),
        case(mesh(2, 2, 2), Ring, 4, &[61]),
        // Heads that don't divide the Ulysses degree: padded with zero heads.
        case(mesh(1, 1, 2), Ulysses, 3, &[61]),
        case(mesh(1, 2, 2), Usp, 3, &[60, 7]),
        case(mesh(1, 1, 4), Ulysses, 3, &[30, 5]),
        // Ulysses over the whole Sp axis of a 2-D mesh.
        case(mesh(1, 2, 2), Ulysses, 4, &[60, 7]),
        // Members holding only padding: 3 rows on 4 ranks (rank 3's block has no valid
        // key), and a 2-token text segment.
        case(mesh(1, 4, 1), Ring, 4, &[3]),
        case(mesh(1, 1, 4), Ulysses, 4, &[3]),
        case(mesh(1, 2, 2), Usp, 4, &[30, 2]),
    ];
    for (i, c) in cases.iter().enumerate() {
        let (err, outs) = check_attention(c, 100 + i as u64);
        let pad = (c.heads.div_ceil(ulysses_degree(c)) * ulysses_degree(c) - c.heads) as u64;
        for o in &outs {
            assert_eq!(
                o.stats,
                ParallelStats {
                    seq_attentions: 1,
                    padded_heads: pad
                }
            );
        }
        eprintln!(
            "{:?} {:?} heads {} seq {:?}: max rel err {err:.2e}",
            c.method, c.mesh, c.heads, c.seq
        );
    }
}

/// The Ulysses degree a case's method uses (heads are padded to a multiple of it).
fn ulysses_degree(c: &AttnCase) -> usize {
    match c.method {
        SeqMethod::Ulysses => c.mesh.sp(),
        SeqMethod::Ring | SeqMethod::Displaced => 1,
        SeqMethod::Usp => c.mesh.ulysses,
    }
}

// ---------------------------------------------------------------------------------------
// Traffic

/// Per rank and attention, with P the degree, B the batch, S the padded sequence
/// (P x local rows), D = heads x head_dim (heads after padding), 4 bytes per element,
/// counted by the CommStats convention (bytes this rank sends):
/// - Ulysses: the forward all-to-all carries q, k, v (3 B S D / P elements in, (P-1)/P
///   of it leaves), the inverse one the output (B S D / P): 4 (P-1)/P^2 B S D 4 bytes in
///   2 calls;
/// - Ring: P-1 sendrecvs of the K and V block (2 B S D / P): 2 (P-1)/P B S D 4 bytes;
/// - USP (U x R): Ulysses over U on S/R rows, then Ring over R on blocks of U local rows
///   x D/U columns: 4 (U-1)/U^2 B (S/R) D 4 all-to-all bytes and 2 (R-1)/(R U) B S D 4
///   sendrecv bytes.
///
/// The final all-gather of the output is counted under all_gather: (P-1) x local bytes.
#[test]
fn comm_volumes_match_the_analytic_formulas() {
    use SeqMethod::{Ring, Ulysses, Usp};
    for c in [
        case(mesh(1, 1, 4), Ulysses, 4, &[64]),
        case(mesh(1, 1, 2), Ulysses, 4, &[64]),
        case(mesh(1, 1, 2), Ulysses, 3, &[61]),
        case(mesh(1, 4, 1), Ring, 4, &[64]),
        case(mesh(1, 2, 1), Ring, 4, &[62]),
        case(mesh(1, 2, 2), Usp, 4, &[64]),
        case(mesh(1, 2, 2), Usp, 3, &[60, 7]),
    ] {
        let (_, outs) = check_attention(&c, 7);
        let m = c.mesh;
        let segs = split_segments(&c.seq, m.sp());
        let local: u64 = segs.iter().map(|s| s.local as u64).sum();
        let (b, hd) = (c.batch as u64, c.head_dim as u64);
        let p = m.sp() as u64;
        let s = p * local;
        let (u, r) = match c.method {
            Ulysses => (p, 1),
            Ring => (1, p),
            Usp => (m.ulysses as u64, m.ring as u64),
            SeqMethod::Displaced => unreachable!("not among these cases"),
        };
        let d = (c.heads as u64).div_ceil(u) * u * hd;
        let d_real = c.heads as u64 * hd;
        // Each formula is written so its division is exact.
        let a2a = 4 * (u - 1) * b * (s / r) * d * 4 / (u * u);
        let ring = 2 * (r - 1) * b * s * d * 4 / (r * u);
        let a2a_calls = if u > 1 { 2 } else { 0 };
        let gather = (p - 1) * b * local * d_real * 4;
        for (rank, o) in outs.iter().enumerate() {
            let st = o.comm.as_ref().expect("multi-rank executors have stats");
            assert_eq!(
                st.all_to_all().bytes,
                a2a,
                "{c:?} rank {rank} all_to_all",
                c = c.mesh
            );
            assert_eq!(st.all_to_all().calls, a2a_calls);
            assert_eq!(
                st.send_recv().bytes,
                ring,
                "{:?} rank {rank} sendrecv",
                c.mesh
            );
            assert_eq!(st.send_recv().calls, r - 1);
            assert_eq!(st.all_gather().bytes, gather);
            assert_eq!(st.all_gather().calls, 1);
            assert_eq!(st.all_reduce().calls, 0);
        }
        eprintln!(
            "{:?} {:?} heads {} (padded to {}) B {b} S {s} head_dim {hd}: all_to_all {a2a} B, \
             sendrecv {ring} B, all_gather {gather} B per rank",
            c.method,
            c.mesh,
            c.heads,
            d / hd
        );
    }
}

// ---------------------------------------------------------------------------------------
// Shard / AllGather

/// Index of global element (outer, row, inner) in the padded layout check below.
fn expected_shard(
    x: &[f32],
    shape: &[usize],
    axis: usize,
    segs: &[Segment],
    member: usize,
) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let rows = shape[axis];
    let mut out = Vec::new();
    for o in 0..outer {
        let mut start = 0;
        for seg in segs {
            for l in 0..seg.local {
                let g = member * seg.local + l;
                for i in 0..inner {
                    out.push(if g < seg.valid {
                        x[(o * rows + start + g) * inner + i]
                    } else {
                        0.0
                    });
                }
            }
            start += seg.valid;
        }
    }
    out
}

#[test]
fn shard_then_all_gather_round_trips_on_every_axis() {
    let m = mesh(2, 2, 2);
    // Segments of 7 and 3 rows, and a 1-row one (members past 0 hold only padding).
    let lens = [7, 3, 1];
    for on in [
        MeshAxis::Sp,
        MeshAxis::Ulysses,
        MeshAxis::Ring,
        MeshAxis::Cfg,
    ] {
        let parts = m.size(on);
        let segs = split_segments(&lens, parts);
        for axis in 0..3 {
            let mut shape = vec![2, 3, 4];
            shape[axis] = lens.iter().sum();
            let mut b = Builder::default();
            let x = b.input("x", &shape);
            let xs = b.shard(x, axis, &m, on, &segs);
            let xg = b.all_gather(xs, axis, &m, on, &segs);
            b.output("shard", xs);
            b.output("full", xg);
            let program = b.finish(m);
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let outs = run_program(&program, std::slice::from_ref(&data));
            for (rank, o) in outs.iter().enumerate() {
                let member = m.index(rank, on);
                assert_eq!(
                    o.outputs[0],
                    expected_shard(&data, &shape, axis, &segs, member),
                    "{on:?} axis {axis} rank {rank}: shard"
                );
                assert_eq!(
                    o.outputs[1], data,
                    "{on:?} axis {axis} rank {rank}: round trip"
                );
                let st = o.comm.as_ref().unwrap();
                let local_elems = (o.outputs[0].len() * 4) as u64;
                assert_eq!(st.all_gather().bytes, (parts as u64 - 1) * local_elems);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One rank

#[test]
fn single_rank_mesh_runs_parallel_steps_locally() {
    for method in [SeqMethod::Ulysses, SeqMethod::Ring, SeqMethod::Usp] {
        let (batch, heads, hd, seq) = (2, 3, 8, [13usize, 5]);
        let s: usize = seq.iter().sum();
        let w = heads * hd;
        // Local rows beyond `valid` (as a compiler may plan): shard pads, attention masks,
        // gather drops.
        let segs = [
            Segment {
                local: 16,
                valid: 13,
            },
            Segment { local: 6, valid: 5 },
        ];
        let sl = 22;
        let m = Mesh::default();
        let mut b = Builder::default();
        let x: Vec<ValueId> = ["q", "k", "v"]
            .iter()
            .map(|n| {
                let i = b.input(n, &[batch, s, w]);
                b.shard(i, 1, &m, MeshAxis::Sp, &segs)
            })
            .collect();
        let out = b.buffer(&[batch, sl, w]);
        b.steps.push(Step::SeqAttention {
            q: x[0],
            k: x[1],
            v: x[2],
            out,
            method,
            batch,
            sq: sl,
            sk: sl,
            heads,
            head_dim: hd,
            scale: 0.3,
            key_segments: segs.to_vec(),
        });
        let full = b.all_gather(out, 1, &m, MeshAxis::Sp, &segs);
        b.output("full", full);
        let program = b.finish(m);
        let mut rng = Rng(9);
        let inputs: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(batch * s * w)).collect();
        let want = reference(&inputs[0], &inputs[1], &inputs[2], batch, s, heads, hd, 0.3);
        let mut ex = CpuExecutor::new(program, Arc::new(vec![])).unwrap();
        let refs: Vec<&[f32]> = inputs.iter().map(|x| x.as_slice()).collect();
        let got = ex.run(&refs).unwrap();
        let e = rel_err(&got[0], &want);
        assert!(e <= 1e-5, "{method:?}: rel err {e:e}");
        assert!(ex.comm_stats().is_none());
        assert_eq!(ex.parallel_stats().padded_heads, 0);
    }
}

#[test]
fn executor_construction_errors_are_clear() {
    let c = case(mesh(1, 1, 2), SeqMethod::Ulysses, 4, &[8]);
    let program = attention_program(&c);
    let no_weights = || Arc::new(vec![]);
    let err = CpuExecutor::new(program.clone(), no_weights())
        .err()
        .unwrap();
    assert!(err.to_string().contains("with_comm"), "{err}");

    let mut comms = in_process_world(2, TIMEOUT);
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let err = CpuExecutor::with_comm(program.clone(), no_weights(), 2, Box::new(c0))
        .err()
        .unwrap();
    assert!(err.to_string().contains("rank 2 is outside"), "{err}");
    let err = CpuExecutor::with_comm(program.clone(), no_weights(), 0, Box::new(c1))
        .err()
        .unwrap();
    assert!(err.to_string().contains("communicator of rank 1"), "{err}");
    let big = in_process_world(4, TIMEOUT).into_iter().next().unwrap();
    let err = CpuExecutor::with_comm(program.clone(), no_weights(), 0, Box::new(big))
        .err()
        .unwrap();
    assert!(err.to_string().contains("world has 4"), "{err}");

    // A step that does not fit the mesh is refused up front.
    let mut bad = (*program).clone();
    if let Step::Shard { parts, .. } = &mut bad.steps[0] {
        *parts = 3;
    }
    let c = in_process_world(2, TIMEOUT).into_iter().next().unwrap();
    let err = CpuExecutor::with_comm(Arc::new(bad), no_weights(), 0, Box::new(c))
        .err()
        .unwrap();
    assert!(err.to_string().contains("3 parts"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Failures

/// Runs `f` on every rank of a fresh world on plain threads (not `run_ranks`, which would
/// announce failures itself) and returns every rank's result.
fn on_threads<T: Send>(world: usize, f: impl Fn(InProcessComm) -> T + Sync) -> Vec<T> {
    let f = &f;
    thread::scope(|s| {
        let joins: Vec<_> = in_process_world(world, TIMEOUT)
            .into_iter()
            .map(|comm| s.spawn(move || f(comm)))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn assert_blames(err: &RuntimeError, culprit: usize, what: &str) {
    match err {
        RuntimeError::Comm(e) => {
            assert!(
                e.culprit().contains(&culprit),
                "{what}: {e} does not blame rank {culprit}"
            );
            assert!(
                e.to_string().contains(&format!("rank {culprit}")),
                "{what}: {e}"
            );
        }
        e => panic!("{what}: expected a communication error, got {e}"),
    }
}

/// A rank whose step fails (an out-of-range embedding index) before the attention makes
/// the others, waiting for it in the all-to-all, return an error naming it at once.
#[test]
fn a_failing_step_is_reported_to_the_other_ranks() {
    let m = mesh(1, 1, 4);
    let (s, heads, hd, vocab) = (8, 4, 4, 10);
    let w = heads * hd;
    let segs = split_segments(&[s], 4);
    let mut b = Builder::default();
    let table = b.weight("table", &[vocab, w]);
    let idx = b.input("idx", &[s]);
    let e = b.buffer(&[s, w]);
    b.steps.push(Step::Embedding { table, idx, out: e });
    let x = b.view(e, &[1, s, w]);
    let xs = b.shard(x, 1, &m, MeshAxis::Sp, &segs);
    let out = b.buffer(&[1, 2, w]);
    b.steps.push(Step::SeqAttention {
        q: xs,
        k: xs,
        v: xs,
        out,
        method: SeqMethod::Ulysses,
        batch: 1,
        sq: 2,
        sk: 2,
        heads,
        head_dim: hd,
        scale: 0.5,
        key_segments: segs.clone(),
    });
    b.output("out", out);
    let program = b.finish(m);
    let weights = Arc::new(vec![Rng(3).vec(vocab * w)]);

    let t0 = Instant::now();
    let results = on_threads(4, |comm| {
        let rank = comm.rank();
        let mut ex =
            CpuExecutor::with_comm(program.clone(), weights.clone(), rank, Box::new(comm))?;
        let idx: Vec<f32> = (0..s)
            .map(|i| {
                if rank == 1 && i == 5 {
                    99.0
                } else {
                    (i % vocab) as f32
                }
            })
            .collect();
        ex.run(&[&idx])
    });
    assert!(
        t0.elapsed() < TIMEOUT / 3,
        "failure took {:?} to propagate",
        t0.elapsed()
    );
    let own = results[1].as_ref().err().unwrap();
    assert!(matches!(own, RuntimeError::Input(_)), "{own}");
    assert!(own.to_string().contains("out of range"), "{own}");
    for rank in [0, 2, 3] {
        let err = results[rank]
            .as_ref()
            .expect_err("peers of a failed rank fail");
        assert_blames(err, 1, &format!("rank {rank}"));
        // The reason travels with it.
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}

/// A communicator that dies at its `fail_at`-th operation: it announces the failure, as
/// a crashing backend would be detected, and returns a transport error.
struct DyingComm {
    inner: InProcessComm,
    fail_at: Option<usize>,
    ops: usize,
}

impl DyingComm {
    fn tick(&mut self, op: CommOp) -> Result<(), CommError> {
        self.ops += 1;
        if Some(self.ops) == self.fail_at {
            self.inner.fail("injected failure");
            return Err(CommError::Transport {
                rank: self.inner.rank(),
                op,
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
}

impl Communicator for DyingComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&mut self, g: &Group, i: &[f32], o: &mut [f32]) -> Result<(), CommError> {
        self.tick(CommOp::AllGather)?;
        self.inner.all_gather(g, i, o)
    }
    fn all_to_all(&mut self, g: &Group, i: &[f32], o: &mut [f32]) -> Result<(), CommError> {
        self.tick(CommOp::AllToAll)?;
        self.inner.all_to_all(g, i, o)
    }
    fn all_reduce_sum(&mut self, g: &Group, d: &mut [f32]) -> Result<(), CommError> {
        self.tick(CommOp::AllReduce)?;
        self.inner.all_reduce_sum(g, d)
    }
    fn send(&mut self, to: usize, tag: u64, d: &[f32]) -> Result<(), CommError> {
        self.tick(CommOp::Send)?;
        self.inner.send(to, tag, d)
    }
    fn recv(&mut self, from: usize, tag: u64, o: &mut [f32]) -> Result<(), CommError> {
        self.tick(CommOp::Recv)?;
        self.inner.recv(from, tag, o)
    }
    fn sendrecv(
        &mut self,
        to: usize,
        s: &[f32],
        from: usize,
        r: &mut [f32],
        tag: u64,
    ) -> Result<(), CommError> {
        self.tick(CommOp::SendRecv)?;
        self.inner.sendrecv(to, s, from, r, tag)
    }
    fn barrier(&mut self, g: &Group) -> Result<(), CommError> {
        self.tick(CommOp::Barrier)?;
        self.inner.barrier(g)
    }
    fn stats(&self) -> &CommStats {
        self.inner.stats()
    }
    fn reset_stats(&mut self) {
        self.inner.reset_stats()
    }
    fn fail(&mut self, reason: &str) {
        self.inner.fail(reason)
    }
}

/// A rank whose communicator dies in the middle of an attention (USP: after the
/// all-to-all, at its second ring transfer) makes every other rank return an error
/// naming it, well before the timeout.
#[test]
fn a_rank_dying_mid_attention_is_named_by_the_others() {
    for (c, fail_at) in [
        // Ring r4: the 2nd sendrecv of rank 2.
        (case(mesh(1, 4, 1), SeqMethod::Ring, 4, &[60, 7]), 2),
        // USP 2x2: all_to_all, sendrecv, then the inverse all_to_all (3rd op) fails.
        (case(mesh(1, 2, 2), SeqMethod::Usp, 4, &[60, 7]), 3),
        // Ulysses u4: the inverse all-to-all.
        (case(mesh(1, 1, 4), SeqMethod::Ulysses, 4, &[60]), 2),
    ] {
        let program = attention_program(&c);
        let s: usize = c.seq.iter().sum();
        let n = c.batch * s * c.heads * c.head_dim;
        let mut rng = Rng(5);
        let inputs: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n)).collect();
        let dying = 2;
        let t0 = Instant::now();
        let results = on_threads(c.mesh.world_size(), |comm| {
            let rank = comm.rank();
            let comm = DyingComm {
                inner: comm,
                fail_at: (rank == dying).then_some(fail_at),
                ops: 0,
            };
            let mut ex =
                CpuExecutor::with_comm(program.clone(), Arc::new(vec![]), rank, Box::new(comm))?;
            let refs: Vec<&[f32]> = inputs.iter().map(|x| x.as_slice()).collect();
            ex.run(&refs)
        });
        assert!(
            t0.elapsed() < TIMEOUT / 3,
            "failure took {:?} to propagate",
            t0.elapsed()
        );
        for (rank, r) in results.iter().enumerate() {
            let err = r
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("{:?}: rank {rank} succeeded", c.method));
            assert_blames(err, dying, &format!("{:?} rank {rank}", c.method));
        }
    }
}
