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
    let (mut gather, mut a2a, mut p2p) = (0.0, 0.0, 0.0);
    let numel = |v: usize| p.values[v].numel() as f64;
    for step in &p.steps {
        match step {
            Step::AllGather { x, parts, .. } => {
                gather += numel(*x) * (*parts as f64 - 1.0) * ELEMENT_BYTES;
            }
            Step::SeqAttention {
                q,
                k,
                method,
                heads,
                ..
            } => {
                let mesh = p.mesh;
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
                    SeqMethod::Usp => {
                        let (u, r) = (mesh.ulysses as f64, mesh.ring as f64);
                        let f = pad(mesh.ulysses);
                        a2a += (2.0 * qn + 2.0 * kn) * f * (u - 1.0) / u * ELEMENT_BYTES;
                        p2p += 2.0 * kn * f * (r - 1.0) * ELEMENT_BYTES;
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
                    SeqMethod::Usp => p.mesh.ulysses,
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
