//! `ditto launch`: starts the ranks of this node as child processes of the current
//! executable, with the environment torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK,
//! LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT), forwards their output line by
//! line prefixed by `[rank r]`, and fails as soon as one rank fails, stopping the others.
//!
//! No rank outlives the launcher:
//! - every child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, set
//!   between fork and exec), so even a `kill -9` of the launcher takes the ranks with it;
//! - SIGINT, SIGTERM and SIGHUP to the launcher stop the ranks (SIGTERM, then SIGKILL after
//!   the grace period) before it exits;
//! - the launcher returns only after every child has been reaped.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::dist_env::DEFAULT_MASTER_PORT;

/// The subcommands that know how to be one rank of a multi-process run. Anything else
/// would run N identical copies writing the same files.
pub const RANK_COMMANDS: &[&str] = &["forward", "generate"];

pub use crate::dist_env::PEER_FAILED_EXIT;

/// How long the launcher waits, after a rank exits with [`PEER_FAILED_EXIT`], for the rank
/// that caused it to exit too, before stopping everyone.
const SETTLE: Duration = Duration::from_millis(500);

/// What to start.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// The executable of the ranks (the current `ditto`).
    pub program: PathBuf,
    /// Its arguments: a subcommand from [`RANK_COMMANDS`] and its flags.
    pub args: Vec<OsString>,
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Host of rank 0 (node 0), where its rendezvous store listens.
    pub master_addr: String,
    /// Port of the rendezvous; default: a free port for one node, 29500 for several
    /// (the nodes must agree on it, and only node 0 could pick a free one).
    pub master_port: Option<u16>,
    /// Also write every rank's output (unprefixed) to `rank<r>.log` here.
    pub log_dir: Option<PathBuf>,
    /// Between SIGTERM and SIGKILL when stopping the ranks.
    pub grace_period: Duration,
}

/// How a launch ended, when not every rank succeeded.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Usage(String),
    #[error("could not start rank {rank} ({program}): {error}")]
    Spawn {
        rank: usize,
        program: String,
        error: io::Error,
    },
    #[error("{0}")]
    Io(String),
    /// A rank failed; the others were stopped. `others` describes how each other rank
    /// ended.
    #[error("rank {rank} (pid {pid}) {how}{}", others_text(.others))]
    RankFailed {
        rank: usize,
        pid: u32,
        how: String,
        others: Vec<String>,
    },
    /// The launcher got a signal and stopped the ranks.
    #[error("interrupted by {}: stopped {ranks} rank(s)", signal_name(*.signal))]
    Interrupted { signal: i32, ranks: usize },
}

fn others_text(others: &[String]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!("; then:\n  {}", others.join("\n  "))
    }
}

impl LaunchError {
    /// The launcher's exit code: 128 + signal for an interrupt (the shell convention), 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Interrupted { signal, .. } => (128 + signal).clamp(1, 255) as u8,
            _ => 1,
        }
    }
}

/// `SIGKILL`-style names for the signals a rank usually dies of.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) if code == i32::from(PEER_FAILED_EXIT) => {
            format!("exited with status {code} (another rank's failure)")
        }
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by {}{}",
            signal_name(sig),
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        (None, None) => format!("ended with {status}"),
    }
}

// ------------------------------------------------------------------------------------------
// Signals to the launcher.

/// The last SIGINT/SIGTERM/SIGHUP received (0: none). A signal handler may only touch
/// lock-free atomics; the main loop polls this.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Catches the stop signals while alive; restores the previous handlers on drop.
struct SignalGuard {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> io::Result<SignalGuard> {
        PENDING_SIGNAL.store(0, Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in STOP_SIGNALS {
            // SAFETY: a zeroed sigaction is a valid starting point; the handler only stores
            // to an atomic, which is async-signal-safe.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                // SA_RESTART: a signal must not make the reader threads' reads fail.
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &action, &mut old) != 0 {
                    return Err(io::Error::last_os_error());
                }
                previous.push((sig, old));
            }
        }
        Ok(SignalGuard { previous })
    }

    fn take() -> Option<i32> {
        match PENDING_SIGNAL.swap(0, Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restoring an action sigaction itself returned.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Children.

/// One started rank. `reaped` guards against signalling a pid the kernel may have given
/// to another process: the waiter sets it (holding the lock) before reaping, and
/// [`Rank::signal`] checks it under the same lock, so a pid is only signalled while it is
/// still ours (running, or a zombie not yet reaped).
struct Rank {
    rank: usize,
    pid: u32,
    reaped: Mutex<bool>,
}

impl Rank {
    fn signal(&self, sig: libc::c_int) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: kill has no memory-safety preconditions. ESRCH (already gone) is fine.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }
}

/// Waits for the child to exit without reaping it (WNOWAIT), marks it reaped under the
/// lock, then reaps it: see [`Rank`].
fn wait_child(rank: &Rank, mut child: Child) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: waitid writes into a zeroed siginfo_t we own.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                rank.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            // Cannot watch it without reaping: fall back to a plain wait.
            break;
        }
    }
    let mut reaped = rank.reaped.lock().unwrap_or_else(|e| e.into_inner());
    *reaped = true;
    child.wait()
}

enum Event {
    Exited {
        rank: usize,
        status: io::Result<ExitStatus>,
    },
}

/// Copies `reader` line by line to the launcher's stdout or stderr, prefixed by
/// `[rank r] `, and unprefixed to the rank's log file. Keeps draining after a write error
/// (the launcher's own output closed): a rank blocked on a full pipe would hang.
fn forward_lines(rank: usize, reader: impl Read, to_stderr: bool, log: Option<Arc<Mutex<File>>>) {
    let mut reader = BufReader::new(reader);
    let prefix = format!("[rank {rank}] ");
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let mut out = Vec::with_capacity(prefix.len() + line.len());
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&line);
        // One write_all under the stream's lock: lines of different ranks never interleave.
        let _ = if to_stderr {
            io::stderr().lock().write_all(&out)
        } else {
            let mut s = io::stdout().lock();
            s.write_all(&out).and_then(|_| s.flush())
        };
        if let Some(f) = &log {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(&line);
        }
    }
}

/// A free TCP port on `addr` for rank 0's store. The port is released before rank 0 binds
/// it, so another process could take it in between; for one node that window is small,
/// and `--master-port` is there when it matters.
fn free_port(addr: &str) -> io::Result<u16> {
    let listener = TcpListener::bind((addr, 0))?;
    Ok(listener.local_addr()?.port())
}

fn validate(o: &LaunchOptions) -> Result<(), LaunchError> {
    let usage = |m: String| Err(LaunchError::Usage(m));
    if o.nproc_per_node == 0 {
        return usage("--nproc-per-node must be at least 1".into());
    }
    if o.nnodes == 0 {
        return usage("--nnodes must be at least 1".into());
    }
    if o.node_rank >= o.nnodes {
        return usage(format!(
            "--node-rank {} with --nnodes {}: nodes go from 0 to {}",
            o.node_rank,
            o.nnodes,
            o.nnodes - 1
        ));
    }
    if o.master_port == Some(0) {
        return usage("--master-port must be 1 to 65535".into());
    }
    let Some(first) = o.args.first() else {
        return usage(format!(
            "give the command after `--`, e.g. `ditto launch --nproc-per-node 2 -- forward ...` ({})",
            RANK_COMMANDS.join(" or ")
        ));
    };
    if !RANK_COMMANDS.iter().any(|c| first == *c) {
        return usage(format!(
            "`{}` cannot run as ranks: ditto launch runs {}",
            first.to_string_lossy(),
            RANK_COMMANDS.join(" or ")
        ));
    }
    Ok(())
}

/// Starts the ranks of this node and waits for them. `Ok` when every rank exited with
/// status 0; otherwise the first failure (in time), after every rank has been stopped
/// and reaped.
pub fn launch(o: &LaunchOptions) -> Result<(), LaunchError> {
    validate(o)?;
    let world = o.nproc_per_node * o.nnodes;
    let port = match o.master_port {
        Some(p) => p,
        None if o.nnodes == 1 => free_port(&o.master_addr).map_err(|e| {
            LaunchError::Io(format!(
                "no free port on --master-addr {}: {e}",
                o.master_addr
            ))
        })?,
        None => DEFAULT_MASTER_PORT,
    };
    if let Some(dir) = &o.log_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| LaunchError::Io(format!("--log-dir {}: {e}", dir.display())))?;
    }
    // Each rank's kernels use a thread pool; N ranks with a pool of every core each would
    // oversubscribe the machine N times (torchrun sets OMP_NUM_THREADS=1 for the same
    // reason). A value the user set wins.
    let threads = std::env::var_os("RAYON_NUM_THREADS").is_none().then(|| {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        (cores / o.nproc_per_node).max(1)
    });

    let guard = SignalGuard::install()
        .map_err(|e| LaunchError::Io(format!("installing signal handlers: {e}")))?;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut ranks: Vec<Arc<Rank>> = Vec::new();
    let mut io_threads = Vec::new();
    // SAFETY: getpid has no preconditions.
    let launcher_pid = unsafe { libc::getpid() };
    let mut spawn_error = None;
    for local in 0..o.nproc_per_node {
        let rank = o.node_rank * o.nproc_per_node + local;
        let log = match &o.log_dir {
            Some(dir) => {
                let path = dir.join(format!("rank{rank}.log"));
                match File::create(&path) {
                    Ok(f) => Some(Arc::new(Mutex::new(f))),
                    Err(e) => {
                        spawn_error = Some(LaunchError::Io(format!("{}: {e}", path.display())));
                        break;
                    }
                }
            }
            None => None,
        };
        let mut cmd = Command::new(&o.program);
        cmd.args(&o.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", o.nproc_per_node.to_string())
            .env("NODE_RANK", o.node_rank.to_string())
            .env("GROUP_RANK", o.node_rank.to_string())
            .env("MASTER_ADDR", &o.master_addr)
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The death signal fires when the *thread* that forked exits, which is why
                // ranks are spawned from the launcher's main thread (alive until it returns).
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGKILL as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The launcher may have died before prctl: then no signal will ever come.
                if libc::getppid() != launcher_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(error) => {
                spawn_error = Some(LaunchError::Spawn {
                    rank,
                    program: o.program.display().to_string(),
                    error,
                });
                break;
            }
        };
        let r = Arc::new(Rank {
            rank,
            pid: child.id(),
            reaped: Mutex::new(false),
        });
        if let Some(out) = child.stdout.take() {
            let log = log.clone();
            io_threads.push(thread::spawn(move || forward_lines(rank, out, false, log)));
        }
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            io_threads.push(thread::spawn(move || forward_lines(rank, err, true, log)));
        }
        let waiter = {
            let r = r.clone();
            let tx = tx.clone();
            move || {
                let status = wait_child(&r, child);
                let _ = tx.send(Event::Exited {
                    rank: r.rank,
                    status,
                });
            }
        };
        thread::spawn(waiter);
        ranks.push(r);
    }
    drop(tx);

    if spawn_error.is_none() {
        let pids: Vec<String> = ranks
            .iter()
            .map(|r| format!("rank {} = {}", r.rank, r.pid))
            .collect();
        eprintln!(
            "launch: node {} of {}, {} rank(s) of {world}, rendezvous at {}:{port}; pids: {}",
            o.node_rank,
            o.nnodes,
            o.nproc_per_node,
            o.master_addr,
            pids.join(", ")
        );
    }

    let result = supervise(&ranks, &rx, o.grace_period, spawn_error);
    for t in io_threads {
        let _ = t.join();
    }
    drop(guard);
    result
}

/// How each rank ended, for the final message.
struct Ended {
    status: Result<ExitStatus, String>,
}

/// Waits for every rank; on the first failure or a stop signal, stops the others
/// (SIGTERM, then SIGKILL after `grace`). Returns after every rank was reaped.
fn supervise(
    ranks: &[Arc<Rank>],
    rx: &mpsc::Receiver<Event>,
    grace: Duration,
    spawn_error: Option<LaunchError>,
) -> Result<(), LaunchError> {
    let stop_all = |sig| ranks.iter().for_each(|r| r.signal(sig));
    let mut ended: Vec<Option<Ended>> = (0..ranks.len()).map(|_| None).collect();
    // Ranks still running when the launcher began stopping them: their end is the
    // launcher's doing, not theirs.
    let mut stopped = vec![false; ranks.len()];
    // The rank to blame: the first to fail on its own, else the first to fail at all.
    let mut first_failure: Option<usize> = None;
    // After a failure caused by a peer, how long to wait for that peer's own failure.
    let mut settle_until: Option<Instant> = None;
    let mut interrupted: Option<i32> = None;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    let mut error = spawn_error;
    if error.is_some() {
        stop_all(libc::SIGTERM);
        stopping = Some(Instant::now());
    }
    let index_of = |rank: usize| ranks.iter().position(|r| r.rank == rank);
    let mut remaining = ranks.len();
    while remaining > 0 {
        let event = rx.recv_timeout(Duration::from_millis(50));
        // A signal before the event: a Ctrl-C in a terminal reaches the ranks too (same
        // process group), and the rank it kills must not be blamed for the stop.
        if let Some(sig) = SignalGuard::take() {
            if stopping.is_none() {
                interrupted = Some(sig);
                stop_all(libc::SIGTERM);
                stopping = Some(Instant::now());
            } else if !killed {
                // Asked again while stopping: no more patience.
                stop_all(libc::SIGKILL);
                killed = true;
            }
        }
        match event {
            Ok(Event::Exited { rank, status }) => {
                let Some(i) = index_of(rank) else { continue };
                remaining -= 1;
                let failed = !matches!(&status, Ok(s) if s.success());
                let on_its_own = match &status {
                    Ok(s) => !s.success() && s.code() != Some(i32::from(PEER_FAILED_EXIT)),
                    Err(_) => true,
                };
                ended[i] = Some(Ended {
                    status: status.map_err(|e| e.to_string()),
                });
                if failed && stopping.is_none() {
                    let blamed_on_its_own = first_failure
                        .and_then(|f| ended[f].as_ref())
                        .is_some_and(|e| {
                            !matches!(&e.status, Ok(s) if s.code() == Some(i32::from(PEER_FAILED_EXIT)))
                        });
                    if first_failure.is_none() || (on_its_own && !blamed_on_its_own) {
                        first_failure = Some(i);
                    }
                    if on_its_own {
                        settle_until = Some(Instant::now());
                    } else if settle_until.is_none() {
                        settle_until = Some(Instant::now() + SETTLE);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every waiter is gone; nothing more can arrive.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stopping.is_none() && settle_until.is_some_and(|t| Instant::now() >= t) {
            for (j, e) in ended.iter().enumerate() {
                stopped[j] = e.is_none();
            }
            stop_all(libc::SIGTERM);
            stopping = Some(Instant::now());
        }
        if let Some(t) = stopping {
            if !killed && t.elapsed() >= grace {
                stop_all(libc::SIGKILL);
                killed = true;
            }
        }
    }

    if let Some(e) = error.take() {
        return Err(e);
    }
    if let Some(signal) = interrupted {
        return Err(LaunchError::Interrupted {
            signal,
            ranks: ranks.len(),
        });
    }
    let Some(i) = first_failure else {
        return Ok(());
    };
    let how = |e: &Option<Ended>| match e {
        Some(Ended { status: Ok(s) }) => describe_status(s),
        Some(Ended { status: Err(e) }) => format!("could not be waited for: {e}"),
        None => "was never seen to exit".to_string(),
    };
    let others = ranks
        .iter()
        .zip(&ended)
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(j, (r, e))| {
            let signalled = matches!(e, Some(Ended { status: Ok(s) }) if s.signal().is_some());
            let by_us = if stopped[j] && signalled {
                ", stopped by the launcher"
            } else {
                ""
            };
            format!("rank {} (pid {}) {}{by_us}", r.rank, r.pid, how(e))
        })
        .collect();
    Err(LaunchError::RankFailed {
        rank: ranks[i].rank,
        pid: ranks[i].pid,
        how: how(&ended[i]),
        others,
    })
}
