//! Lowering of an optimized graph to a `Program`: one step per compute node, reshapes as
//! views, fused kernels compiled to bytecode, buffers from the liveness plan.

use std::collections::HashMap;

use ditto_ir::{Graph, Id, Op};

use crate::kernel::compile_kernel;
use crate::memory;
use crate::program::{
    Binding, Mesh, MeshAxis, Program, Segment, SeqMethod, Step, Storage, Value, FORMAT_VERSION,
};
use crate::CodegenError;

/// Lowers `g`, compiled for `mesh` (the sharding pass decided what each rank holds).
pub fn lower_for_mesh(g: &Graph, mesh: Mesh) -> Result<Program, CodegenError> {
    let mut p = lower(g)?;
    p.mesh = mesh;
    Ok(p)
}

pub fn lower(g: &Graph) -> Result<Program, CodegenError> {
    let mut values: Vec<Value> = Vec::new();
    let mut root: Vec<usize> = Vec::new();
    let mut value_of: HashMap<Id, usize> = HashMap::new();
    let mut inputs = Vec::new();
    let mut weights = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut kernels = Vec::new();
    let mut kernel_index: HashMap<String, usize> = HashMap::new();

    let bad = |id: Id, why: &str| CodegenError::Lower {
        node: usize::from(id),
        op: g.node(id).name(),
        reason: why.to_string(),
    };
    let int = |id: Id| -> Result<usize, CodegenError> {
        g.int_attr(id)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(id, "expected a non-negative integer attribute"))
    };
    let mesh_axis = |id: Id| -> Result<MeshAxis, CodegenError> {
        MeshAxis::parse(&g.node(id).name()).ok_or_else(|| bad(id, "unknown mesh axis"))
    };
    let segments = |ids: &[Id]| -> Result<Vec<Segment>, CodegenError> {
        ids.chunks(2)
            .map(|p| {
                Ok(Segment {
                    local: int(p[0])?,
                    valid: int(p.get(1).copied().unwrap_or(p[0]))?,
                })
            })
            .collect()
    };
    let float = |id: Id| -> Result<f64, CodegenError> {
        g.float_attr(id)
            .ok_or_else(|| bad(id, "expected a float attribute"))
    };

    for (i, node) in g.nodes().iter().enumerate() {
        let id = Id::from(i);
        if node.is_attribute() {
            continue;
        }
        let shape = g.shape(id).to_vec();
        let new_value =
            |values: &mut Vec<Value>, root: &mut Vec<usize>, storage, r: Option<usize>| {
                values.push(Value {
                    storage,
                    shape: shape.clone(),
                });
                let v = values.len() - 1;
                root.push(r.unwrap_or(v));
                v
            };
        let v = |id: Id| -> Result<usize, CodegenError> {
            value_of
                .get(&id)
                .copied()
                .ok_or_else(|| bad(id, "operand has no value"))
        };
        let intermediate = Storage::Buffer(usize::MAX);
        let val = match node {
            Op::Input(ch) => {
                let dtype = g
                    .tensor(id)
                    .map(|t| t.dtype.to_string())
                    .unwrap_or_default();
                inputs.push(Binding {
                    name: g.node(ch[0]).name(),
                    shape: shape.clone(),
                    dtype,
                });
                new_value(
                    &mut values,
                    &mut root,
                    Storage::Input(inputs.len() - 1),
                    None,
                )
            }
            Op::Weight(ch) => {
                weights.push(Binding {
                    name: g.node(ch[0]).name(),
                    shape: shape.clone(),
                    dtype: "f32".into(),
                });
                new_value(
                    &mut values,
                    &mut root,
                    Storage::Weight(weights.len() - 1),
                    None,
                )
            }
            Op::Seq(x) => {
                let src = v(*x)?;
                let st = values[src].storage;
                let r = root[src];
                new_value(&mut values, &mut root, st, Some(r))
            }
            Op::Reshape(ch) => {
                let src = v(ch[0])?;
                let st = values[src].storage;
                let r = root[src];
                new_value(&mut values, &mut root, st, Some(r))
            }
            Op::Outputs(_) | Op::Arg(_) => return Err(bad(id, "unexpected node in a graph")),
            _ => {
                let out = new_value(&mut values, &mut root, intermediate, None);
                let step =
                    match node {
                        Op::Scalar(c) => Step::Fill {
                            out,
                            value: float(*c)? as f32,
                        },
                        Op::Fused(ch) => {
                            let name = g.node(ch[0]).name();
                            let k = match kernel_index.get(&name) {
                                Some(&k) => k,
                                None => {
                                    let body = g
                                        .kernels
                                        .get(&name)
                                        .ok_or_else(|| bad(id, "fused kernel body missing"))?;
                                    kernels.push(compile_kernel(&name, ch.len() - 1, body)?);
                                    kernel_index.insert(name, kernels.len() - 1);
                                    kernels.len() - 1
                                }
                            };
                            Step::Fused {
                                kernel: k,
                                args: ch[1..].iter().map(|&c| v(c)).collect::<Result<_, _>>()?,
                                out,
                            }
                        }
                        e if e.is_elementwise() => return Err(bad(
                            id,
                            "unfused elementwise op: run the fuse_elementwise pass before lowering",
                        )),
                        Op::Linear([x, w]) | Op::LinearBias([x, w, _]) => {
                            let ws = g.shape(*w);
                            let k = ws[1];
                            Step::Linear {
                                x: v(*x)?,
                                w: v(*w)?,
                                b: match node {
                                    Op::LinearBias([_, _, b]) => Some(v(*b)?),
                                    _ => None,
                                },
                                out,
                                m: g.tensor(*x).map_or(0, |t| t.numel()) / k.max(1),
                                k,
                                n: ws[0],
                            }
                        }
                        Op::Attention([q, k, vv, heads, scale]) => {
                            let heads = int(*heads)?;
                            let (qs, ks, vs) = (g.shape(*q), g.shape(*k), g.shape(*vv));
                            Step::Attention {
                                q: v(*q)?,
                                k: v(*k)?,
                                v: v(*vv)?,
                                out,
                                batch: qs[0],
                                sq: qs[1],
                                sk: ks[1],
                                heads,
                                head_dim: qs[2] / heads,
                                head_dim_v: vs[2] / heads,
                                scale: float(*scale)? as f32,
                            }
                        }
                        Op::LayerNorm([x, eps]) | Op::RmsNorm([x, eps]) => {
                            let cols = *shape.last().unwrap_or(&1);
                            let rows = shape.iter().product::<usize>() / cols.max(1);
                            let (x, eps) = (v(*x)?, float(*eps)? as f32);
                            if matches!(node, Op::LayerNorm(_)) {
                                Step::LayerNorm {
                                    x,
                                    out,
                                    rows,
                                    cols,
                                    eps,
                                }
                            } else {
                                Step::RmsNorm {
                                    x,
                                    out,
                                    rows,
                                    cols,
                                    eps,
                                }
                            }
                        }
                        Op::GroupNorm([x, groups, eps]) => Step::GroupNorm {
                            x: v(*x)?,
                            out,
                            n: shape[0],
                            c: shape[1],
                            hw: shape[2..].iter().product(),
                            groups: int(*groups)?,
                            eps: float(*eps)? as f32,
                        },
                        Op::Softmax(x) => {
                            let cols = *shape.last().unwrap_or(&1);
                            Step::Softmax {
                                x: v(*x)?,
                                out,
                                rows: shape.iter().product::<usize>() / cols.max(1),
                                cols,
                            }
                        }
                        Op::Permute(ch) => Step::Permute {
                            x: v(ch[0])?,
                            out,
                            perm: ch[1..].iter().map(|&p| int(p)).collect::<Result<_, _>>()?,
                        },
                        Op::Concat(ch) => Step::Concat {
                            axis: int(ch[0])?,
                            inputs: ch[1..].iter().map(|&c| v(c)).collect::<Result<_, _>>()?,
                            out,
                        },
                        Op::Slice([x, axis, start, end]) => Step::Slice {
                            x: v(*x)?,
                            axis: int(*axis)?,
                            start: int(*start)?,
                            end: int(*end)?,
                            out,
                        },
                        Op::Conv2d([x, w, b, stride, pad]) => Step::Conv2d {
                            x: v(*x)?,
                            w: v(*w)?,
                            b: v(*b)?,
                            out,
                            stride: int(*stride)?,
                            pad: int(*pad)?,
                        },
                        Op::UpsampleNearest([x, f]) => Step::UpsampleNearest {
                            x: v(*x)?,
                            out,
                            factor: int(*f)?,
                        },
                        Op::TimestepEmbedding([t, dim, flip, shift, scale]) => {
                            Step::TimestepEmbedding {
                                t: v(*t)?,
                                out,
                                dim: int(*dim)?,
                                flip_sin_to_cos: int(*flip)? != 0,
                                downscale_freq_shift: float(*shift)? as f32,
                                scale: float(*scale)? as f32,
                            }
                        }
                        Op::Embedding([table, idx]) => Step::Embedding {
                            table: v(*table)?,
                            idx: v(*idx)?,
                            out,
                        },
                        Op::SinCosPosEmbed([dim, gh, gw, base, interp]) => Step::SinCosPosEmbed {
                            out,
                            dim: int(*dim)?,
                            grid_h: int(*gh)?,
                            grid_w: int(*gw)?,
                            base_size: float(*base)? as f32,
                            interpolation_scale: float(*interp)? as f32,
                        },
                        Op::RopeCos(ch) | Op::RopeSin(ch) => Step::RopeTables {
                            ids: v(ch[0])?,
                            theta: float(ch[1])?,
                            axes_dims: ch[2..].iter().map(|&d| int(d)).collect::<Result<_, _>>()?,
                            out,
                            cos: matches!(node, Op::RopeCos(_)),
                        },
                        Op::Shard(ch) | Op::AllGather(ch) => {
                            let axis = int(ch[1])?;
                            let mesh = mesh_axis(ch[2])?;
                            let parts = int(ch[3])?;
                            let segments = segments(&ch[4..])?;
                            let x = v(ch[0])?;
                            if matches!(node, Op::Shard(_)) {
                                Step::Shard {
                                    x,
                                    out,
                                    axis,
                                    mesh,
                                    parts,
                                    segments,
                                }
                            } else {
                                Step::AllGather {
                                    x,
                                    out,
                                    axis,
                                    mesh,
                                    parts,
                                    segments,
                                }
                            }
                        }
                        Op::SeqAttention(ch) => {
                            let heads = int(ch[3])?;
                            let qs = g.shape(ch[0]);
                            let method = SeqMethod::parse(&g.node(ch[5]).name())
                                .ok_or_else(|| bad(id, "unknown sequence-parallel method"))?;
                            Step::SeqAttention {
                                q: v(ch[0])?,
                                k: v(ch[1])?,
                                v: v(ch[2])?,
                                out,
                                method,
                                batch: qs[0],
                                sq: qs[1],
                                sk: g.shape(ch[1])[1],
                                heads,
                                head_dim: qs[2] / heads,
                                scale: float(ch[4])? as f32,
                                key_segments: segments(&ch[6..])?,
                            }
                        }
                        Op::Rope([x, c, s]) => Step::Rope {
                            x: v(*x)?,
                            cos: v(*c)?,
                            sin: v(*s)?,
                            out,
                        },
                        _ => return Err(bad(id, "no lowering for this op")),
                    };
                steps.push(step);
                out
            }
        };
        value_of.insert(id, val);
    }

    // Every output gets storage of its own in a planned buffer: a view of an input or weight,
    // or a second name for a value, is copied so backends can hand outputs back by buffer.
    let mut outputs = Vec::new();
    let mut seen_roots: HashMap<usize, ()> = HashMap::new();
    for (name, id) in &g.outputs {
        let mut val = *value_of
            .get(id)
            .ok_or_else(|| bad(*id, "output has no value"))?;
        let needs_copy = !matches!(values[val].storage, Storage::Buffer(_))
            || seen_roots.contains_key(&root[val]);
        if needs_copy {
            let shape = values[val].shape.clone();
            values.push(Value {
                storage: Storage::Buffer(usize::MAX),
                shape,
            });
            let out = values.len() - 1;
            root.push(out);
            steps.push(Step::Copy { x: val, out });
            val = out;
        }
        seen_roots.insert(root[val], ());
        outputs.push((name.clone(), val));
    }

    let step_io: Vec<(usize, Vec<usize>)> =
        steps.iter().map(|s| (s.output(), s.operands())).collect();
    let keep: Vec<usize> = outputs.iter().map(|(_, v)| *v).collect();
    let buffers = memory::plan(&mut values, &root, &step_io, &keep);

    Ok(Program {
        format_version: FORMAT_VERSION,
        mesh: Mesh::default(),
        inputs,
        weights,
        buffers,
        values,
        kernels,
        steps,
        outputs,
    })
}
