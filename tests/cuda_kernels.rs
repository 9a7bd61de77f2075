//! The CUDA kernels and the GPU executor, without a GPU. Every fixture model's kernels are
//! generated for f32 and bf16 storage, compiled to PTX for sm_90 with NVRTC and assembled
//! with ptxas (no register spills allowed in the bf16 plans, the ones that run). Then the
//! GPU backend's executor (`ditto_runtime::gpu::GpuExecutor`) runs every fixture on an
//! emulated device: the generated kernels in a host emulation of CUDA (tensor-core
//! `mma.sync` included), GEMMs on the CPU backend's `gemm`, through graph capture and
//! replay, against the CPU backend's own run of the same Program; and four ranks of USP and
//! CFG x Ring programs on threads, against the serial run. The flash-attention kernel is
//! also checked on its own, for every head dim and storage type, against a float64
//! reference.
//!
//! No GPU is needed. Without NVRTC the compile test says why it skipped, except under CI
//! (`CI` set), where it fails: CI installs NVRTC (see `.ci/run`), and a broken install must
//! not pass silently. The emulation needs a C++ compiler (`c++`), and skips without one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ditto::codegen::cuda::{self, cuda_plan, CudaPlan, KArg, LibraryOp, StorageDType};
use ditto::codegen::{
    Binding, KInstr, Kernel, Mesh, MeshAxis, Program, Segment, Step, Storage, Value,
};
use ditto::runtime::comm::Communicator;
use ditto::runtime::cpu::executor::CpuExecutor;
use ditto::runtime::cpu::kernels::gemm;
use ditto::runtime::gpu::{
    decode, encode, Device, DevicePtr, Gemm, GpuError, GpuExecutor, LaunchArg,
};
use ditto::{CompileOptions, HostTensor, Model, Parallel};

const ARCH: &str = "sm_90";
const FAMILIES: &[&str] = &["dit", "pixart", "sd3", "flux", "vae"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The fixture's recorded inputs, its model and the shapes they imply.
fn load(name: &str) -> (Model, BTreeMap<String, HostTensor>, ditto::Shapes) {
    let dir = fixture(name);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let io = ditto::read_tensors(&dir.join("io.safetensors")).unwrap();
    let inputs: BTreeMap<String, HostTensor> = io
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let shapes = model.family().shapes_from_inputs(&shapes).unwrap();
    (model, inputs, shapes)
}

/// Programs to cover: each family on one rank, and the transformers split over a 2 x 2
/// Ulysses x Ring mesh (shard and all-gather kernels).
fn programs() -> Vec<(String, Program)> {
    let mut out = Vec::new();
    for &name in FAMILIES {
        let (model, _, shapes) = load(name);
        let p = model
            .compile(&shapes, &CompileOptions::default())
            .unwrap()
            .program;
        out.push((name.to_string(), p));
        if name != "vae" {
            let opts = CompileOptions {
                parallel: Parallel {
                    mesh: Mesh {
                        cfg: 1,
                        ring: 2,
                        ulysses: 2,
                    },
                    ..Parallel::default()
                },
                ..CompileOptions::default()
            };
            let p = model.compile(&shapes, &opts).unwrap().program;
            out.push((format!("{name} (usp 2x2)"), p));
        }
    }
    out
}

/// The CUDA toolchain the compile tests use: NVRTC (its version and library), the headers
/// and ptxas. `None` (the test skips, saying why) without NVRTC, except under CI, which
/// must have both (installed by `.ci/run`).
struct Toolchain {
    version: (i32, i32),
    lib: PathBuf,
    include: Vec<PathBuf>,
    ptxas: Option<PathBuf>,
}

fn toolchain_or_skip() -> Option<Toolchain> {
    let (version, lib) = match cuda::nvrtc_version() {
        Ok(v) => v,
        Err(e) if !in_ci() => {
            eprintln!("skipped: NVRTC is not available here ({e})");
            return None;
        }
        Err(e) => panic!("CI must have NVRTC (installed by .ci/run): {e}"),
    };
    let ptxas = cuda::find_ptxas();
    if ptxas.is_none() && in_ci() {
        panic!("CI must have ptxas (installed by .ci/run from nvidia-cuda-nvcc)");
    }
    Some(Toolchain {
        version,
        lib,
        include: cuda::cuda_include_dirs(),
        ptxas,
    })
}

#[test]
fn fixture_kernels_compile_to_ptx() {
    let Some(Toolchain {
        version,
        lib,
        include,
        ptxas,
    }) = toolchain_or_skip()
    else {
        return;
    };
    eprintln!(
        "NVRTC {}.{} from {}; headers {:?}; ptxas {:?}",
        version.0,
        version.1,
        lib.display(),
        include,
        ptxas
    );
    let cache = cuda::KernelCache::new();
    let mut spills = Vec::new();
    for (name, program) in programs() {
        for dtype in [StorageDType::F32, StorageDType::Bf16] {
            let plan = cuda_plan(&program, dtype).unwrap_or_else(|e| panic!("{name}: {e}"));
            let before = cache.stats().compiled;
            let ptx = cache
                .compile(&plan.kernels, ARCH, &include)
                .unwrap_or_else(|e| panic!("{name} {dtype}: {e}"));
            assert_eq!(ptx.len(), plan.kernels.len());
            let launches: usize = plan.steps.iter().map(|s| s.launches.len()).sum();
            eprintln!(
                "{name} {dtype}: {} steps, {launches} launches, {} kernels ({} newly compiled)",
                program.steps.len(),
                plan.kernels.len(),
                cache.stats().compiled - before
            );
            for (k, (kname, text)) in plan.kernels.iter().zip(&ptx) {
                assert_eq!(&k.name, kname);
                assert!(
                    text.contains(&format!(".entry {kname}(")),
                    "{kname}: no entry in its PTX"
                );
                let Some(ptxas) = &ptxas else { continue };
                for f in cuda::ptxas_info(ptxas, text, ARCH).unwrap() {
                    eprintln!(
                        "  {:28} {:3} registers, {:4} B smem, {} B stack, spills {}/{}",
                        f.name,
                        f.registers,
                        f.shared_bytes,
                        f.stack_frame,
                        f.spill_stores,
                        f.spill_loads
                    );
                    // The 16-bit plans are what runs; f32 plans are for checking, and
                    // ptxas may trade a few bytes of spill for occupancy in them.
                    if dtype != StorageDType::F32 && (f.spill_stores > 0 || f.spill_loads > 0) {
                        spills.push(format!("{name} {dtype}: {}", f.name));
                    }
                }
            }
        }
    }
    assert!(
        spills.is_empty(),
        "kernels that spill registers: {spills:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Host emulation of the generated CUDA.

/// CUDA's device-side vocabulary for a host C++ compiler. Blocks run one after another; a
/// block's threads are fibers (ucontext) when the kernel synchronizes (`__syncthreads`,
/// shuffles, `mma.sync`): in each round every fiber runs until its next sync point, so the
/// lanes of a warp exchange values in step, and `__syncthreads` holds a fiber until every
/// live fiber of the block has reached it (warps may take different paths in between), so
/// shared memory (a `static`) sees CUDA's ordering. Kernels that never synchronize run
/// their threads as plain calls.
const SHIM: &str = r#"
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __align__(n) __attribute__((aligned(n)))
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned int x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

template <class T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned int i) { float f; memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double f; memcpy(&f, &i, 8); return f; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

struct __nv_bfloat16 { unsigned short x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.x) << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
struct __half { _Float16 v; };
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float2 __half22float2(__half2 h) { return float2{(float)h.x.v, (float)h.y.v}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }

namespace emu {
struct Fiber { ucontext_t ctx; std::vector<char> stack; uint3 tid; bool done; bool at_barrier; };
inline ucontext_t sched;
inline Fiber* cur = nullptr;
inline bool coop = false;
inline std::vector<float> slots;
inline void (*entry)(void**) = nullptr;
inline void** entry_args = nullptr;
inline void yield() {
  if (!coop) { fprintf(stderr, "sync in a kernel run without fibers\n"); abort(); }
  swapcontext(&cur->ctx, &sched);
}
// `__syncthreads`: this fiber waits until every live fiber of the block is at the barrier
// (a warp-level exchange, a shuffle or an mma, is a plain yield: its lanes run in step).
inline void barrier() {
  if (!coop) { fprintf(stderr, "sync in a kernel run without fibers\n"); abort(); }
  cur->at_barrier = true;
  swapcontext(&cur->ctx, &sched);
}
inline void trampoline() { entry(entry_args); cur->done = true; }
inline void launch(void (*fn)(void**), void** args, dim3 grid, dim3 block, bool cooperative) {
  gridDim = grid; blockDim = block; entry = fn; entry_args = args; coop = cooperative;
  const unsigned nt = block.x * block.y * block.z;
  std::vector<Fiber> fibers(cooperative ? nt : 0);
  for (auto& f : fibers) f.stack.resize(1 << 16);
  slots.assign(nt, 0.0f);
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    blockIdx = uint3{bx, by, bz};
    unsigned i = 0;
    for (unsigned tz = 0; tz < block.z; ++tz)
    for (unsigned ty = 0; ty < block.y; ++ty)
    for (unsigned tx = 0; tx < block.x; ++tx) {
      if (!cooperative) { threadIdx = uint3{tx, ty, tz}; fn(args); continue; }
      Fiber& f = fibers[i++];
      f.tid = uint3{tx, ty, tz}; f.done = false; f.at_barrier = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &sched;
      makecontext(&f.ctx, trampoline, 0);
    }
    for (bool left = cooperative; left;) {
      left = false;
      for (auto& f : fibers) {
        if (f.done || f.at_barrier) continue;
        cur = &f; threadIdx = f.tid;
        swapcontext(&sched, &f.ctx);
      }
      // Everyone still running waits at the barrier: release them together.
      bool all = true;
      for (auto& f : fibers) {
        if (f.done) continue;
        left = true;
        all &= f.at_barrier;
      }
      if (all) for (auto& f : fibers) f.at_barrier = false;
    }
  }
}
template <class... P, size_t... I> void call_impl(void (*k)(P...), void** a, std::index_sequence<I...>) {
  k(*reinterpret_cast<P*>(a[I])...);
}
template <class... P> void call(void (*k)(P...), void** a) { call_impl(k, a, std::index_sequence_for<P...>{}); }
}  // namespace emu

inline void __syncthreads() { emu::barrier(); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: each lane hands in its A (4 registers)
// and B (2 registers) fragments, then computes its 4 accumulators from the whole warp's,
// with the fragment layout of the PTX ISA (groupID = lane / 4, tq = lane % 4):
// A[row][k] is in lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2;
// B[k][n] in lane n * 4 + (k % 8) / 2, register k / 8, half k % 2;
// C[row][col] in lane (row % 8) * 4 + col / 2, element 2 (row / 8) + col % 2.
enum { EMU_F16 = 0, EMU_BF16 = 1 };
namespace emu { inline std::vector<uint32_t> frags; }
inline float emu_half(uint32_t x, int kind) {
  x &= 0xffffu;
  if (kind == EMU_BF16) { uint32_t u = x << 16; float f; memcpy(&f, &u, 4); return f; }
  uint16_t b = (uint16_t)x; _Float16 h; memcpy(&h, &b, 2); return (float)h;
}
inline void emu_mma_16816(float* d, const unsigned* a, const unsigned* b, int kind) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
  if (emu::frags.size() < 6u * nt) emu::frags.assign(6u * nt, 0u);
  for (int i = 0; i < 4; ++i) emu::frags[6 * t + i] = a[i];
  emu::frags[6 * t + 4] = b[0];
  emu::frags[6 * t + 5] = b[1];
  emu::yield();
  const unsigned base = t & ~31u, lane = t & 31u, g = lane >> 2, tq = lane & 3u;
  auto A = [&](unsigned row, unsigned k) {
    const uint32_t w = emu::frags[6 * (base + (row % 8) * 4 + (k % 8) / 2) + row / 8 + 2 * (k / 8)];
    return emu_half((k % 2) ? (w >> 16) : w, kind);
  };
  auto B = [&](unsigned k, unsigned n) {
    const uint32_t w = emu::frags[6 * (base + n * 4 + (k % 8) / 2) + 4 + k / 8];
    return emu_half((k % 2) ? (w >> 16) : w, kind);
  };
  float r[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * tq + (i % 2);
    float acc = d[i];
    for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    r[i] = acc;
  }
  emu::yield();
  for (int i = 0; i < 4; ++i) d[i] = r[i];
}
inline float __shfl_xor_sync(unsigned, float v, int m) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  emu::slots[t] = v;
  emu::yield();
  const float r = emu::slots[(t & ~31u) | ((t & 31u) ^ (unsigned)m)];
  emu::yield();
  return r;
}
"#;

/// Reads a launch request, runs it, writes the blobs back (see `Emulator::run`).
const MAIN: &str = r#"
static uint32_t rd32(FILE* f) { uint32_t v; if (fread(&v, 4, 1, f) != 1) abort(); return v; }
static uint64_t rd64(FILE* f) { uint64_t v; if (fread(&v, 8, 1, f) != 1) abort(); return v; }
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = fopen(argv[1], "rb");
  if (!in) return 3;
  std::vector<std::vector<char>> blobs(rd32(in));
  for (auto& b : blobs) { b.resize(rd64(in)); if (!b.empty() && fread(b.data(), 1, b.size(), in) != b.size()) abort(); }
  const uint32_t nl = rd32(in);
  for (uint32_t l = 0; l < nl; ++l) {
    const uint32_t k = rd32(in);
    dim3 grid{rd32(in), rd32(in), rd32(in)}, block{rd32(in), rd32(in), rd32(in)};
    const uint32_t na = rd32(in);
    std::vector<void*> ptrs(na); std::vector<int> ints(na); std::vector<void*> args(na);
    for (uint32_t a = 0; a < na; ++a) {
      if (rd32(in) == 0) { const uint32_t b = rd32(in); const uint64_t off = rd64(in); ptrs[a] = blobs[b].data() + off; args[a] = &ptrs[a]; }
      else { ints[a] = (int)rd32(in); args[a] = &ints[a]; }
    }
    emu::launch(KERNELS[k].fn, args.data(), grid, block, KERNELS[k].coop);
  }
  fclose(in);
  FILE* out = fopen(argv[2], "wb");
  for (auto& b : blobs) fwrite(b.data(), 1, b.size(), out);
  fclose(out);
  return 0;
}
"#;

struct Emulator {
    exe: PathBuf,
    dir: PathBuf,
    /// Kernels it holds.
    kernels: usize,
}

fn cxx() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .ok()?
        .status
        .success()
        .then_some(cxx)
}

impl Emulator {
    /// Builds one executable holding every kernel of `plan` (each in its own namespace, as
    /// each is its own NVRTC program).
    fn build(plan: &CudaPlan, dir: &Path, cxx: &str) -> Emulator {
        std::fs::create_dir_all(dir.join("include")).unwrap();
        std::fs::write(dir.join("include/emu_shim.h"), SHIM).unwrap();
        for h in ["cuda_fp16.h", "cuda_bf16.h"] {
            std::fs::write(
                dir.join("include").join(h),
                "#pragma once\n#include \"emu_shim.h\"\n",
            )
            .unwrap();
        }
        let mut tu = String::from("#include \"emu_shim.h\"\n");
        for (i, k) in plan.kernels.iter().enumerate() {
            tu.push_str(&format!("namespace k{i} {{\n{}\n}}\n", k.source));
        }
        tu.push_str(
            "struct Entry { void (*fn)(void**); bool coop; };\nstatic const Entry KERNELS[] = {\n",
        );
        for (i, k) in plan.kernels.iter().enumerate() {
            let coop = k.source.contains("__syncthreads") || k.source.contains("__shfl");
            tu.push_str(&format!(
                "  {{+[](void** a) {{ emu::call(&k{i}::{}, a); }}, {coop}}},\n",
                k.name
            ));
        }
        tu.push_str("};\n");
        tu.push_str(MAIN);
        std::fs::write(dir.join("kernels.cpp"), &tu).unwrap();
        let exe = dir.join("kernels");
        let out = Command::new(cxx)
            .args(["-std=c++17", "-O1", "-w", "-fno-strict-aliasing", "-I"])
            .arg(dir.join("include"))
            .arg(dir.join("kernels.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "host build of the kernels failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Emulator {
            exe,
            dir: dir.to_path_buf(),
            kernels: plan.kernels.len(),
        }
    }

    /// Runs `launches` over `blobs` (device memory), each argument a blob and a byte
    /// offset, or an int; the blobs come back changed.
    fn run(&self, launches: &[HostLaunch], blobs: &mut [Vec<u8>]) {
        let mut req: Vec<u8> = Vec::new();
        let w32 = |r: &mut Vec<u8>, v: u32| r.extend(v.to_le_bytes());
        let w64 = |r: &mut Vec<u8>, v: u64| r.extend(v.to_le_bytes());
        w32(&mut req, blobs.len() as u32);
        for b in blobs.iter() {
            w64(&mut req, b.len() as u64);
            req.extend_from_slice(b);
        }
        w32(&mut req, launches.len() as u32);
        for (k, grid, block, args) in launches {
            w32(&mut req, *k as u32);
            for v in grid.iter().chain(block) {
                w32(&mut req, *v);
            }
            w32(&mut req, args.len() as u32);
            for a in args {
                match *a {
                    Arg::Blob(b, off) => {
                        w32(&mut req, 0);
                        w32(&mut req, b as u32);
                        w64(&mut req, off as u64);
                    }
                    Arg::Int(v) => {
                        w32(&mut req, 1);
                        w32(&mut req, v as u32);
                    }
                }
            }
        }
        // Ranks on threads share the emulator: each call its own files.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (rq, rs) = (
            self.dir.join(format!("request{call}.bin")),
            self.dir.join(format!("response{call}.bin")),
        );
        std::fs::write(&rq, &req).unwrap();
        let st = Command::new(&self.exe).arg(&rq).arg(&rs).status().unwrap();
        assert!(st.success(), "emulated launch failed: {st}");
        let resp = std::fs::read(&rs).unwrap();
        let _ = (std::fs::remove_file(&rq), std::fs::remove_file(&rs));
        let mut at = 0;
        for b in blobs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&resp[at..at + n]);
            at += n;
        }
    }
}

/// Kernel index, grid, block and arguments of one emulated launch.
type HostLaunch = (usize, [u32; 3], [u32; 3], Vec<Arg>);

#[derive(Clone, Copy)]
enum Arg {
    Blob(usize, usize),
    Int(i32),
}

/// Bytes past each blob's end that a kernel must leave alone.
const CANARY: usize = 64;

/// Device memory of one rank: storage blobs (inputs, weights, buffers), each with a canary.
struct Memory {
    blobs: Vec<Vec<u8>>,
    inputs: usize,
    weights: usize,
}

impl Memory {
    fn new(p: &Program, plan: &CudaPlan, weights: &[Vec<f32>], inputs: &[&[f32]]) -> Memory {
        let with_canary = |mut b: Vec<u8>| {
            b.extend([0xA5; CANARY]);
            b
        };
        // Uploads convert each input to its planned type.
        let mut blobs: Vec<Vec<u8>> = inputs
            .iter()
            .zip(&plan.input_dtypes)
            .map(|(x, &d)| with_canary(encode(x, d)))
            .collect();
        blobs.extend(weights.iter().map(|w| with_canary(encode(w, plan.dtype))));
        blobs.extend(
            plan.buffer_bytes
                .iter()
                .map(|&n| with_canary(vec![0xCD; n])),
        );
        Memory {
            blobs,
            inputs: p.inputs.len(),
            weights: p.weights.len(),
        }
    }
    fn blob(&self, s: Storage) -> usize {
        match s {
            Storage::Input(i) => i,
            Storage::Weight(w) => self.inputs + w,
            Storage::Buffer(b) => self.inputs + self.weights + b,
        }
    }
    fn read(&self, p: &Program, plan: &CudaPlan, v: usize) -> Vec<f32> {
        decode(
            &self.blobs[self.blob(p.values[v].storage)],
            plan.value_dtypes[v],
            p.values[v].numel(),
        )
    }
}

/// Runs the launches of step `si` on `mem` (with `gathered` as the collective's result).
fn run_launches(
    emu: &Emulator,
    p: &Program,
    plan: &CudaPlan,
    si: usize,
    mem: &mut Memory,
    rank: usize,
    gathered: Option<Vec<u8>>,
) {
    let sp = &plan.steps[si];
    if sp.launches.is_empty() {
        return;
    }
    let scratch = mem.blobs.len();
    let mut scratch_blob = gathered.unwrap_or_else(|| vec![0xCD; sp.scratch_bytes]);
    assert_eq!(
        scratch_blob.len(),
        sp.scratch_bytes,
        "step {si}: scratch size"
    );
    scratch_blob.extend([0xA5; CANARY]);
    mem.blobs.push(scratch_blob);
    let before = mem.blobs.clone();
    let launches: Vec<_> = sp
        .launches
        .iter()
        .map(|l| {
            let args = l
                .args
                .iter()
                .map(|a| match *a {
                    KArg::Value(v) => Arg::Blob(mem.blob(p.values[v].storage), 0),
                    KArg::ValueAt { value, offset } => Arg::Blob(
                        mem.blob(p.values[value].storage),
                        offset * plan.value_dtypes[value].bytes(),
                    ),
                    KArg::Scratch => Arg::Blob(scratch, 0),
                    KArg::ScratchAt(bytes) => Arg::Blob(scratch, bytes),
                    KArg::MeshIndex(axis) => Arg::Int(p.mesh.index(rank, axis) as i32),
                })
                .collect();
            (l.kernel, l.grid, l.block, args)
        })
        .collect();
    emu.run(&launches, &mut mem.blobs);
    mem.blobs.pop();
    // Only the output's bytes may change: no kernel writes its inputs, another buffer, or
    // past the end of its output.
    let out = &p.values[p.steps[si].output()];
    let ob = mem.blob(out.storage);
    let out_bytes = out.numel() * plan.value_dtypes[p.steps[si].output()].bytes();
    for (b, (now, was)) in mem.blobs.iter().zip(&before).enumerate() {
        let same = if b == ob {
            now[out_bytes..] == was[out_bytes..]
        } else {
            now == was
        };
        assert!(
            same,
            "step {si} (`{}`) wrote outside its output",
            p.steps[si].kind()
        );
    }
}

/// A [`Device`] on the host: allocations are byte blobs (each followed by a canary no
/// kernel may touch), generated kernels run in the emulator, GEMMs on the CPU backend's
/// `gemm` (f32 accumulation, the result rounded to the storage type, as cuBLASLt does).
/// Work is queued as on a stream and runs at the next GEMM, download or synchronize;
/// capture records the queue for replay. The first `read_only` allocations (the
/// executor's weights and inputs, which it allocates first) are checked unchanged since
/// their upload after every batch of launches: no kernel writes what it reads.
struct EmulatedDevice<'a> {
    emu: &'a Emulator,
    /// With a communicator the device has collectives of its own (as NCCL gives a GPU):
    /// they move the bytes of its allocations to and from the other ranks' devices.
    comm: Option<Box<dyn Communicator>>,
    blobs: Vec<Vec<u8>>,
    read_only: usize,
    uploaded: BTreeMap<usize, Vec<u8>>,
    queue: Vec<Op>,
    recording: Option<Vec<Op>>,
    graph: Option<Vec<Op>>,
    /// Launches and GEMMs run, and graph replays.
    launches: usize,
    gemms: usize,
    replays: usize,
}

#[derive(Clone)]
enum Op {
    Launch(HostLaunch),
    Gemm(Gemm),
}

impl<'a> EmulatedDevice<'a> {
    fn new(emu: &'a Emulator, p: &Program) -> Self {
        EmulatedDevice {
            emu,
            comm: None,
            blobs: vec![],
            read_only: p.weights.len() + p.inputs.len(),
            uploaded: BTreeMap::new(),
            queue: vec![],
            recording: None,
            graph: None,
            launches: 0,
            gemms: 0,
            replays: 0,
        }
    }
    /// (allocation, byte offset) of an address.
    fn at(&self, ptr: DevicePtr) -> (usize, usize) {
        let (blob, off) = ((ptr >> 40) as usize - 1, (ptr & ((1 << 40) - 1)) as usize);
        assert!(
            blob < self.blobs.len(),
            "address {ptr:#x} is not an allocation"
        );
        (blob, off)
    }
    /// `len` bytes at `ptr`, as they are now (queued work not run).
    fn slice(&self, ptr: DevicePtr, len: usize) -> &[u8] {
        let (b, off) = self.at(ptr);
        assert!(
            off + len <= self.blobs[b].len() - CANARY,
            "read past allocation {b}"
        );
        &self.blobs[b][off..off + len]
    }
    fn read(&self, ptr: DevicePtr, d: StorageDType, n: usize) -> Vec<f32> {
        decode(self.slice(ptr, n * d.bytes()), d, n)
    }
    fn write(&mut self, ptr: DevicePtr, d: StorageDType, x: &[f32]) {
        self.put(ptr, &encode(x, d));
    }
    fn with_collectives(mut self, comm: Box<dyn Communicator>) -> Self {
        self.comm = Some(comm);
        self
    }
    /// `len` bytes at `ptr` once the queued work has run.
    fn bytes(&mut self, ptr: DevicePtr, len: usize) -> Vec<u8> {
        self.flush();
        self.slice(ptr, len).to_vec()
    }
    fn put(&mut self, ptr: DevicePtr, data: &[u8]) {
        let (b, off) = self.at(ptr);
        assert!(
            off + data.len() <= self.blobs[b].len() - CANARY,
            "write past allocation {b}"
        );
        self.blobs[b][off..off + data.len()].copy_from_slice(data);
    }
    fn enqueue(&mut self, op: Op) {
        match &mut self.recording {
            Some(r) => r.push(op),
            None => self.queue.push(op),
        }
    }
    fn flush(&mut self) {
        let queue = std::mem::take(&mut self.queue);
        let mut launches: Vec<HostLaunch> = vec![];
        for op in queue {
            match op {
                Op::Launch(l) => launches.push(l),
                Op::Gemm(g) => {
                    self.run_launches(std::mem::take(&mut launches));
                    self.run_gemm(&g);
                }
            }
        }
        self.run_launches(launches);
    }
    fn run_launches(&mut self, launches: Vec<HostLaunch>) {
        if launches.is_empty() {
            return;
        }
        self.launches += launches.len();
        self.emu.run(&launches, &mut self.blobs);
        for (i, b) in self.blobs.iter().enumerate() {
            assert!(
                b[b.len() - CANARY..].iter().all(|&c| c == 0xA5),
                "a kernel wrote past the end of allocation {i}"
            );
            if let Some(up) = self.uploaded.get(&i) {
                assert!(
                    b[..up.len()] == up[..],
                    "a kernel wrote into uploaded allocation {i}"
                );
            }
        }
    }
    fn run_gemm(&mut self, g: &Gemm) {
        self.gemms += 1;
        let d = g.dtype;
        let bias = g.bias.map(|b| self.read(b, d, g.n));
        for i in 0..g.batch {
            let off = |p: DevicePtr, stride: usize| p + (i * stride * d.bytes()) as u64;
            let a = self.read(off(g.a, g.stride_a), d, g.m * g.k);
            let b = self.read(off(g.b, g.stride_b), d, g.n * g.k);
            let mut c = vec![0.0f32; g.m * g.n];
            gemm::linear(&a, g.m, g.k, &b, g.n, bias.as_deref(), &mut c);
            let cp = off(g.c, g.stride_c);
            if g.accumulate {
                let was = self.read(cp, d, g.m * g.n);
                c.iter_mut().zip(was).for_each(|(c, w)| *c += w);
            }
            self.write(cp, d, &c);
        }
    }
}

impl Device for EmulatedDevice<'_> {
    fn describe(&self) -> String {
        "host emulation".into()
    }
    fn alloc(&mut self, bytes: usize, _what: &str) -> Result<DevicePtr, GpuError> {
        // Not zeroed (the CUDA device zeroes): a step that reads what no step wrote shows.
        let mut b = vec![0xCDu8; bytes];
        b.extend([0xA5; CANARY]);
        self.blobs.push(b);
        Ok((self.blobs.len() as u64) << 40)
    }
    fn upload(&mut self, dst: DevicePtr, data: &[u8]) -> Result<(), GpuError> {
        self.flush();
        self.put(dst, data);
        let (b, off) = self.at(dst);
        if b < self.read_only {
            assert_eq!(off, 0, "weights and inputs are uploaded whole");
            self.uploaded.insert(b, data.to_vec());
        }
        Ok(())
    }
    fn download(&mut self, src: DevicePtr, len: usize) -> Result<Vec<u8>, GpuError> {
        Ok(self.bytes(src, len))
    }
    fn load_kernels(
        &mut self,
        kernels: &[cuda::CudaKernel],
        _ptx: &[String],
    ) -> Result<(), GpuError> {
        assert_eq!(
            kernels.len(),
            self.emu.kernels,
            "the emulator holds the plan's kernels"
        );
        Ok(())
    }
    fn launch(
        &mut self,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        _shared: u32,
        args: &[LaunchArg],
    ) -> Result<(), GpuError> {
        let args = args
            .iter()
            .map(|a| match *a {
                LaunchArg::Ptr(p) => {
                    let (b, off) = self.at(p);
                    Arg::Blob(b, off)
                }
                LaunchArg::I32(v) => Arg::Int(v),
            })
            .collect();
        self.enqueue(Op::Launch((kernel, grid, block, args)));
        Ok(())
    }
    fn gemm(&mut self, g: &Gemm) -> Result<(), GpuError> {
        self.enqueue(Op::Gemm(*g));
        Ok(())
    }
    fn copy(&mut self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        let data = self.bytes(src, bytes);
        self.put(dst, &data);
        Ok(())
    }
    fn synchronize(&mut self) -> Result<(), GpuError> {
        self.flush();
        Ok(())
    }
    fn collectives(&self) -> bool {
        self.comm.is_some()
    }
    fn all_gather(
        &mut self,
        group: &ditto::runtime::comm::Group,
        send: DevicePtr,
        recv: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        let words = to_words(&self.bytes(send, bytes));
        let mut all = vec![0.0f32; words.len() * group.size()];
        self.comm
            .as_mut()
            .unwrap()
            .all_gather(group, &words, &mut all)?;
        for (i, member) in all.chunks(words.len()).enumerate() {
            let data = from_words(member, bytes);
            self.put(recv + (i * bytes) as u64, &data);
        }
        Ok(())
    }
    fn all_to_all(
        &mut self,
        group: &ditto::runtime::comm::Group,
        send: DevicePtr,
        recv: DevicePtr,
        chunk: usize,
    ) -> Result<(), GpuError> {
        let n = group.size();
        let data = self.bytes(send, n * chunk);
        let words: Vec<f32> = data.chunks(chunk).flat_map(to_words).collect();
        let mut got = vec![0.0f32; words.len()];
        self.comm
            .as_mut()
            .unwrap()
            .all_to_all(group, &words, &mut got)?;
        let per = words.len() / n;
        let data: Vec<u8> = got.chunks(per).flat_map(|w| from_words(w, chunk)).collect();
        self.put(recv, &data);
        Ok(())
    }
    fn sendrecv(
        &mut self,
        to: usize,
        send: DevicePtr,
        from: usize,
        recv: DevicePtr,
        bytes: usize,
    ) -> Result<(), GpuError> {
        let words = to_words(&self.bytes(send, bytes));
        let mut got = vec![0.0f32; words.len()];
        self.comm
            .as_mut()
            .unwrap()
            .sendrecv(to, &words, from, &mut got, 0x6465_7669)?;
        let data = from_words(&got, bytes);
        self.put(recv, &data);
        Ok(())
    }
    fn begin_capture(&mut self) -> Result<bool, GpuError> {
        self.flush();
        self.recording = Some(vec![]);
        Ok(true)
    }
    fn end_capture(&mut self) -> Result<(), GpuError> {
        self.graph = self.recording.take();
        Ok(())
    }
    fn replay(&mut self) -> Result<(), GpuError> {
        let g = self.graph.clone().expect("a captured graph");
        self.replays += 1;
        self.queue.extend(g);
        Ok(())
    }
}

/// Bytes as f32 bit patterns (the host communicator's unit), the last word zero-padded.
fn to_words(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            f32::from_bits(u32::from_le_bytes(w))
        })
        .collect()
}

fn from_words(w: &[f32], len: usize) -> Vec<u8> {
    let mut b: Vec<u8> = w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    b.truncate(len);
    b
}

/// Runs a single-rank program through the GPU backend's executor on the emulated device,
/// three times (eager, captured, replayed); every run must give the same outputs.
fn emulate(
    p: &Program,
    plan: &CudaPlan,
    emu: &Emulator,
    weights: &[Vec<f32>],
    inputs: &[&[f32]],
) -> Vec<Vec<f32>> {
    let ptx = vec![String::new(); plan.kernels.len()];
    let mut exec = GpuExecutor::new(
        Arc::new(p.clone()),
        Arc::new(plan.clone()),
        &ptx,
        weights,
        EmulatedDevice::new(emu, p),
    )
    .unwrap();
    let first = exec.run(inputs).unwrap();
    let eager = (exec.device().launches, exec.device().gemms);
    let library = plan.steps.iter().filter(|s| s.library.is_some()).count();
    assert_eq!(
        eager,
        (
            plan.steps.iter().map(|s| s.launches.len()).sum::<usize>(),
            library
        ),
        "one run enqueues every launch and every GEMM once"
    );
    for run in 1..3 {
        assert_eq!(exec.run(inputs).unwrap(), first, "run {run} differs");
    }
    assert!(exec.graph_captured());
    assert_eq!(exec.device().replays, 2, "runs 2 and 3 replay the graph");
    assert_eq!(exec.device().gemms, 3 * library);
    first
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_nan() != b.is_nan() {
                f32::INFINITY
            } else if a.is_nan() {
                0.0
            } else {
                (a - b).abs()
            }
        })
        .fold(0.0f32, f32::max);
    err / scale
}

fn emulator_or_skip(plan: &CudaPlan, tag: &str) -> Option<(Emulator, tempfile::TempDir)> {
    let Some(cxx) = cxx() else {
        eprintln!("skipped: no C++ compiler (`c++` or $CXX) for the host emulation");
        return None;
    };
    let dir = tempfile::Builder::new()
        .prefix(&format!("ditto-emu-{tag}-"))
        .tempdir()
        .unwrap();
    let emu = Emulator::build(plan, dir.path(), &cxx);
    Some((emu, dir))
}

/// Max relative error of the emulated GPU program against the CPU backend on the fixture's
/// recorded inputs.
fn emulate_fixture(name: &str, dtype: StorageDType) -> Option<f32> {
    let (model, inputs, shapes) = load(name);
    let program = model
        .compile(&shapes, &CompileOptions::default())
        .unwrap()
        .program;
    let weights = model.load_weights(&program).unwrap();
    let plan = cuda_plan(&program, dtype).unwrap();
    let (emu, _dir) = emulator_or_skip(&plan, name)?;
    let bound: Vec<&[f32]> = program
        .inputs
        .iter()
        .map(|b| inputs[&b.name].data.as_slice())
        .collect();
    let got = emulate(&program, &plan, &emu, &weights, &bound);
    let mut cpu = CpuExecutor::new(Arc::new(program.clone()), weights.clone()).unwrap();
    let want = cpu.run(&bound).unwrap();
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| max_rel_err(g, w))
        .fold(0.0f32, f32::max);
    eprintln!("{name} {dtype}: emulated GPU vs CPU max relative error {err:.2e}");
    Some(err)
}

/// Every transformer fixture split over a 2 x 2 Ulysses x Ring mesh, CFG 2 x Ring 2 where
/// its batch is a CFG pair, and PixArt over Ulysses 3 (padding heads and rows): executors
/// on emulated devices, one per rank on
/// threads, against the serial CPU run; with the collectives staged through the host
/// communicator, and with devices that have collectives of their own (as NCCL gives).
#[test]
fn emulated_multi_rank_programs_match_the_serial_cpu_run() {
    for &name in &FAMILIES[..4] {
        let (model, inputs, shapes) = load(name);
        let serial = model
            .compile(&shapes, &CompileOptions::default())
            .unwrap()
            .program;
        let bind = |p: &Program| -> Vec<Vec<f32>> {
            p.inputs
                .iter()
                .map(|b| inputs[&b.name].data.clone())
                .collect()
        };
        let serial_inputs = bind(&serial);
        let serial_bound: Vec<&[f32]> = serial_inputs.iter().map(|v| v.as_slice()).collect();
        let weights = model.load_weights(&serial).unwrap();
        let want = CpuExecutor::new(Arc::new(serial.clone()), weights)
            .unwrap()
            .run(&serial_bound)
            .unwrap();
        let mut meshes = vec![Mesh {
            cfg: 1,
            ring: 2,
            ulysses: 2,
        }];
        if shapes.batch % 2 == 0 {
            meshes.push(Mesh {
                cfg: 2,
                ring: 2,
                ulysses: 1,
            });
        }
        if name == "pixart" {
            // 4 heads over 3 members: 2 each, the last member's both padding.
            meshes.push(Mesh {
                cfg: 1,
                ring: 1,
                ulysses: 3,
            });
        }
        for mesh in meshes {
            let opts = CompileOptions {
                parallel: Parallel {
                    mesh,
                    ..Parallel::default()
                },
                ..CompileOptions::default()
            };
            let program = Arc::new(model.compile(&shapes, &opts).unwrap().program);
            let weights = model.load_weights(&program).unwrap();
            let bound_inputs = bind(&program);
            for (dtype, tol) in [(StorageDType::F32, 1e-4f32), (StorageDType::Bf16, 3e-2)] {
                let plan = Arc::new(cuda_plan(&program, dtype).unwrap());
                let Some((emu, _dir)) = emulator_or_skip(&plan, name) else {
                    return;
                };
                for on_device in [false, true] {
                    let outs = run_emulated_ranks(
                        &emu,
                        &program,
                        &plan,
                        &weights,
                        &bound_inputs,
                        on_device,
                    )
                    .unwrap_or_else(|e| panic!("{name} {dtype}: {e}"));
                    for (rank, (out, sent, attentions)) in outs.iter().enumerate() {
                        let err = out
                            .iter()
                            .zip(&want)
                            .map(|(g, w)| max_rel_err(g, w))
                            .fold(0.0f32, f32::max);
                        eprintln!(
                            "{name} {mesh:?} {dtype}, collectives on the device: {on_device}, \
                             rank {rank}: max rel err {err:.2e} vs serial, {sent} bytes \
                             through the host, {attentions} parallel attentions"
                        );
                        assert!(err < tol, "{name} {mesh:?} {dtype} rank {rank}: {err:e}");
                        assert!(*attentions > 0, "{name}: no parallel attention ran");
                    }
                }
            }
        }
    }
}

/// One rank's outputs, bytes sent through the host communicator, parallel attentions.
type RankRun = (Vec<Vec<f32>>, u64, u64);

/// Every rank of `program` on its own emulated device, on threads with the in-process
/// communicator; per rank its outputs, the bytes it sent through the host communicator
/// and its parallel attentions. With `on_device` the devices get collectives of their own
/// (over a second in-process world).
fn run_emulated_ranks(
    emu: &Emulator,
    program: &Arc<Program>,
    plan: &Arc<CudaPlan>,
    weights: &[Vec<f32>],
    inputs: &[Vec<f32>],
    on_device: bool,
) -> Result<Vec<RankRun>, ditto::runtime::comm::RankError> {
    use ditto::runtime::comm::{in_process_world, run_ranks};
    let world = program.mesh.world_size();
    let timeout = std::time::Duration::from_secs(300);
    let device_comms = std::sync::Mutex::new(
        in_process_world(world, timeout)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
    );
    let ptx = vec![String::new(); plan.kernels.len()];
    run_ranks(world, timeout, |comm| {
        let rank = comm.rank();
        let mut device = EmulatedDevice::new(emu, program);
        let own = device_comms.lock().unwrap()[rank].take().unwrap();
        if on_device {
            device = device.with_collectives(Box::new(own));
        }
        let mut e = GpuExecutor::with_comm(
            program.clone(),
            plan.clone(),
            &ptx,
            weights,
            device,
            rank,
            Box::new(comm),
        )?;
        let bound: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let out = e.run(&bound)?;
        let sent = e.comm_stats().map_or(0, |s| s.total_bytes());
        Ok::<_, GpuError>((out, sent, e.parallel_stats().seq_attentions))
    })
}

#[test]
fn emulated_fixture_kernels_match_the_cpu_backend_f32() {
    for &name in FAMILIES {
        let Some(err) = emulate_fixture(name, StorageDType::F32) else {
            return;
        };
        assert!(err < 1e-4, "{name} f32: {err:e}");
    }
}

#[test]
fn emulated_fixture_kernels_match_the_cpu_backend_bf16() {
    // bf16 storage of every weight and intermediate: a few bf16 ulps (2^-8) per layer.
    for &name in FAMILIES {
        let Some(err) = emulate_fixture(name, StorageDType::Bf16) else {
            return;
        };
        assert!(err < 3e-2, "{name} bf16: {err:e}");
    }
}

// ---------------------------------------------------------------------------------------
// Single steps the fixtures do not reach: long rows (streamed, split group norm), rows that
// do not divide into vectors, softmax, fill, copies, transposes.

/// A one-rank program: inputs, then `steps` over values with a buffer each.
struct Build {
    p: Program,
}

impl Build {
    fn new() -> Build {
        Build {
            p: Program {
                format_version: ditto::codegen::program::FORMAT_VERSION,
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
    fn input(&mut self, shape: &[usize]) -> usize {
        self.p.inputs.push(Binding {
            name: format!("x{}", self.p.inputs.len()),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.p.values.push(Value {
            storage: Storage::Input(self.p.inputs.len() - 1),
            shape: shape.to_vec(),
        });
        self.p.values.len() - 1
    }
    fn weight(&mut self, shape: &[usize]) -> usize {
        self.p.weights.push(Binding {
            name: format!("w{}", self.p.weights.len()),
            shape: shape.to_vec(),
            dtype: "f32".into(),
        });
        self.p.values.push(Value {
            storage: Storage::Weight(self.p.weights.len() - 1),
            shape: shape.to_vec(),
        });
        self.p.values.len() - 1
    }
    fn buffer(&mut self, shape: &[usize]) -> usize {
        self.p.buffers.push(shape.iter().product::<usize>().max(1));
        self.p.values.push(Value {
            storage: Storage::Buffer(self.p.buffers.len() - 1),
            shape: shape.to_vec(),
        });
        self.p.values.len() - 1
    }
    fn step(&mut self, s: Step) {
        self.p.steps.push(s);
    }
    fn output(&mut self, v: usize) {
        self.p
            .outputs
            .push((format!("y{}", self.p.outputs.len()), v));
    }
}

fn inputs_for(p: &Program, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed;
    p.inputs
        .iter()
        .map(|b| {
            (0..b.shape.iter().product::<usize>())
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 2.0
                })
                .collect()
        })
        .collect()
}

#[test]
fn emulated_single_steps_match_the_cpu_backend() {
    let mut b = Build::new();
    // Layer norm over long rows (streamed), rows of 1001 (no vectors, a tail), group norm
    // split across blocks (rows of 10000 in 3 chunks), softmax, RMS norm in lane groups.
    let x = b.input(&[3, 40000]);
    let y = b.buffer(&[3, 40000]);
    b.step(Step::LayerNorm {
        x,
        out: y,
        rows: 3,
        cols: 40000,
        eps: 1e-6,
    });
    b.output(y);
    let x = b.input(&[5, 1001]);
    let y = b.buffer(&[5, 1001]);
    b.step(Step::LayerNorm {
        x,
        out: y,
        rows: 5,
        cols: 1001,
        eps: 1e-5,
    });
    b.output(y);
    let y2 = b.buffer(&[5, 1001]);
    b.step(Step::Softmax {
        x,
        out: y2,
        rows: 5,
        cols: 1001,
    });
    b.output(y2);
    let x = b.input(&[2, 8, 50, 50]);
    let y = b.buffer(&[2, 8, 50, 50]);
    b.step(Step::GroupNorm {
        x,
        out: y,
        n: 2,
        c: 8,
        hw: 2500,
        groups: 2,
        eps: 1e-6,
    });
    b.output(y);
    let x = b.input(&[37, 24]);
    let y = b.buffer(&[37, 24]);
    b.step(Step::RmsNorm {
        x,
        out: y,
        rows: 37,
        cols: 24,
        eps: 1e-6,
    });
    b.output(y);
    let y = b.buffer(&[37, 24]);
    b.step(Step::Softmax {
        x,
        out: y,
        rows: 37,
        cols: 24,
    });
    b.output(y);
    let x = b.input(&[2, 3000]);
    let y = b.buffer(&[2, 3000]);
    b.step(Step::Softmax {
        x,
        out: y,
        rows: 2,
        cols: 3000,
    });
    b.output(y);
    // A block per row without a tail (1152 = 288 x 4 = 144 x 8), and 32-lane groups.
    let x = b.input(&[3, 1152]);
    let y = b.buffer(&[3, 1152]);
    b.step(Step::LayerNorm {
        x,
        out: y,
        rows: 3,
        cols: 1152,
        eps: 1e-6,
    });
    b.output(y);
    let x = b.input(&[9, 256]);
    let y = b.buffer(&[9, 256]);
    b.step(Step::RmsNorm {
        x,
        out: y,
        rows: 9,
        cols: 256,
        eps: 1e-6,
    });
    b.output(y);
    // Transposes: the contiguous axis moves (tiles with edges), and a batch of them.
    let x = b.input(&[3, 45, 70]);
    let y = b.buffer(&[3, 70, 45]);
    b.step(Step::Permute {
        x,
        out: y,
        perm: vec![0, 2, 1],
    });
    b.output(y);
    let x = b.input(&[2, 5, 6, 7]);
    let y = b.buffer(&[7, 5, 2, 6]);
    b.step(Step::Permute {
        x,
        out: y,
        perm: vec![3, 1, 0, 2],
    });
    b.output(y);
    // Concat whose pieces do not divide into vectors; a slice; fill; copy; upsampling.
    let a = b.input(&[2, 3, 5]);
    let c = b.input(&[2, 4, 5]);
    let y = b.buffer(&[2, 7, 5]);
    b.step(Step::Concat {
        inputs: vec![a, c],
        axis: 1,
        out: y,
    });
    b.output(y);
    let y = b.buffer(&[2, 2, 5]);
    b.step(Step::Slice {
        x: c,
        axis: 1,
        start: 1,
        end: 3,
        out: y,
    });
    b.output(y);
    let y = b.buffer(&[3, 7]);
    b.step(Step::Fill {
        out: y,
        value: -2.5,
    });
    b.output(y);
    let y = b.buffer(&[2, 3, 5]);
    b.step(Step::Copy { x: a, out: y });
    b.output(y);
    let x = b.input(&[1, 2, 3, 5]);
    let y = b.buffer(&[1, 2, 9, 15]);
    b.step(Step::UpsampleNearest {
        x,
        out: y,
        factor: 3,
    });
    b.output(y);
    // A fused kernel with every instruction, an argument broadcast along the rows.
    let p0 = b.input(&[4, 16]);
    let p1 = b.input(&[16]);
    let y = b.buffer(&[4, 16]);
    use KInstr::*;
    b.p.kernels.push(Kernel {
        name: "k0_all_ops".into(),
        num_args: 2,
        body: vec![
            Arg(0),
            Arg(1),
            Add(0, 1),
            Sub(2, 1),
            Mul(3, 0),
            Const(0.5),
            Div(4, 5),
            Neg(6),
            Silu(7),
            GeluTanh(8),
            Gelu(9),
            Sigmoid(10),
            Tanh(11),
            Exp(12),
            Add(13, 3),
        ],
        source: String::new(),
    });
    b.step(Step::Fused {
        kernel: 0,
        args: vec![p0, p1],
        out: y,
    });
    b.output(y);
    // Timestep embeddings of an odd width and with SD's shift; an embedding table whose
    // rows do not divide into vectors.
    let t = b.input(&[3]);
    let y = b.buffer(&[3, 7]);
    b.step(Step::TimestepEmbedding {
        t,
        out: y,
        dim: 7,
        flip_sin_to_cos: false,
        downscale_freq_shift: 1.0,
        scale: 2.0,
    });
    b.output(y);
    let y = b.buffer(&[3, 320]);
    b.step(Step::TimestepEmbedding {
        t,
        out: y,
        dim: 320,
        flip_sin_to_cos: true,
        downscale_freq_shift: 1.0,
        scale: 1.0,
    });
    b.output(y);
    let table = b.weight(&[5, 7]);
    let idx = b.input(&[4]);
    let y = b.buffer(&[4, 7]);
    b.step(Step::Embedding { table, idx, out: y });
    b.output(y);
    // Convolutions (im2col into scratch, the bias, then the batched GEMM): 3 x 3 with
    // padding over a batch of 2 and a width that is not the height, and a 2 x 2 patch
    // embedding with stride 2. A linear layer with a bias (the GEMM's epilogue).
    for (xs, ws, stride, pad) in [
        ([2, 3, 7, 6], [5, 3, 3, 3], 1, 1),
        ([1, 4, 8, 8], [6, 4, 2, 2], 2, 0),
    ] {
        let x = b.input(&xs);
        let w = b.weight(&ws);
        let bias = b.weight(&[ws[0]]);
        let span = |n: usize, k: usize| (n + 2 * pad - k) / stride + 1;
        let y = b.buffer(&[xs[0], ws[0], span(xs[2], ws[2]), span(xs[3], ws[3])]);
        b.step(Step::Conv2d {
            x,
            w,
            b: bias,
            out: y,
            stride,
            pad,
        });
        b.output(y);
    }
    let x = b.input(&[5, 24]);
    let w = b.weight(&[7, 24]);
    let bias = b.weight(&[7]);
    let y = b.buffer(&[5, 7]);
    b.step(Step::Linear {
        x,
        w,
        b: Some(bias),
        out: y,
        m: 5,
        k: 24,
        n: 7,
    });
    b.output(y);

    let p = b.p;
    let mut inputs = inputs_for(&p, 0x1234_5678_9abc_def1);
    let input_of = |v: usize| match p.values[v].storage {
        Storage::Input(i) => i,
        _ => unreachable!(),
    };
    inputs[input_of(t)] = vec![0.0, 17.5, 999.0];
    inputs[input_of(idx)] = vec![3.0, 0.0, 4.0, 1.0];
    let weights: Vec<Vec<f32>> = p
        .weights
        .iter()
        .enumerate()
        .map(|(w, b)| {
            (0..b.shape.iter().product::<usize>())
                .map(|i| (i as f32 * 0.37 + w as f32).cos())
                .collect()
        })
        .collect();
    let bound: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
    let mut cpu = CpuExecutor::new(Arc::new(p.clone()), Arc::new(weights.clone())).unwrap();
    let want = cpu.run(&bound).unwrap();
    for dtype in [StorageDType::F32, StorageDType::Bf16] {
        let plan = cuda_plan(&p, dtype).unwrap();
        let Some((emu, _dir)) = emulator_or_skip(&plan, "steps") else {
            return;
        };
        let got = emulate(&p, &plan, &emu, &weights, &bound);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = max_rel_err(g, w);
            let tol = if dtype == StorageDType::F32 {
                2e-5
            } else {
                2e-2
            };
            assert!(
                err < tol,
                "{dtype}: step {i} (`{}`): {err:e}",
                p.steps[i].kind()
            );
        }
    }
}

#[test]
fn emulated_shard_and_gather_round_trip() {
    // Two members split axis 1 of [2, 10, 8]: a segment of 7 rows (padded to 2 x 4) and one
    // of 3 (padded to 2 x 2). Each rank shards with its own index; the gathered locals
    // reassemble x. x is a weight, so it is stored as the plan's type.
    let segs = vec![
        Segment { local: 4, valid: 7 },
        Segment { local: 2, valid: 3 },
    ];
    let mut b = Build::new();
    b.p.mesh = Mesh {
        cfg: 1,
        ring: 1,
        ulysses: 2,
    };
    let x = b.weight(&[2, 10, 8]);
    let l = b.buffer(&[2, 6, 8]);
    let y = b.buffer(&[2, 10, 8]);
    let common = (1, MeshAxis::Ulysses, 2, segs.clone());
    b.step(Step::Shard {
        x,
        out: l,
        axis: common.0,
        mesh: common.1,
        parts: common.2,
        segments: common.3.clone(),
    });
    b.step(Step::AllGather {
        x: l,
        out: y,
        axis: common.0,
        mesh: common.1,
        parts: common.2,
        segments: common.3,
    });
    b.output(y);
    let p = b.p;
    let mut x_data = vec![];
    for i in 0..160 {
        x_data.push((i as f32 * 0.731).sin() * 3.0);
    }
    let weights = vec![x_data];
    for dtype in [StorageDType::F32, StorageDType::Bf16] {
        let plan = cuda_plan(&p, dtype).unwrap();
        assert_eq!(plan.steps[1].library, Some(LibraryOp::Collective));
        let Some((emu, _dir)) = emulator_or_skip(&plan, "shard") else {
            return;
        };
        let mut mems: Vec<Memory> = (0..2)
            .map(|_| Memory::new(&p, &plan, &weights, &[]))
            .collect();
        for (r, m) in mems.iter_mut().enumerate() {
            run_launches(&emu, &p, &plan, 0, m, r, None);
        }
        let locals: Vec<Vec<f32>> = mems.iter().map(|m| m.read(&p, &plan, l)).collect();
        // Member 1 holds rows 4..7 of segment 0 (then a zero row) and row 2 of segment 1
        // (then a zero row).
        let row = |v: &[f32], b: usize, r: usize, n: usize| {
            v[(b * n + r) * 8..(b * n + r + 1) * 8].to_vec()
        };
        assert_eq!(plan.value_dtypes[l], dtype);
        let xr = |r: usize| {
            row(&weights[0], 1, r, 10)
                .iter()
                .map(|&v| decode(&encode(&[v], dtype), dtype, 1)[0])
                .collect::<Vec<_>>()
        };
        assert_eq!(row(&locals[1], 1, 0, 6), xr(4));
        assert_eq!(row(&locals[1], 1, 3, 6), vec![0.0; 8]);
        assert_eq!(row(&locals[1], 1, 4, 6), xr(9));
        assert_eq!(row(&locals[1], 1, 5, 6), vec![0.0; 8]);
        let gathered: Vec<u8> = mems
            .iter()
            .flat_map(|m| {
                m.blobs[m.blob(p.values[l].storage)][..plan.value_dtypes[l].bytes() * 96].to_vec()
            })
            .collect();
        for (r, m) in mems.iter_mut().enumerate() {
            run_launches(&emu, &p, &plan, 1, m, r, Some(gathered.clone()));
            let got = m.read(&p, &plan, y);
            let want = decode(&encode(&weights[0], dtype), dtype, 160);
            assert_eq!(got, want, "{dtype} rank {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The flash-attention kernel on its own: every head dim and storage type, with the
// log-sum-exp and a key-padding mask, query and key counts that leave partial tiles.

/// The value of `x` once stored as `d`.
fn rounded(x: &[f32], d: StorageDType) -> Vec<f32> {
    decode(&encode(x, d), d, x.len())
}

/// Float64 attention of `[B, S, H*D]` tensors (keys where `mask` is true) and the
/// natural-log LSE `[B, H, SQ]`.
#[allow(clippy::too_many_arguments)]
fn attention_f64(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    spec: &cuda::AttentionSpec,
    mask: &[bool],
) -> (Vec<f64>, Vec<f64>) {
    let (b, sq, sk, h, d) = (spec.batch, spec.sq, spec.sk, spec.heads, spec.head_dim);
    let mut out = vec![0.0f64; b * sq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * sq];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..sq {
                let qi = &q[((bi * sq + i) * h + hi) * d..][..d];
                let scores: Vec<Option<f64>> = (0..sk)
                    .map(|j| {
                        mask[j].then(|| {
                            let kj = &k[((bi * sk + j) * h + hi) * d..][..d];
                            qi.iter()
                                .zip(kj)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                                * spec.scale as f64
                        })
                    })
                    .collect();
                let m = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = scores.iter().flatten().map(|x| (x - m).exp()).sum();
                lse[(bi * h + hi) * sq + i] = m + z.ln();
                let o = &mut out[((bi * sq + i) * h + hi) * d..][..d];
                for (j, sc) in scores.iter().enumerate() {
                    let Some(sc) = sc else { continue };
                    let p = (sc - m).exp() / z;
                    let vj = &v[((bi * sk + j) * h + hi) * d..][..d];
                    for (oo, &vv) in o.iter_mut().zip(vj) {
                        *oo += p * vv as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

fn attention_specs() -> Vec<cuda::AttentionSpec> {
    let mut specs = Vec::new();
    for dtype in [StorageDType::Bf16, StorageDType::F16, StorageDType::F32] {
        for &head_dim in &cuda::HEAD_DIMS {
            // The SIMT kernel runs a warp per row: fewer rows keep the emulation quick.
            let (sq, sk) = match dtype {
                StorageDType::F32 => (9, 45),
                _ => (70, 100),
            };
            specs.push(cuda::AttentionSpec {
                batch: 1,
                sq,
                sk,
                heads: 2,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                dtype,
                lse: true,
                key_mask: true,
            });
        }
    }
    specs
}

/// The kernel in the emulator against float64 on the same (storage-rounded) inputs, for
/// every head dim and storage type; and a key mask that hides every key.
#[test]
fn emulated_attention_kernels_match_float64() {
    let specs = attention_specs();
    let kernels: Vec<ditto::codegen::cuda::CudaKernel> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let name = format!("attention_{i}");
            let source = cuda::attention_source(spec, &name).unwrap();
            ditto::codegen::cuda::CudaKernel {
                hash: cuda::kernel_hash(&source),
                name,
                source,
            }
        })
        .collect();
    let plan = CudaPlan {
        dtype: StorageDType::Bf16,
        value_dtypes: vec![],
        input_dtypes: vec![],
        buffer_bytes: vec![],
        kernels,
        steps: vec![],
    };
    let Some((emu, _dir)) = emulator_or_skip(&plan, "attention") else {
        return;
    };
    for (i, spec) in specs.iter().enumerate() {
        let n_q = spec.batch * spec.sq * spec.heads * spec.head_dim;
        let n_k = spec.batch * spec.sk * spec.heads * spec.head_dim;
        let mut b = Build::new();
        let (q, k) = (b.input(&[n_q]), b.input(&[n_k]));
        b.input(&[n_k]);
        let data = inputs_for(&b.p, 7 + i as u64);
        let [q, k, v] = [&data[q], &data[k], &data[k + 1]].map(|x| rounded(x, spec.dtype));
        for all_masked in [false, true] {
            // Every fifth key is padding (or all of them).
            let mask: Vec<bool> = (0..spec.sk).map(|j| !all_masked && j % 5 != 3).collect();
            let mut blobs = vec![
                vec![0u8; n_q * spec.dtype.bytes() + CANARY],
                encode(&q, spec.dtype),
                encode(&k, spec.dtype),
                encode(&v, spec.dtype),
                vec![0u8; 4 * spec.batch * spec.heads * spec.sq],
                mask.iter().map(|&m| m as u8).collect(),
            ];
            let (grid, block) = spec.launch_dims();
            let args = (0..6).map(|b| Arg::Blob(b, 0)).collect();
            emu.run(&[(i, grid, block, args)], &mut blobs);
            assert!(
                blobs[0][n_q * spec.dtype.bytes()..].iter().all(|&x| x == 0),
                "{spec:?}: wrote past the output"
            );
            let got = decode(&blobs[0], spec.dtype, n_q);
            let got_lse = decode(&blobs[4], StorageDType::F32, blobs[4].len() / 4);
            let (want, want_lse) = attention_f64(&q, &k, &v, spec, &mask);
            let scale = want.iter().fold(1e-30f64, |a, x| a.max(x.abs()));
            let err = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| (g as f64 - w).abs())
                .fold(0.0f64, f64::max)
                / scale;
            let lse_err = got_lse
                .iter()
                .zip(&want_lse)
                .map(|(&g, &w)| {
                    if w.is_infinite() && (g as f64) == w {
                        0.0
                    } else {
                        (g as f64 - w).abs()
                    }
                })
                .fold(0.0f64, f64::max);
            // 16-bit storage rounds the probabilities and the output (2^-8 for bf16).
            let tol = match spec.dtype {
                StorageDType::Bf16 => 1.5e-2,
                StorageDType::F16 => 2e-3,
                StorageDType::F32 => 1e-5,
            };
            eprintln!(
                "attention d{} {} {}: max rel err {err:.2e}, LSE max abs err {lse_err:.2e}",
                spec.head_dim,
                spec.dtype,
                if all_masked { "(all keys masked)" } else { "" }
            );
            if all_masked {
                assert!(got.iter().all(|&x| x == 0.0), "{spec:?}: masked rows");
                assert!(got_lse.iter().all(|&x| x == f32::NEG_INFINITY));
            } else {
                assert!(err <= tol, "{spec:?}: {err:e}");
                assert!(lse_err <= 1e-4, "{spec:?}: LSE {lse_err:e}");
            }
        }
    }
}

/// Every attention variant compiles to sm_90 PTX and assembles without register spills.
#[test]
fn attention_kernels_compile_without_spills() {
    let Some(Toolchain {
        version,
        include,
        ptxas,
        ..
    }) = toolchain_or_skip()
    else {
        return;
    };
    eprintln!("NVRTC {}.{}", version.0, version.1);
    let mut specs = attention_specs();
    // Production sizes: PixArt-Sigma at 1024 px (4096 tokens, 16 heads of 72) and Flux
    // (4608 tokens, 24 heads of 128), without the optional outputs.
    for (seq, heads, head_dim) in [(4096, 16, 72), (4608, 24, 128)] {
        specs.push(cuda::AttentionSpec {
            batch: 2,
            sq: seq,
            sk: seq,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            dtype: StorageDType::Bf16,
            lse: false,
            key_mask: false,
        });
    }
    let mut spills = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let name = format!("attention_{i}");
        let source = cuda::attention_source(spec, &name).unwrap();
        let kernel = ditto::codegen::cuda::CudaKernel {
            hash: cuda::kernel_hash(&source),
            name: name.clone(),
            source,
        };
        let ptx = cuda::compile_ptx(std::slice::from_ref(&kernel), ARCH, &include)
            .unwrap_or_else(|e| panic!("{spec:?}: {e}"))
            .remove(0)
            .1;
        assert!(ptx.contains(&format!(".entry {name}(")));
        if spec.dtype != StorageDType::F32 {
            assert!(ptx.contains("mma.sync.aligned.m16n8k16"), "{spec:?}");
        }
        let Some(ptxas) = &ptxas else { continue };
        for f in cuda::ptxas_info(ptxas, &ptx, ARCH).unwrap() {
            eprintln!(
                "d{} {}: {} registers, {} B smem, spills {}/{}",
                spec.head_dim,
                spec.dtype,
                f.registers,
                f.shared_bytes,
                f.spill_stores,
                f.spill_loads
            );
            if f.spill_stores > 0 || f.spill_loads > 0 {
                spills.push(format!("{spec:?}"));
            }
        }
    }
    assert!(
        spills.is_empty(),
        "attention kernels that spill: {spills:?}"
    );
}
