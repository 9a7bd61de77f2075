//! Cutting a model graph at the block boundaries its model marked
//! ([`Graph::boundaries`]) into parts that run one after another: PipeFusion's pipeline
//! stages (each rank holds only its stage's weights), and the head / block stack / tail
//! that step caching skips parts of.
//!
//! A part from boundary `a` to boundary `b` takes the streams of boundary `a` as inputs
//! `carry.0`, `carry.1`, ... (each marked as a token sequence, so sequence sharding splits
//! it like the model's own streams), computes blocks `a..b` and returns the streams of
//! boundary `b` as outputs of the same names. Everything else the blocks need (timestep and
//! class embeddings, RoPE tables, caption projections) is recomputed in the part from the
//! model's own inputs: it is small, and it keeps the parts independent. The first part
//! (`from = None`) also holds the head (patch embedding); the last (`to = None`) holds the
//! tail and the model's own outputs.

use std::collections::HashMap;

use egg::{Id, Language};

use crate::{Graph, IrError};

/// The input/output name of stream `j` of a boundary.
pub fn carry_name(j: usize) -> String {
    format!("carry.{j}")
}

/// Where a part starts and ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// `None`: the model's head (its inputs); `Some(a)`: boundary `a`.
    pub from: Option<usize>,
    /// `None`: the model's tail (its outputs); `Some(b)`: boundary `b`.
    pub to: Option<usize>,
}

impl Graph {
    /// Number of blocks the model marked (boundaries minus one), 0 when it marked none.
    pub fn num_blocks(&self) -> usize {
        self.boundaries.len().saturating_sub(1)
    }

    /// The part of this graph between two boundaries (see the module doc), with the taps
    /// named in `taps` as extra outputs (each must be computable inside the part).
    pub fn part(&self, span: Span, taps: &[&str]) -> Result<Graph, IrError> {
        let boundary = |b: usize| {
            self.boundaries.get(b).ok_or_else(|| {
                IrError::Other(format!(
                    "boundary {b} does not exist: the model marked {} (blocks 0..{})",
                    self.boundaries.len(),
                    self.num_blocks()
                ))
            })
        };
        if let (Some(a), Some(b)) = (span.from, span.to) {
            if a > b {
                return Err(IrError::Other(format!(
                    "a part cannot run from boundary {a} back to boundary {b}"
                )));
            }
        }
        let mut cut_in: HashMap<Id, usize> = HashMap::new();
        if let Some(a) = span.from {
            for (j, &id) in boundary(a)?.iter().enumerate() {
                cut_in.entry(id).or_insert(j);
            }
        }
        let mut outputs: Vec<(String, Id)> = match span.to {
            Some(b) => boundary(b)?
                .iter()
                .enumerate()
                .map(|(j, &id)| (carry_name(j), id))
                .collect(),
            None => self.outputs.clone(),
        };
        for name in taps {
            let id = self
                .tapped(name)
                .ok_or_else(|| IrError::Other(format!("the model exposes no value `{name}`")))?;
            outputs.push((name.to_string(), id));
        }

        // Nodes needed by the outputs, not looking past the cut.
        let nodes = self.nodes();
        let mut needed = vec![false; nodes.len()];
        for (_, id) in &outputs {
            needed[usize::from(*id)] = true;
        }
        // Streams of earlier boundaries must not be needed: that would recompute the blocks
        // before the cut (or expose a value that only they compute).
        let earlier: HashMap<Id, usize> = self
            .boundaries
            .iter()
            .enumerate()
            .take(span.from.unwrap_or(0))
            .flat_map(|(b, ids)| ids.iter().map(move |&id| (id, b)))
            .filter(|(id, _)| !cut_in.contains_key(id))
            .collect();
        for i in (0..nodes.len()).rev() {
            if !needed[i] || cut_in.contains_key(&Id::from(i)) {
                continue;
            }
            if let Some(b) = earlier.get(&Id::from(i)) {
                return Err(IrError::Other(format!(
                    "the part from boundary {} needs %{i} of boundary {b}, which lies before the cut",
                    span.from.unwrap_or(0)
                )));
            }
            for &c in nodes[i].children() {
                needed[usize::from(c)] = true;
            }
        }

        let mut g = Graph::new();
        let mut map: Vec<Option<Id>> = vec![None; nodes.len()];
        for i in 0..nodes.len() {
            if !needed[i] {
                continue;
            }
            let id = Id::from(i);
            let new = if let Some(&j) = cut_in.get(&id) {
                let t = self.tensor(id).ok_or_else(|| {
                    IrError::Other(format!("boundary value %{i} is not a tensor"))
                })?;
                let x = g.input(&carry_name(j), t.dtype, &t.shape)?;
                if t.shape.len() == 3 {
                    g.seq(x)?
                } else {
                    x
                }
            } else {
                let mut missing = None;
                let n = nodes[i].clone().map_children(|c| {
                    map[usize::from(c)].unwrap_or_else(|| {
                        missing = Some(c);
                        c
                    })
                });
                if let Some(c) = missing {
                    return Err(IrError::Other(format!(
                        "node %{i} needs %{c}, which lies before the cut"
                    )));
                }
                g.add(n)?
            };
            map[i] = Some(new);
        }
        let mapped = |id: Id| map[usize::from(id)];
        for (name, id) in outputs {
            let new = mapped(id)
                .ok_or_else(|| IrError::Other(format!("output `{name}` lies before the cut")))?;
            g.output(&name, new);
        }
        g.kernels = self.kernels.clone();
        g.boundaries = self
            .boundaries
            .iter()
            .filter_map(|b| b.iter().map(|&id| mapped(id)).collect::<Option<Vec<_>>>())
            .collect();
        g.taps = self
            .taps
            .iter()
            .filter_map(|(n, id)| mapped(*id).map(|m| (n.clone(), m)))
            .collect();
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Op};

    /// x -> seq -> [block: x + w_i] x2 -> mul 2 -> out; timestep feeds every block.
    fn two_blocks() -> Graph {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, 4, 3]).unwrap();
        let t = g.input("t", DType::F32, &[1, 1, 3]).unwrap();
        let x = g.seq(x).unwrap();
        g.mark_boundary(&[x]);
        let mut h = x;
        for i in 0..2 {
            let w = g.weight(&format!("w{i}"), &[3]).unwrap();
            let a = g.add_(h, w).unwrap();
            g.tap(format!("b{i}.sum"), a);
            h = g.add_(a, t).unwrap();
            g.mark_boundary(&[h]);
        }
        let y = g.mul_scalar(h, 2.0).unwrap();
        g.output("out", y);
        g
    }

    fn inputs(g: &Graph) -> Vec<String> {
        g.nodes()
            .iter()
            .filter_map(|n| match n {
                Op::Input(ch) => Some(g.node(ch[0]).name()),
                _ => None,
            })
            .collect()
    }
    fn weights(g: &Graph) -> Vec<String> {
        g.nodes()
            .iter()
            .filter_map(|n| match n {
                Op::Weight(ch) => Some(g.node(ch[0]).name()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn parts_hold_only_their_blocks() {
        let g = two_blocks();
        assert_eq!(g.num_blocks(), 2);
        let head = g
            .part(
                Span {
                    from: None,
                    to: Some(1),
                },
                &["b0.sum"],
            )
            .unwrap();
        assert_eq!(weights(&head), ["w0"]);
        let names: Vec<&str> = head.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["carry.0", "b0.sum"]);

        let tail = g
            .part(
                Span {
                    from: Some(1),
                    to: None,
                },
                &[],
            )
            .unwrap();
        assert_eq!(weights(&tail), ["w1"]);
        let mut ins = inputs(&tail);
        ins.sort();
        assert_eq!(ins, ["carry.0", "t"]);
        // The carry is a token sequence again.
        assert!(tail.nodes().iter().any(|n| matches!(n, Op::Seq(_))));
        assert_eq!(tail.outputs[0].0, "out");
        assert_eq!(tail.shape(tail.outputs[0].1), [1, 4, 3]);
    }

    #[test]
    fn bad_cuts_are_errors() {
        let g = two_blocks();
        let e = g
            .part(
                Span {
                    from: Some(3),
                    to: None,
                },
                &[],
            )
            .unwrap_err();
        assert!(e.to_string().contains("boundary 3 does not exist"), "{e}");
        let e = g
            .part(
                Span {
                    from: Some(2),
                    to: Some(1),
                },
                &[],
            )
            .unwrap_err();
        assert!(e.to_string().contains("back to boundary"), "{e}");
        // A tap of block 0 is not computable in a part that starts after it.
        let e = g
            .part(
                Span {
                    from: Some(1),
                    to: None,
                },
                &["b0.sum"],
            )
            .unwrap_err();
        assert!(e.to_string().contains("before the cut"), "{e}");
        let e = g
            .part(
                Span {
                    from: None,
                    to: None,
                },
                &["nope"],
            )
            .unwrap_err();
        assert!(e.to_string().contains("no value `nope`"), "{e}");
    }
}
