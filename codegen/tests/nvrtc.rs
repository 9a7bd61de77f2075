//! The CUDA side of codegen: the emitted source of representative kernels, deduplication,
//! storage types, launch plans, errors, and NVRTC compilation (to PTX for sm_90) of every
//! kind of step at the sizes real models use, with ptxas checking register spills.
//!
//! Without NVRTC the compile test says why it skipped, except under CI (`CI` set), where it
//! fails: CI installs NVRTC (see `.ci/run`).

use ditto_codegen::cuda::{
    self, cuda_plan, cuda_sources, CudaError, CudaKernel, KArg, LibraryOp, StorageDType,
};
use ditto_codegen::{
    compile_kernel, Binding, Kernel, Mesh, MeshAxis, Program, Segment, Step, Storage, Value,
};
use ditto_ir::{Op, RecExpr};

/// A program under construction: every value gets its own buffer.
struct Build {
    p: Program,
}

impl Build {
    fn new() -> Build {
        Build {
            p: Program {
                format_version: ditto_codegen::program::FORMAT_VERSION,
                mesh: Mesh::default(),
                inputs: vec![],
                weights: vec![],
                buffers: vec![],
                values: vec![],
                kernels: vec![],
                steps: vec![],
                outputs: vec![],
            },
        }
    }
    fn value(&mut self, storage: Storage, shape: &[usize]) -> usize {
        self.p.values.push(Value {
            storage,
            shape: shape.to_vec(),
        });
        self.p.values.len() - 1
    }
    fn input(&mut self, shape: &[usize]) -> usize {
        self.p.inputs.push(Binding {
            name: format!("in{}", self.p.inputs.len()),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.value(Storage::Input(self.p.inputs.len() - 1), shape)
    }
    fn weight(&mut self, shape: &[usize]) -> usize {
        self.p.weights.push(Binding {
            name: format!("w{}", self.p.weights.len()),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.value(Storage::Weight(self.p.weights.len() - 1), shape)
    }
    fn buffer(&mut self, shape: &[usize]) -> usize {
        self.p.buffers.push(shape.iter().product::<usize>().max(1));
        self.value(Storage::Buffer(self.p.buffers.len() - 1), shape)
    }
    /// A buffer-backed activation (a GEMM's output, so it has the storage type).
    fn activation(&mut self, shape: &[usize]) -> usize {
        let k = *shape.last().unwrap();
        let m: usize = shape.iter().product::<usize>() / k;
        let x = self.buffer(&[m, k]);
        let w = self.weight(&[k, k]);
        let out = self.buffer(shape);
        self.p.steps.push(Step::Linear {
            x,
            w,
            b: None,
            out,
            m,
            k,
            n: k,
        });
        out
    }
    fn kernel(&mut self, name: &str, num_args: usize, body: &str) -> usize {
        let expr: RecExpr<Op> = body.parse().unwrap();
        self.p
            .kernels
            .push(compile_kernel(name, num_args, &expr).unwrap());
        self.p.kernels.len() - 1
    }
    fn step(&mut self, s: Step) {
        self.p.steps.push(s);
    }
}

const MODULATE: &str = "(add (mul (arg 0) (add (arg 1) (scalar 1.0))) (arg 2))";

/// PixArt-style modulation at DiT-XL size: x [2, 4096, 1152], scale/shift [2, 1, 1152].
fn modulate_program() -> Program {
    let mut b = Build::new();
    let k = b.kernel("k3_add_mul_add", 3, MODULATE);
    let x = b.activation(&[2, 4096, 1152]);
    let scale = b.activation(&[2, 1, 1152]);
    let shift = b.activation(&[2, 1, 1152]);
    let out = b.buffer(&[2, 4096, 1152]);
    b.step(Step::Fused {
        kernel: k,
        args: vec![x, scale, shift],
        out,
    });
    b.p
}

fn source_of<'a>(kernels: &'a [CudaKernel], name: &str) -> &'a str {
    &kernels
        .iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no kernel `{name}`"))
        .source
}

#[test]
fn modulate_kernel_source() {
    let p = modulate_program();
    let ks = cuda_sources(&p, StorageDType::Bf16).unwrap();
    let src = source_of(&ks, "k3_add_mul_add");
    // Named after the fused ops, unmangled, with the body's shapes baked in.
    for line in [
        "#include <cuda_bf16.h>",
        "extern \"C\" __global__ void __launch_bounds__(256) k3_add_mul_add(__nv_bfloat16* __restrict__ out, \
         const __nv_bfloat16* __restrict__ a0, const __nv_bfloat16* __restrict__ a1, const __nv_bfloat16* __restrict__ a2) {",
        "  if (t >= 1179648u) return;",
        "  const unsigned int e = t * 8u;  // first output element",
        "  const unsigned int i0 = e / 4718592u;",
        "  const unsigned int i2 = e % 1152u;",
        // x is read at the output's own offset, scale/shift broadcast over the tokens.
        "  ldv<8>(a0 + e, x0);",
        "  ldv<8>(a1 + i0 * 1152u + i2, x1);",
        "  ldv<8>(a2 + i0 * 1152u + i2, x2);",
        "    const float r3 = r1 + r2;",
        "    const float r4 = r0 * r3;",
        "    const float r6 = r4 + r5;",
        "  stv<8>(out + e, y);",
    ] {
        assert!(src.contains(line), "missing `{line}` in:\n{src}");
    }
    // The token coordinate is never needed, so never computed.
    assert!(!src.contains("i1"), "{src}");
    assert!(src.contains("a1: bf16 strides [1152, 0, 1] over out dims [2, 4096, 1152]"));

    // f32 storage: 4-wide vectors, no 16-bit header.
    let ks = cuda_sources(&p, StorageDType::F32).unwrap();
    let src = source_of(&ks, "k3_add_mul_add");
    assert!(src.contains("ldv<4>(a1 + i0 * 1152u + i2, x1);"), "{src}");
    assert!(src.contains("const float4 t = __ldg"), "{src}");
    assert!(!src.contains("#include"), "{src}");
}

#[test]
fn broadcast_and_scalar_paths() {
    let mut b = Build::new();
    let k = b.kernel("k0_mul_add", 3, "(add (mul (arg 0) (arg 1)) (arg 2))");
    // A per-row scale ([rows, 1]) is broadcast along each vector; rows of 1001 do not split
    // into vectors, so that kernel goes element by element.
    let x = b.activation(&[64, 1152]);
    let s = b.activation(&[64, 1]);
    let c = b.activation(&[1152]);
    let out = b.buffer(&[64, 1152]);
    b.step(Step::Fused {
        kernel: k,
        args: vec![x, s, c],
        out,
    });
    let x = b.activation(&[8, 1001]);
    let s = b.activation(&[8, 1]);
    let c = b.activation(&[1001]);
    let out = b.buffer(&[8, 1001]);
    b.step(Step::Fused {
        kernel: k,
        args: vec![x, s, c],
        out,
    });
    let ks = cuda_sources(&b.p, StorageDType::Bf16).unwrap();
    let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k0_mul_add", "k0_mul_add_2"]);
    let v = &ks[0].source;
    assert!(
        v.contains("const float b = ld(a1[i0]);  // broadcast along the vector"),
        "{v}"
    );
    assert!(v.contains("ldv<8>(a2 + i1, x2);"), "{v}");
    let s = &ks[1].source;
    assert!(s.contains("one thread per output element"), "{s}");
    assert!(s.contains("x1[0] = ld(*(a1 + i0));"), "{s}");
    assert!(s.contains("st(out + e, y[0]);"), "{s}");
}

#[test]
fn identical_steps_share_kernels() {
    // 28 identical layers compile 28 x 2 steps into two kernels; slices at different
    // offsets share one kernel (the launch passes the offset pointer).
    let mut b = Build::new();
    let k = b.kernel("k0_gelu_tanh", 1, "(gelu_tanh (arg 0))");
    for _ in 0..28 {
        let x = b.activation(&[2, 256, 4608]);
        let y = b.buffer(&[2, 256, 4608]);
        b.step(Step::Fused {
            kernel: k,
            args: vec![x],
            out: y,
        });
        let n = b.buffer(&[2, 256, 4608]);
        b.step(Step::LayerNorm {
            x: y,
            out: n,
            rows: 512,
            cols: 4608,
            eps: 1e-6,
        });
    }
    let ada = b.activation(&[2, 6912]);
    for i in 0..6 {
        let out = b.buffer(&[2, 1152]);
        b.step(Step::Slice {
            x: ada,
            axis: 1,
            start: i * 1152,
            end: (i + 1) * 1152,
            out,
        });
    }
    let plan = cuda_plan(&b.p, StorageDType::Bf16).unwrap();
    let names: Vec<&str> = plan.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k0_gelu_tanh", "layer_norm", "slice"]);
    for k in &plan.kernels {
        assert_eq!(k.hash, cuda::kernel_hash(&k.source));
    }
    let slices: Vec<&KArg> = plan
        .steps
        .iter()
        .filter(|s| s.launches.first().is_some_and(|l| l.kernel == 2))
        .map(|s| &s.launches[0].args[1])
        .collect();
    assert_eq!(slices.len(), 6);
    assert_eq!(
        *slices[3],
        KArg::ValueAt {
            value: ada,
            offset: 3 * 1152
        }
    );
}

#[test]
fn row_kernels_use_lane_groups_blocks_or_streams() {
    let mut b = Build::new();
    for (rows, cols) in [
        (16384usize, 128usize),
        (4096, 1152),
        (4608, 3072),
        (4, 65536),
    ] {
        let x = b.activation(&[rows, cols]);
        let y = b.buffer(&[rows, cols]);
        b.step(Step::RmsNorm {
            x,
            out: y,
            rows,
            cols,
            eps: 1e-6,
        });
    }
    let plan = cuda_plan(&b.p, StorageDType::Bf16).unwrap();
    let launch = |i: usize| &plan.steps[2 * i + 1].launches[0];
    // Head-dim 128 RMS norm (Flux qk-norm): 16 lanes per row, 16 rows per block.
    assert_eq!(
        (launch(0).grid, launch(0).block),
        ([1024, 1, 1], [256, 1, 1])
    );
    let src = &plan.kernels[launch(0).kernel].source;
    assert!(src.contains("group_sum<16>(q)"), "{src}");
    assert!(!src.contains("__syncthreads"), "{src}");
    // 1152 / 8 = 144 vectors: a block of 160 threads per row, one vector each.
    assert_eq!(
        (launch(1).grid, launch(1).block),
        ([4096, 1, 1], [160, 1, 1])
    );
    let src = &plan.kernels[launch(1).kernel].source;
    assert!(
        src.contains("block_sum<160>(q, red)") && src.contains("if (c < 144u)"),
        "{src}"
    );
    // 3072 / 8 = 384 vectors: 384 threads, no tail.
    assert_eq!(launch(2).block, [384, 1, 1]);
    assert!(!plan.kernels[launch(2).kernel].source.contains("if (c <"));
    // Rows too long for registers are streamed.
    let src = &plan.kernels[launch(3).kernel].source;
    assert!(
        src.contains("streamed from memory") && src.contains("c += 512u"),
        "{src}"
    );
}

#[test]
fn group_norm_splits_long_rows() {
    // VAE at 1024 px: 512 channels, 32 groups, 128 x 128: rows of 262144 in 64 chunks.
    let mut b = Build::new();
    let x = b.activation(&[1, 512, 128, 128]);
    let y = b.buffer(&[1, 512, 128, 128]);
    b.step(Step::GroupNorm {
        x,
        out: y,
        n: 1,
        c: 512,
        hw: 16384,
        groups: 32,
        eps: 1e-6,
    });
    let plan = cuda_plan(&b.p, StorageDType::Bf16).unwrap();
    let s = &plan.steps[1];
    assert_eq!(s.launches.len(), 2);
    assert_eq!(s.launches[0].grid, [64, 32, 1]);
    assert_eq!(s.launches[0].args, [KArg::Scratch, KArg::Value(x)]);
    assert_eq!(
        s.launches[1].args,
        [KArg::Value(y), KArg::Value(x), KArg::Scratch]
    );
    assert_eq!(s.scratch_bytes, 32 * 64 * 2 * 4);
}

#[test]
fn storage_types_keep_f32_islands() {
    // Flux's conditioning: timestep * 1000 stays f32 (it feeds the sinusoidal embedding);
    // position ids and RoPE tables stay f32; an input a GEMM reads takes the storage type.
    let mut b = Build::new();
    let t = b.input(&[1]);
    let k = b.kernel("k0_mul", 1, "(mul (arg 0) (scalar 1000.0))");
    let t1000 = b.buffer(&[1]);
    b.step(Step::Fused {
        kernel: k,
        args: vec![t],
        out: t1000,
    });
    let emb = b.buffer(&[1, 256]);
    b.step(Step::TimestepEmbedding {
        t: t1000,
        out: emb,
        dim: 256,
        flip_sin_to_cos: true,
        downscale_freq_shift: 0.0,
        scale: 1.0,
    });
    let ids = b.input(&[4096, 3]);
    let cos = b.buffer(&[4096, 128]);
    b.step(Step::RopeTables {
        ids,
        theta: 10000.0,
        axes_dims: vec![16, 56, 56],
        out: cos,
        cos: true,
    });
    let hs = b.input(&[4096, 64]);
    let w = b.weight(&[3072, 64]);
    let h = b.buffer(&[4096, 3072]);
    b.step(Step::Linear {
        x: hs,
        w,
        b: None,
        out: h,
        m: 4096,
        k: 64,
        n: 3072,
    });
    let plan = cuda_plan(&b.p, StorageDType::Bf16).unwrap();
    let d = &plan.value_dtypes;
    assert_eq!(
        (d[t], d[t1000], d[emb]),
        (StorageDType::F32, StorageDType::F32, StorageDType::Bf16)
    );
    assert_eq!((d[ids], d[cos]), (StorageDType::F32, StorageDType::F32));
    assert_eq!(
        (d[hs], d[w], d[h]),
        (StorageDType::Bf16, StorageDType::Bf16, StorageDType::Bf16)
    );
    assert_eq!(
        plan.input_dtypes,
        [StorageDType::F32, StorageDType::F32, StorageDType::Bf16]
    );
    // Buffers are sized for what they hold.
    let buf = |v: usize| match b.p.values[v].storage {
        Storage::Buffer(i) => plan.buffer_bytes[i],
        _ => unreachable!(),
    };
    assert_eq!((buf(cos), buf(h)), (4096 * 128 * 4, 4096 * 3072 * 2));
    let src = source_of(&plan.kernels, "timestep_embedding");
    assert!(src.contains("const float* __restrict__ t"), "{src}");
}

#[test]
fn library_steps_and_collectives() {
    let mut b = Build::new();
    b.p.mesh = Mesh {
        cfg: 1,
        ring: 1,
        ulysses: 4,
    };
    let q = b.activation(&[1, 1024, 3072]);
    let o = b.buffer(&[1, 1024, 3072]);
    b.step(Step::Attention {
        q,
        k: q,
        v: q,
        out: o,
        batch: 1,
        sq: 1024,
        sk: 1024,
        heads: 24,
        head_dim: 128,
        head_dim_v: 128,
        scale: 0.088,
    });
    let segs = vec![
        Segment {
            local: 1152,
            valid: 4096,
        },
        Segment {
            local: 128,
            valid: 512,
        },
    ];
    let full = b.activation(&[1, 4608, 3072]);
    let local = b.buffer(&[1, 1280, 3072]);
    b.step(Step::Shard {
        x: full,
        out: local,
        axis: 1,
        mesh: MeshAxis::Ulysses,
        parts: 4,
        segments: segs.clone(),
    });
    let back = b.buffer(&[1, 4608, 3072]);
    b.step(Step::AllGather {
        x: local,
        out: back,
        axis: 1,
        mesh: MeshAxis::Ulysses,
        parts: 4,
        segments: segs,
    });
    let plan = cuda_plan(&b.p, StorageDType::Bf16).unwrap();
    let kinds: Vec<Option<LibraryOp>> = plan.steps.iter().map(|s| s.library).collect();
    assert_eq!(
        kinds,
        [
            Some(LibraryOp::Gemm),
            None,
            Some(LibraryOp::Gemm),
            None,
            Some(LibraryOp::Collective)
        ]
    );
    // Attention is a launch of the generated flash-attention kernel: 1024 / 64 query
    // tiles x 24 heads x 1 batch, 4 warps.
    let attn = &plan.steps[1].launches[0];
    assert_eq!((attn.grid, attn.block), ([16, 24, 1], [128, 1, 1]));
    assert_eq!(
        attn.args,
        [
            KArg::Value(o),
            KArg::Value(q),
            KArg::Value(q),
            KArg::Value(q)
        ]
    );
    assert!(plan.kernels[attn.kernel].source.contains("mma.sync"));
    let shard = &plan.steps[3].launches[0];
    assert_eq!(shard.args[2], KArg::MeshIndex(MeshAxis::Ulysses));
    let gather = &plan.steps[4];
    assert_eq!(gather.scratch_bytes, 4 * 1280 * 3072 * 2);
    assert_eq!(gather.launches[0].args[1], KArg::Scratch);
    let src = &plan.kernels[shard.kernel].source;
    assert!(src.contains("const int member"), "{src}");
}

#[test]
fn bad_programs_are_errors_not_panics() {
    let mut b = Build::new();
    let k = b.kernel("k0_add", 2, "(add (arg 0) (arg 1))");
    let x = b.activation(&[4, 8]);
    let y = b.activation(&[3, 8]);
    let out = b.buffer(&[4, 8]);
    b.step(Step::Fused {
        kernel: k,
        args: vec![x, y],
        out,
    });
    let err = cuda_plan(&b.p, StorageDType::F32).unwrap_err();
    assert!(
        matches!(&err, CudaError::Unsupported { kind, .. } if kind == "fused"),
        "{err}"
    );
    assert!(err.to_string().contains("does not broadcast"), "{err}");

    let mut b = Build::new();
    let x = b.activation(&[4, 8]);
    let out = b.buffer(&[8, 4]);
    b.step(Step::Permute {
        x,
        out,
        perm: vec![0, 0],
    });
    assert!(cuda_plan(&b.p, StorageDType::F32)
        .unwrap_err()
        .to_string()
        .contains("not a permutation"));

    let mut b = Build::new();
    let x = b.activation(&[4, 8]);
    b.step(Step::LayerNorm {
        x,
        out: 99,
        rows: 4,
        cols: 8,
        eps: 1e-5,
    });
    assert!(cuda_plan(&b.p, StorageDType::F32)
        .unwrap_err()
        .to_string()
        .contains("value 99 does not exist"));

    let mut b = Build::new();
    b.p.kernels.push(Kernel {
        name: "k0_bad".into(),
        num_args: 1,
        body: vec![],
        source: String::new(),
    });
    let x = b.activation(&[4]);
    let out = b.buffer(&[4]);
    b.step(Step::Fused {
        kernel: 0,
        args: vec![x],
        out,
    });
    assert!(cuda_plan(&b.p, StorageDType::F32)
        .unwrap_err()
        .to_string()
        .contains("empty kernel body"));
}

#[test]
fn missing_library_message_says_what_to_do() {
    let e = CudaError::LibraryMissing {
        lib: "libnvrtc".into(),
        searched: vec!["/usr/local/cuda/lib64".into()],
    };
    let m = e.to_string();
    assert!(
        m.contains("/usr/local/cuda/lib64")
            && m.contains("pip install nvidia-cuda-nvrtc")
            && m.contains(cuda::NVRTC_LIB_ENV),
        "{m}"
    );
}

/// One program with every step kind this module generates kernels for, at the sizes of
/// real models (DiT-XL / PixArt at 1024 px, SD3, Flux, the SD VAE).
fn every_kind_at_real_sizes() -> Program {
    let mut b = Build::new();
    b.p.mesh = Mesh {
        cfg: 1,
        ring: 2,
        ulysses: 2,
    };
    // Fused: modulation, gating, activations, a broadcast weight over NCHW.
    let modulate = b.kernel("k3_add_mul_add", 3, MODULATE);
    let gate = b.kernel("k4_mul_add", 3, "(add (arg 0) (mul (arg 1) (arg 2)))");
    let gelu = b.kernel("k5_gelu_tanh", 1, "(gelu_tanh (arg 0))");
    let silu = b.kernel(
        "k0_mul_add_silu",
        3,
        "(silu (add (mul (arg 0) (arg 1)) (arg 2)))",
    );
    let all = b.kernel(
        "k9_all",
        2,
        "(exp (tanh (sigmoid (gelu (neg (div (sub (arg 0) (arg 1)) (scalar 3.0)))))))",
    );
    let x = b.activation(&[2, 4096, 1152]);
    let sc = b.activation(&[2, 1, 1152]);
    let sh = b.activation(&[2, 1, 1152]);
    let m = b.buffer(&[2, 4096, 1152]);
    b.step(Step::Fused {
        kernel: modulate,
        args: vec![x, sc, sh],
        out: m,
    });
    let g = b.buffer(&[2, 4096, 1152]);
    b.step(Step::Fused {
        kernel: gate,
        args: vec![x, m, sc],
        out: g,
    });
    let ff = b.activation(&[2, 4096, 4608]);
    let ffo = b.buffer(&[2, 4096, 4608]);
    b.step(Step::Fused {
        kernel: gelu,
        args: vec![ff],
        out: ffo,
    });
    let img = b.activation(&[1, 512, 128, 128]);
    let gw = b.weight(&[512, 1, 1]);
    let gb = b.weight(&[512, 1, 1]);
    let act = b.buffer(&[1, 512, 128, 128]);
    b.step(Step::Fused {
        kernel: silu,
        args: vec![img, gw, gb],
        out: act,
    });
    let odd = b.activation(&[3, 1001]);
    let oddo = b.buffer(&[3, 1001]);
    b.step(Step::Fused {
        kernel: all,
        args: vec![odd, odd],
        out: oddo,
    });
    // Norms and softmax.
    for (rows, cols) in [
        (8192usize, 1152usize),
        (4608, 3072),
        (110592, 128),
        (8192, 64),
        (4, 40000),
        (7, 1001),
    ] {
        let x = b.activation(&[rows, cols]);
        let y = b.buffer(&[rows, cols]);
        b.step(Step::LayerNorm {
            x,
            out: y,
            rows,
            cols,
            eps: 1e-6,
        });
        let y = b.buffer(&[rows, cols]);
        b.step(Step::RmsNorm {
            x,
            out: y,
            rows,
            cols,
            eps: 1e-6,
        });
        let y = b.buffer(&[rows, cols]);
        b.step(Step::Softmax {
            x,
            out: y,
            rows,
            cols,
        });
    }
    let y = b.buffer(&[1, 512, 128, 128]);
    b.step(Step::GroupNorm {
        x: img,
        out: y,
        n: 1,
        c: 512,
        hw: 16384,
        groups: 32,
        eps: 1e-6,
    });
    let small = b.activation(&[2, 128, 32, 32]);
    let y = b.buffer(&[2, 128, 32, 32]);
    b.step(Step::GroupNorm {
        x: small,
        out: y,
        n: 2,
        c: 128,
        hw: 1024,
        groups: 32,
        eps: 1e-6,
    });
    // Layout: DiT patchify / unpatchify at 1024 px (latent 128 x 128, patch 2), attention's
    // head transposes, a VAE attention transpose; concat of text and image tokens; slices.
    let lat = b.input(&[2, 4, 64, 2, 64, 2]);
    let y = b.buffer(&[2, 64, 64, 4, 2, 2]);
    b.step(Step::Permute {
        x: lat,
        out: y,
        perm: vec![0, 2, 4, 1, 3, 5],
    });
    let p = b.activation(&[2, 64, 64, 2, 2, 8]);
    let y = b.buffer(&[2, 8, 64, 2, 64, 2]);
    b.step(Step::Permute {
        x: p,
        out: y,
        perm: vec![0, 5, 1, 3, 2, 4],
    });
    let h = b.activation(&[2, 4096, 16, 72]);
    let y = b.buffer(&[2, 16, 4096, 72]);
    b.step(Step::Permute {
        x: h,
        out: y,
        perm: vec![0, 2, 1, 3],
    });
    let v = b.activation(&[1, 512, 16384]);
    let y = b.buffer(&[1, 16384, 512]);
    b.step(Step::Permute {
        x: v,
        out: y,
        perm: vec![0, 2, 1],
    });
    let txt = b.activation(&[1, 512, 3072]);
    let imgt = b.activation(&[1, 4096, 3072]);
    let cat = b.buffer(&[1, 4608, 3072]);
    b.step(Step::Concat {
        inputs: vec![txt, imgt],
        axis: 1,
        out: cat,
    });
    let ids_t = b.input(&[512, 3]);
    let ids_i = b.input(&[4096, 3]);
    let ids = b.buffer(&[4608, 3]);
    b.step(Step::Concat {
        inputs: vec![ids_t, ids_i],
        axis: 0,
        out: ids,
    });
    let s = b.buffer(&[1, 4096, 3072]);
    b.step(Step::Slice {
        x: cat,
        axis: 1,
        start: 512,
        end: 4608,
        out: s,
    });
    let up_in = b.activation(&[1, 512, 64, 64]);
    let up = b.buffer(&[1, 512, 128, 128]);
    b.step(Step::UpsampleNearest {
        x: up_in,
        out: up,
        factor: 2,
    });
    // Embeddings and RoPE (Flux: 24 heads of 128, axes 16/56/56).
    let t = b.input(&[2]);
    let te = b.buffer(&[2, 256]);
    b.step(Step::TimestepEmbedding {
        t,
        out: te,
        dim: 256,
        flip_sin_to_cos: true,
        downscale_freq_shift: 1.0,
        scale: 1.0,
    });
    let table = b.weight(&[1001, 1152]);
    let labels = b.input(&[2]);
    let le = b.buffer(&[2, 1152]);
    b.step(Step::Embedding {
        table,
        idx: labels,
        out: le,
    });
    let pe = b.buffer(&[4096, 1152]);
    b.step(Step::SinCosPosEmbed {
        out: pe,
        dim: 1152,
        grid_h: 64,
        grid_w: 64,
        base_size: 64.0,
        interpolation_scale: 2.0,
    });
    let cos = b.buffer(&[4608, 128]);
    b.step(Step::RopeTables {
        ids,
        theta: 10000.0,
        axes_dims: vec![16, 56, 56],
        out: cos,
        cos: true,
    });
    let sin = b.buffer(&[4608, 128]);
    b.step(Step::RopeTables {
        ids,
        theta: 10000.0,
        axes_dims: vec![16, 56, 56],
        out: sin,
        cos: false,
    });
    let q = b.activation(&[1, 4608, 24, 128]);
    let qr = b.buffer(&[1, 4608, 24, 128]);
    b.step(Step::Rope {
        x: q,
        cos,
        sin,
        out: qr,
    });
    // Parallel steps' local parts, copies and fills.
    let segs = vec![
        Segment {
            local: 1024,
            valid: 4096,
        },
        Segment {
            local: 128,
            valid: 512,
        },
    ];
    let local = b.buffer(&[1, 1152, 3072]);
    b.step(Step::Shard {
        x: cat,
        out: local,
        axis: 1,
        mesh: MeshAxis::Sp,
        parts: 4,
        segments: segs.clone(),
    });
    let back = b.buffer(&[1, 4608, 3072]);
    b.step(Step::AllGather {
        x: local,
        out: back,
        axis: 1,
        mesh: MeshAxis::Sp,
        parts: 4,
        segments: segs,
    });
    let c = b.buffer(&[2, 4096, 1152]);
    b.step(Step::Copy { x: g, out: c });
    let f = b.buffer(&[2, 4096]);
    b.step(Step::Fill {
        out: f,
        value: f32::NEG_INFINITY,
    });
    b.p
}

#[test]
fn every_step_kind_compiles_with_nvrtc() {
    let (version, lib) = match cuda::nvrtc_version() {
        Ok(v) => v,
        Err(e)
            if std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false" || v == "0") =>
        {
            eprintln!("skipped: NVRTC is not available here ({e})");
            return;
        }
        Err(e) => panic!("CI must have NVRTC (installed by .ci/run): {e}"),
    };
    eprintln!("NVRTC {}.{} from {}", version.0, version.1, lib.display());
    let include = cuda::cuda_include_dirs();
    let ptxas = cuda::find_ptxas();
    let p = every_kind_at_real_sizes();
    let mut spills = Vec::new();
    for dtype in [StorageDType::F32, StorageDType::F16, StorageDType::Bf16] {
        let plan = cuda_plan(&p, dtype).unwrap();
        let ptx = cuda::compile_ptx(&plan.kernels, "sm_90", &include)
            .unwrap_or_else(|e| panic!("{dtype}: {e}"));
        eprintln!("{dtype}: {} kernels", ptx.len());
        for (name, text) in &ptx {
            assert!(text.contains(&format!(".entry {name}(")), "{name}");
            let Some(ptxas) = &ptxas else { continue };
            for f in cuda::ptxas_info(ptxas, text, "sm_90").unwrap() {
                eprintln!(
                    "  {:24} {:3} registers, {:5} B smem, {:3} B stack, spills {}/{}",
                    f.name,
                    f.registers,
                    f.shared_bytes,
                    f.stack_frame,
                    f.spill_stores,
                    f.spill_loads
                );
                if f.spill_stores + f.spill_loads > 0 {
                    spills.push(format!("{dtype} {}", f.name));
                }
            }
        }
    }
    assert!(spills.is_empty(), "register spills: {spills:?}");
    // A compile error is reported with NVRTC's log and the kernel's name.
    let bad = CudaKernel {
        name: "broken".into(),
        source: "extern \"C\" __global__ void broken() { undefined_thing(); }".into(),
        hash: 0,
    };
    match cuda::compile_ptx(&[bad], "sm_90", &include) {
        Err(CudaError::Compile { kernel, log }) => {
            assert_eq!(kernel, "broken");
            assert!(log.contains("undefined_thing"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
