//! Displaced attention (`SeqMethod::Displaced`) and its state across runs, on in-process
//! ranks and on virtual ranks: exact mode against a float64 reference, stale mode against
//! the reference over the K/V it is meant to see (this step's own slot, the previous step's
//! others), PCPP's window and edge exchange, PipeFusion's virtual patches, the traffic
//! against the analytic volumes, and the errors.
//!
//! Programs are built directly (no IR): q, k, v in, shard over Sp (and CFG), one displaced
//! attention, the local rows and the gathered rows out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ditto_codegen::program::FORMAT_VERSION;
use ditto_codegen::{
    Binding, Mesh, MeshAxis, Program, Segment, SeqMethod, Step, Storage, Value, ValueId,
};
use ditto_runtime::comm::{run_ranks, CommStats, Communicator};
use ditto_runtime::cpu::executor::CpuExecutor;
use ditto_runtime::parallel::stale::{edge_rows, StaleMode, StaleState};
use ditto_runtime::parallel::Placement;
use ditto_runtime::RuntimeError;

const TIMEOUT: Duration = Duration::from_secs(30);
const TOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------
// Program building

#[derive(Default)]
struct Builder {
    inputs: Vec<Binding>,
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
    fn split(
        &mut self,
        gather: bool,
        x: ValueId,
        axis: usize,
        mesh: &Mesh,
        on: MeshAxis,
        segs: &[Segment],
    ) -> ValueId {
        let mut shape = self.values[x].shape.clone();
        shape[axis] = segs
            .iter()
            .map(|s| if gather { s.valid } else { s.local })
            .sum();
        let out = self.buffer(&shape);
        let (parts, segments) = (mesh.size(on), segs.to_vec());
        self.steps.push(if gather {
            Step::AllGather {
                x,
                out,
                axis,
                mesh: on,
                parts,
                segments,
            }
        } else {
            Step::Shard {
                x,
                out,
                axis,
                mesh: on,
                parts,
                segments,
            }
        });
        out
    }
    fn finish(self, mesh: Mesh) -> Arc<Program> {
        Arc::new(Program {
            format_version: FORMAT_VERSION,
            mesh,
            inputs: self.inputs,
            weights: Vec::new(),
            buffers: self.buffers,
            values: self.values,
            kernels: Vec::new(),
            steps: self.steps,
            outputs: self.outputs,
        })
    }
}

fn split_segments(valid: &[usize], parts: usize) -> Vec<Segment> {
    valid
        .iter()
        .map(|&v| Segment {
            local: v.div_ceil(parts),
            valid: v,
        })
        .collect()
}

#[derive(Clone)]
struct Case {
    mesh: Mesh,
    batch: usize,
    heads: usize,
    head_dim: usize,
    seq: Vec<usize>,
    /// Displaced attentions in a row (layers): the output of one is the next one's q.
    layers: usize,
}

impl Case {
    fn new(mesh: Mesh, seq: &[usize]) -> Case {
        Case {
            mesh,
            batch: 2,
            heads: 2,
            head_dim: 4,
            seq: seq.to_vec(),
            layers: 1,
        }
    }
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn rows(&self) -> usize {
        self.seq.iter().sum()
    }
    fn numel(&self) -> usize {
        self.batch * self.rows() * self.width()
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    fn segs(&self) -> Vec<Segment> {
        split_segments(&self.seq, self.mesh.sp())
    }
}

/// q, k, v -> (CFG shard) -> Sp shard -> `layers` displaced attentions (each layer's
/// queries are the previous output; k and v shared) -> outputs "local" (the last layer's
/// rows of this rank) and "full" (gathered).
fn program(c: &Case) -> Arc<Program> {
    let m = c.mesh;
    let (s, w) = (c.rows(), c.width());
    let mut b = Builder::default();
    let mut x = [
        b.input("q", &[c.batch, s, w]),
        b.input("k", &[c.batch, s, w]),
        b.input("v", &[c.batch, s, w]),
    ];
    let cfg_segs = split_segments(&[c.batch], m.cfg);
    if m.cfg > 1 {
        for t in &mut x {
            *t = b.split(false, *t, 0, &m, MeshAxis::Cfg, &cfg_segs);
        }
    }
    let segs = c.segs();
    for t in &mut x {
        *t = b.split(false, *t, 1, &m, MeshAxis::Sp, &segs);
    }
    let bl = c.batch / m.cfg;
    let sl: usize = segs.iter().map(|s| s.local).sum();
    let mut q = x[0];
    for _ in 0..c.layers {
        let out = b.buffer(&[bl, sl, w]);
        b.steps.push(Step::SeqAttention {
            q,
            k: x[1],
            v: x[2],
            out,
            method: SeqMethod::Displaced,
            batch: bl,
            sq: sl,
            sk: sl,
            heads: c.heads,
            head_dim: c.head_dim,
            scale: c.scale(),
            key_segments: segs.clone(),
        });
        q = out;
    }
    b.outputs.push(("local".into(), q));
    let mut full = b.split(true, q, 1, &m, MeshAxis::Sp, &segs);
    if m.cfg > 1 {
        full = b.split(true, full, 0, &m, MeshAxis::Cfg, &cfg_segs);
    }
    b.outputs.push(("full".into(), full));
    b.finish(m)
}

// ---------------------------------------------------------------------------------------
// Data and reference

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

/// Float64 attention of query rows `qrows` of batch element `b` over the key rows `krows`
/// (indices into the unsplit sequence), with keys and values taken from `kv(row)`.
#[allow(clippy::too_many_arguments)]
fn reference_rows(
    c: &Case,
    q: &[f32],
    b: usize,
    qrows: &[usize],
    krows: &[usize],
    k: &dyn Fn(usize) -> Vec<f32>,
    v: &dyn Fn(usize) -> Vec<f32>,
) -> Vec<f64> {
    let (s, w, hd) = (c.rows(), c.width(), c.head_dim);
    let scale = c.scale() as f64;
    let ks: Vec<Vec<f32>> = krows.iter().map(|&r| k(r)).collect();
    let vs: Vec<Vec<f32>> = krows.iter().map(|&r| v(r)).collect();
    let mut out = vec![0.0f64; qrows.len() * w];
    for (qi, &r) in qrows.iter().enumerate() {
        let qv = &q[(b * s + r) * w..][..w];
        for h in 0..c.heads {
            let sc: Vec<f64> = ks
                .iter()
                .map(|kr| {
                    (0..hd)
                        .map(|d| qv[h * hd + d] as f64 * kr[h * hd + d] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                let acc: f64 = sc
                    .iter()
                    .zip(&vs)
                    .map(|(x, vr)| (x - m).exp() * vr[h * hd + d] as f64)
                    .sum();
                out[qi * w + h * hd + d] = acc / z;
            }
        }
    }
    out
}

/// Global rows (in the unsplit sequence) that Sp member `m` holds, and its local positions.
fn member_rows(c: &Case, m: usize) -> Vec<(usize, usize)> {
    let mut rows = Vec::new();
    let (mut g0, mut l0) = (0, 0);
    for s in c.segs() {
        for o in 0..s.local {
            let g = m * s.local + o;
            if g < s.valid {
                rows.push((g0 + g, l0 + o));
            }
        }
        g0 += s.valid;
        l0 += s.local;
    }
    rows
}

/// The segment of an unsplit row and its offset in it.
fn seg_of(c: &Case, row: usize) -> (usize, usize) {
    let mut at = 0;
    for (i, &v) in c.seq.iter().enumerate() {
        if row < at + v {
            return (i, row - at);
        }
        at += v;
    }
    unreachable!("row {row} past the sequence")
}

/// `max|got - want| / max|want|`.
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    let den = want.iter().fold(0.0f64, |a, x| a.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (&x, &y)| a.max((x as f64 - y).abs()))
        / den
}

/// Row `r` of batch element `b` of a `[batch, rows, width]` tensor.
fn row(c: &Case, t: &[f32], b: usize, r: usize) -> Vec<f32> {
    let w = c.width();
    t[(b * c.rows() + r) * w..][..w].to_vec()
}

// ---------------------------------------------------------------------------------------
// Running

struct RankOut {
    outputs: Vec<Vec<f32>>,
    comm: CommStats,
}

/// Runs every rank once per entry of `runs` (mode, inputs), each rank keeping its state
/// (and executor) across runs as a generation does. Returns per run, per rank.
fn run_steps(
    c: &Case,
    portion: Option<f32>,
    runs: &[(StaleMode, [Vec<f32>; 3])],
) -> Vec<Vec<RankOut>> {
    let p = program(c);
    let world = p.mesh.world_size();
    let results = Mutex::new(Vec::new());
    run_ranks(world, TIMEOUT, |comm| {
        let rank = comm.rank();
        let mut ex = CpuExecutor::with_comm(p.clone(), Arc::new(vec![]), rank, Box::new(comm))?;
        let mut state = StaleState::default().with_pcpp_portion(portion);
        let mut outs = Vec::new();
        for (mode, inputs) in runs {
            state.mode = *mode;
            ex.reset_comm_stats();
            let refs: Vec<&[f32]> = inputs.iter().map(|x| x.as_slice()).collect();
            let outputs = ex.run_with_state(&refs, &mut state)?;
            outs.push(RankOut {
                outputs,
                comm: ex.comm_stats().cloned().unwrap_or_default(),
            });
        }
        results.lock().unwrap().push((rank, outs));
        Ok::<_, RuntimeError>(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut by_rank = results.into_inner().unwrap();
    by_rank.sort_by_key(|(r, _)| *r);
    let mut per_run: Vec<Vec<RankOut>> = (0..runs.len()).map(|_| Vec::new()).collect();
    for (_, outs) in by_rank {
        for (i, o) in outs.into_iter().enumerate() {
            per_run[i].push(o);
        }
    }
    per_run
}

fn inputs(c: &Case, seed: u64) -> [Vec<f32>; 3] {
    let mut rng = Rng(seed);
    let n = c.numel();
    [rng.vec(n), rng.vec(n), rng.vec(n)]
}

/// For every rank, its local output rows against the reference where Sp member `m`'s
/// queries (from `q`) attend to the key rows `keys(m)` with K/V of key row `r` from
/// `kv(m, r)` (0: the first inputs, 1: the second).
fn check_ranks(
    c: &Case,
    outs: &[RankOut],
    q: &[f32],
    keys: &dyn Fn(usize) -> Vec<usize>,
    kv: &dyn Fn(usize, usize) -> (Vec<f32>, Vec<f32>),
    what: &str,
) -> f64 {
    let m = c.mesh;
    let bl = c.batch / m.cfg;
    let sl: usize = c.segs().iter().map(|s| s.local).sum();
    let w = c.width();
    let mut worst = 0.0f64;
    for (rank, out) in outs.iter().enumerate() {
        let (ci, si) = (m.index(rank, MeshAxis::Cfg), m.index(rank, MeshAxis::Sp));
        let rows = member_rows(c, si);
        let qrows: Vec<usize> = rows.iter().map(|r| r.0).collect();
        let krows = keys(si);
        let local = &out.outputs[0];
        assert!(local.iter().all(|x| x.is_finite()), "{what}: rank {rank}");
        for bb in 0..bl {
            let b = ci * bl + bb;
            let want = reference_rows(
                c,
                q,
                b,
                &qrows,
                &krows,
                &|r| row_kv(c, kv, si, b, r).0,
                &|r| row_kv(c, kv, si, b, r).1,
            );
            let got: Vec<f32> = rows
                .iter()
                .flat_map(|&(_, l)| local[(bb * sl + l) * w..][..w].to_vec())
                .collect();
            let e = max_err(&got, &want);
            assert!(e <= TOL, "{what}: rank {rank} batch {b}: rel err {e:e}");
            worst = worst.max(e);
        }
    }
    worst
}

fn row_kv(
    c: &Case,
    kv: &dyn Fn(usize, usize) -> (Vec<f32>, Vec<f32>),
    member: usize,
    b: usize,
    r: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (k, v) = kv(member, r);
    (row(c, &k, b, r), row(c, &v, b, r))
}

/// The Sp member holding unsplit row `r`.
fn owner(c: &Case, r: usize) -> usize {
    let (s, o) = seg_of(c, r);
    o / c.segs()[s].local
}

fn all_rows(c: &Case) -> Vec<usize> {
    (0..c.rows()).collect()
}

// ---------------------------------------------------------------------------------------
// Tests

/// Per-rank traffic of one exact run of `program(c)`: per displaced attention, Ulysses'
/// two all-to-alls (q/k/v out, the output back) and the ring's all-gathers of K and V (of
/// this rank's heads of its Ulysses group's rows); then the output's gathers.
fn exact_traffic(c: &Case) -> (u64, u64, u64, u64) {
    let m = c.mesh;
    let (r, u, sp) = (m.ring, m.ulysses, m.sp());
    let bl = c.batch / m.cfg;
    let sl: usize = c.segs().iter().map(|s| s.local).sum();
    let sw = c.heads.div_ceil(u) * c.head_dim;
    let layers = c.layers as u64;
    let mut gather = layers * 2 * CommStats::all_gather_bytes(bl * u * sl * sw, r)
        + CommStats::all_gather_bytes(bl * sl * c.width(), sp);
    let mut gather_calls = layers * if r > 1 { 2 } else { 0 } + u64::from(sp > 1);
    if m.cfg > 1 {
        gather += CommStats::all_gather_bytes(bl * c.rows() * c.width(), 2);
        gather_calls += 1;
    }
    let a2a = if u > 1 {
        layers
            * (CommStats::all_to_all_bytes(u * 3 * bl * sl * sw, u)
                + CommStats::all_to_all_bytes(u * bl * sl * sw, u))
    } else {
        0
    };
    let a2a_calls = if u > 1 { 2 * layers } else { 0 };
    (gather, gather_calls, a2a, a2a_calls)
}

#[test]
fn exact_mode_matches_serial_attention() {
    let mesh = |cfg, ring, ulysses| Mesh { cfg, ring, ulysses };
    for c in [
        Case::new(mesh(1, 2, 1), &[16]),
        Case::new(mesh(1, 4, 1), &[16]),
        // Padded: 14 rows on 4 members, and image + text segments.
        Case::new(mesh(1, 4, 1), &[14]),
        Case::new(mesh(1, 4, 1), &[12, 5]),
        // CFG pair x 2 Sp members: each CFG group has its own stores.
        Case::new(mesh(2, 2, 1), &[10, 3]),
        Case::new(mesh(1, 1, 1), &[9]),
        // Ulysses inside: stores of this rank's heads (2 heads on 4: padded heads).
        Case::new(mesh(1, 1, 2), &[16]),
        Case::new(mesh(1, 1, 4), &[14]),
        Case::new(mesh(1, 2, 2), &[12, 5]),
        Case::new(mesh(2, 2, 2), &[16]),
    ] {
        let x = inputs(&c, 7);
        let runs = run_steps(&c, None, &[(StaleMode::Exact, x.clone())]);
        let e = check_ranks(
            &c,
            &runs[0],
            &x[0],
            &|_| all_rows(&c),
            &|_, _| (x[1].clone(), x[2].clone()),
            "exact",
        );
        eprintln!("{:?} {:?}: {e:.2e}", c.mesh, c.seq);
        let (gather, gather_calls, a2a, a2a_calls) = exact_traffic(&c);
        for (rank, o) in runs[0].iter().enumerate() {
            assert_eq!(
                o.comm.all_gather().bytes,
                gather,
                "{:?} rank {rank}",
                c.mesh
            );
            assert_eq!(o.comm.all_to_all().bytes, a2a, "{:?} rank {rank}", c.mesh);
            if c.mesh.world_size() > 1 {
                assert_eq!(o.comm.all_gather().calls, gather_calls, "rank {rank}");
                assert_eq!(o.comm.all_to_all().calls, a2a_calls, "rank {rank}");
            }
        }
    }
}

/// Stale mode: each rank attends with its ring member's fresh K/V and the others' of the
/// previous step, and after the step ONE all-gather over the ring carries every layer's
/// fresh K/V. With Ulysses inside (ring 2 x Ulysses 2, and a CFG pair), staleness is per
/// ring member: the Ulysses members of one ring member see each other's fresh K/V (their
/// all-to-all is exact), and each rank stores its share of the heads.
#[test]
fn stale_mode_attends_to_the_previous_steps_keys_and_exchanges_them() {
    for (cfg, ring, ulysses, seq, layers) in [
        (1, 2, 1, vec![16], 1),
        (1, 4, 1, vec![14], 3),
        (1, 4, 1, vec![12, 5], 2),
        (1, 2, 2, vec![16], 1),
        (2, 2, 2, vec![12, 5], 2),
    ] {
        let mut c = Case::new(Mesh { cfg, ring, ulysses }, &seq);
        c.layers = layers;
        let (a, b) = (inputs(&c, 1), inputs(&c, 2));
        // Warmup with A, then two stale steps with B.
        let runs = run_steps(
            &c,
            None,
            &[
                (StaleMode::Exact, a.clone()),
                (StaleMode::Stale, b.clone()),
                (StaleMode::Stale, b.clone()),
            ],
        );
        if layers == 1 {
            // Step 2: this ring member's rows fresh (B), the others from A.
            check_ranks(
                &c,
                &runs[1],
                &b[0],
                &|_| all_rows(&c),
                &|m, r| {
                    let x = if owner(&c, r) / ulysses == m / ulysses {
                        &b
                    } else {
                        &a
                    };
                    (x[1].clone(), x[2].clone())
                },
                "stale step",
            );
            // Step 3: the exchange after step 2 made every slot B: exact again.
            check_ranks(
                &c,
                &runs[2],
                &b[0],
                &|_| all_rows(&c),
                &|_, _| (b[1].clone(), b[2].clone()),
                "after the exchange",
            );
        }
        // Traffic of a stale step: Ulysses' all-to-alls as in an exact step, and ONE
        // all-gather over the ring of every layer's K and V (plus the output's gathers):
        // the same bytes as a warmup step's 2 per layer.
        let (warm_gather, warm_calls, a2a, _) = exact_traffic(&c);
        let bl = c.batch / cfg;
        let sl: usize = c.segs().iter().map(|s| s.local).sum();
        let sw = c.heads.div_ceil(ulysses) * c.head_dim;
        let per_layer = 2 * CommStats::all_gather_bytes(bl * ulysses * sl * sw, ring);
        let outputs = warm_gather - layers as u64 * per_layer;
        let output_calls = warm_calls - 2 * layers as u64;
        for (rank, (w, st)) in runs[0].iter().zip(&runs[1]).enumerate() {
            let (warm, stale) = (&w.comm, &st.comm);
            let kv = CommStats::all_gather_bytes(2 * layers * ulysses * bl * sl * sw, ring);
            assert_eq!(stale.all_gather().bytes, kv + outputs, "rank {rank}");
            assert_eq!(warm.all_gather().bytes, stale.all_gather().bytes);
            assert_eq!(stale.all_gather().calls, 1 + output_calls, "rank {rank}");
            assert_eq!(warm.all_gather().calls, 2 * layers as u64 + output_calls);
            assert_eq!(stale.all_to_all().bytes, a2a, "rank {rank}");
            assert_eq!(stale.send_recv().bytes, 0);
        }
    }
}

/// PipeFusion's hybrid: a stage of `C x R x U` ranks plays an M-patch program patch by
/// patch; the 1-patch program of the same layout fills the stores first (warmup).
#[test]
fn placed_patches_on_a_group_of_ranks_attend_to_fresh_and_stale_patches() {
    let m = 2;
    for (cfg, ring, ulysses, seq) in [
        (1, 2, 1, vec![16]),
        (1, 1, 2, vec![16]),
        (2, 1, 2, vec![16, 8]),
        (1, 2, 2, vec![16]),
    ] {
        let one = Case::new(Mesh { cfg, ring, ulysses }, &seq);
        let mut many = one.clone();
        many.mesh.ring = m * ring;
        let group = one.mesh.world_size();
        let (a, b) = (inputs(&one, 11), inputs(&one, 12));
        let (warm_p, patch_p) = (program(&one), program(&many));
        let results = Mutex::new(Vec::new());
        run_ranks(group, TIMEOUT, |mut comm| {
            let g = comm.rank();
            // The group's ranks sit at communicator ranks 0..group here.
            let ranks: Vec<usize> = (0..group).collect();
            let mut warm = CpuExecutor::placed(
                warm_p.clone(),
                Arc::new(vec![]),
                g,
                Placement::on(ranks.clone()),
            )?;
            let placement = Placement { patches: m, ranks };
            let mut patch = CpuExecutor::placed(patch_p.clone(), Arc::new(vec![]), g, placement)?;
            let mut state = StaleState::default();
            let ra: Vec<&[f32]> = a.iter().map(|v| v.as_slice()).collect();
            let rb: Vec<&[f32]> = b.iter().map(|v| v.as_slice()).collect();
            warm.run_placed(&ra, &mut state, Some(&mut comm))?;
            let mut outs = Vec::new();
            for i in 0..m {
                state.patch = Some(i);
                outs.push(patch.run_placed(&rb, &mut state, Some(&mut comm))?);
            }
            results.lock().unwrap().push((g, outs));
            Ok::<_, RuntimeError>(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let placement = Placement {
            patches: m,
            ranks: (0..group).collect(),
        };
        let mesh = many.mesh;
        let (bl, w) = (one.batch / cfg, one.width());
        let sl: usize = many.segs().iter().map(|s| s.local).sum();
        let per_patch = mesh.sp() / m;
        for (g, outs) in results.into_inner().unwrap() {
            for (i, out) in outs.iter().enumerate() {
                let r = placement.program_rank(&mesh, g, i);
                let (ci, si) = (mesh.index(r, MeshAxis::Cfg), mesh.index(r, MeshAxis::Sp));
                let rows = member_rows(&many, si);
                let qrows: Vec<usize> = rows.iter().map(|x| x.0).collect();
                for bb in 0..bl {
                    let bg = ci * bl + bb;
                    // Patches up to this one are fresh (B), the later ones still A.
                    let kv = |row_: usize| {
                        if owner(&many, row_) / per_patch <= i {
                            &b
                        } else {
                            &a
                        }
                    };
                    let want = reference_rows(
                        &one,
                        &b[0],
                        bg,
                        &qrows,
                        &all_rows(&one),
                        &|x| row(&one, &kv(x)[1], bg, x),
                        &|x| row(&one, &kv(x)[2], bg, x),
                    );
                    let got: Vec<f32> = rows
                        .iter()
                        .flat_map(|&(_, l)| out[0][(bb * sl + l) * w..][..w].to_vec())
                        .collect();
                    let e = max_err(&got, &want);
                    assert!(
                        e <= TOL,
                        "{:?}: rank {g} patch {i} batch {bg}: rel err {e:e}",
                        one.mesh
                    );
                }
                // After the last patch, the gathered output is whole (every patch fresh in
                // its own attention).
                if i + 1 == m {
                    assert_eq!(out[1].len(), one.numel());
                }
            }
        }
    }
}

#[test]
fn pcpp_attends_to_its_window_and_exchanges_edges_with_neighbours() {
    let portion = 0.3f32;
    for (sp, seq) in [(4, vec![20]), (4, vec![18, 5]), (2, vec![16])] {
        let c = Case::new(
            Mesh {
                cfg: 1,
                ring: sp,
                ulysses: 1,
            },
            &seq,
        );
        let segs = c.segs();
        // Key rows of member m's window, per segment [m*local - w, (m+1)*local + w).
        let window = |m: usize| -> Vec<usize> {
            (0..c.rows())
                .filter(|&r| {
                    let (s, o) = seg_of(&c, r);
                    let l = segs[s].local;
                    let w = edge_rows(l, portion);
                    o + w >= m * l && o < (m + 1) * l + w
                })
                .collect()
        };
        let (a, b) = (inputs(&c, 3), inputs(&c, 4));
        let runs = run_steps(
            &c,
            Some(portion),
            &[
                (StaleMode::Exact, a.clone()),
                (StaleMode::Stale, b.clone()),
                (StaleMode::Stale, b.clone()),
            ],
        );
        // Warmup: exact, over all keys.
        check_ranks(
            &c,
            &runs[0],
            &a[0],
            &|_| all_rows(&c),
            &|_, _| (a[1].clone(), a[2].clone()),
            "pcpp warmup",
        );
        // Stale step: the window, own rows fresh, the neighbours' edges from the warmup.
        check_ranks(
            &c,
            &runs[1],
            &b[0],
            &window,
            &|m, r| {
                let x = if owner(&c, r) == m { &b } else { &a };
                (x[1].clone(), x[2].clone())
            },
            "pcpp stale step",
        );
        // The edges came over after step 2: the window is all fresh.
        check_ranks(
            &c,
            &runs[2],
            &b[0],
            &window,
            &|_, _| (b[1].clone(), b[2].clone()),
            "pcpp after the exchange",
        );
        // Traffic: per neighbour, w rows per segment of K and V, in one message.
        let edge: usize = segs.iter().map(|s| edge_rows(s.local, portion)).sum();
        let local: usize = c.batch * segs.iter().map(|s| s.local).sum::<usize>() * c.width();
        for (rank, out) in runs[1].iter().enumerate() {
            let st = &out.comm;
            let neighbours = [rank > 0, rank + 1 < sp].iter().filter(|&&n| n).count();
            let want = (neighbours * 2 * c.batch * edge * c.width()) as u64 * 4;
            assert_eq!(st.send_recv().bytes, want, "rank {rank}");
            assert_eq!(st.send_recv().calls, neighbours as u64, "rank {rank}");
            // Only the output's gather.
            assert_eq!(
                st.all_gather().bytes,
                CommStats::all_gather_bytes(local, sp)
            );
        }
    }
}

/// PipeFusion's use: a 1-part program in exact mode fills the stores, then one executor
/// runs the M-part program patch by patch.
#[test]
fn virtual_ranks_share_the_stores_of_a_one_part_program() {
    let m = 4;
    let one = Case::new(Mesh::default(), &[16, 4]);
    let mut many = one.clone();
    many.mesh = Mesh {
        cfg: 1,
        ring: m,
        ulysses: 1,
    };
    let (a, b) = (inputs(&one, 5), inputs(&one, 6));
    let mut warm = CpuExecutor::new(program(&one), Arc::new(vec![])).unwrap();
    let mut patch = CpuExecutor::virtual_ranks(program(&many), Arc::new(vec![])).unwrap();
    let mut state = StaleState::default();

    // Warmup step with A.
    let ra: Vec<&[f32]> = a.iter().map(|v| v.as_slice()).collect();
    let full_a = warm.run_with_state(&ra, &mut state).unwrap();
    let serial_a = reference_rows(
        &one,
        &a[0],
        0,
        &all_rows(&one),
        &all_rows(&one),
        &|r| row(&one, &a[1], 0, r),
        &|r| row(&one, &a[2], 0, r),
    );
    let w = one.width();
    assert!(max_err(&full_a[1][..one.rows() * w], &serial_a) <= TOL);
    let kv_after_warmup = state.kv_bytes();
    assert_eq!(kv_after_warmup, 2 * one.numel() * 4);

    // Patch step with nothing changed (A again): every patch is exact, and after the last
    // patch the gathered output is the serial one.
    state.mode = StaleMode::Stale;
    let mut last = Vec::new();
    for i in 0..m {
        state.patch = Some(i);
        last = patch.run_with_state(&ra, &mut state).unwrap();
    }
    let e = max_err(&last[1], &serial(&one, &a));
    assert!(e <= TOL, "unchanged patch step: {e:e}");
    assert_eq!(state.kv_bytes(), kv_after_warmup);

    // Patch step with B: patch i sees fresh K/V of patches <= i and A of the others.
    let rb: Vec<&[f32]> = b.iter().map(|v| v.as_slice()).collect();
    for i in 0..m {
        state.patch = Some(i);
        let out = patch.run_with_state(&rb, &mut state).unwrap();
        let got = &out[0];
        let rows = member_rows(&many, i);
        let sl: usize = many.segs().iter().map(|s| s.local).sum();
        let qrows: Vec<usize> = rows.iter().map(|r| r.0).collect();
        for bb in 0..one.batch {
            let kv = |r: usize| if owner(&many, r) <= i { &b } else { &a };
            let want = reference_rows(
                &one,
                &b[0],
                bb,
                &qrows,
                &all_rows(&one),
                &|r| row(&one, &kv(r)[1], bb, r),
                &|r| row(&one, &kv(r)[2], bb, r),
            );
            let g: Vec<f32> = rows
                .iter()
                .flat_map(|&(_, l)| got[(bb * sl + l) * w..][..w].to_vec())
                .collect();
            let e = max_err(&g, &want);
            assert!(e <= TOL, "patch {i} batch {bb}: {e:e}");
        }
    }
    assert_eq!(state.stats().virtual_attentions, 2 * m as u64);

    // After a reset, a first patch without warmup attends to its own patch only.
    state.reset();
    state.patch = Some(1);
    let out = patch.run_with_state(&rb, &mut state).unwrap();
    let rows = member_rows(&many, 1);
    let qrows: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let want = reference_rows(
        &one,
        &b[0],
        0,
        &qrows,
        &qrows,
        &|r| row(&one, &b[1], 0, r),
        &|r| row(&one, &b[2], 0, r),
    );
    // (Batch element 0: its local rows come first.)
    let g: Vec<f32> = rows
        .iter()
        .flat_map(|&(_, l)| out[0][l * w..(l + 1) * w].to_vec())
        .collect();
    assert!(max_err(&g, &want) <= TOL);
}

/// The serial output of every row, batch-major.
fn serial(c: &Case, x: &[Vec<f32>; 3]) -> Vec<f64> {
    let mut out = Vec::new();
    for b in 0..c.batch {
        out.extend(reference_rows(
            c,
            &x[0],
            b,
            &all_rows(c),
            &all_rows(c),
            &|r| row(c, &x[1], b, r),
            &|r| row(c, &x[2], b, r),
        ));
    }
    out
}

#[test]
fn errors_are_clear() {
    let c = Case::new(
        Mesh {
            cfg: 1,
            ring: 2,
            ulysses: 1,
        },
        &[8],
    );
    let x = inputs(&c, 9);
    let refs: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
    let one = Case::new(Mesh::default(), &[8]);
    let xo = inputs(&one, 9);
    let ro: Vec<&[f32]> = xo.iter().map(|v| v.as_slice()).collect();

    // A displaced attention without a state.
    let mut e = CpuExecutor::new(program(&one), Arc::new(vec![])).unwrap();
    let err = e.run(&ro).unwrap_err().to_string();
    assert!(err.contains("run_with_state"), "{err}");

    // A virtual executor: needs the state and a rank in range.
    let mut v = CpuExecutor::virtual_ranks(program(&c), Arc::new(vec![])).unwrap();
    let err = v.run(&refs).unwrap_err().to_string();
    assert!(err.contains("run_with_state"), "{err}");
    let mut st = StaleState::default();
    let err = v.run_with_state(&refs, &mut st).unwrap_err().to_string();
    assert!(err.contains("StaleState::patch"), "{err}");
    st.patch = Some(2);
    let err = v.run_with_state(&refs, &mut st).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");

    // Virtual ranks alone with a CFG split: that needs a group of ranks.
    let cfg = Case::new(
        Mesh {
            cfg: 2,
            ring: 2,
            ulysses: 1,
        },
        &[8],
    );
    let err = CpuExecutor::virtual_ranks(program(&cfg), Arc::new(vec![]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("CFG"), "{err}");

    // Stores of a padded M-part layout differ from the 1-part one: 10 rows on 4 parts.
    let padded = Case::new(
        Mesh {
            cfg: 1,
            ring: 4,
            ulysses: 1,
        },
        &[10],
    );
    let one10 = Case::new(Mesh::default(), &[10]);
    let x10 = inputs(&one10, 1);
    let r10: Vec<&[f32]> = x10.iter().map(|v| v.as_slice()).collect();
    let mut st = StaleState::default();
    CpuExecutor::new(program(&one10), Arc::new(vec![]))
        .unwrap()
        .run_with_state(&r10, &mut st)
        .unwrap();
    st.patch = Some(0);
    let err = CpuExecutor::virtual_ranks(program(&padded), Arc::new(vec![]))
        .unwrap()
        .run_with_state(&r10, &mut st)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must agree"), "{err}");

    // A program with a different number of displaced attentions.
    let mut two = one.clone();
    two.layers = 2;
    let mut st = StaleState::default();
    CpuExecutor::new(program(&two), Arc::new(vec![]))
        .unwrap()
        .run_with_state(&ro, &mut st)
        .unwrap();
    let err = CpuExecutor::new(program(&one), Arc::new(vec![]))
        .unwrap()
        .run_with_state(&ro, &mut st)
        .unwrap_err()
        .to_string();
    assert!(err.contains("same displaced attentions"), "{err}");

    // A bad PCPP portion.
    for f in [0.0f32, 1.5, f32::NAN] {
        let mut st = StaleState::default().with_pcpp_portion(Some(f));
        let err = CpuExecutor::new(program(&one), Arc::new(vec![]))
            .unwrap()
            .run_with_state(&ro, &mut st)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PCPP portion"), "{err}");
    }
}
