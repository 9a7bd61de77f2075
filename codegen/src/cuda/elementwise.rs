//! Elementwise kernels: `out[i] = f(arg_0[..], arg_1[..], ...)` where each argument is read
//! through its own base offset and strides over the output's dimensions. Fused kernels
//! (the `KInstr` body), copies, fills, slices and contiguous-row permutes all come out of
//! this one generator.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::emit::{self, Needs, NAME, THREADS};
use super::plan::Builder;
use super::StorageDType;
use crate::program::KInstr;

/// How one argument is read: element `i` of the output (coordinates `c`) reads
/// `base + sum(c[k] * strides[k])`. A stride of 0 broadcasts along that axis.
#[derive(Clone, Debug)]
pub(crate) struct Operand {
    pub dtype: StorageDType,
    pub base: usize,
    pub strides: Vec<usize>,
    /// The launch passes the pointer already advanced by `base` (`KArg::ValueAt`), so the
    /// source does not depend on it: slices at different offsets share one kernel. `base`
    /// still decides whether 16-byte accesses are aligned.
    pub base_at_launch: bool,
}

/// Strides of a row-major tensor of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides of an argument of `shape` broadcast (numpy rules, right-aligned) to `out`.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Result<Vec<usize>, String> {
    let bad = || format!("argument of shape {shape:?} does not broadcast to {out:?}");
    if shape.len() > out.len() && shape[..shape.len() - out.len()].iter().any(|&d| d != 1) {
        return Err(bad());
    }
    let own = contiguous_strides(shape);
    let mut strides = vec![0; out.len()];
    for (k, &n) in out.iter().enumerate().rev() {
        let Some(i) = (k + shape.len()).checked_sub(out.len()) else {
            break;
        };
        strides[k] = match shape[i] {
            d if d == n => {
                if n == 1 {
                    0
                } else {
                    own[i]
                }
            }
            1 => 0,
            _ => return Err(bad()),
        };
    }
    Ok(strides)
}

/// Merges adjacent output axes that every array walks contiguously (or broadcasts alike)
/// and drops axes of size 1, so index arithmetic has as few divisions as possible.
/// `strides[a]` are array `a`'s strides over `sizes`. Never returns an empty list.
pub(crate) fn coalesce(sizes: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_sizes: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (k, &n) in sizes.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let mergeable = !out_sizes.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, o)| *o.last().unwrap_or(&0) == s[k] * n);
        if mergeable {
            *out_sizes.last_mut().unwrap_or(&mut 0) *= n;
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                if let Some(l) = o.last_mut() {
                    *l = s[k];
                }
            }
        } else {
            out_sizes.push(n);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[k]);
            }
        }
    }
    if out_sizes.is_empty() {
        return (vec![1], strides.iter().map(|_| vec![0]).collect());
    }
    (out_sizes, out_strides)
}

/// The C expression of an elementwise body, one `const float rI = ...;` per instruction;
/// `arg(a)` names the value of argument `a`. Returns the lines and the result register.
fn body_lines(
    body: &[KInstr],
    num_args: usize,
    arg: impl Fn(usize) -> String,
) -> Result<(Vec<String>, String, bool), String> {
    let mut lines = Vec::with_capacity(body.len());
    let mut activations = false;
    for (i, ins) in body.iter().enumerate() {
        let r = |x: usize| -> Result<String, String> {
            if x < i {
                Ok(format!("r{x}"))
            } else {
                Err(format!(
                    "instruction {i} reads register {x}, not defined before it"
                ))
            }
        };
        let e = match *ins {
            KInstr::Arg(a) if a < num_args => arg(a),
            KInstr::Arg(a) => {
                return Err(format!("instruction {i} reads argument {a} of {num_args}"))
            }
            KInstr::Const(c) => emit::c_float(c),
            KInstr::Add(a, b) => format!("{} + {}", r(a)?, r(b)?),
            KInstr::Sub(a, b) => format!("{} - {}", r(a)?, r(b)?),
            KInstr::Mul(a, b) => format!("{} * {}", r(a)?, r(b)?),
            KInstr::Div(a, b) => format!("{} / {}", r(a)?, r(b)?),
            KInstr::Neg(a) => format!("-{}", r(a)?),
            KInstr::Exp(a) => format!("expf({})", r(a)?),
            KInstr::Tanh(a) => format!("tanhf({})", r(a)?),
            KInstr::Silu(a) | KInstr::GeluTanh(a) | KInstr::Gelu(a) | KInstr::Sigmoid(a) => {
                activations = true;
                let f = match ins {
                    KInstr::Silu(_) => "silu",
                    KInstr::GeluTanh(_) => "gelu_tanh",
                    KInstr::Gelu(_) => "gelu",
                    _ => "sigmoid",
                };
                format!("{f}({})", r(a)?)
            }
        };
        lines.push(format!("const float r{i} = {e};"));
    }
    if body.is_empty() {
        return Err("empty kernel body".into());
    }
    Ok((lines, format!("r{}", body.len() - 1), activations))
}

/// An elementwise kernel to generate.
pub(crate) struct Elementwise<'a> {
    /// Base of the kernel's name (made unique by the builder).
    pub name: &'a str,
    /// One line for the header comment: what the kernel computes.
    pub what: String,
    pub body: &'a [KInstr],
    pub out_shape: &'a [usize],
    pub out_dtype: StorageDType,
    pub args: Vec<Operand>,
}

/// What the plan needs to launch a generated kernel (the arguments are the caller's).
pub(crate) struct Emitted {
    pub kernel: usize,
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// Emits the kernel; its parameters are `(out, a0, a1, ...)`, one per `args` entry.
/// `None` for an empty output (nothing to launch).
pub(crate) fn emit(b: &mut Builder, ew: &Elementwise) -> Result<Option<Emitted>, String> {
    let n: usize = ew.out_shape.iter().product();
    if n == 0 {
        return Ok(None);
    }
    let rank = ew.out_shape.len();
    for (a, op) in ew.args.iter().enumerate() {
        if op.strides.len() != rank {
            return Err(format!(
                "argument {a} has {} strides for a rank-{rank} output",
                op.strides.len()
            ));
        }
    }
    let mut all = vec![contiguous_strides(ew.out_shape)];
    all.extend(ew.args.iter().map(|o| o.strides.clone()));
    let (sizes, strides) = coalesce(ew.out_shape, &all);
    let k = sizes.len();
    let out_strides = &strides[0];
    let arg_strides = &strides[1..];

    let used: Vec<bool> = (0..ew.args.len())
        .map(|a| ew.body.contains(&KInstr::Arg(a)))
        .collect();
    let mut dtypes: BTreeSet<StorageDType> = BTreeSet::new();
    dtypes.insert(ew.out_dtype);
    for (a, op) in ew.args.iter().enumerate() {
        if used[a] {
            dtypes.insert(op.dtype);
        }
    }
    // 16-byte vectors along the innermost axis when every argument walks it contiguously
    // (aligned) or broadcasts it.
    let vw = emit::vec_width(dtypes.iter().copied());
    let inner = sizes[k - 1];
    let vectorized = inner % vw == 0
        && ew
            .args
            .iter()
            .zip(arg_strides)
            .enumerate()
            .all(|(a, (op, s))| {
                !used[a]
                    || s[k - 1] == 0
                    || (s[k - 1] == 1
                        && op.base % vw == 0
                        && s[..k - 1].iter().all(|&x| x % vw == 0))
            });
    let v = if vectorized { vw } else { 1 };

    let max_extent = ew
        .args
        .iter()
        .zip(arg_strides)
        .map(|(op, s)| {
            (if op.base_at_launch { 0 } else { op.base })
                + s.iter()
                    .zip(&sizes)
                    .map(|(&st, &d)| st * (d - 1))
                    .sum::<usize>()
                + 1
        })
        .chain([n])
        .max()
        .unwrap_or(n);
    let (it, u) = emit::index_type(max_extent + v);

    // Coordinates along each coalesced axis, only those some argument needs.
    let base = |a: usize| {
        if ew.args[a].base_at_launch {
            0
        } else {
            ew.args[a].base
        }
    };
    let same_as_out = |a: usize| base(a) == 0 && arg_strides[a] == *out_strides;
    let mut need = vec![false; k];
    for (a, s) in arg_strides.iter().enumerate() {
        if used[a] && !same_as_out(a) {
            for (d, &st) in s.iter().enumerate() {
                need[d] |= st != 0;
            }
        }
    }
    let offset = |a: usize| -> String {
        if same_as_out(a) {
            return "e".into();
        }
        let mut terms: Vec<String> = Vec::new();
        if base(a) != 0 {
            terms.push(format!("{}{u}", base(a)));
        }
        for (d, &st) in arg_strides[a].iter().enumerate() {
            match st {
                0 => {}
                1 => terms.push(format!("i{d}")),
                _ => terms.push(format!("i{d} * {st}{u}")),
            }
        }
        if terms.is_empty() {
            "0".into()
        } else {
            terms.join(" + ")
        }
    };

    let (lines, result, activations) = body_lines(ew.body, ew.args.len(), |a| format!("x{a}[j]"))?;

    let mut what = format!("{NAME}: {}\n", ew.what);
    for (a, op) in ew.args.iter().enumerate() {
        let _ = writeln!(
            what,
            "  a{a}: {}{} strides {:?} over out dims {:?}{}",
            op.dtype,
            if base(a) != 0 {
                format!(" at offset {}", base(a))
            } else {
                String::new()
            },
            arg_strides[a],
            sizes,
            if used[a] { "" } else { " (unused)" }
        );
    }
    let _ = write!(
        what,
        "out: {} {}; {}",
        ew.out_dtype,
        emit::shape_str(ew.out_shape),
        if v > 1 {
            format!("one thread per {v} consecutive outputs (16-byte accesses)")
        } else {
            "one thread per output element".to_string()
        }
    );
    let needs = Needs {
        vectors: v > 1,
        activations,
        ..Needs::default()
    };
    let mut s = emit::prelude(&what, &dtypes, needs);
    let mut params = vec![emit::ptr_param(ew.out_dtype, "out", true)];
    for (a, op) in ew.args.iter().enumerate() {
        params.push(emit::ptr_param(op.dtype, &format!("a{a}"), false));
    }
    let units = n / v;
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({THREADS}) {NAME}({}) {{",
        params.join(", ")
    );
    let _ = writeln!(
        s,
        "  const {it} t = ({it})blockIdx.x * {THREADS}{u} + threadIdx.x;\n  if (t >= {units}{u}) return;"
    );
    if v > 1 {
        let _ = writeln!(s, "  const {it} e = t * {v}{u};  // first output element");
    } else {
        let _ = writeln!(s, "  const {it} e = t;");
    }
    for d in 0..k {
        if !need[d] {
            continue;
        }
        let inner_prod: usize = sizes[d + 1..].iter().product();
        let mut expr = "e".to_string();
        if inner_prod != 1 {
            expr = format!("{expr} / {inner_prod}{u}");
        }
        if d > 0 {
            expr = format!("{expr} % {}{u}", sizes[d]);
        }
        let _ = writeln!(s, "  const {it} i{d} = {expr};");
    }
    for (a, op) in ew.args.iter().enumerate() {
        if !used[a] {
            continue;
        }
        let off = offset(a);
        if arg_strides[a][k - 1] == 0 && v > 1 {
            let _ = writeln!(
                s,
                "  float x{a}[{v}];\n  {{\n    const float b = ld(a{a}[{off}]);  // broadcast along the vector\n    for (int j = 0; j < {v}; ++j) x{a}[j] = b;\n  }}"
            );
        } else {
            let _ = writeln!(
                s,
                "  float x{a}[{v}];\n  {}",
                emit::load(&format!("x{a}"), &format!("a{a} + {off}"), op.dtype, v)
            );
        }
    }
    let _ = writeln!(
        s,
        "  float y[{v}];\n#pragma unroll\n  for (int j = 0; j < {v}; ++j) {{"
    );
    for l in &lines {
        let _ = writeln!(s, "    {l}");
    }
    let _ = writeln!(s, "    y[j] = {result};\n  }}");
    let _ = writeln!(s, "  {}\n}}", emit::store("out + e", "y", ew.out_dtype, v));

    let kernel = b.kernel(ew.name, s);
    Ok(Some(Emitted {
        kernel,
        grid: [emit::blocks(units, THREADS as usize), 1, 1],
        block: [THREADS, 1, 1],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_strides_follow_numpy() {
        assert_eq!(
            broadcast_strides(&[2, 1, 64], &[2, 16, 64]).unwrap(),
            [64, 0, 1]
        );
        assert_eq!(broadcast_strides(&[64], &[2, 16, 64]).unwrap(), [0, 0, 1]);
        assert_eq!(broadcast_strides(&[1], &[3, 4]).unwrap(), [0, 0]);
        assert_eq!(broadcast_strides(&[1, 3, 4], &[3, 4]).unwrap(), [4, 1]);
        assert!(broadcast_strides(&[3], &[3, 4]).is_err());
        assert!(broadcast_strides(&[2, 3, 4], &[3, 4]).is_err());
    }

    #[test]
    fn coalesce_merges_contiguous_and_broadcast_runs() {
        // out [2, 16, 64]: x full, s broadcast over tokens.
        let (sizes, st) = coalesce(
            &[2, 16, 64],
            &[vec![1024, 64, 1], vec![1024, 64, 1], vec![64, 0, 1]],
        );
        assert_eq!(sizes, [2, 16, 64]);
        assert_eq!(st[2], [64, 0, 1]);
        // Both full: one axis.
        let (sizes, st) = coalesce(&[2, 16, 64], &[vec![1024, 64, 1], vec![1024, 64, 1]]);
        assert_eq!(sizes, [2048]);
        assert_eq!(st, [vec![1], vec![1]]);
        // Size-1 axes vanish; a scalar output keeps one axis.
        let (sizes, _) = coalesce(&[1, 5, 1], &[vec![5, 1, 1]]);
        assert_eq!(sizes, [5]);
        let (sizes, st) = coalesce(&[1, 1], &[vec![1, 1], vec![0, 0]]);
        assert_eq!((sizes, st), (vec![1], vec![vec![0], vec![0]]));
    }
}
