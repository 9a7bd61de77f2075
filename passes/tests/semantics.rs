//! The passes preserve what a graph computes: random graphs (elementwise chains, layout ops,
//! the identities canonicalize removes, GEMMs) are evaluated by a small reference interpreter
//! before and after the default pipeline, and must agree exactly (every rewrite is exact and
//! fused kernels apply the same f32 operations in the same order).

use ditto_ir::infer::broadcast_shapes;
use ditto_ir::{DType, Graph, Id, Op, RecExpr};
use ditto_passes::{Pipeline, RunOptions};

#[derive(Clone, Debug)]
struct T {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        idx[i] = flat % shape[i];
        flat /= shape[i];
    }
    idx
}

fn broadcast_get(t: &T, out_idx: &[usize]) -> f32 {
    let off = out_idx.len() - t.shape.len();
    let st = strides(&t.shape);
    let mut flat = 0;
    for (i, &d) in t.shape.iter().enumerate() {
        let k = if d == 1 { 0 } else { out_idx[off + i] };
        flat += k * st[i];
    }
    t.data[flat]
}

fn binary(a: &T, b: &T, f: impl Fn(f32, f32) -> f32) -> T {
    let shape = broadcast_shapes(&a.shape, &b.shape).expect("broadcasts");
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let idx = unravel(i, &shape);
            f(broadcast_get(a, &idx), broadcast_get(b, &idx))
        })
        .collect();
    T { shape, data }
}

fn unary(a: &T, f: impl Fn(f32) -> f32) -> T {
    T {
        shape: a.shape.clone(),
        data: a.data.iter().map(|&x| f(x)).collect(),
    }
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
}

/// Elementwise ops shared by graph nodes and kernel bodies.
fn elementwise(op: &Op, v: &dyn Fn(Id) -> T) -> Option<T> {
    Some(match op {
        Op::Add([a, b]) => binary(&v(*a), &v(*b), |x, y| x + y),
        Op::Sub([a, b]) => binary(&v(*a), &v(*b), |x, y| x - y),
        Op::Mul([a, b]) => binary(&v(*a), &v(*b), |x, y| x * y),
        Op::Div([a, b]) => binary(&v(*a), &v(*b), |x, y| x / y),
        Op::Neg(a) => unary(&v(*a), |x| -x),
        Op::Silu(a) => unary(&v(*a), |x| x / (1.0 + (-x).exp())),
        Op::Sigmoid(a) => unary(&v(*a), |x| 1.0 / (1.0 + (-x).exp())),
        Op::Tanh(a) => unary(&v(*a), f32::tanh),
        Op::Exp(a) => unary(&v(*a), f32::exp),
        Op::GeluTanh(a) => unary(&v(*a), gelu_tanh),
        _ => return None,
    })
}

fn attr_f(expr: &[Op], id: Id) -> f32 {
    match &expr[usize::from(id)] {
        Op::Float(f) => f.get() as f32,
        Op::Int(i) => *i as f32,
        other => panic!("not a number: {other}"),
    }
}

fn attr_u(g: &Graph, id: Id) -> usize {
    g.int_attr(id).expect("int attribute") as usize
}

fn values_for(name: &str, shape: &[usize]) -> T {
    let mut h: u64 = 1469598103934665603;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(1099511628211);
    }
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let x = h.wrapping_add(i as u64).wrapping_mul(6364136223846793005) >> 40;
            (x as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    T {
        shape: shape.to_vec(),
        data,
    }
}

fn eval_kernel(body: &RecExpr<Op>, args: &[T]) -> T {
    let nodes = body.as_ref();
    let mut vals: Vec<Option<T>> = vec![None; nodes.len()];
    for (i, op) in nodes.iter().enumerate() {
        vals[i] = match op {
            Op::Arg(k) => Some(args[attr_f(nodes, *k) as usize].clone()),
            Op::Scalar(f) => Some(T {
                shape: vec![],
                data: vec![attr_f(nodes, *f)],
            }),
            Op::Int(_) | Op::Float(_) => None,
            op => {
                let get = |c: Id| vals[usize::from(c)].clone().expect("tensor");
                Some(elementwise(op, &get).expect("elementwise body"))
            }
        };
    }
    vals.pop().flatten().expect("kernel result")
}

fn eval(g: &Graph) -> Vec<(String, T)> {
    let mut vals: Vec<Option<T>> = vec![None; g.len()];
    for (i, op) in g.nodes().iter().enumerate() {
        let v = |c: Id| vals[usize::from(c)].clone().expect("tensor operand");
        let t = match op {
            Op::Int(_) | Op::Float(_) | Op::Name(_) => None,
            Op::Input(ch) | Op::Weight(ch) => {
                Some(values_for(&g.node(ch[0]).name(), g.shape(Id::from(i))))
            }
            Op::Scalar(f) => Some(T {
                shape: vec![],
                data: vec![attr_f(g.nodes(), *f)],
            }),
            Op::Reshape(ch) => {
                let x = v(ch[0]);
                Some(T {
                    shape: g.shape(Id::from(i)).to_vec(),
                    data: x.data,
                })
            }
            Op::Permute(ch) => {
                let x = v(ch[0]);
                let perm: Vec<usize> = ch[1..].iter().map(|&p| attr_u(g, p)).collect();
                let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
                let st = strides(&x.shape);
                let n: usize = shape.iter().product();
                let data = (0..n)
                    .map(|f| {
                        let idx = unravel(f, &shape);
                        let src: usize = perm.iter().zip(&idx).map(|(&p, &k)| k * st[p]).sum();
                        x.data[src]
                    })
                    .collect();
                Some(T { shape, data })
            }
            Op::Slice([x, a, s, _]) => {
                let x = v(*x);
                let (a, s) = (attr_u(g, *a), attr_u(g, *s));
                let shape = g.shape(Id::from(i)).to_vec();
                let st = strides(&x.shape);
                let n: usize = shape.iter().product();
                let data = (0..n)
                    .map(|f| {
                        let mut idx = unravel(f, &shape);
                        idx[a] += s;
                        x.data[idx.iter().zip(&st).map(|(k, s)| k * s).sum::<usize>()]
                    })
                    .collect();
                Some(T { shape, data })
            }
            Op::Linear([x, w]) => {
                let (x, w) = (v(*x), v(*w));
                let (nout, k) = (w.shape[0], w.shape[1]);
                let rows = x.data.len() / k;
                let mut data = vec![0.0; rows * nout];
                for r in 0..rows {
                    for o in 0..nout {
                        let mut acc = 0.0f32;
                        for j in 0..k {
                            acc += x.data[r * k + j] * w.data[o * k + j];
                        }
                        data[r * nout + o] = acc;
                    }
                }
                Some(T {
                    shape: g.shape(Id::from(i)).to_vec(),
                    data,
                })
            }
            Op::Fused(ch) => {
                let body = &g.kernels[&g.node(ch[0]).name()];
                let args: Vec<T> = ch[1..].iter().map(|&a| v(a)).collect();
                Some(eval_kernel(body, &args))
            }
            op => Some(elementwise(op, &v).unwrap_or_else(|| panic!("no interpreter for {op}"))),
        };
        if let Some(t) = &t {
            assert_eq!(t.shape, g.shape(Id::from(i)), "%{i} {op}");
        }
        vals[i] = t;
    }
    g.outputs
        .iter()
        .map(|(n, id)| (n.clone(), vals[usize::from(*id)].clone().expect("output")))
        .collect()
}

/// A small deterministic generator (no extra dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

fn random_graph(seed: u64) -> Graph {
    let mut r = Rng(seed);
    let mut g = Graph::new();
    let mut vals: Vec<Id> = vec![
        g.input("x", DType::F32, &[2, 3, 4]).unwrap(),
        g.input("y", DType::F32, &[3, 4]).unwrap(),
        g.weight("w", &[4]).unwrap(),
    ];
    for step in 0..40 {
        let a = vals[vals.len() - 1 - r.below(vals.len().min(6))];
        let sa = g.shape(a).to_vec();
        let new = match r.below(14) {
            0 => g.silu(a),
            1 => g.tanh(a),
            2 => {
                let n = g.neg(a).unwrap();
                g.neg(n)
            }
            3 => g.mul_scalar(a, r.pick(&[1.0, 0.5, -2.0])),
            4 => {
                let c = g.scalar(r.pick(&[0.0, 1.0, 0.25])).unwrap();
                if r.below(2) == 0 {
                    g.add_(c, a)
                } else {
                    g.add_(a, c)
                }
            }
            5 | 6 => {
                // Another value that broadcasts with `a`, or `a` itself.
                let b = *vals
                    .iter()
                    .rev()
                    .find(|&&b| b != a && broadcast_shapes(&sa, g.shape(b)).is_some())
                    .unwrap_or(&a);
                match r.below(4) {
                    0 => g.add_(a, b),
                    1 => g.mul(b, a),
                    2 => g.sub(a, b),
                    _ => g.div(a, b),
                }
            }
            7 if sa.len() >= 2 => {
                let numel: usize = sa.iter().product();
                let dims = r.pick(&[vec![numel], vec![sa[0], numel / sa[0]], sa.clone()]);
                let t = g.reshape(a, &dims).unwrap();
                g.reshape(t, &sa)
            }
            8 if sa.len() >= 2 => {
                let n = sa.len();
                let mut p: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    p.swap(i, r.below(i + 1));
                }
                let t = g.permute(a, &p).unwrap();
                let mut q: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    q.swap(i, r.below(i + 1));
                }
                g.permute(t, &q)
            }
            9 if !sa.is_empty() => {
                let axis = r.below(sa.len());
                let len = sa[axis];
                let (s, e) = if r.below(2) == 0 || len == 1 {
                    (0, len)
                } else {
                    (r.below(len - 1), len)
                };
                g.slice(a, axis, s, e)
            }
            10 if sa.last().is_some() => {
                let k = *sa.last().unwrap();
                let w = g.weight(&format!("lin{step}"), &[4, k]).unwrap();
                g.linear(a, w)
            }
            11 => g.gelu_tanh(a),
            12 => g.sigmoid(a),
            _ => g.exp(a).and_then(|e| g.tanh(e)),
        };
        if let Ok(id) = new {
            vals.push(id);
        }
    }
    g.output("last", *vals.last().unwrap());
    for k in 0..3 {
        let id = vals[r.below(vals.len())];
        g.output(&format!("extra{k}"), id);
    }
    g
}

fn same(a: &T, b: &T) -> bool {
    a.shape == b.shape
        && a.data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

#[test]
fn the_default_pipeline_preserves_results_on_random_graphs() {
    let opts = RunOptions {
        dump_dir: None,
        verify_each: true,
    };
    let mut rewrites = 0;
    for seed in 0..200 {
        let g = random_graph(seed);
        let before = eval(&g);
        let (out, reports) = Pipeline::default_cpu().run(g.clone(), &opts).unwrap();
        if !reports[1].notes[1].ends_with("none") {
            rewrites += 1;
        }
        let after = eval(&out);
        for ((n, a), (m, b)) in before.iter().zip(&after) {
            assert_eq!(n, m);
            assert!(
                same(a, b),
                "seed {seed}, output {n}:\n{a:?}\n{b:?}\nbefore:\n{}\nafter:\n{}",
                ditto_ir::text::print(&g),
                ditto_ir::text::print(&out)
            );
        }
        assert!(!out.nodes().iter().any(Op::is_elementwise));
    }
    assert!(rewrites > 100, "only {rewrites} graphs were rewritten");
}
