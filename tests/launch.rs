//! Multi-process runs: `ditto launch` (one node and two "nodes" on loopback), ranks started
//! with torchrun's variables by hand, and the failures: a rank killed mid-generation, a
//! rank that never arrives, the launcher stopped by a signal or killed. Every test checks
//! that no rank outlives it (processes whose command line holds the test's scratch path).

#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ditto::HostTensor;

const TOL: f32 = 1e-5;

fn ditto_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ditto")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh scratch folder; its path is the marker that finds this test's processes.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("launch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Live (non-zombie) processes whose command line contains `marker`, except this test.
fn processes_with(marker: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if !cmdline.contains(marker) {
            continue;
        }
        // State is the field after the parenthesized command name.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Asserts that no process of this test is left, allowing `within` for the kernel to
/// deliver pending kills.
fn assert_no_processes_left(marker: &Path, within: Duration) {
    let marker = s(marker);
    let start = Instant::now();
    loop {
        let left = processes_with(&marker);
        if left.is_empty() {
            return;
        }
        if start.elapsed() > within {
            for (pid, _) in &left {
                // Clean up before failing, so one failure does not leak into other tests.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
            panic!("processes left after the test: {left:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A started process with its stderr read line by line on a thread (stdout collected).
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
    stdout: Option<thread::JoinHandle<String>>,
}

impl Running {
    fn start(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ditto");
        let err = child.stderr.take().expect("stderr");
        let mut out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            stderr: Vec::new(),
            stdout: Some(stdout),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn wait_for_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with `{needle}` within {within:?}; stderr so far:\n{}",
                    self.stderr.join("\n")
                ),
            }
        }
    }

    /// Waits for the exit, killing the process if it takes longer than `within`.
    fn finish(mut self, within: Duration) -> (ExitStatus, String, String, Duration) {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "still running after {within:?}; stderr:\n{}",
                    self.stderr.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let took = start.elapsed();
        let stdout = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(line);
        }
        (status, stdout, self.stderr.join("\n"), took)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave a launcher running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run ditto")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn tensors(path: &Path) -> HashMap<String, HostTensor> {
    ditto::read_tensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn assert_close(what: &str, got: &HostTensor, want: &HostTensor) {
    let e = got.max_rel_err(want);
    assert!(e <= TOL, "{what}: max rel err {e}");
}

fn forward_args(out: &Path) -> Vec<String> {
    let dir = fixture("sd3");
    vec![
        "forward".into(),
        "--model".into(),
        s(&dir),
        "--inputs".into(),
        s(&dir.join("io.safetensors")),
        "--out".into(),
        s(out),
    ]
}

const USP_2X2: [&str; 4] = ["--ulysses-degree", "2", "--ring-degree", "2"];

/// `generate` on the SD3 pipeline fixture from its recorded initial latents.
fn generate_args(dir: &Path, name: &str, steps: usize) -> Vec<String> {
    let fx = fixture("sd3-pipeline");
    let start = dir.join("start.safetensors");
    if !start.exists() {
        let reference = tensors(&fx.join("loop.safetensors"));
        ditto::write_tensors(&start, &[("latents", &reference["latents.0"])]).expect("write");
    }
    vec![
        "generate".into(),
        "--model".into(),
        s(&fx),
        "--prompt-embeds".into(),
        s(&fx.join("prompt.safetensors")),
        "--latents".into(),
        s(&start),
        "--steps".into(),
        steps.to_string(),
        "--guidance".into(),
        "5".into(),
        "--out".into(),
        s(&dir.join(format!("{name}.png"))),
        "--save-latents".into(),
        s(&dir.join(format!("{name}.safetensors"))),
    ]
}

/// The serial result of `forward` (one process, one rank).
fn serial_forward(dir: &Path) -> HostTensor {
    let out = dir.join("serial.safetensors");
    assert_ok(&run(Command::new(ditto_bin()).args(forward_args(&out))));
    tensors(&out).remove("output").expect("output")
}

#[test]
fn launch_forward_matches_in_process_and_serial() {
    let dir = scratch("forward");
    let serial = serial_forward(&dir);
    let threads = dir.join("threads.safetensors");
    assert_ok(&run(Command::new(ditto_bin())
        .args(forward_args(&threads))
        .args(USP_2X2)));
    let threads = tensors(&threads).remove("output").expect("output");

    let launched = dir.join("launched.safetensors");
    let logs = dir.join("logs");
    let out = run(Command::new(ditto_bin())
        .args([
            "launch",
            "--nproc-per-node",
            "4",
            "--log-dir",
            &s(&logs),
            "--",
        ])
        .args(forward_args(&launched))
        .args(USP_2X2)
        .arg("--report"));
    assert_ok(&out);
    let got = tensors(&launched).remove("output").expect("output");
    assert_close("launched vs in-process", &got, &threads);
    assert_close("launched vs serial", &got, &serial);

    // Output is prefixed, and only rank 0 speaks (the report once, from rank 0).
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        stdout.contains("[rank 0] parallel layout: cfg 1 x ring 2 x ulysses 2"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("parallel layout").count(), 1, "{stdout}");
    assert!(
        stderr.contains("[rank 0] SD3Transformer2DModel: forward in"),
        "{stderr}"
    );
    for r in 1..4 {
        assert!(!stdout.contains(&format!("[rank {r}]")), "{stdout}");
        assert!(!stderr.contains(&format!("[rank {r}]")), "{stderr}");
    }
    assert!(
        stderr.contains("launch: node 0 of 1, 4 rank(s) of 4"),
        "{stderr}"
    );
    // Per-rank logs, unprefixed.
    let log0 = std::fs::read_to_string(logs.join("rank0.log")).expect("rank0.log");
    assert!(
        log0.contains("\nSD3Transformer2DModel: forward in") || log0.starts_with("SD3"),
        "{log0}"
    );
    for r in 1..4 {
        let log = std::fs::read_to_string(logs.join(format!("rank{r}.log"))).expect("log");
        assert!(log.is_empty(), "rank {r} said: {log}");
    }
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn launch_generate_matches_in_process_and_serial() {
    let dir = scratch("generate");
    assert_ok(&run(
        Command::new(ditto_bin()).args(generate_args(&dir, "serial", 6))
    ));
    assert_ok(&run(Command::new(ditto_bin())
        .args(generate_args(&dir, "threads", 6))
        .args(USP_2X2)));
    let out = run(Command::new(ditto_bin())
        .args(["launch", "--nproc-per-node", "4", "--"])
        .args(generate_args(&dir, "launched", 6))
        .args(USP_2X2));
    assert_ok(&out);
    let got = tensors(&dir.join("launched.safetensors"));
    for other in ["threads", "serial"] {
        let want = tensors(&dir.join(format!("{other}.safetensors")));
        for key in ["latents", "image"] {
            assert_close(&format!("{key} launched vs {other}"), &got[key], &want[key]);
        }
    }
    // The PNG is written, by rank 0 alone (the only one that reports it).
    assert!(dir.join("launched.png").exists());
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("wrote").count(), 1, "{stdout}");
    assert!(stdout.contains("[rank 0] wrote"), "{stdout}");
    // And the same against diffusers' recorded result.
    let reference = tensors(&fixture("sd3-pipeline").join("loop.safetensors"));
    assert!(got["latents"].max_rel_err(&reference["latents.6"]) <= 1e-4);
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

/// PipeFusion with one process per rank: stages (and the layout inside them) as separate
/// processes give the in-process result, and every process ends with the final latents
/// (rank 0, on the first stage, writes them).
#[test]
fn launch_pipefusion_matches_in_process() {
    let dir = scratch("pipefusion");
    let args = |name: &str, inside: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            "--steps",
            "4",
            "--num-samples",
            "1",
            "--pipefusion-degree",
            "2",
            "--num-pipeline-patch",
            "2",
            "--warmup-steps",
            "1",
            "--report",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(inside.iter().map(|x| x.to_string()));
        a.extend([
            "--out".to_string(),
            s(&dir.join(format!("{name}.png"))),
            "--save-latents".to_string(),
            s(&dir.join(format!("{name}.safetensors"))),
        ]);
        a
    };
    for (name, procs, inside) in [
        ("pf2", "2", &[][..]),
        ("pf2u2", "4", &["--ulysses-degree", "2"][..]),
    ] {
        let threads = format!("{name}-threads");
        assert_ok(&run(Command::new(ditto_bin()).args(args(&threads, inside))));
        let out = run(Command::new(ditto_bin())
            .args(["launch", "--nproc-per-node", procs, "--"])
            .args(args(name, inside)));
        assert_ok(&out);
        let got = tensors(&dir.join(format!("{name}.safetensors")));
        let want = tensors(&dir.join(format!("{threads}.safetensors")));
        for key in ["latents", "image"] {
            assert_close(&format!("{name} {key}"), &got[key], &want[key]);
        }
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("[rank 0] PipeFusion: 2 stage(s)"),
            "{stdout}"
        );
        assert!(
            stdout.contains("measured columns for rank 0 only"),
            "{stdout}"
        );
    }
    // A world that does not fit the stages is named.
    let out = run(Command::new(ditto_bin())
        .args(["launch", "--nproc-per-node", "3", "--"])
        .args(args("bad", &[])));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("2 PipeFusion stages"),
        "{}",
        text(&out.stderr)
    );
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn two_nodes_on_loopback_match_serial() {
    let dir = scratch("two-nodes");
    let serial = serial_forward(&dir);
    let port = free_port().to_string();
    let launched = dir.join("launched.safetensors");
    let node = |rank: &str| {
        Running::start(
            Command::new(ditto_bin())
                .args(["launch", "--nnodes", "2", "--node-rank", rank])
                .args(["--nproc-per-node", "2", "--master-port", &port, "--"])
                .args(forward_args(&launched))
                .args(USP_2X2),
        )
    };
    // Node 1 first: its ranks wait for node 0's store.
    let n1 = node("1");
    let n0 = node("0");
    let (st0, out0, err0, _) = n0.finish(Duration::from_secs(20));
    let (st1, out1, err1, _) = n1.finish(Duration::from_secs(20));
    assert!(st0.success(), "node 0: {err0}");
    assert!(st1.success(), "node 1: {err1}");
    assert!(err0.contains("node 0 of 2, 2 rank(s) of 4"), "{err0}");
    // Node 1 holds ranks 2 and 3, which print nothing.
    assert!(out1.is_empty() && !err1.contains("[rank"), "{out1}{err1}");
    assert!(err0.contains("[rank 0] SD3Transformer2DModel"), "{err0}");
    let _ = out0;
    let got = tensors(&launched).remove("output").expect("output");
    assert_close("two nodes vs serial", &got, &serial);
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn torchrun_style_variables_without_launch() {
    let dir = scratch("torchrun");
    let serial = serial_forward(&dir);
    let port = free_port().to_string();
    let start_rank = |rank: usize| {
        // Each rank its own --out: only rank 0's may appear.
        let out = dir.join(format!("rank{rank}.safetensors"));
        Running::start(
            Command::new(ditto_bin())
                .args(forward_args(&out))
                .args(["--ulysses-degree", "2"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port),
        )
    };
    let r1 = start_rank(1);
    let r0 = start_rank(0);
    let (st0, _, err0, _) = r0.finish(Duration::from_secs(20));
    let (st1, out1, err1, _) = r1.finish(Duration::from_secs(20));
    assert!(st0.success(), "rank 0: {err0}");
    assert!(st1.success(), "rank 1: {err1}");
    assert!(
        out1.is_empty() && err1.is_empty(),
        "rank 1 said: {out1}{err1}"
    );
    assert!(err0.contains("on 2 rank(s), one per process"), "{err0}");
    let got = tensors(&dir.join("rank0.safetensors"))
        .remove("output")
        .expect("output");
    assert_close("torchrun-style vs serial", &got, &serial);
    assert!(
        !dir.join("rank1.safetensors").exists(),
        "rank 1 wrote its output"
    );
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn launcher_variables_that_do_not_fit_are_clear_errors() {
    let dir = scratch("env-errors");
    let out_path = dir.join("x.safetensors");
    let with_env = |vars: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Command::new(ditto_bin());
        cmd.args(forward_args(&out_path)).args(extra);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let local = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")];
    let err = with_env(
        &[&[("RANK", "0"), ("WORLD_SIZE", "4")][..], &local].concat(),
        &["--ulysses-degree", "2"],
    );
    assert!(
        err.contains("RANK=0 of WORLD_SIZE=4 but the parallel layout has 2 rank(s)"),
        "{err}"
    );
    let err = with_env(
        &[("RANK", "2"), ("WORLD_SIZE", "2")],
        &["--ulysses-degree", "2"],
    );
    assert!(err.contains("RANK=2 but WORLD_SIZE=2"), "{err}");
    let err = with_env(
        &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "x")],
        &[],
    );
    assert!(err.contains("OMPI_COMM_WORLD_SIZE=\"x\""), "{err}");
    let err = with_env(
        &[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NNODES", "2"),
        ],
        &["--ulysses-degree", "2"],
    );
    assert!(err.contains("MASTER_ADDR is not set"), "{err}");
    let err = with_env(&[], &["--ulysses-degree", "2", "--timeout", "0"]);
    assert!(err.contains("--timeout 0 must be a positive"), "{err}");
    assert!(!out_path.exists());
}

#[test]
fn rank_that_never_arrives_is_named() {
    let dir = scratch("never-arrives");
    let port = free_port().to_string();
    let r0 = Running::start(
        Command::new(ditto_bin())
            .args(forward_args(&dir.join("out.safetensors")))
            .args(["--ulysses-degree", "2", "--timeout", "3"])
            .env("RANK", "0")
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port),
    );
    let (status, _, err, took) = r0.finish(Duration::from_secs(15));
    assert!(!status.success());
    assert!(err.contains("rank(s) 1 did not arrive"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

/// `ditto launch --nproc-per-node 2 -- generate` with more steps than a test will wait
/// for, started and seen to be denoising (rank 0 printed "compiled"). Returns the
/// launcher and the pids of its ranks (from its "pids:" line).
fn long_generation(dir: &Path) -> (Running, Vec<u32>) {
    let mut launcher = Running::start(
        Command::new(ditto_bin())
            .args([
                "launch",
                "--nproc-per-node",
                "2",
                "--grace-period",
                "2",
                "--",
            ])
            .args(generate_args(dir, "long", 1_000_000))
            .args(["--ulysses-degree", "2", "--timeout", "10"]),
    );
    let pids_line = launcher.wait_for_line("pids:", Duration::from_secs(10));
    let pids: Vec<u32> = pids_line
        .split("pids:")
        .nth(1)
        .expect("pids")
        .split(',')
        .map(|p| p.rsplit('=').next().unwrap().trim().parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2, "{pids_line}");
    launcher.wait_for_line("[rank 0] compiled in", Duration::from_secs(10));
    // A few steps in.
    thread::sleep(Duration::from_millis(300));
    (launcher, pids)
}

#[test]
fn killed_rank_fails_the_launch_naming_it() {
    let dir = scratch("kill-rank");
    let (launcher, pids) = long_generation(&dir);
    let start = Instant::now();
    unsafe {
        libc::kill(pids[1] as libc::pid_t, libc::SIGKILL);
    }
    let (status, _, err, _) = launcher.finish(Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "rank 1 (pid {}) was killed by signal 9 (SIGKILL); then:",
            pids[1]
        )),
        "{err}"
    );
    // Within the collective timeout (10 s): the dead peer is detected, not waited out.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(!dir.join("long.png").exists());
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank() {
    let dir = scratch("sigterm");
    let (launcher, _) = long_generation(&dir);
    unsafe {
        libc::kill(launcher.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let (status, _, err, took) = launcher.finish(Duration::from_secs(15));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(
        err.contains("interrupted by signal 15 (SIGTERM): stopped 2 rank(s)"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_no_processes_left(&dir, Duration::from_secs(1));
}

#[test]
fn killed_launcher_takes_its_ranks_along() {
    let dir = scratch("kill-launcher");
    let (mut launcher, pids) = long_generation(&dir);
    launcher.child.kill().expect("kill the launcher");
    let _ = launcher.child.wait();
    // PR_SET_PDEATHSIG: the kernel kills the ranks when their parent dies.
    assert_no_processes_left(&dir, Duration::from_secs(3));
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty()),
            "rank pid {pid} is still alive"
        );
    }
}

#[test]
fn the_rank_that_failed_first_is_blamed_not_its_peers() {
    let dir = scratch("blame");
    // Rank 0 computes, then cannot write its output; rank 1 then fails at the final
    // barrier because of it, possibly before rank 0 has exited.
    let out = run(Command::new(ditto_bin())
        .args(["launch", "--nproc-per-node", "2", "--"])
        .args(forward_args(&dir.join("no-such-dir/out.safetensors")))
        .args(["--ulysses-degree", "2"]));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("error: launch: rank 0 (pid"), "{err}");
    assert!(err.contains("exited with status 1; then:"), "{err}");
    assert_no_processes_left(&dir, Duration::from_secs(2));
}

#[test]
fn launch_usage_errors() {
    let bad = |args: &[&str]| {
        let out = run(Command::new(ditto_bin()).args(args));
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let err = bad(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "compile",
        "--model",
        "x",
    ]);
    assert!(err.contains("`compile` cannot run as ranks"), "{err}");
    let err = bad(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--",
        "forward",
    ]);
    assert!(err.contains("--node-rank 2 with --nnodes 2"), "{err}");
    let err = bad(&["launch", "--nproc-per-node", "0", "--", "forward"]);
    assert!(err.contains("--nproc-per-node must be at least 1"), "{err}");
    // A rank's own error is forwarded, and the launch names the rank and its status. Both
    // ranks fail alike; whichever exits first makes the launcher stop the other, which may
    // then never print, so either rank's error will do.
    let err = bad(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        "forward",
        "--model",
        "/nonexistent",
        "--inputs",
        "x",
        "--out",
        "y",
    ]);
    assert!(
        (err.contains("[rank 0] error:") || err.contains("[rank 1] error:"))
            && err.contains("/nonexistent")
            && err.contains("exited with status 1"),
        "{err}"
    );
}
