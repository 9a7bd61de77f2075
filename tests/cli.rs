//! The `ditto` command line: forward, inspect, compile (with IR dumps) and run, and clear
//! errors (exit status 1, a message, no panic) on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn ditto(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ditto"))
        .args(args)
        .output()
        .expect("run ditto");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn forward_writes_output_matching_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    for fam in ["dit", "vae"] {
        let dir = fixture(fam);
        let io = dir.join("io.safetensors");
        let (ok, _, err) = ditto(&[
            "forward",
            "--model",
            p(&dir),
            "--inputs",
            p(&io),
            "--out",
            p(&out),
        ]);
        assert!(ok, "{err}");
        let ours = ditto::read_tensors(&out).unwrap();
        let reference = ditto::read_tensors(&io).unwrap();
        let e = ours["output"].max_rel_err(&reference["output"]);
        assert!(e <= 1e-4, "{fam}: {e}");
    }
}

#[test]
fn inspect_describes_the_model() {
    let (ok, out, err) = ditto(&[
        "inspect",
        "--model",
        p(&fixture("pixart")),
        "--height",
        "256",
        "--width",
        "128",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("PixArtTransformer2DModel"), "{out}");
    assert!(out.contains("heads         4 x 16"), "{out}");
    // 256x128 px -> 32x16 latent -> 16x8 patches of 2.
    assert!(out.contains("image tokens  128"), "{out}");
    let (ok, out, err) = ditto(&["inspect", "--model", p(&fixture("flux"))]);
    assert!(ok, "{err}");
    assert!(out.contains("FluxTransformer2DModel"), "{out}");
}

#[test]
fn compile_dumps_readable_ir_that_reparses_and_plan_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("dump");
    let plan = tmp.path().join("plan");
    let dir = fixture("pixart");
    let (ok, out, err) = ditto(&[
        "compile",
        "--model",
        p(&dir),
        "--height",
        "128",
        "--width",
        "128",
        "--batch",
        "2",
        "--text-len",
        "7",
        "--out",
        p(&plan),
        "--dump-dir",
        p(&dump),
        "--verify",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("pass canonicalize"), "{out}");
    let mut ir_files: Vec<PathBuf> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    ir_files.sort();
    assert!(ir_files.len() >= 4, "{ir_files:?}");
    for f in &ir_files {
        let text = std::fs::read_to_string(f).unwrap();
        let g = ditto::ir::text::parse(&text)
            .unwrap_or_else(|e| panic!("{} does not re-parse: {e}", f.display()));
        ditto::ir::verify(&g).unwrap();
        assert!(f.with_extension("dot").exists());
    }
    let last = std::fs::read_to_string(ir_files.last().unwrap()).unwrap();
    assert!(
        last.contains("attention") && last.contains("fused"),
        "{last}"
    );
    assert!(last.contains("w:transformer_blocks.0.attn1.to_q.weight"));

    // Compile-then-run gives the forward result.
    let io = dir.join("io.safetensors");
    let out = tmp.path().join("out.safetensors");
    let (ok, _, err) = ditto(&[
        "run",
        "--plan",
        p(&plan),
        "--model",
        p(&dir),
        "--inputs",
        p(&io),
        "--out",
        p(&out),
    ]);
    assert!(ok, "{err}");
    let e = ditto::read_tensors(&out).unwrap()["output"]
        .max_rel_err(&ditto::read_tensors(&io).unwrap()["output"]);
    assert!(e <= 1e-4, "{e}");
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    // Inputs of another model: wrong shapes and names.
    let (ok, _, err) = ditto(&[
        "forward",
        "--model",
        p(&fixture("dit")),
        "--inputs",
        p(&fixture("sd3").join("io.safetensors")),
        "--out",
        p(&out),
    ]);
    assert!(!ok);
    assert!(
        err.starts_with("error:") && !err.contains("panicked"),
        "{err}"
    );
    // A file that is not safetensors.
    let (ok, _, err) = ditto(&[
        "forward",
        "--model",
        p(&fixture("dit")),
        "--inputs",
        p(&fixture("dit").join("config.json")),
        "--out",
        p(&out),
    ]);
    assert!(!ok);
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );
    // A size that does not fit the latent grid.
    let (ok, _, err) = ditto(&["compile", "--model", p(&fixture("dit")), "--height", "100"]);
    assert!(!ok);
    assert!(err.contains("--height 100"), "{err}");
}

#[test]
fn parallel_forward_reports_and_compile_dumps_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let dir = fixture("sd3");
    let io = dir.join("io.safetensors");
    let (ok, stdout, err) = ditto(&[
        "forward",
        "--model",
        p(&dir),
        "--inputs",
        p(&io),
        "--out",
        p(&out),
        "--ulysses-degree",
        "2",
        "--ring-degree",
        "2",
        "--report",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("usp_attention x 3"), "{stdout}");
    // 64 image + 7 text tokens on 4 ranks: the text is padded to 8.
    assert!(
        stdout.contains("padding: 72 token rows for 71 valid"),
        "{stdout}"
    );
    let e = ditto::read_tensors(&out).unwrap()["output"]
        .max_rel_err(&ditto::read_tensors(&io).unwrap()["output"]);
    assert!(e <= 1e-4, "{e}");

    let dump = tmp.path().join("dump");
    let (ok, stdout, err) = ditto(&[
        "compile",
        "--model",
        p(&dir),
        "--ring-degree",
        "4",
        "--text-len",
        "7",
        "--dump-dir",
        p(&dump),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("ring x3"), "{stdout}");
    for rank in 0..4 {
        let text = std::fs::read_to_string(dump.join(format!("rank{rank}.ir"))).unwrap();
        assert!(text.starts_with(&format!("# rank {rank} of 4")), "{text}");
        ditto::ir::text::parse(&text).unwrap();
    }
    // 7 text tokens on 4 ranks: the last rank holds one, padded.
    let last = std::fs::read_to_string(dump.join("rank3.ir")).unwrap();
    assert!(last.contains("rows [6, 7) of 7"), "{last}");

    let (ok, _, err) = ditto(&["compile", "--model", p(&dir), "--parallel", "auto"]);
    assert!(!ok && err.contains("--world-size"), "{err}");
}

#[test]
fn compile_for_cuda_stores_ptx_with_the_plan() {
    let (ok, _, err) = ditto(&["compile", "--model", p(&fixture("dit")), "--device", "tpu"]);
    assert!(!ok && err.contains("unknown --device `tpu`"), "{err}");
    if std::env::var_os("DITTO_NVRTC_LIB").is_none() && std::env::var_os("CI").is_none() {
        eprintln!("skipped the NVRTC part: DITTO_NVRTC_LIB is not set (see .ci/run)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("plan");
    let (ok, out, err) = ditto(&[
        "compile",
        "--model",
        p(&fixture("pixart")),
        "--device",
        "cuda",
        "--arch",
        "sm_90",
        "--out",
        p(&plan),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("compiled to PTX for sm_90"), "{out}");
    let ptx: Vec<_> = std::fs::read_dir(plan.join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    assert!(!ptx.is_empty());
    for f in ptx {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.contains(".target sm_90"), "{}", f.display());
    }
}

#[test]
fn cuda_device_errors_name_their_cause() {
    let dir = fixture("dit");
    let io = dir.join("io.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let forward = |extra: &[&str]| {
        let mut args = vec![
            "forward",
            "--model",
            p(&dir),
            "--inputs",
            p(&io),
            "--out",
            p(&out),
        ];
        args.extend_from_slice(extra);
        ditto(&args)
    };
    for (flags, says) in [
        (&["--device", "gpu"][..], "unknown --device `gpu`"),
        (&["--device", "cuda:x"][..], "unknown --device `cuda:x`"),
        (
            &["--device", "cuda", "--dtype", "fp8"][..],
            "unknown --dtype `fp8`",
        ),
    ] {
        let (ok, _, err) = forward(flags);
        assert!(!ok && err.contains(says), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // On the GPU, a parallel program runs one process per rank; in one process it says so
    // before anything runs. DistriFusion stays on the CPU backend.
    let (ok, _, err) = ditto(&[
        "generate",
        "--device",
        "cuda",
        "--ulysses-degree",
        "2",
        "--out",
        p(&tmp.path().join("g.png")),
    ]);
    assert!(
        !ok && err.contains("one process per rank") && err.contains("ditto launch"),
        "{err}"
    );
    let (ok, _, err) = ditto(&[
        "generate",
        "--device",
        "cuda",
        "--distrifusion-degree",
        "2",
        "--out",
        p(&tmp.path().join("g.png")),
    ]);
    assert!(!ok && err.contains("CPU backend only"), "{err}");
    // Without the NVIDIA driver (CI), the GPU backend names the missing library instead of
    // panicking in cudarc; with one, the forward pass runs.
    use ditto::runtime::gpu::libraries::{require, Library};
    if require(Library::Driver).is_err() {
        for cmd in [
            forward(&["--device", "cuda"]),
            ditto(&[
                "generate",
                "--device",
                "cuda:0",
                "--steps",
                "1",
                "--out",
                p(&tmp.path().join("g.png")),
            ]),
        ] {
            let (ok, _, err) = cmd;
            assert!(!ok, "{err}");
            assert!(
                err.contains("libcuda") && err.contains("--device cpu"),
                "{err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}
