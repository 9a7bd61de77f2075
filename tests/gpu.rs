//! The CUDA backend on a GPU: every fixture model's forward pass and every pipeline
//! fixture's denoising loop on the GPU against the CPU backend (f32 storage: max relative
//! error 1e-4; bf16: 2e-2 per forward pass, 5e-2 after a whole loop and the VAE), and CUDA
//! graph replay giving the eager run's outputs bit for bit.
//!
//! Without a GPU (no NVIDIA driver, or no device) every test says why it skipped, unless
//! `DITTO_REQUIRE_GPU` is set: then it fails, so a GPU run cannot pass by skipping.
//! Build with `cargo test --release --test gpu --no-run` and run the binary on the GPU
//! machine (see `bench/gpu/check.sh`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use ditto::codegen::cuda::StorageDType;
use ditto::parallel::RankOptions;
use ditto::runtime::gpu::libraries::{require, Library};
use ditto::runtime::gpu::{CudaDevice, GpuExecutor};
use ditto::{
    Backend, CompileOptions, GenerateRequest, HostTensor, Model, Noise, Pipeline, PromptEmbeds,
    Session, TimestepSchedule,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Whether a GPU is here; `false` (the test skips, saying why) unless `DITTO_REQUIRE_GPU`
/// is set, which turns a missing GPU into a failure.
fn gpu_or_skip() -> bool {
    let required = std::env::var_os("DITTO_REQUIRE_GPU").is_some_and(|v| !v.is_empty() && v != "0");
    let found = require(Library::Driver).and_then(|_| CudaDevice::new(0).map(drop));
    match found {
        Ok(()) => true,
        Err(e) if required => panic!("DITTO_REQUIRE_GPU is set but there is no usable GPU: {e}"),
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            false
        }
    }
}

fn cuda(dtype: StorageDType) -> Backend {
    Backend::Cuda { ordinal: 0, dtype }
}

/// Allowed max relative error of one forward pass with `dtype` storage.
fn forward_tol(dtype: StorageDType) -> f32 {
    match dtype {
        StorageDType::F32 => 1e-4,
        _ => 2e-2,
    }
}

/// A fixture model, its recorded inputs, and its program compiled for `mesh`.
fn load(
    name: &str,
    mesh: ditto::codegen::Mesh,
) -> (Model, BTreeMap<String, HostTensor>, Arc<ditto::Program>) {
    let model = Model::load(fixture(name)).unwrap();
    let inputs: BTreeMap<String, HostTensor> =
        ditto::read_tensors(&fixture(name).join("io.safetensors"))
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v)))
            .collect();
    let shapes: BTreeMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let shapes = model.family().shapes_from_inputs(&shapes).unwrap();
    let opts = CompileOptions {
        parallel: ditto::Parallel {
            mesh,
            ..Default::default()
        },
        ..CompileOptions::default()
    };
    let program = Arc::new(model.compile(&shapes, &opts).unwrap().program);
    (model, inputs, program)
}

fn serial() -> ditto::codegen::Mesh {
    ditto::codegen::Mesh::default()
}

#[test]
fn fixture_forward_passes_match_the_cpu_backend() {
    if !gpu_or_skip() {
        return;
    }
    let mut table = Vec::new();
    for name in ["dit", "pixart", "sd3", "flux", "vae"] {
        let (model, inputs, program) = load(name, serial());
        let weights = model.load_weights(&program).unwrap();
        let want = Session::new(program.clone(), weights.clone())
            .unwrap()
            .run(&inputs)
            .unwrap();
        for dtype in [StorageDType::F32, StorageDType::Bf16, StorageDType::F16] {
            let mut gpu = Session::on(cuda(dtype), program.clone(), weights.clone())
                .unwrap_or_else(|e| panic!("{name} {dtype}: {e}"));
            let got = gpu
                .run(&inputs)
                .unwrap_or_else(|e| panic!("{name} {dtype}: {e}"));
            let err = got
                .iter()
                .map(|(k, v)| v.max_rel_err(&want[k]))
                .fold(0.0f32, f32::max);
            table.push(format!("{name:>7} {dtype:>5}: max rel err {err:.2e}"));
            // f16 is reported, not held to a bound: its 5-bit exponent may overflow on
            // activations a real checkpoint keeps small.
            if dtype != StorageDType::F16 {
                assert!(err <= forward_tol(dtype), "{name} {dtype}: {err:e}");
            }
        }
    }
    eprintln!("{}", table.join("\n"));
}

#[test]
fn graph_replay_gives_the_eager_outputs() {
    if !gpu_or_skip() {
        return;
    }
    let (model, inputs, program) = load("pixart", serial());
    let weights = model.load_weights(&program).unwrap();
    let mut exec: GpuExecutor<CudaDevice> =
        ditto::backend::cuda_executor(program.clone(), &weights, 0, StorageDType::Bf16).unwrap();
    let bound: Vec<&[f32]> = program
        .inputs
        .iter()
        .map(|b| inputs[&b.name].data.as_slice())
        .collect();
    let eager = exec.run(&bound).unwrap();
    for run in 1..4 {
        assert_eq!(exec.run(&bound).unwrap(), eager, "run {run}");
    }
    assert!(
        exec.graph_captured(),
        "runs 3 and 4 replay the captured graph"
    );
    let m = exec.memory();
    eprintln!(
        "pixart fixture on {}: weights {} B, activations {} B (planned), scratch {} B",
        ditto::runtime::gpu::Device::describe(exec.device()),
        m.weights,
        m.buffers,
        m.scratch
    );
}

fn loop_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("loop.json")).unwrap()).unwrap()
}

/// The final latents and image of a pipeline fixture's loop on `backend`.
fn run_pipeline(name: &str, backend: Backend) -> (HostTensor, HostTensor) {
    let dir = fixture(name);
    let meta = loop_json(&dir);
    let reference = ditto::read_tensors(&dir.join("loop.safetensors")).unwrap();
    let mut pipe = Pipeline::load(&dir)
        .unwrap()
        .with_rank_options(RankOptions {
            backend,
            ..RankOptions::default()
        });
    let mut req = match meta["family"].as_str() {
        Some("dit") => {
            GenerateRequest::classes(vec![meta["class_label"].as_u64().unwrap() as usize])
        }
        _ => GenerateRequest::prompt(PromptEmbeds::read(&dir.join("prompt.safetensors")).unwrap()),
    };
    req = req
        .with_noise(Noise::Latents(reference["latents.0"].clone()))
        .with_steps(meta["steps"].as_u64().unwrap() as usize);
    req = match meta["guidance_scale"].as_f64() {
        Some(g) => req.with_guidance(g as f32),
        None => req
            .with_guidance(3.5)
            .with_timesteps(TimestepSchedule::Scheduler),
    };
    let out = pipe
        .generate(&req)
        .unwrap_or_else(|e| panic!("{name} on {backend}: {e}"));
    (out.latents, out.image)
}

#[test]
fn pipeline_fixtures_match_the_cpu_backend() {
    if !gpu_or_skip() {
        return;
    }
    for name in [
        "dit-pipeline",
        "pixart-pipeline",
        "sd3-pipeline",
        "flux-pipeline",
    ] {
        let (want_latents, want_image) = run_pipeline(name, Backend::Cpu);
        for (dtype, tol) in [(StorageDType::F32, 1e-4f32), (StorageDType::Bf16, 5e-2)] {
            let (latents, image) = run_pipeline(name, cuda(dtype));
            let (el, ei) = (
                latents.max_rel_err(&want_latents),
                image.max_rel_err(&want_image),
            );
            eprintln!("{name:>16} {dtype:>5}: latents {el:.2e}, image {ei:.2e}");
            assert!(
                el <= tol && ei <= tol,
                "{name} {dtype}: latents {el:e}, image {ei:e}"
            );
        }
    }
}

/// Four ranks of a USP 2 x 2 program on the one GPU (each with its own stream), talking
/// through the in-process communicator staged via the host, against the serial CPU run.
#[test]
fn multi_rank_program_on_one_gpu_matches_the_serial_run() {
    use ditto::runtime::comm::{run_ranks, Communicator};
    if !gpu_or_skip() {
        return;
    }
    let (model, inputs, serial) = load("pixart", serial());
    let want = Session::new(serial.clone(), model.load_weights(&serial).unwrap())
        .unwrap()
        .run(&inputs)
        .unwrap();
    let mesh = ditto::codegen::Mesh {
        cfg: 1,
        ring: 2,
        ulysses: 2,
    };
    let (_, _, usp) = load("pixart", mesh);
    let weights = model.load_weights(&usp).unwrap();
    let bound: Vec<Vec<f32>> = usp
        .inputs
        .iter()
        .map(|b| inputs[&b.name].data.clone())
        .collect();
    let outs = run_ranks(4, std::time::Duration::from_secs(120), |comm| {
        let rank = comm.rank();
        let mut e = ditto::backend::cuda_executor_with_comm(
            usp.clone(),
            &weights,
            0,
            StorageDType::F32,
            rank,
            Box::new(comm),
        )?;
        let b: Vec<&[f32]> = bound.iter().map(|v| v.as_slice()).collect();
        Ok::<_, ditto::Error>(e.run(&b)?)
    })
    .unwrap();
    let sample = usp.outputs.iter().position(|(n, _)| n == "sample").unwrap();
    let want = &want["sample"];
    for (rank, out) in outs.iter().enumerate() {
        let got = HostTensor::new(want.shape.clone(), out[sample].clone());
        let err = got.max_rel_err(want);
        eprintln!("pixart usp 2x2 f32 on one GPU, rank {rank}: max rel err {err:.2e}");
        assert!(err <= 1e-4, "rank {rank}: {err:e}");
    }
}

/// NCCL on the one GPU: a world of one rank (NCCL refuses two ranks on one GPU), its
/// all-gather and its send to itself moving bytes device to device. Needs `libnccl`.
#[test]
fn nccl_moves_bytes_device_to_device() {
    use ditto::runtime::comm::{in_process_world, Group};
    use ditto::runtime::gpu::Device;
    if !gpu_or_skip() {
        return;
    }
    if let Err(e) = require(Library::Nccl) {
        eprintln!("skipped: {e}");
        return;
    }
    let mut device = CudaDevice::new(0).unwrap();
    let mut host = in_process_world(1, std::time::Duration::from_secs(30)).remove(0);
    device.enable_nccl(&mut host).unwrap();
    assert!(device.collectives());
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = device.alloc(data.len(), "source").unwrap();
    let dst = device.alloc(data.len(), "gathered").unwrap();
    let back = device.alloc(data.len(), "received").unwrap();
    device.upload(src, &data).unwrap();
    device
        .all_gather(&Group::world(1), src, dst, data.len())
        .unwrap();
    device.sendrecv(0, src, 0, back, data.len()).unwrap();
    assert_eq!(device.download(dst, data.len()).unwrap(), data);
    assert_eq!(device.download(back, data.len()).unwrap(), data);
}
