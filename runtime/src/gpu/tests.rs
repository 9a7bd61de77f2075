//! The executor on a host-memory device that runs GEMMs and nothing else: a linear layer
//! (the GEMM's bias, the output read back) against the CPU backend, and the errors a bad
//! plan, weights or inputs get. Generated kernels are covered by the emulation in
//! `tests/cuda_kernels.rs`.

use std::sync::Arc;

use ditto_codegen::cuda::{cuda_plan, CudaKernel, StorageDType};
use ditto_codegen::{Binding, Mesh, Program, Step, Storage, Value};

use super::{decode, encode, Device, DevicePtr, Gemm, GpuError, GpuExecutor, LaunchArg};
use crate::cpu::executor::CpuExecutor;
use crate::cpu::kernels::gemm;

#[derive(Default)]
struct HostDevice {
    mem: Vec<Vec<u8>>,
}

impl HostDevice {
    fn at(&self, p: DevicePtr) -> (usize, usize) {
        ((p >> 40) as usize - 1, (p & ((1 << 40) - 1)) as usize)
    }
    fn read(&self, p: DevicePtr, d: StorageDType, n: usize) -> Vec<f32> {
        let (b, o) = self.at(p);
        decode(&self.mem[b][o..], d, n)
    }
}

impl Device for HostDevice {
    fn describe(&self) -> String {
        "host".into()
    }
    fn alloc(&mut self, bytes: usize, _: &str) -> Result<DevicePtr, GpuError> {
        self.mem.push(vec![0; bytes]);
        Ok((self.mem.len() as u64) << 40)
    }
    fn upload(&mut self, dst: DevicePtr, data: &[u8]) -> Result<(), GpuError> {
        let (b, o) = self.at(dst);
        self.mem[b][o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn download(&mut self, src: DevicePtr, len: usize) -> Result<Vec<u8>, GpuError> {
        let (b, o) = self.at(src);
        Ok(self.mem[b][o..o + len].to_vec())
    }
    fn load_kernels(&mut self, k: &[CudaKernel], _: &[String]) -> Result<(), GpuError> {
        assert!(k.is_empty());
        Ok(())
    }
    fn launch(
        &mut self,
        _: usize,
        _: [u32; 3],
        _: [u32; 3],
        _: u32,
        _: &[LaunchArg],
    ) -> Result<(), GpuError> {
        unreachable!("a GEMM-only program launches nothing")
    }
    fn gemm(&mut self, g: &Gemm) -> Result<(), GpuError> {
        assert_eq!((g.batch, g.accumulate), (1, false));
        let a = self.read(g.a, g.dtype, g.m * g.k);
        let b = self.read(g.b, g.dtype, g.n * g.k);
        let bias = g.bias.map(|p| self.read(p, g.dtype, g.n));
        let mut c = vec![0.0; g.m * g.n];
        gemm::linear(&a, g.m, g.k, &b, g.n, bias.as_deref(), &mut c);
        let bytes = encode(&c, g.dtype);
        self.upload(g.c, &bytes)
    }
    fn copy(&mut self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<(), GpuError> {
        let data = self.download(src, bytes)?;
        self.upload(dst, &data)
    }
    fn synchronize(&mut self) -> Result<(), GpuError> {
        Ok(())
    }
}

/// `y = x · wᵀ + b` with x [3, 5] an input and w [4, 5], b [4] weights.
fn linear_program() -> Program {
    let binding = |name: &str, shape: &[usize]| Binding {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: "f32".into(),
    };
    let value = |storage, shape: &[usize]| Value {
        storage,
        shape: shape.to_vec(),
    };
    Program {
        format_version: ditto_codegen::program::FORMAT_VERSION,
        mesh: Mesh::default(),
        inputs: vec![binding("x", &[3, 5])],
        weights: vec![binding("w", &[4, 5]), binding("b", &[4])],
        buffers: vec![12],
        values: vec![
            value(Storage::Input(0), &[3, 5]),
            value(Storage::Weight(0), &[4, 5]),
            value(Storage::Weight(1), &[4]),
            value(Storage::Buffer(0), &[3, 4]),
        ],
        kernels: vec![],
        steps: vec![Step::Linear {
            x: 0,
            w: 1,
            b: Some(2),
            out: 3,
            m: 3,
            k: 5,
            n: 4,
        }],
        outputs: vec![("y".into(), 3)],
    }
}

fn weights() -> Vec<Vec<f32>> {
    vec![
        (0..20).map(|i| (i as f32 * 0.3).sin()).collect(),
        vec![0.5, -1.0, 0.25, 2.0],
    ]
}

#[test]
fn linear_matches_the_cpu_backend() {
    let p = Arc::new(linear_program());
    let x: Vec<f32> = (0..15).map(|i| i as f32 * 0.1 - 0.7).collect();
    let want = CpuExecutor::new(p.clone(), Arc::new(weights()))
        .unwrap()
        .run(&[&x])
        .unwrap();
    for (dtype, tol) in [(StorageDType::F32, 1e-6), (StorageDType::Bf16, 2e-2)] {
        let plan = Arc::new(cuda_plan(&p, dtype).unwrap());
        let mut e =
            GpuExecutor::new(p.clone(), plan, &[], &weights(), HostDevice::default()).unwrap();
        // Weights (bf16: 20 + 4 values of 2 bytes), the input (f32 unless a library step
        // reads it: here the GEMM does) and the one buffer.
        let m = e.memory();
        assert_eq!(
            (m.weights, m.inputs, m.buffers),
            (24 * dtype.bytes(), 15 * dtype.bytes(), 12 * dtype.bytes())
        );
        // HostDevice cannot capture: every run enqueues the steps.
        for _ in 0..3 {
            let got = e.run(&[&x]).unwrap();
            let err = got[0]
                .iter()
                .zip(&want[0])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < tol * 3.0, "{dtype}: {err}");
        }
        assert!(!e.graph_captured());
    }
}

#[test]
fn bad_plans_weights_and_inputs_are_errors() {
    let p = Arc::new(linear_program());
    let plan = Arc::new(cuda_plan(&p, StorageDType::F32).unwrap());
    let new = |p: &Arc<Program>, w: &[Vec<f32>], ptx: &[String]| {
        GpuExecutor::new(p.clone(), plan.clone(), ptx, w, HostDevice::default())
            .err()
            .map(|e| e.to_string())
    };
    let err = new(&p, &weights()[..1], &[]).unwrap();
    assert!(err.contains("takes 2 weights, 1 were given"), "{err}");
    let mut short = weights();
    short[0].pop();
    let err = new(&p, &short, &[]).unwrap();
    assert!(
        err.contains("weight `w` has 19 elements, the program expects 20"),
        "{err}"
    );
    let err = new(&p, &weights(), &["x".into()]).unwrap();
    assert!(err.contains("0 kernels but 1 PTX"), "{err}");
    // A plan made for another program.
    let mut other = linear_program();
    other.values.push(other.values[3].clone());
    let err = new(&Arc::new(other), &weights(), &[]).unwrap();
    assert!(err.contains("the plan does not fit the program"), "{err}");
    // A program over several ranks.
    let mut multi = linear_program();
    multi.mesh.ulysses = 2;
    let multi = Arc::new(multi);
    let err = new(&multi, &weights(), &[]).unwrap();
    assert!(
        err.contains("over 2 ranks") && err.contains("with_comm"),
        "{err}"
    );
    // A communicator of the wrong size.
    let comm = crate::comm::in_process_world(3, std::time::Duration::from_secs(1)).remove(0);
    let err = GpuExecutor::with_comm(
        multi,
        plan.clone(),
        &[],
        &weights(),
        HostDevice::default(),
        0,
        Box::new(comm),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("communicator of 3 ranks, for a program over 2"),
        "{err}"
    );

    let mut e = GpuExecutor::new(
        p.clone(),
        plan.clone(),
        &[],
        &weights(),
        HostDevice::default(),
    )
    .unwrap();
    let err = e.run(&[]).unwrap_err().to_string();
    assert!(err.contains("takes 1 inputs, 0 were given"), "{err}");
    let err = e.run(&[&[1.0; 14]]).unwrap_err().to_string();
    assert!(
        err.contains("input `x` has 14 elements, the program expects 15 (shape [3, 5])"),
        "{err}"
    );
}

#[test]
fn storage_round_trip_rounds_to_nearest_even() {
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
    let x = [1.0f32, -2.5, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 65504.0];
    let bf = decode(&encode(&x, StorageDType::Bf16), StorageDType::Bf16, 5);
    assert_eq!(bf, [1.0, -2.5, 1.0, 1.0 + 4.0 / 256.0, 65536.0]);
    let h = decode(&encode(&x, StorageDType::F16), StorageDType::F16, 5);
    assert_eq!(h[..2], [1.0, -2.5]);
    assert_eq!(h[4], 65504.0);
    let f = decode(&encode(&x, StorageDType::F32), StorageDType::F32, 5);
    assert_eq!(f, x);
}
