//! `ditto bench kernels`: every generated kernel of a model's CUDA plan timed on the GPU,
//! with its bandwidth against the device's own copy bandwidth (the roofline of a
//! memory-bound kernel), and the flash-attention kernel's TFLOP/s at the head dims and
//! sequence lengths DiTs use.
//!
//! Each kernel runs on its first launch's arguments, in one arena of device memory filled
//! with a finite pattern (a kernel's speed does not depend on the values; the arena is
//! carved per kernel, so the benchmark needs only the largest kernel's memory, not the
//! model's). Bytes moved are the sizes of the values the launch reads and writes, once
//! each: what a kernel that touches every element once must move.

use std::collections::BTreeMap;

use ditto_codegen::cuda::{
    attention_source, compile_ptx, cuda_include_dirs, AttentionSpec, CudaKernel, CudaPlan, KArg,
    Launch, StorageDType,
};
use ditto_codegen::{Program, ValueId};
use ditto_runtime::gpu::{CudaDevice, Device, DevicePtr, GpuError, LaunchArg};
use serde::Serialize;

use crate::Error;

/// One kernel of a plan: its first launch and what it moves.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCase {
    pub kernel: usize,
    pub name: String,
    /// Launches of it in one forward pass.
    pub launches: usize,
    pub launch: Launch,
    /// Distinct values the launch reads or writes, with their bytes.
    pub values: Vec<(ValueId, usize)>,
    /// Scratch bytes of the launch's step, when the launch uses the scratch.
    pub scratch: usize,
}

impl KernelCase {
    /// Bytes read and written, each value once.
    pub fn bytes(&self) -> usize {
        self.values.iter().map(|(_, b)| b).sum::<usize>() + self.scratch
    }
}

/// The kernels of `plan` (each once, on its first launch), attention kernels excepted
/// (they are compute-bound: see [`attention_specs`]).
pub fn kernel_cases(program: &Program, plan: &CudaPlan) -> Vec<KernelCase> {
    let mut count = vec![0usize; plan.kernels.len()];
    let mut first: BTreeMap<usize, (usize, &Launch)> = BTreeMap::new();
    for (si, step) in plan.steps.iter().enumerate() {
        for l in &step.launches {
            count[l.kernel] += 1;
            first.entry(l.kernel).or_insert((si, l));
        }
    }
    first
        .into_iter()
        .filter(|(k, _)| !plan.kernels[*k].name.starts_with("flash_attention"))
        .map(|(k, (si, l))| {
            let mut values: Vec<(ValueId, usize)> = Vec::new();
            let mut scratch = 0;
            for a in &l.args {
                match *a {
                    KArg::Value(v) | KArg::ValueAt { value: v, .. } => {
                        if !values.iter().any(|(x, _)| *x == v) {
                            values.push((
                                v,
                                program.values[v].numel() * plan.value_dtypes[v].bytes(),
                            ));
                        }
                    }
                    KArg::Scratch | KArg::ScratchAt(_) => scratch = plan.steps[si].scratch_bytes,
                    KArg::MeshIndex(_) => {}
                }
            }
            KernelCase {
                kernel: k,
                name: plan.kernels[k].name.clone(),
                launches: count[k],
                launch: l.clone(),
                values,
                scratch,
            }
        })
        .collect()
}

/// The attention shapes of the kernel table: head dims 64, 72 and 128 at 4096 and 16384
/// tokens (PixArt / SD3 at 1024 px and at 2048 px), 24 heads, batch 1, `dtype` storage.
pub fn attention_specs(dtype: StorageDType) -> Vec<AttentionSpec> {
    let mut specs = Vec::new();
    for head_dim in [64, 72, 128] {
        for seq in [4096, 16384] {
            specs.push(AttentionSpec {
                batch: 1,
                sq: seq,
                sk: seq,
                heads: 24,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                dtype,
                lse: false,
                key_mask: false,
            });
        }
    }
    specs
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub name: String,
    pub launches: usize,
    pub bytes: usize,
    pub us: f64,
    pub gb_s: f64,
    /// Of the measured copy bandwidth.
    pub fraction_of_copy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttentionRow {
    pub head_dim: usize,
    pub seq: usize,
    pub heads: usize,
    pub ms: f64,
    pub tflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelBenchReport {
    pub device: String,
    pub dtype: String,
    /// Device-to-device copy, bytes read + written per second.
    pub copy_gb_s: f64,
    /// Slowest per forward pass (time x launches) first.
    pub kernels: Vec<KernelRow>,
    pub attention: Vec<AttentionRow>,
}

impl std::fmt::Display for KernelBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({} storage); copy bandwidth {:.0} GB/s (read + write)",
            self.device, self.dtype, self.copy_gb_s
        )?;
        writeln!(
            f,
            "{:<44} {:>8} {:>12} {:>10} {:>9} {:>7}",
            "kernel", "launches", "bytes", "us", "GB/s", "of copy"
        )?;
        for k in &self.kernels {
            writeln!(
                f,
                "{:<44} {:>8} {:>12} {:>10.2} {:>9.0} {:>6.0}%",
                k.name,
                k.launches,
                k.bytes,
                k.us,
                k.gb_s,
                100.0 * k.fraction_of_copy
            )?;
        }
        writeln!(
            f,
            "{:<10} {:>6} {:>6} {:>10} {:>9}",
            "attention", "seq", "heads", "ms", "TFLOP/s"
        )?;
        for a in &self.attention {
            writeln!(
                f,
                "hd {:<7} {:>6} {:>6} {:>10.3} {:>9.1}",
                a.head_dim, a.seq, a.heads, a.ms, a.tflops
            )?;
        }
        Ok(())
    }
}

/// Bytes of a finite value in every storage type: as f32 0.50096, as two bf16 / f16 halves
/// 0.5 / 1.75 and 0.
const PATTERN: [u8; 4] = [0x00, 0x3F, 0x00, 0x3F];

fn filled(device: &mut CudaDevice, bytes: usize, what: &str) -> Result<DevicePtr, GpuError> {
    let ptr = device.alloc(bytes.max(16), what)?;
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(bytes).collect();
    device.upload(ptr, &data)?;
    Ok(ptr)
}

/// Times every kernel of `plan` (compiled to `ptx`) and the attention kernels on `device`.
pub fn bench_kernels(
    device: &mut CudaDevice,
    program: &Program,
    plan: &CudaPlan,
    ptx: &[String],
    reps: usize,
) -> Result<KernelBenchReport, Error> {
    device.load_kernels(&plan.kernels, ptx)?;
    // Copy bandwidth over 1 GiB: far beyond the L2, as the model's activations are.
    let copy_bytes = 1usize << 30;
    let src = filled(device, copy_bytes, "copy source")?;
    let dst = device.alloc(copy_bytes, "copy destination")?;
    let ms = device.time_ms(reps, |d| d.copy(dst, src, copy_bytes))?;
    let copy_gb_s = 2.0 * copy_bytes as f64 / (ms * 1e-3) / 1e9;

    let cases = kernel_cases(program, plan);
    let arena_bytes = cases
        .iter()
        .map(|c| {
            c.values
                .iter()
                .map(|(_, b)| b.next_multiple_of(256))
                .sum::<usize>()
                + c.scratch.next_multiple_of(256)
        })
        .max()
        .unwrap_or(0);
    let arena = filled(device, arena_bytes, "kernel arena")?;
    let mut kernels = Vec::with_capacity(cases.len());
    for c in &cases {
        let mut at = arena;
        let mut ptr_of: BTreeMap<ValueId, DevicePtr> = BTreeMap::new();
        for &(v, b) in &c.values {
            ptr_of.insert(v, at);
            at += b.next_multiple_of(256) as u64;
        }
        let scratch = at;
        let args: Vec<LaunchArg> = c
            .launch
            .args
            .iter()
            .map(|a| match *a {
                KArg::Value(v) => LaunchArg::Ptr(ptr_of[&v]),
                KArg::ValueAt { value, offset } => LaunchArg::Ptr(
                    ptr_of[&value] + (offset * plan.value_dtypes[value].bytes()) as u64,
                ),
                KArg::Scratch => LaunchArg::Ptr(scratch),
                KArg::ScratchAt(bytes) => LaunchArg::Ptr(scratch + bytes as u64),
                KArg::MeshIndex(axis) => LaunchArg::I32(program.mesh.index(0, axis) as i32),
            })
            .collect();
        let l = &c.launch;
        let ms = device.time_ms(reps, |d| {
            d.launch(l.kernel, l.grid, l.block, l.shared_bytes, &args)
        })?;
        let gb_s = c.bytes() as f64 / (ms * 1e-3) / 1e9;
        kernels.push(KernelRow {
            name: c.name.clone(),
            launches: c.launches,
            bytes: c.bytes(),
            us: ms * 1e3,
            gb_s,
            fraction_of_copy: gb_s / copy_gb_s,
        });
    }
    kernels.sort_by(|a, b| (b.us * b.launches as f64).total_cmp(&(a.us * a.launches as f64)));

    let specs = attention_specs(plan.dtype);
    let sources: Vec<CudaKernel> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = format!("bench_attention_{i}");
            let source = attention_source(s, &name)
                .map_err(|e| Error::Input(format!("attention {s:?}: {e}")))?;
            Ok(CudaKernel {
                hash: ditto_codegen::cuda::kernel_hash(&source),
                name,
                source,
            })
        })
        .collect::<Result<_, Error>>()?;
    let arch = device.arch_name();
    let attn_ptx: Vec<String> = compile_ptx(&sources, &arch, &cuda_include_dirs())?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let base = plan.kernels.len();
    device.load_kernels(&sources, &attn_ptx)?;
    let mut attention = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let bytes = s.batch * s.sq * s.heads * s.head_dim * s.dtype.bytes();
        let buf = filled(
            device,
            4 * bytes.next_multiple_of(256),
            "attention operands",
        )?;
        let stride = bytes.next_multiple_of(256) as u64;
        let args: Vec<LaunchArg> = (0..4).map(|j| LaunchArg::Ptr(buf + j * stride)).collect();
        let (grid, block) = s.launch_dims();
        let ms = device.time_ms(reps, |d| d.launch(base + i, grid, block, 0, &args))?;
        let flops = 4.0 * (s.batch * s.heads * s.head_dim) as f64 * s.sq as f64 * s.sk as f64;
        attention.push(AttentionRow {
            head_dim: s.head_dim,
            seq: s.sq,
            heads: s.heads,
            ms,
            tflops: flops / (ms * 1e-3) / 1e12,
        });
    }
    Ok(KernelBenchReport {
        device: device.describe(),
        dtype: plan.dtype.to_string(),
        copy_gb_s,
        kernels,
        attention,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ditto_codegen::cuda::cuda_plan;

    #[test]
    fn every_kernel_once_with_the_bytes_it_moves() {
        let pipe = crate::Pipeline::builtin().unwrap();
        let model = pipe.transformer_model();
        let shapes = model.family().default_shapes();
        let program = model
            .compile(&shapes, &crate::CompileOptions::default())
            .unwrap()
            .program;
        let plan = cuda_plan(&program, StorageDType::Bf16).unwrap();
        let cases = kernel_cases(&program, &plan);
        let launched: std::collections::BTreeSet<usize> = plan
            .steps
            .iter()
            .flat_map(|s| s.launches.iter().map(|l| l.kernel))
            .collect();
        let attention = launched
            .iter()
            .filter(|&&k| plan.kernels[k].name.starts_with("flash_attention"))
            .count();
        assert!(attention > 0);
        assert_eq!(cases.len() + attention, launched.len());
        let total: usize = cases.iter().map(|c| c.launches).sum();
        let all: usize = plan.steps.iter().map(|s| s.launches.len()).sum();
        assert!(total < all, "attention launches are left out");
        for c in &cases {
            // The output is the first argument, and it is counted.
            let KArg::Value(out) = c.launch.args[0] else {
                continue;
            };
            let out_bytes = program.values[out].numel() * plan.value_dtypes[out].bytes();
            assert!(c.bytes() >= out_bytes, "{}", c.name);
            assert_eq!(c.values[0], (out, out_bytes));
        }
    }
}
