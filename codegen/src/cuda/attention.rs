//! Attention: `softmax(q k^T * scale) v` per batch element and head, as one flash-attention
//! kernel (FlashAttention-2's scheme): a block takes a tile of query rows, streams the keys
//! and values through shared memory in tiles, and keeps the running row maximum, the
//! running sum and the output accumulator on chip (the online softmax), so the score matrix
//! never reaches memory.
//!
//! - **f16 / bf16 storage: tensor cores.** Four warps per block, 16 query rows each (64 per
//!   block), key tiles of 64. Scores and the output accumulate in f32 through
//!   `mma.sync.aligned.m16n8k16` (sm_80 and later, Hopper included). The query fragments
//!   stay in registers for the whole kernel; the probabilities go from the score
//!   accumulators straight into the A fragments of the `P V` product (the accumulator layout
//!   of two adjacent 16x8 tiles is the A layout of one 16x16 tile), as FlashAttention-2
//!   does. Head dims that are not a multiple of 16 (72, 88) are zero-padded in shared
//!   memory for `q k^T`; `P V` works in 8-column tiles, which every supported head dim fills.
//! - **f32 storage: SIMT.** One warp per query row (each lane a strided slice of the head
//!   dim), key tiles of 32 in shared memory, the dot products reduced by shuffles. f32 plans
//!   are for checking; they keep f32 arithmetic throughout, which tensor cores would not.
//!
//! Both take `q` `[B, SQ, H*D]`, `k`/`v` `[B, SK, H*D]` (the layouts of the Program's
//! values) and write `out` `[B, SQ, H*D]`; optionally the log-sum-exp of each row (natural
//! log, `[B, H, SQ]` f32, what Ring attention merges with) and a key-padding mask
//! (`[SK]` bytes, 0 = padding: never attended to). Fully masked rows give 0 and an LSE of
//! -inf. Exponentials are `exp2f` of scores pre-multiplied by `scale * log2(e)`.
//!
//! The matrix instruction is written once, as inline PTX behind `mma16816`, with a host
//! fallback (`emu_mma_16816`) that the tests' CUDA emulation provides, so the kernel's
//! indexing is checked against a float64 reference without a GPU.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::elementwise::Emitted;
use super::emit::{self, c_float, Needs, NAME};
use super::plan::Builder;
use super::StorageDType;

/// Head dims the kernels are generated for (multiples of 8; the tensor-core kernel's 8-column
/// output tiles need that).
pub const HEAD_DIMS: [usize; 5] = [64, 72, 88, 96, 128];

/// One attention kernel's configuration: everything is baked into the source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub dtype: StorageDType,
    /// Also write the log-sum-exp of every row (a trailing `float*` parameter).
    pub lse: bool,
    /// Take a key-padding mask (a trailing `const unsigned char*` parameter, after `lse`).
    pub key_mask: bool,
}

/// Query rows per block of the tensor-core kernel (4 warps x 16 rows).
const MMA_ROWS: usize = 64;
/// Keys per shared-memory tile of the tensor-core kernel.
const MMA_KEYS: usize = 64;
/// Query rows (warps) per block of the SIMT kernel, and its keys per tile.
const SIMT_ROWS: usize = 4;
const SIMT_KEYS: usize = 32;

impl AttentionSpec {
    fn check(&self) -> Result<(), String> {
        let d = self.head_dim;
        if d == 0 || d % 8 != 0 || d > 256 {
            return Err(format!(
                "attention head dim {d}: the kernels take multiples of 8 up to 256 (checked: {HEAD_DIMS:?})"
            ));
        }
        if self.batch == 0 || self.sq == 0 || self.sk == 0 || self.heads == 0 {
            return Err(format!("empty attention {self:?}"));
        }
        if !self.scale.is_finite() {
            return Err(format!("attention scale {} is not finite", self.scale));
        }
        let elems = self.batch * self.sq.max(self.sk) * self.heads * d;
        if elems >= 1 << 31 {
            return Err(format!(
                "attention over {elems} elements per tensor: the kernel indexes with 32 bits"
            ));
        }
        Ok(())
    }

    /// Grid and block of the kernel.
    pub fn launch_dims(&self) -> ([u32; 3], [u32; 3]) {
        let rows = match self.dtype {
            StorageDType::F32 => SIMT_ROWS,
            _ => MMA_ROWS,
        };
        (
            [
                emit::blocks(self.sq, rows),
                self.heads as u32,
                self.batch as u32,
            ],
            [128, 1, 1],
        )
    }

    fn what(&self) -> String {
        format!(
            "Flash attention: softmax(q k^T * {}) v over {} batch x {} heads, {} queries x {} keys, head dim {}, {} storage ({}){}{}.",
            self.scale,
            self.batch,
            self.heads,
            self.sq,
            self.sk,
            self.head_dim,
            self.dtype,
            match self.dtype {
                StorageDType::F32 => "SIMT, f32",
                _ => "mma.sync m16n8k16, f32 accumulation",
            },
            if self.lse { "; writes the row log-sum-exp" } else { "" },
            if self.key_mask { "; masks padding keys" } else { "" },
        )
    }

    /// The kernel's parameters after `out, q, k, v`.
    fn extra_params(&self) -> String {
        let mut s = String::new();
        if self.lse {
            s.push_str(", float* __restrict__ lse");
        }
        if self.key_mask {
            s.push_str(", const unsigned char* __restrict__ mask");
        }
        s
    }
}

/// Emits the attention kernel for `spec`; its parameters are `(out, q, k, v[, lse][, mask])`.
pub(crate) fn attention_kernel(b: &mut Builder, spec: &AttentionSpec) -> Result<Emitted, String> {
    spec.check()?;
    let source = match spec.dtype {
        StorageDType::F32 => simt_source(spec),
        _ => mma_source(spec),
    };
    let kernel = b.kernel(&kernel_name(spec), source);
    let (grid, block) = spec.launch_dims();
    Ok(Emitted {
        kernel,
        grid,
        block,
    })
}

fn kernel_name(spec: &AttentionSpec) -> String {
    format!(
        "flash_attention_d{}_{}{}{}",
        spec.head_dim,
        spec.dtype,
        if spec.lse { "_lse" } else { "" },
        if spec.key_mask { "_mask" } else { "" }
    )
}

/// The kernel alone, named `name` (for tests and benchmarks of the kernel by itself).
pub fn attention_source(spec: &AttentionSpec, name: &str) -> Result<String, String> {
    spec.check()?;
    let source = match spec.dtype {
        StorageDType::F32 => simt_source(spec),
        _ => mma_source(spec),
    };
    Ok(source.replace(NAME, name))
}

/// `scale * log2(e)`: scores are kept in base-2 exponent units.
fn scale_log2(spec: &AttentionSpec) -> f32 {
    (spec.scale as f64 * std::f64::consts::LOG2_E) as f32
}

fn mma_source(spec: &AttentionSpec) -> String {
    let dtypes: BTreeSet<StorageDType> = [spec.dtype].into();
    let mut s = emit::prelude(&spec.what(), &dtypes, Needs::default());
    let (ptx_type, emu_kind, pair, pair_fn) = match spec.dtype {
        StorageDType::Bf16 => (
            "bf16",
            "EMU_BF16",
            "__nv_bfloat162",
            "__floats2bfloat162_rn",
        ),
        _ => ("f16", "EMU_F16", "__half2", "__floats2half2_rn"),
    };
    let t = spec.dtype.c_type();
    let d = spec.head_dim;
    let dp = d.next_multiple_of(16);
    let row_stride = spec.heads * d;
    let key_tiles = spec.sk.div_ceil(MMA_KEYS);
    let _ = write!(
        s,
        r#"// D = A B + D for one warp: A 16x16 (row-major), B 16x8 (column-major), {ptx_type}
// operands in pairs per 32-bit register (lower index in the lower half), f32 accumulators.
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b) {{
#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32 {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  emu_mma_16816(d, a, b, {emu_kind});
#endif
}}
// Two f32 as a rounded {ptx_type} pair in one register.
__device__ __forceinline__ unsigned pack2(float x, float y) {{
  union {{ {pair} h; unsigned u; }} p;
  p.h = {pair_fn}(x, y);
  return p.u;
}}

#define SQ {sq}
#define SK {sk}
#define D {d}
#define DP {dp}
#define RS {row_stride}
#define BC {keys}
// Shared-memory row stride in 16-bit elements: DP plus 16 bytes, so that the 8 rows a
// fragment load touches fall in different banks.
#define LDS ({dp} + 8)

extern "C" __global__ void __launch_bounds__(128) {NAME}({t}* __restrict__ out, const {t}* __restrict__ q, const {t}* __restrict__ k, const {t}* __restrict__ v{extra}) {{
  __shared__ __align__(16) unsigned short ks[BC * LDS];
  __shared__ __align__(16) unsigned short vs[BC * LDS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = blockIdx.x * {rows} + warp * 16;
  const unsigned short* qh = reinterpret_cast<const unsigned short*>(q);
  const unsigned short* kh = reinterpret_cast<const unsigned short*>(k);
  const unsigned short* vh = reinterpret_cast<const unsigned short*>(v);
  // This warp's 16 query rows as A fragments, for the whole kernel (zero past SQ and D).
  unsigned qf[DP / 16][4];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {{
#pragma unroll
    for (int r = 0; r < 4; ++r) {{
      const int row = row0 + g + ((r & 1) ? 8 : 0);
      const int col = kk * 16 + 2 * tq + ((r & 2) ? 8 : 0);
      qf[kk][r] = (row < SQ && col < D)
          ? *reinterpret_cast<const unsigned*>(qh + (b * SQ + row) * RS + h * D + col)
          : 0u;
    }}
  }}
  // Running max (base-2 units) and partial sums of rows g and g + 8; the output tiles.
  float m[2] = {{__int_as_float(0xff800000), __int_as_float(0xff800000)}};
  float l[2] = {{0.0f, 0.0f}};
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;

  for (int kt = 0; kt < {key_tiles}; ++kt) {{
    const int key0 = kt * BC;
    __syncthreads();
    // The tile's keys and values, 16 bytes at a time, zero past SK and D.
    for (int c = threadIdx.x; c < BC * (DP / 8); c += 128) {{
      const int r = c / (DP / 8), cc = (c % (DP / 8)) * 8;
      const int key = key0 + r;
      uint4 kv = {{0u, 0u, 0u, 0u}}, vv = {{0u, 0u, 0u, 0u}};
      if (key < SK && cc < D) {{
        const int off = (b * SK + key) * RS + h * D + cc;
        kv = __ldg(reinterpret_cast<const uint4*>(kh + off));
        vv = __ldg(reinterpret_cast<const uint4*>(vh + off));
      }}
      *reinterpret_cast<uint4*>(ks + r * LDS + cc) = kv;
      *reinterpret_cast<uint4*>(vs + r * LDS + cc) = vv;
    }}
    __syncthreads();

    // Scores of the warp's 16 rows against the tile's keys: BC / 8 tiles of 16 x 8.
    float s[BC / 8][4];
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {{
#pragma unroll
      for (int nt = 0; nt < BC / 8; ++nt) {{
        const unsigned short* kr = ks + (nt * 8 + g) * LDS + kk * 16 + 2 * tq;
        const unsigned bf[2] = {{*reinterpret_cast<const unsigned*>(kr), *reinterpret_cast<const unsigned*>(kr + 8)}};
        mma16816(s[nt], qf[kk], bf);
      }}
    }}
    // Scale, mask, and the tile's row maxima (over the 4 lanes that share a row).
    float mx[2] = {{__int_as_float(0xff800000), __int_as_float(0xff800000)}};
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {{
#pragma unroll
      for (int r = 0; r < 4; ++r) {{
        const int key = key0 + nt * 8 + 2 * tq + (r & 1);
        const bool keep = key < SK{mask_test};
        const float x = keep ? s[nt][r] * {scale} : __int_as_float(0xff800000);
        s[nt][r] = x;
        mx[r >> 1] = fmaxf(mx[r >> 1], x);
      }}
    }}
    float alpha[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {{
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float mn = fmaxf(m[i], mx[i]);
      // A row with nothing to attend to yet keeps exponent base 0 (no inf - inf).
      base[i] = mn == __int_as_float(0xff800000) ? 0.0f : mn;
      alpha[i] = exp2f(m[i] - base[i]);
      m[i] = mn;
      l[i] *= alpha[i];
    }}
#pragma unroll
    for (int nt = 0; nt < BC / 8; ++nt) {{
#pragma unroll
      for (int r = 0; r < 4; ++r) {{
        s[nt][r] = exp2f(s[nt][r] - base[r >> 1]);
        l[r >> 1] += s[nt][r];
      }}
    }}
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {{
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }}
    // O += P V: the probabilities of 16 keys (two score tiles) are one A fragment.
#pragma unroll
    for (int kc = 0; kc < BC / 16; ++kc) {{
      const unsigned pa[4] = {{pack2(s[2 * kc][0], s[2 * kc][1]), pack2(s[2 * kc][2], s[2 * kc][3]),
                               pack2(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack2(s[2 * kc + 1][2], s[2 * kc + 1][3])}};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {{
        const unsigned short* vr = vs + (kc * 16 + 2 * tq) * LDS + dt * 8 + g;
        const unsigned bf[2] = {{unsigned(vr[0]) | (unsigned(vr[LDS]) << 16),
                                 unsigned(vr[8 * LDS]) | (unsigned(vr[9 * LDS]) << 16)}};
        mma16816(o[dt], pa, bf);
      }}
    }}
  }}

  // Normalize and store rows g and g + 8 (each lane its 2 columns of every 8).
  unsigned short* oh = reinterpret_cast<unsigned short*>(out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {{
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    const int row = row0 + g + 8 * i;
    if (row >= SQ) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {{
      *reinterpret_cast<unsigned*>(oh + (b * SQ + row) * RS + h * D + dt * 8 + 2 * tq) =
          pack2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
    }}{lse_store}
  }}
}}
"#,
        sq = spec.sq,
        sk = spec.sk,
        keys = MMA_KEYS,
        rows = MMA_ROWS,
        extra = spec.extra_params(),
        mask_test = if spec.key_mask {
            " && mask[key] != 0"
        } else {
            ""
        },
        scale = c_float(scale_log2(spec)),
        lse_store = if spec.lse {
            "\n    // The log-sum-exp in natural-log units: (m + log2 l) ln 2.\n    \
             if (tq == 0) lse[(b * gridDim.y + h) * SQ + row] =\n        \
             l[i] > 0.0f ? (m[i] + log2f(l[i])) * 0.6931471805599453f : __int_as_float(0xff800000);"
        } else {
            ""
        },
    );
    s
}

fn simt_source(spec: &AttentionSpec) -> String {
    let dtypes: BTreeSet<StorageDType> = [StorageDType::F32].into();
    let needs = Needs {
        warp_reduce: true,
        ..Needs::default()
    };
    let mut s = emit::prelude(&spec.what(), &dtypes, needs);
    let d = spec.head_dim;
    let per_lane = d.div_ceil(32);
    let key_tiles = spec.sk.div_ceil(SIMT_KEYS);
    let _ = write!(
        s,
        r#"#define SQ {sq}
#define SK {sk}
#define D {d}
#define RS {row_stride}
#define BC {keys}
// Head-dim elements per lane: lane, lane + 32, ...
#define NL {per_lane}

extern "C" __global__ void __launch_bounds__(128) {NAME}(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v{extra}) {{
  __shared__ float ks[BC * D];
  __shared__ float vs[BC * D];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y, b = blockIdx.z;
  const int row = blockIdx.x * {rows} + warp;
  // Warps past the last row still help load the tiles.
  const bool active = row < SQ;
  float qr[NL], o[NL];
#pragma unroll
  for (int j = 0; j < NL; ++j) {{
    const int c = lane + 32 * j;
    qr[j] = (active && c < D) ? q[(b * SQ + row) * RS + h * D + c] * {scale} : 0.0f;
    o[j] = 0.0f;
  }}
  float m = __int_as_float(0xff800000), l = 0.0f;
  for (int kt = 0; kt < {key_tiles}; ++kt) {{
    const int key0 = kt * BC;
    __syncthreads();
    for (int c = threadIdx.x; c < BC * D; c += 128) {{
      const int key = key0 + c / D;
      const int off = (b * SK + key) * RS + h * D + c % D;
      ks[c] = key < SK ? k[off] : 0.0f;
      vs[c] = key < SK ? v[off] : 0.0f;
    }}
    __syncthreads();
    if (!active) continue;
    const int n = min(BC, SK - key0);
    for (int j = 0; j < n; ++j) {{{mask_skip}
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < NL; ++i) {{
        const int c = lane + 32 * i;
        if (c < D) part += qr[i] * ks[j * D + c];
      }}
      const float x = group_sum<32>(part);
      const float mn = fmaxf(m, x);
      const float alpha = exp2f(m - mn), p = exp2f(x - mn);
      l = l * alpha + p;
#pragma unroll
      for (int i = 0; i < NL; ++i) {{
        const int c = lane + 32 * i;
        if (c < D) o[i] = o[i] * alpha + p * vs[j * D + c];
      }}
      m = mn;
    }}
  }}
  if (!active) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int i = 0; i < NL; ++i) {{
    const int c = lane + 32 * i;
    if (c < D) out[(b * SQ + row) * RS + h * D + c] = o[i] * inv;
  }}{lse_store}
}}
"#,
        sq = spec.sq,
        sk = spec.sk,
        row_stride = spec.heads * d,
        keys = SIMT_KEYS,
        rows = SIMT_ROWS,
        extra = spec.extra_params(),
        scale = c_float(scale_log2(spec)),
        mask_skip = if spec.key_mask {
            "\n      if (mask[key0 + j] == 0) continue;"
        } else {
            ""
        },
        lse_store = if spec.lse {
            "\n  if (lane == 0) lse[(b * gridDim.y + h) * SQ + row] =\n      \
             l > 0.0f ? (m + log2f(l)) * 0.6931471805599453f : __int_as_float(0xff800000);"
        } else {
            ""
        },
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: StorageDType, head_dim: usize) -> AttentionSpec {
        AttentionSpec {
            batch: 2,
            sq: 70,
            sk: 130,
            heads: 3,
            head_dim,
            scale: 0.125,
            dtype,
            lse: true,
            key_mask: true,
        }
    }

    #[test]
    fn sources_bake_the_shapes_and_name_what_they_do() {
        let s = attention_source(&spec(StorageDType::Bf16, 72), "fa").unwrap();
        assert!(s.contains("extern \"C\" __global__ void __launch_bounds__(128) fa("));
        assert!(
            s.contains("#define DP 80"),
            "72 pads to 80 for the k = 16 steps"
        );
        assert!(s.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        assert!(s.contains("float* __restrict__ lse, const unsigned char* __restrict__ mask"));
        let f = attention_source(&spec(StorageDType::F32, 88), "fa").unwrap();
        assert!(f.contains("#define NL 3") && !f.contains("mma.sync"));
        let h = attention_source(&spec(StorageDType::F16, 128), "fa").unwrap();
        assert!(h.contains(".f16.f16.f32") && h.contains("cuda_fp16.h"));
        assert_eq!(
            spec(StorageDType::Bf16, 64).launch_dims(),
            ([2, 3, 2], [128, 1, 1])
        );
        assert_eq!(spec(StorageDType::F32, 64).launch_dims().0, [18, 3, 2]);
    }

    #[test]
    fn unsupported_configurations_are_errors() {
        for d in [0, 60, 264] {
            assert!(
                attention_source(&spec(StorageDType::Bf16, d), "fa").is_err(),
                "{d}"
            );
        }
        let mut s = spec(StorageDType::Bf16, 64);
        s.sk = 0;
        assert!(attention_source(&s, "fa").is_err());
        s.sk = 4;
        s.scale = f32::NAN;
        assert!(attention_source(&s, "fa").is_err());
    }
}
