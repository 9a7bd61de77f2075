//! Graphviz export: one box per tensor node labelled with the op, its attributes and shape.

use std::fmt::Write;

use egg::{Id, Language};

use crate::{Graph, Op};

pub fn to_dot(g: &Graph) -> String {
    let mut out = String::from("digraph ditto {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n");
    for (i, node) in g.nodes().iter().enumerate() {
        if node.is_attribute() {
            continue;
        }
        let id = Id::from(i);
        let attrs: Vec<String> = node
            .children()
            .iter()
            .filter(|&&c| g.node(c).is_attribute())
            .map(|&c| g.node(c).name())
            .collect();
        let (label, style) = match node {
            Op::Weight(ch) => (
                format!("w:{}", g.node(ch[0]).name()),
                ", style=filled, fillcolor=\"#eeeeee\"",
            ),
            Op::Input(ch) => (
                format!("in:{}", g.node(ch[0]).name()),
                ", style=filled, fillcolor=\"#cce5ff\"",
            ),
            _ => (format!("{} {}", node, attrs.join(" ")), ""),
        };
        let _ = writeln!(
            out,
            "  n{i} [label=\"{}\\n{}\"{style}];",
            label.replace('"', "'"),
            g.meta(id)
        );
        for &c in node.children() {
            if !g.node(c).is_attribute() {
                let _ = writeln!(out, "  n{} -> n{i};", usize::from(c));
            }
        }
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(
            out,
            "  \"out:{name}\" [shape=oval];\n  n{} -> \"out:{name}\";",
            usize::from(*id)
        );
    }
    out.push_str("}\n");
    out
}
