//! `--report`: what a parallel program sends, measured per rank, next to the analytic volume
//! of each method, and how much work padding added.

use std::fmt::Write;

use ditto_codegen::{Program, SeqMethod, Step};

use crate::parallel::RankStats;

/// Bytes per element on the wire of the CPU backend.
const ELEMENT_BYTES: f64 = 4.0;

/// Analytic bytes one rank sends per forward, by collective kind:
/// (all_gather, all_to_all, send/recv).
pub fn analytic_bytes(p: &Program) -> (f64, f64, f64) {
    analytic_bytes_on(p, &p.mesh)
}

/// [`analytic_bytes`] with the group sizes of `groups` rather than the program's mesh: a
/// program placed with virtual patches (PipeFusion) talks only to the ranks of one patch,
/// which are the physical mesh's.
pub fn analytic_bytes_on(p: &Program, groups: &ditto_codegen::Mesh) -> (f64, f64, f64) {
    let (mut gather, mut a2a, mut p2p) = (0.0, 0.0, 0.0);
    let numel = |v: usize| p.values[v].numel() as f64;
    for step in &p.steps {
        match step {
            Step::AllGather { x, mesh, .. } => {
                gather += numel(*x) * (groups.size(*mesh) as f64 - 1.0) * ELEMENT_BYTES;
            }
            Step::SeqAttention {
                q,
                k,
                method,
                heads,
                ..
            } => {
                let mesh = groups;
                // Heads are padded up to a multiple of the Ulysses degree.
                let pad = |deg: usize| (heads.div_ceil(deg) * deg) as f64 / *heads as f64;
                let (qn, kn) = (numel(*q), numel(*k));
                match method {
                    SeqMethod::Ulysses => {
                        let n = mesh.sp() as f64;
                        // q, k, v out and the result back, each (n-1)/n of a local tensor.
                        a2a +=
                            (2.0 * qn + 2.0 * kn) * pad(mesh.sp()) * (n - 1.0) / n * ELEMENT_BYTES;
                    }
                    SeqMethod::Ring => {
                        let n = mesh.sp() as f64;
                        p2p += 2.0 * kn * (n - 1.0) * ELEMENT_BYTES;
                    }
                    SeqMethod::Usp | SeqMethod::Displaced => {
                        // Ulysses inside; then Ring passes K/V around, and displaced
                        // attention (DistriFusion) sends the local K and V to every other
                        // ring member per step (synchronously in warmup, batched after a
                        // stale step; PCPP sends only edge rows).
                        let (u, r) = (mesh.ulysses as f64, mesh.ring as f64);
                        let f = pad(mesh.ulysses);
                        a2a += (2.0 * qn + 2.0 * kn) * f * (u - 1.0) / u * ELEMENT_BYTES;
                        let kv = 2.0 * kn * f * (r - 1.0) * ELEMENT_BYTES;
                        if *method == SeqMethod::Usp {
                            p2p += kv;
                        } else {
                            gather += kv;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (gather, a2a, p2p)
}

/// Padding: (token rows computed, valid rows) over the program's shards, and attention
/// heads computed vs real ones.
pub fn padding(p: &Program) -> ((usize, usize), (usize, usize)) {
    let mut rows = (0, 0);
    let mut heads = (0, 0);
    for step in &p.steps {
        match step {
            Step::Shard {
                segments, parts, ..
            } => {
                for s in segments {
                    rows.0 += s.local * parts;
                    rows.1 += s.valid;
                }
            }
            Step::SeqAttention {
                heads: h, method, ..
            } => {
                let deg = match method {
                    SeqMethod::Ulysses => p.mesh.sp(),
                    SeqMethod::Usp | SeqMethod::Displaced => p.mesh.ulysses,
                    SeqMethod::Ring => 1,
                };
                heads.0 += h.div_ceil(deg) * deg;
                heads.1 += h;
            }
            _ => {}
        }
    }
    (rows, heads)
}

fn mib(b: f64) -> String {
    format!("{:.3} MiB", b / (1u64 << 20) as f64)
}

/// The report printed by `--report`: bytes per rank per forward pass (`stats` may total
/// `forwards` passes, e.g. every denoising step of a generation).
pub fn communication(p: &Program, stats: &RankStats, forwards: usize) -> String {
    let per = forwards.max(1) as f64;
    let mut out = String::new();
    let m = p.mesh;
    let _ = writeln!(
        out,
        "parallel layout: cfg {} x ring {} x ulysses {} = {} rank(s)",
        m.cfg,
        m.ring,
        m.ulysses,
        m.world_size()
    );
    let methods: Vec<&str> = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::SeqAttention { .. }))
        .map(|s| s.kind())
        .collect();
    if !methods.is_empty() {
        let _ = writeln!(out, "attention: {} x {}", methods[0], methods.len());
    }
    let (gather, a2a, p2p) = analytic_bytes(p);
    let _ = writeln!(
        out,
        "bytes sent per rank per forward (per denoising step){}:",
        if forwards > 1 {
            format!(", averaged over {forwards} forwards")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "{:<6} {:>16} {:>16} {:>16} {:>16}",
        "rank", "all_gather", "all_to_all", "send/recv", "all_reduce"
    );
    for (rank, st) in stats.per_rank.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<6} {:>16} {:>16} {:>16} {:>16}",
            rank,
            mib(st.all_gather().bytes as f64 / per),
            mib(st.all_to_all().bytes as f64 / per),
            mib(st.send_recv().bytes as f64 / per),
            mib(st.all_reduce().bytes as f64 / per),
        );
    }
    let _ = writeln!(
        out,
        "{:<6} {:>16} {:>16} {:>16} {:>16}",
        "model",
        mib(gather),
        mib(a2a),
        mib(p2p),
        "-"
    );
    let _ = writeln!(
        out,
        "(model: Ulysses 4(N-1)/N^2 * B*S*D*bytes per attention, Ring 2(N-1)/N * B*S*D*bytes, all-gather (N-1)/N of the full tensor; heads padded to the Ulysses degree count)"
    );
    let stores: f64 = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::SeqAttention {
                method: SeqMethod::Displaced,
                batch,
                sk,
                heads,
                head_dim,
                ..
            } => Some(
                // With Ulysses inside, a rank stores its share of the heads.
                (2 * batch * sk * m.sp() * heads.div_ceil(m.ulysses) * head_dim) as f64
                    * ELEMENT_BYTES,
            ),
            _ => None,
        })
        .sum();
    if stores > 0.0 {
        let _ = writeln!(
            out,
            "(displaced attention: the model row is DistriFusion's volume, sent by a warmup step as 2 all-gathers per layer and by a stale step as 1 batched all-gather; PCPP's stale steps send instead 2 x ceil(F x rows/N) edge rows of K and V per layer to each neighbour; every rank holds K/V stores of {})",
            mib(stores)
        );
    }
    let _ = writeln!(
        out,
        "memory per rank: weights {}, planned buffers {}",
        mib(p.weight_bytes() as f64),
        mib(p.buffer_bytes() as f64)
    );
    let ((rows, valid), (heads, real)) = padding(p);
    if rows > valid || heads > real {
        let _ = writeln!(
            out,
            "padding: {rows} token rows for {valid} valid (+{:.1}%), {heads} attention heads for {real} (+{:.1}%)",
            100.0 * (rows - valid) as f64 / valid.max(1) as f64,
            100.0 * (heads - real) as f64 / real.max(1) as f64
        );
    } else {
        let _ = writeln!(out, "padding: none");
    }
    out
}

/// `--compare-serial`: how far an approximate run (stale activations, step caching) is
/// from the exact serial run of the same request.
pub fn versus_serial(reference: &crate::Generation, run: &crate::Generation) -> String {
    let img = crate::quality::distance(&reference.image.data, &run.image.data);
    let lat = crate::quality::distance(&reference.latents.data, &run.latents.data);
    format!(
        "vs serial: image PSNR {} (max rel err {:.3e}); latents max rel err {:.3e}, rel L2 {:.3e}\n",
        if img.psnr_db.is_finite() {
            format!("{:.2} dB", img.psnr_db)
        } else {
            "inf (identical)".to_string()
        },
        img.max_rel_err,
        lat.max_rel_err,
        lat.rel_l2
    )
}

/// `--report` of a PipeFusion generation: stages, per-rank memory, and traffic per step
/// next to the analytic volume.
pub fn pipefusion(rep: &crate::pipeline::PipeFusionReport) -> String {
    let mut out = String::new();
    let steps = rep.steps.max(1) as f64;
    let m = rep.stage_mesh;
    let group = m.world_size().max(1);
    let _ = writeln!(
        out,
        "PipeFusion: {} stage(s) of blocks {}, {} patch(es); each stage on cfg {} x ring {} x ulysses {} = {group} rank(s); {} of {} step(s) warmup (exact)",
        rep.stage_blocks.len(),
        rep.stage_blocks
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect::<Vec<_>>()
            .join(", "),
        rep.patches,
        m.cfg,
        m.ring,
        m.ulysses,
        rep.warmup_steps,
        rep.steps
    );
    let _ = writeln!(
        out,
        "{:<6} {:>6} {:>14} {:>14} {:>18} {:>18} {:>18}",
        "rank",
        "stage",
        "weights",
        "K/V buffers",
        "sent per step",
        "analytic per step",
        "analytic (warmup)"
    );
    // Every rank's analytic volume; what this process measured for its own rank(s) (every
    // rank in a one-process run, its own with one process per rank).
    for r in 0..rep.analytic_step_bytes.len() {
        let own = rep.ranks.iter().position(|&x| x == r);
        let measured = |f: &dyn Fn(usize) -> String| own.map_or("-".to_string(), f);
        let _ = writeln!(
            out,
            "{:<6} {:>6} {:>14} {:>14} {:>18} {:>18} {:>18}",
            r,
            r / group,
            measured(&|i| mib(rep.weight_bytes[i] as f64)),
            measured(&|i| mib(rep.kv_bytes[i] as f64)),
            measured(&|i| mib(rep.comm[i].total_bytes() as f64 / steps)),
            mib(rep.analytic_step_bytes[r] as f64),
            mib(rep.analytic_warmup_bytes.get(r).copied().unwrap_or(0) as f64),
        );
    }
    let measured: u64 = rep.comm.iter().map(|c| c.total_bytes()).sum();
    let analytic: u64 = rep
        .ranks
        .iter()
        .filter_map(|&r| rep.analytic_total_bytes.get(r))
        .sum();
    let _ = writeln!(
        out,
        "(analytic: each rank sends the next stage's counterpart its rows of the carried streams once per step, patch by patch, and the last stage sends the latents back after every step but the last; inside a stage, Ulysses' all-to-alls and the ring's K/V gathers of each patch, and the gathers of the outputs; with a step cache, stage 0 also sends its decisions and its rows of the front's streams. Whole generation: measured {}, analytic {} if no patch is skipped)",
        mib(measured as f64),
        mib(analytic as f64)
    );
    out
}

/// One line on what a step cache did: policy, steps computed, and the rescaling polynomial
/// TeaCache used (an identity one says no fit was found).
pub fn cache_summary(c: &crate::CacheReport) -> String {
    let n = c.computed.len();
    let mut s = format!(
        "cache {}: {} of {n} step(s) computed, {} skipped",
        c.policy,
        c.computed_steps(),
        n - c.computed_steps()
    );
    if !c.patches.is_empty() {
        let (done, all) = c.computed_patches();
        let _ = write!(
            s,
            " (PipeFusion patches decide apart: {done} of {all} patch steps computed)"
        );
    }
    if let Some(r) = &c.rescale {
        let _ = write!(s, "; rescale: {r}");
    }
    s
}

/// `--report` of a cached generation: every step, computed or skipped, with the number the
/// policy compared with its threshold.
pub fn cache_steps(c: &crate::CacheReport, timesteps: &[f32]) -> String {
    let mut out = String::new();
    let skipped = c.skipped_steps();
    let _ = writeln!(
        out,
        "skipped steps: {}",
        if skipped.is_empty() {
            "none".to_string()
        } else {
            skipped
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let what = match c.policy {
        crate::CachePolicy::TeaCache { .. } => "accumulated rescaled change",
        crate::CachePolicy::FirstBlock { .. } => "block-0 residual change",
        crate::CachePolicy::None => "-",
    };
    let _ = writeln!(
        out,
        "{:>5} {:>10} {:>9} {:>28}",
        "step", "timestep", "blocks", what
    );
    for (i, &computed) in c.computed.iter().enumerate() {
        // With PipeFusion's patches: which patches went through the blocks.
        let blocks = match c.patches.get(i) {
            Some(p) if p.iter().any(|&x| x) && !computed => format!(
                "patches {}",
                p.iter()
                    .enumerate()
                    .filter(|(_, &x)| x)
                    .map(|(j, _)| j.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ if computed => "computed".to_string(),
            _ => "skipped".to_string(),
        };
        let _ = writeln!(
            out,
            "{:>5} {:>10} {:>9} {:>28}",
            i,
            timesteps.get(i).map_or("-".to_string(), |t| format!("{t}")),
            blocks,
            c.indicator
                .get(i)
                .copied()
                .flatten()
                .map_or("-".to_string(), |v| format!("{v:.4e}"))
        );
    }
    out
}
