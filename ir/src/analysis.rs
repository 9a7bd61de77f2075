//! The e-graph analysis: per e-class shape, dtype and distribution, from the same inference
//! the builder uses. Rewrites must preserve it: merging two classes with different metadata
//! is a bug in a rewrite rule, reported by the verifier after extraction.

use egg::{Analysis, DidMerge, EGraph, Id};

use crate::infer::infer;
use crate::meta::Meta;
use crate::Op;

#[derive(Default, Clone)]
pub struct ShapeAnalysis;

pub type IrEGraph = EGraph<Op, ShapeAnalysis>;

impl Analysis<Op> for ShapeAnalysis {
    type Data = Meta;

    fn make(egraph: &mut IrEGraph, enode: &Op, _id: Id) -> Meta {
        infer(enode, |c| &egraph[c].data).unwrap_or_else(|e| Meta::Invalid(e.to_string()))
    }

    fn merge(&mut self, a: &mut Meta, b: Meta) -> DidMerge {
        match (&*a, &b) {
            (x, y) if x == y => DidMerge(false, false),
            (Meta::Invalid(_), _) => DidMerge(false, true),
            (_, Meta::Invalid(_)) => {
                *a = b;
                DidMerge(true, false)
            }
            // Two valid but different metas in one class: a rewrite equated values of
            // different shapes. Mark the class so the verifier reports it.
            (x, y) => {
                *a = Meta::Invalid(format!("a rewrite merged {x} with {y}"));
                DidMerge(true, true)
            }
        }
    }
}
