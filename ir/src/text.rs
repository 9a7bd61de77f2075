//! SSA text form of a graph: one line per node, weights and inputs declared once at the top
//! and referenced inline (`w:NAME`, `in:NAME`), attributes inline. `print` and `parse`
//! round-trip: `print(parse(print(g))) == print(g)`.
//!
//! ```text
//! input hidden_states: f32[2, 4, 16, 16]
//! weight blocks.0.attn.to_q.weight: f32[64, 64]
//! kernel k0 = (add (mul (arg 0) (arg 1)) (arg 2))
//! %0 = reshape in:hidden_states 2 4 8 2 8 2  # f32[2, 4, 8, 2, 8, 2]
//! %1 = linear %0 w:blocks.0.attn.to_q.weight  # f32[...]
//! output sample = %1
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use egg::{FromOp, Id, RecExpr};

use crate::meta::ShapeDisplay;
use crate::op::Float;
use crate::{DType, Graph, IrError, Op};

/// How each node appears when referenced from another line.
fn reference_names(g: &Graph) -> Vec<Option<String>> {
    let mut names = vec![None; g.len()];
    let mut next = 0usize;
    for (i, node) in g.nodes().iter().enumerate() {
        let id = Id::from(i);
        names[i] = Some(match node {
            Op::Int(v) => v.to_string(),
            Op::Float(f) => f.to_string(),
            Op::Name(s) => s.to_string(),
            Op::Weight(ch) => format!("w:{}", g.name_attr(ch[0]).expect("weight name")),
            Op::Input(ch) => format!("in:{}", g.name_attr(ch[0]).expect("input name")),
            _ => {
                let _ = id;
                next += 1;
                format!("%{}", next - 1)
            }
        });
    }
    names
}

/// Prints the graph in SSA text form.
pub fn print(g: &Graph) -> String {
    let names = reference_names(g);
    let mut out = String::new();
    for (i, node) in g.nodes().iter().enumerate() {
        let id = Id::from(i);
        match node {
            Op::Input(ch) => {
                let t = g.tensor(id).expect("inputs are tensors");
                let _ = writeln!(
                    out,
                    "input {}: {}{}",
                    g.name_attr(ch[0]).expect("input name"),
                    t.dtype,
                    ShapeDisplay(&t.shape)
                );
            }
            Op::Weight(ch) => {
                let _ = writeln!(
                    out,
                    "weight {}: f32{}",
                    g.name_attr(ch[0]).expect("weight name"),
                    ShapeDisplay(g.shape(id))
                );
            }
            _ => {}
        }
    }
    for (name, body) in &g.kernels {
        let _ = writeln!(out, "kernel {name} = {body}");
    }
    for (i, node) in g.nodes().iter().enumerate() {
        if node.is_attribute() || matches!(node, Op::Input(_) | Op::Weight(_)) {
            continue;
        }
        let id = Id::from(i);
        let mut line = format!("{} = {}", names[i].as_deref().expect("named"), node);
        for &c in egg::Language::children(node) {
            line.push(' ');
            line.push_str(names[usize::from(c)].as_deref().expect("named"));
        }
        let _ = writeln!(out, "{line}  # {}", g.meta(id));
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(
            out,
            "output {name} = {}",
            names[usize::from(*id)].as_deref().expect("named")
        );
    }
    out
}

fn perr(line: usize, reason: impl Into<String>) -> IrError {
    IrError::Parse {
        line,
        reason: reason.into(),
    }
}

/// Parses `shape` text like `f32[2, 4, 16]`.
fn parse_typed_shape(line: usize, s: &str) -> Result<(DType, Vec<usize>), IrError> {
    let open = s
        .find('[')
        .ok_or_else(|| perr(line, "expected dtype[dims]"))?;
    let dtype: DType = s[..open]
        .trim()
        .parse()
        .map_err(|e: String| perr(line, e))?;
    let inner = s[open + 1..]
        .strip_suffix(']')
        .ok_or_else(|| perr(line, "missing `]`"))?;
    let dims = inner
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<usize>()
                .map_err(|_| perr(line, format!("bad dim `{t}`")))
        })
        .collect::<Result<_, _>>()?;
    Ok((dtype, dims))
}

/// Parses the SSA text form back into a graph (re-checking every shape).
pub fn parse(text: &str) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut values: HashMap<String, Id> = HashMap::new();
    let mut kernels = BTreeMap::new();
    for (lineno, raw) in text.lines().enumerate() {
        let lineno = lineno + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("input ") {
            let (name, ty) = rest
                .split_once(':')
                .ok_or_else(|| perr(lineno, "expected `input NAME: dtype[dims]`"))?;
            let (dtype, dims) = parse_typed_shape(lineno, ty.trim())?;
            let id = g
                .input(name.trim(), dtype, &dims)
                .map_err(|e| perr(lineno, e.to_string()))?;
            values.insert(format!("in:{}", name.trim()), id);
        } else if let Some(rest) = line.strip_prefix("weight ") {
            let (name, ty) = rest
                .split_once(':')
                .ok_or_else(|| perr(lineno, "expected `weight NAME: f32[dims]`"))?;
            let (_, dims) = parse_typed_shape(lineno, ty.trim())?;
            let id = g
                .weight(name.trim(), &dims)
                .map_err(|e| perr(lineno, e.to_string()))?;
            values.insert(format!("w:{}", name.trim()), id);
        } else if let Some(rest) = line.strip_prefix("kernel ") {
            let (name, body) = rest
                .split_once('=')
                .ok_or_else(|| perr(lineno, "expected `kernel NAME = BODY`"))?;
            let body: RecExpr<Op> = body
                .trim()
                .parse()
                .map_err(|e| perr(lineno, format!("bad kernel body: {e}")))?;
            kernels.insert(name.trim().to_string(), body);
        } else if let Some(rest) = line.strip_prefix("output ") {
            let (name, val) = rest
                .split_once('=')
                .ok_or_else(|| perr(lineno, "expected `output NAME = %N`"))?;
            let id = *values
                .get(val.trim())
                .ok_or_else(|| perr(lineno, format!("unknown value `{}`", val.trim())))?;
            g.output(name.trim(), id);
        } else if line.starts_with('%') {
            let (lhs, rhs) = line
                .split_once('=')
                .ok_or_else(|| perr(lineno, "expected `%N = op operands...`"))?;
            let mut toks = rhs.split_whitespace();
            let opname = toks.next().ok_or_else(|| perr(lineno, "missing op"))?;
            let mut children = Vec::new();
            for t in toks {
                let id = if let Some(&id) = values.get(t) {
                    id
                } else if t.starts_with('%') || t.starts_with("w:") || t.starts_with("in:") {
                    return Err(perr(lineno, format!("`{t}` is used before it is defined")));
                } else if let Ok(i) = t.parse::<i64>() {
                    g.int(i)
                } else if let Ok(f) = t.parse::<Float>() {
                    g.float(f.get())
                } else {
                    g.name(t)
                };
                children.push(id);
            }
            let op = Op::from_op(opname, children)
                .map_err(|e| perr(lineno, format!("bad node: {e}")))?;
            let id = g.add(op).map_err(|e| perr(lineno, e.to_string()))?;
            values.insert(lhs.trim().to_string(), id);
        } else {
            return Err(perr(lineno, format!("cannot read `{line}`")));
        }
    }
    g.kernels = kernels;
    Ok(g)
}
