//! Fused elementwise kernel bodies: from the IR expression over `(arg i)` leaves to the
//! register bytecode the CPU backend interprets (and, later, the CUDA C it emits).

use ditto_ir::{Op, RecExpr};

use crate::program::{KInstr, Kernel};
use crate::CodegenError;

pub fn compile_kernel(
    name: &str,
    num_args: usize,
    body: &RecExpr<Op>,
) -> Result<Kernel, CodegenError> {
    let nodes = body.as_ref();
    // Register of each body node; attribute leaves have none.
    let mut reg: Vec<Option<usize>> = vec![None; nodes.len()];
    let mut code = Vec::new();
    let bad = |why: String| CodegenError::Kernel {
        kernel: name.to_string(),
        reason: why,
    };
    for (i, node) in nodes.iter().enumerate() {
        let r = |id: &ditto_ir::Id| {
            reg[usize::from(*id)].ok_or_else(|| bad(format!("operand of `{node}` is not a value")))
        };
        let instr = match node {
            Op::Int(_) | Op::Float(_) | Op::Name(_) => continue,
            Op::Arg(a) => match nodes[usize::from(*a)] {
                Op::Int(k) if k >= 0 && (k as usize) < num_args => KInstr::Arg(k as usize),
                _ => return Err(bad(format!("bad argument index at node {i}"))),
            },
            Op::Scalar(v) => match nodes[usize::from(*v)] {
                Op::Float(f) => KInstr::Const(f.get() as f32),
                Op::Int(k) => KInstr::Const(k as f32),
                _ => return Err(bad("scalar without a value".into())),
            },
            Op::Add([a, b]) => KInstr::Add(r(a)?, r(b)?),
            Op::Sub([a, b]) => KInstr::Sub(r(a)?, r(b)?),
            Op::Mul([a, b]) => KInstr::Mul(r(a)?, r(b)?),
            Op::Div([a, b]) => KInstr::Div(r(a)?, r(b)?),
            Op::Neg(a) => KInstr::Neg(r(a)?),
            Op::Silu(a) => KInstr::Silu(r(a)?),
            Op::GeluTanh(a) => KInstr::GeluTanh(r(a)?),
            Op::Gelu(a) => KInstr::Gelu(r(a)?),
            Op::Sigmoid(a) => KInstr::Sigmoid(r(a)?),
            Op::Tanh(a) => KInstr::Tanh(r(a)?),
            Op::Exp(a) => KInstr::Exp(r(a)?),
            other => return Err(bad(format!("`{other}` cannot be part of a fused kernel"))),
        };
        reg[i] = Some(code.len());
        code.push(instr);
    }
    if code.is_empty() {
        return Err(bad("empty body".into()));
    }
    Ok(Kernel {
        name: name.to_string(),
        num_args,
        body: code,
        source: body.to_string(),
    })
}
