//! The sharding pass on a small graph: the IR before and after, as text.

use ditto_ir::mesh::Mesh;
use ditto_ir::{text, verify, DType, Graph};
use ditto_passes::shard_sequence::NVLINK;
use ditto_passes::{MethodChoice, Pass, ShardSequence};

/// A token sequence through a projection, self-attention and an output projection.
fn small() -> Graph {
    let mut g = Graph::new();
    let x = g.input("hidden_states", DType::F32, &[2, 6, 8]).unwrap();
    let x = g.seq(x).unwrap();
    let w = g.weight("to_q.weight", &[8, 8]).unwrap();
    let q = g.linear(x, w).unwrap();
    let a = g.attention(q, q, q, 2, 0.5).unwrap();
    let s = g.silu(a).unwrap();
    let y = g.add_(s, x).unwrap();
    g.output("sample", y);
    g
}

fn shard(g: &Graph, mesh: Mesh) -> String {
    let out = ShardSequence::new(mesh, MethodChoice::Forced, NVLINK)
        .run(g)
        .unwrap()
        .graph;
    verify(&out).unwrap();
    text::print(&out)
}

#[test]
fn before_and_after_ulysses() {
    let g = small();
    assert_eq!(
        text::print(&g),
        "\
input hidden_states: f32[2, 6, 8]
weight to_q.weight: f32[8, 8]
%0 = seq in:hidden_states  # f32[2, 6, 8]
%1 = linear %0 w:to_q.weight  # f32[2, 6, 8]
%2 = attention %1 %1 %1 2 0.5  # f32[2, 6, 8]
%3 = silu %2  # f32[2, 6, 8]
%4 = add %3 %0  # f32[2, 6, 8]
output sample = %4
"
    );
    // Two Ulysses ranks: each takes 3 of the 6 tokens, computes the projection, activation
    // and residual on its rows, attends through the all-to-all form, and the result is
    // gathered once at the end.
    assert_eq!(
        shard(
            &g,
            Mesh {
                cfg: 1,
                ring: 1,
                ulysses: 2
            }
        ),
        "\
input hidden_states: f32[2, 6, 8]
weight to_q.weight: f32[8, 8]
%0 = seq in:hidden_states  # f32[2, 6, 8]
%1 = shard %0 1 sp 2 3 6  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%2 = linear %1 w:to_q.weight  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%3 = seq_attention %2 %2 %2 2 0.5 ulysses 3 6  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%4 = silu %3  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%5 = add %4 %1  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%6 = all_gather %5 1 sp 2 3 6  # f32[2, 6, 8]
output sample = %6
"
    );
}

#[test]
fn ring_pads_a_sequence_that_does_not_divide() {
    // 6 tokens on 4 Ring ranks: 2 rows each, the last 2 of 8 are padding (masked as keys,
    // dropped by the gather).
    let out = shard(
        &small(),
        Mesh {
            cfg: 1,
            ring: 4,
            ulysses: 1,
        },
    );
    assert!(out.contains("shard %0 1 sp 4 2 6"), "{out}");
    assert!(
        out.contains("seq_attention %2 %2 %2 2 0.5 ring 2 6"),
        "{out}"
    );
    assert!(out.contains("all_gather %5 1 sp 4 2 6"), "{out}");
}

#[test]
fn one_rank_changes_nothing() {
    let g = small();
    assert_eq!(shard(&g, Mesh::default()), text::print(&g));
}

fn shard_stale(g: &Graph, sp: usize) -> String {
    let mesh = Mesh {
        cfg: 1,
        ring: 1,
        ulysses: sp,
    };
    let out = ShardSequence::new(mesh, MethodChoice::Stale, NVLINK)
        .run(g)
        .unwrap()
        .graph;
    verify(&out).unwrap();
    text::print(&out)
}

#[test]
fn stale_choice_makes_displaced_attention_even_on_one_part() {
    // Displaced attention on 2 parts, and on 1: the same program with parts 1, so that
    // PipeFusion's warmup (1 part) and patch (M parts) programs have the same attentions.
    let g = small();
    let two = shard_stale(&g, 2);
    assert_eq!(
        two,
        "\
input hidden_states: f32[2, 6, 8]
weight to_q.weight: f32[8, 8]
%0 = seq in:hidden_states  # f32[2, 6, 8]
%1 = shard %0 1 sp 2 3 6  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%2 = linear %1 w:to_q.weight  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%3 = seq_attention %2 %2 %2 2 0.5 displaced 3 6  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%4 = silu %3  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%5 = add %4 %1  # f32[2, 3, 8] split(axis 1, 2 ranks, mesh sp)
%6 = all_gather %5 1 sp 2 3 6  # f32[2, 6, 8]
output sample = %6
"
    );
    let one = shard_stale(&g, 1);
    assert_eq!(
        one,
        two.replace("sp 2 3 6", "sp 1 6 6")
            .replace("displaced 3 6", "displaced 6 6")
            .replace(
                "f32[2, 3, 8] split(axis 1, 2 ranks",
                "f32[2, 6, 8] split(axis 1, 1 ranks"
            )
    );
}
