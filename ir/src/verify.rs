//! The verifier: every node's operands exist and fit, recorded metadata agrees with a fresh
//! inference, fused nodes name a kernel whose body only uses arguments it is given, and every
//! output is a tensor. Run after each pass in tests and with `--verify`.

use egg::{Id, Language};

use crate::infer::infer;
use crate::meta::Meta;
use crate::{Graph, IrError, Op};

pub fn verify(g: &Graph) -> Result<(), IrError> {
    let fail = |i: usize, op: &Op, reason: String| IrError::Verify {
        node: i,
        op: op.name(),
        reason,
    };
    for (i, node) in g.nodes().iter().enumerate() {
        for &c in node.children() {
            if usize::from(c) >= i {
                return Err(fail(
                    i,
                    node,
                    format!("operand %{c} is not defined before use"),
                ));
            }
        }
        let fresh = infer(node, |c| g.meta(c)).map_err(|e| fail(i, node, e.to_string()))?;
        if &fresh != g.meta(Id::from(i)) {
            return Err(fail(
                i,
                node,
                format!("recorded {} but operands give {fresh}", g.meta(Id::from(i))),
            ));
        }
        if let Meta::Invalid(why) = g.meta(Id::from(i)) {
            return Err(fail(i, node, why.clone()));
        }
        if let Op::Fused(ch) = node {
            let name = g.node(ch[0]).name();
            let body = g
                .kernels
                .get(&name)
                .ok_or_else(|| fail(i, node, format!("no kernel named `{name}`")))?;
            for n in body.as_ref() {
                if let Op::Arg(a) = n {
                    let Op::Int(k) = body[*a] else {
                        return Err(fail(i, node, "arg index is not an integer".into()));
                    };
                    if k < 0 || k as usize >= ch.len() - 1 {
                        return Err(fail(
                            i,
                            node,
                            format!("kernel `{name}` uses arg {k} of {}", ch.len() - 1),
                        ));
                    }
                } else if !n.is_elementwise() && !n.is_attribute() && !matches!(n, Op::Scalar(_)) {
                    return Err(fail(
                        i,
                        node,
                        format!("kernel `{name}` contains non-elementwise `{n}`"),
                    ));
                }
            }
        }
    }
    for (name, id) in &g.outputs {
        if usize::from(*id) >= g.len() || g.tensor(*id).is_none() {
            return Err(IrError::Other(format!("output `{name}` is not a tensor")));
        }
    }
    Ok(())
}
