//! Rendezvous store: a small key-value server that ranks in separate processes use to
//! find each other, like torch.distributed's `TCPStore`.
//!
//! Rank 0 hosts it ([`TcpStore::serve`]: a background thread accepting clients, one
//! handler thread per client, a `key -> bytes` map behind a mutex and a condvar); every
//! rank, rank 0 included, connects to it with [`TcpStore::connect`], which retries until
//! its timeout because rank 0 may start after the others.
//!
//! Blocking operations (`get` until a key exists, `barrier` until every rank arrived)
//! wait on the *server*, which is the one place that knows who arrived, so a barrier
//! timeout can name exactly the ranks that never came. The client sends its timeout with
//! each request and the server answers at that deadline at the latest; the client's own
//! socket read timeout is only a backstop for a server that stopped answering.
//!
//! Protocol (little-endian throughout): every message is a `u32` body length followed
//! by the body. A request body is an opcode byte and its fields; a reply body is a
//! status byte (`OK`, `TIMEOUT`, `ERROR`) and its fields. Strings and byte values are a
//! `u32` length and the bytes. One request is in flight per connection at a time.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::net::{SocketAddrV4, SocketAddrV6, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Sent in HELLO so that a client that reached some other service fails loudly instead
/// of misparsing its bytes.
const MAGIC: u32 = 0x4454_5331; // "DTS1"

/// Bodies larger than this are a corrupt stream, not a real request (rendezvous values
/// are addresses and counters).
const MAX_BODY: usize = 256 << 20;

/// How long a client waits between attempts to reach a server that is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(25);

mod opcode {
    pub const HELLO: u8 = 1;
    pub const SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const BARRIER: u8 = 5;
}

mod status {
    pub const OK: u8 = 0;
    pub const TIMEOUT: u8 = 1;
    pub const ERROR: u8 = 2;
}

/// Errors of the rendezvous store. Every variant names the store's address or the key /
/// barrier involved, so a rank's log line says what it was waiting for and where.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The server could not be started (address in use, bad address).
    #[error("cannot serve the rendezvous store at {addr}: {reason}")]
    Bind { addr: String, reason: String },
    /// No server answered at `addr` before the timeout (refused, unreachable).
    #[error("could not connect to the rendezvous store at {addr} within {after:?}: {reason}")]
    Connect {
        addr: String,
        after: Duration,
        reason: String,
    },
    /// The connection to the server broke (reset, closed, no reply): usually rank 0 died.
    #[error("rendezvous store at {addr}: connection lost during {op}: {reason}")]
    Disconnected {
        addr: String,
        op: &'static str,
        reason: String,
    },
    /// `get` waited for a key that nobody set.
    #[error("rendezvous store at {addr}: key `{key}` was not set within {after:?}")]
    KeyTimeout {
        addr: String,
        key: String,
        after: Duration,
    },
    /// A barrier that not every rank reached; `missing` lists the absent ranks.
    #[error("rendezvous `{name}` timed out after {after:?}: rank(s) {} did not arrive", rank_list(.missing))]
    BarrierTimeout {
        name: String,
        after: Duration,
        missing: Vec<usize>,
    },
    /// The server refused a request (rank outside the world, `add` on a non-counter).
    #[error("rendezvous store at {addr}: {message}")]
    Rejected { addr: String, message: String },
    /// The peer at `addr` does not speak this protocol.
    #[error("rendezvous store at {addr}: protocol error: {message}")]
    Protocol { addr: String, message: String },
}

fn rank_list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Locks ignoring poisoning: critical sections only move data in and out of maps, and
/// the store must keep answering the other ranks when one handler thread panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Wire encoding

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u32(v.len() as u32);
        s.0.extend_from_slice(v);
        s
    }
    fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
}

struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!(
                "truncated message ({} byte(s) left, {n} needed)",
                self.buf.len()
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    // One buffer, one write: with TCP_NODELAY two writes would be two packets.
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)
}

fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {MAX_BODY}"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Milliseconds on the wire, rounded up so that a wait never ends before the caller's
/// deadline; saturates so `Duration::MAX` means "as long as allowed".
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// Server

#[derive(Default)]
struct ServerState {
    kv: HashMap<String, Vec<u8>>,
    /// Per barrier name, one arrival set per generation: a rank's k-th call of
    /// `barrier(name)` joins generation k, so a name can be reused (one barrier per
    /// denoising step, say) without an early rank slipping through a stale generation.
    barriers: HashMap<String, Vec<BTreeSet<usize>>>,
    barrier_calls: HashMap<(String, usize), usize>,
}

struct ServerShared {
    world_size: usize,
    /// Bound on every blocking request, whatever the client asked for, so that a client
    /// with a huge timeout cannot pin a handler thread forever.
    timeout: Duration,
    state: Mutex<ServerState>,
    changed: Condvar,
    shutdown: AtomicBool,
    /// One clone per client socket (to unblock its handler at shutdown) and the handler.
    clients: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

/// Why a blocking wait on the server ended without its condition.
enum WaitEnd {
    TimedOut(Duration),
    ShuttingDown,
}

impl ServerShared {
    /// Waits until `ready` returns a value, the wait (capped by the server timeout)
    /// passes, or the server shuts down.
    fn wait_for<T>(
        &self,
        wait: Duration,
        mut ready: impl FnMut(&mut ServerState) -> Option<T>,
    ) -> Result<T, WaitEnd> {
        let wait = wait.min(self.timeout);
        let deadline = Instant::now().checked_add(wait);
        let mut state = lock(&self.state);
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return Err(WaitEnd::ShuttingDown);
            }
            if let Some(v) = ready(&mut state) {
                return Ok(v);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Err(WaitEnd::TimedOut(wait));
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The reply to one request; `Ok(None)` when the server is shutting down and the
    /// connection should close without one (the client then reports the lost store).
    fn process(&self, rank: &mut Option<usize>, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let mut d = Dec { buf: body };
        let op = d.u8()?;
        if op == opcode::HELLO {
            if d.u32()? != MAGIC {
                return Err("not a ditto rendezvous client".into());
            }
            let r = d.u64()? as usize;
            if r >= self.world_size {
                return Err(format!(
                    "rank {r} is outside the world of {} rank(s)",
                    self.world_size
                ));
            }
            *rank = Some(r);
            return Ok(Some(
                Enc::default().u8(status::OK).u64(self.world_size as u64).0,
            ));
        }
        let Some(me) = *rank else {
            return Err("request before HELLO".into());
        };
        let timed_out = |waited: Duration| Enc::default().u8(status::TIMEOUT).u64(millis(waited));
        match op {
            opcode::SET => {
                let key = d.string()?;
                let value = d.bytes()?.to_vec();
                lock(&self.state).kv.insert(key, value);
                self.changed.notify_all();
                Ok(Some(Enc::default().u8(status::OK).0))
            }
            opcode::GET => {
                let key = d.string()?;
                let wait = Duration::from_millis(d.u64()?);
                match self.wait_for(wait, |s| s.kv.get(&key).cloned()) {
                    Ok(v) => Ok(Some(Enc::default().u8(status::OK).bytes(&v).0)),
                    Err(WaitEnd::TimedOut(w)) => Ok(Some(timed_out(w).0)),
                    Err(WaitEnd::ShuttingDown) => Ok(None),
                }
            }
            opcode::ADD => {
                let key = d.string()?;
                let delta = d.i64()?;
                let mut state = lock(&self.state);
                // Counters are stored as decimal text (like TCPStore), so `get` on a
                // counter reads naturally.
                let current = match state.kv.get(&key) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| format!("add on key `{key}`, which is not a counter"))?,
                };
                let next = current
                    .checked_add(delta)
                    .ok_or_else(|| format!("counter `{key}` overflows"))?;
                state.kv.insert(key, next.to_string().into_bytes());
                drop(state);
                self.changed.notify_all();
                Ok(Some(Enc::default().u8(status::OK).i64(next).0))
            }
            opcode::BARRIER => {
                let name = d.string()?;
                let wait = Duration::from_millis(d.u64()?);
                let generation = {
                    let mut state = lock(&self.state);
                    let calls = state.barrier_calls.entry((name.clone(), me)).or_insert(0);
                    let generation = *calls;
                    *calls += 1;
                    let gens = state.barriers.entry(name.clone()).or_default();
                    if gens.len() <= generation {
                        gens.resize_with(generation + 1, BTreeSet::new);
                    }
                    gens[generation].insert(me);
                    generation
                };
                self.changed.notify_all();
                let world = self.world_size;
                let arrived = |s: &mut ServerState| s.barriers[&name][generation].clone();
                match self.wait_for(wait, |s| (arrived(s).len() == world).then_some(())) {
                    Ok(()) => Ok(Some(Enc::default().u8(status::OK).0)),
                    Err(WaitEnd::TimedOut(w)) => {
                        let here = arrived(&mut lock(&self.state));
                        let missing: Vec<usize> =
                            (0..world).filter(|r| !here.contains(r)).collect();
                        let mut reply = timed_out(w).u32(missing.len() as u32);
                        for r in missing {
                            reply = reply.u32(r as u32);
                        }
                        Ok(Some(reply.0))
                    }
                    Err(WaitEnd::ShuttingDown) => Ok(None),
                }
            }
            other => Err(format!("unknown request opcode {other}")),
        }
    }

    fn handle(&self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut rank = None;
        // Ends when the client disconnects or the server shuts its socket down.
        while let Ok(body) = read_frame(&mut stream) {
            let reply = match self.process(&mut rank, &body) {
                Ok(Some(reply)) => reply,
                Ok(None) => return,
                Err(message) => Enc::default().u8(status::ERROR).str(&message).0,
            };
            if write_frame(&mut stream, &reply).is_err() {
                return;
            }
        }
    }
}

/// The running store server (rank 0 keeps it alive for the whole job). Dropping it
/// stops the server: clients' pending and later requests fail naming its address.
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// The bound address (the real port when `serve` was given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn world_size(&self) -> usize {
        self.shared.world_size
    }
}

impl fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreServer")
            .field("local_addr", &self.local_addr)
            .field("world_size", &self.shared.world_size)
            .finish_non_exhaustive()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            // Under the lock, so no waiter can miss the flag between its check and wait.
            let _guard = lock(&self.shared.state);
            self.shared.changed.notify_all();
        }
        // `accept` has no timeout: a connection of our own wakes it to see the flag.
        let wake = match self.local_addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, a.port(), 0, 0))
            }
            a => a,
        };
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woke {
                let _ = acceptor.join();
            }
            // Otherwise the acceptor stays blocked in accept; leaking it beats hanging.
        }
        let clients = std::mem::take(&mut *lock(&self.shared.clients));
        for (stream, _) in &clients {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handler) in clients {
            let _ = handler.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client

struct ClientConn {
    stream: TcpStream,
    /// Set when a request broke the stream mid-way: later requests fail with the same
    /// reason instead of reading a stale reply.
    broken: Option<String>,
}

/// A rank's connection to the rendezvous store. Shareable between threads (`&self`
/// methods; requests are serialized on the one connection).
pub struct TcpStore {
    addr: String,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    local_addr: SocketAddr,
    conn: Mutex<ClientConn>,
}

impl fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            "the store closed the connection (has rank 0 exited?)".to_string()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no reply in time".to_string(),
        _ => e.to_string(),
    }
}

impl TcpStore {
    /// Starts the store server on `addr` (port 0 picks a free port: see
    /// [`StoreServer::local_addr`]) for a world of `world_size` ranks. `timeout` bounds
    /// every blocking request it serves.
    pub fn serve(
        addr: impl ToSocketAddrs + fmt::Display,
        world_size: usize,
        timeout: Duration,
    ) -> Result<StoreServer, StoreError> {
        let bind_err = |reason: String| StoreError::Bind {
            addr: addr.to_string(),
            reason,
        };
        let listener = TcpListener::bind(&addr).map_err(|e| bind_err(e.to_string()))?;
        let local_addr = listener.local_addr().map_err(|e| bind_err(e.to_string()))?;
        let shared = Arc::new(ServerShared {
            world_size,
            timeout,
            state: Mutex::new(ServerState::default()),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            clients: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("ditto-store-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(|e| bind_err(format!("cannot start the accept thread: {e}")))?
        };
        Ok(StoreServer {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Connects rank `rank` to the store at `addr`, retrying until `timeout` (the server
    /// may not be up yet). `timeout` is also the default wait of `get` and `barrier`.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Display,
        rank: usize,
        timeout: Duration,
    ) -> Result<TcpStore, StoreError> {
        let name = addr.to_string();
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let left = || match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        let mut last = String::from("no address to try");
        let stream = 'retry: loop {
            match addr.to_socket_addrs() {
                Ok(candidates) => {
                    for a in candidates {
                        // At least a few ms per attempt, at most 1 s, so that one black-holed
                        // address cannot eat the whole budget before a retry.
                        let attempt =
                            left().clamp(Duration::from_millis(10), Duration::from_secs(1));
                        match TcpStream::connect_timeout(&a, attempt) {
                            Ok(s) => break 'retry s,
                            Err(e) => last = e.to_string(),
                        }
                    }
                }
                Err(e) => last = format!("cannot resolve the address: {e}"),
            }
            let left = left();
            if left.is_zero() {
                return Err(StoreError::Connect {
                    addr: name,
                    after: timeout,
                    reason: last,
                });
            }
            thread::sleep(RETRY_PAUSE.min(left));
        };
        let _ = stream.set_nodelay(true);
        let local_addr = stream.local_addr().map_err(|e| StoreError::Disconnected {
            addr: name.clone(),
            op: "connect",
            reason: e.to_string(),
        })?;
        let mut store = TcpStore {
            addr: name,
            rank,
            world_size: 0,
            timeout,
            local_addr,
            conn: Mutex::new(ClientConn {
                stream,
                broken: None,
            }),
        };
        let hello = Enc::default()
            .u8(opcode::HELLO)
            .u32(MAGIC)
            .u64(rank as u64)
            .0;
        let reply = store.request("connect", &hello, Duration::ZERO)?;
        let mut d = Dec { buf: &reply[1..] };
        store.world_size = d.u64().map_err(|m| store.protocol(m))? as usize;
        Ok(store)
    }

    /// The address this client was given (what errors name).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The world size the server was started with.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// This end of the connection to the server: the local interface that reaches
    /// rank 0, which is the one the TCP communicator listens on for its peers.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn protocol(&self, message: String) -> StoreError {
        StoreError::Protocol {
            addr: self.addr.clone(),
            message,
        }
    }

    /// Sends one request and returns the reply body (status byte first), mapping the
    /// `ERROR` status to `Rejected`. `wait` is how long the server may block on it.
    fn request(
        &self,
        op: &'static str,
        body: &[u8],
        wait: Duration,
    ) -> Result<Vec<u8>, StoreError> {
        let mut conn = lock(&self.conn);
        let disconnected = |reason: String| StoreError::Disconnected {
            addr: self.addr.clone(),
            op,
            reason,
        };
        if let Some(reason) = &conn.broken {
            return Err(disconnected(reason.clone()));
        }
        // Backstop only: the server replies by `wait`; the slack covers a loaded machine.
        let backstop = wait
            .saturating_add(self.timeout.max(Duration::from_secs(1)))
            .min(Duration::from_secs(60 * 60 * 24));
        let result = conn
            .stream
            .set_read_timeout(Some(backstop))
            .and_then(|()| write_frame(&mut conn.stream, body))
            .and_then(|()| read_frame(&mut conn.stream));
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                let reason = describe_io(&e);
                conn.broken = Some(reason.clone());
                return Err(disconnected(reason));
            }
        };
        drop(conn);
        match reply.first() {
            Some(&status::OK) | Some(&status::TIMEOUT) => Ok(reply),
            Some(&status::ERROR) => {
                let message = Dec { buf: &reply[1..] }
                    .string()
                    .unwrap_or_else(|e| format!("unreadable error: {e}"));
                Err(StoreError::Rejected {
                    addr: self.addr.clone(),
                    message,
                })
            }
            Some(other) => Err(self.protocol(format!("unknown reply status {other}"))),
            None => Err(self.protocol("empty reply".into())),
        }
    }

    /// Sets `key` to `value` (replacing any previous value) and wakes its waiters.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let body = Enc::default().u8(opcode::SET).str(key).bytes(value).0;
        self.request("set", &body, Duration::ZERO).map(|_| ())
    }

    /// The value of `key`, waiting up to the store timeout for some rank to set it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        self.get_timeout(key, self.timeout)
    }

    /// `get` with an explicit wait.
    pub fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        match self.get_inner(key, timeout)? {
            Ok(v) => Ok(v),
            Err(after) => Err(StoreError::KeyTimeout {
                addr: self.addr.clone(),
                key: key.to_string(),
                after,
            }),
        }
    }

    /// The value of `key` if it is set now, without waiting.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_inner(key, Duration::ZERO)?.ok())
    }

    /// Inner result: the value, or how long the server waited for it.
    fn get_inner(
        &self,
        key: &str,
        wait: Duration,
    ) -> Result<Result<Vec<u8>, Duration>, StoreError> {
        let body = Enc::default().u8(opcode::GET).str(key).u64(millis(wait)).0;
        let reply = self.request("get", &body, wait)?;
        let mut d = Dec { buf: &reply[1..] };
        if reply[0] == status::TIMEOUT {
            let waited = d.u64().map_err(|m| self.protocol(m))?;
            return Ok(Err(Duration::from_millis(waited)));
        }
        Ok(Ok(d.bytes().map_err(|m| self.protocol(m))?.to_vec()))
    }

    /// Atomically adds `delta` to the counter `key` (0 if unset) and returns the new
    /// value. Every rank sees a distinct result, whatever the interleaving.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let body = Enc::default().u8(opcode::ADD).str(key).i64(delta).0;
        let reply = self.request("add", &body, Duration::ZERO)?;
        Dec { buf: &reply[1..] }.i64().map_err(|m| self.protocol(m))
    }

    /// Returns once all `world_size` ranks have called `barrier(name)` (the k-th call of
    /// each rank meets the k-th calls of the others). On timeout the error lists the
    /// ranks that did not arrive.
    pub fn barrier(&self, name: &str) -> Result<(), StoreError> {
        self.barrier_timeout(name, self.timeout)
    }

    /// `barrier` with an explicit wait.
    pub fn barrier_timeout(&self, name: &str, timeout: Duration) -> Result<(), StoreError> {
        let body = Enc::default()
            .u8(opcode::BARRIER)
            .str(name)
            .u64(millis(timeout))
            .0;
        let reply = self.request("barrier", &body, timeout)?;
        if reply[0] == status::OK {
            return Ok(());
        }
        let mut d = Dec { buf: &reply[1..] };
        let parse = |d: &mut Dec| -> Result<(u64, Vec<usize>), String> {
            let waited = d.u64()?;
            let n = d.u32()? as usize;
            let missing = (0..n)
                .map(|_| d.u32().map(|r| r as usize))
                .collect::<Result<_, _>>()?;
            Ok((waited, missing))
        };
        let (waited, missing) = parse(&mut d).map_err(|m| self.protocol(m))?;
        Err(StoreError::BarrierTimeout {
            name: name.to_string(),
            after: Duration::from_millis(waited),
            missing,
        })
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<ServerShared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // Transient (aborted handshake, out of descriptors): pause instead of
                // spinning, keep serving the clients we have.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let handler = {
            let shared = Arc::clone(shared);
            thread::Builder::new()
                .name("ditto-store-client".into())
                .spawn(move || shared.handle(stream))
        };
        if let Ok(handler) = handler {
            lock(&shared.clients).push((clone, handler));
        }
    }
}
