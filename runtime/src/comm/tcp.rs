//! TCP communicator: CPU ranks in separate processes (or threads) joined by a full mesh
//! of TCP connections — the role gloo plays for PyTorch.
//!
//! Design:
//! - Setup ([`TcpComm::connect`]): each rank listens on an ephemeral port of the
//!   interface that reaches the rendezvous store, publishes `ditto/tcp/<n>/addr/<rank>`
//!   there (`<n>` counts this rank's connects, so a second communicator over the same
//!   store does not read stale addresses), connects to every higher rank and accepts
//!   every lower one. Each connection starts with a handshake naming the connecting rank,
//!   so accept order does not matter and stray connections are ignored.
//! - Matching mirrors the in-process backend: every received message goes into one
//!   mailbox keyed by `(sender, key)`, the key being a point-to-point tag or a
//!   collective's `(ordered group, per-group sequence number)`. Collectives on different
//!   groups and point-to-point traffic never mix; one key's messages stay FIFO (TCP keeps
//!   each sender's order).
//! - One reader thread per peer always drains its socket into the mailbox. Because every
//!   receiver drains unconditionally, the caller can write its payloads synchronously:
//!   a large write only waits for the peer's reader, never for the peer's program to
//!   reach a matching receive, so "send to everyone, then wait for everyone" (both sides
//!   of a `sendrecv` ring included) cannot deadlock at any message size.
//! - Frames: a kind byte, then for data the op, the key (tag, or sequence number and
//!   group), the element count and the payload as little-endian f32. `FAIL` carries a
//!   reason, `BYE` announces a clean exit.
//! - Failures: `fail()` records the failure locally and sends `FAIL` to every peer; a
//!   peer whose socket closes without `BYE` (killed, crashed) or breaks is recorded as
//!   failed by the reader that saw it. Either poisons this rank's communicator, so pending
//!   and later waits return `PeerFailed` naming that rank at once, as with a panicking
//!   in-process rank. A clean `BYE` marks the peer exited: messages it sent before are
//!   still delivered, waits that need more from it return `PeerExited`.
//! - Semantics, validation, errors and the [`CommStats`] convention are the in-process
//!   backend's (same helper formulas), so the two are interchangeable bit for bit.

use std::collections::{BTreeSet, HashMap, TryReserveError, VecDeque};
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::collectives::{self, Received};
use super::store::{StoreError, TcpStore};
use super::{CommError, CommOp, CommStats, Communicator, Group};

/// First bytes of the connection handshake, so a stray connection is recognized.
const HANDSHAKE_MAGIC: u32 = 0x4454_4331; // "DTC1"
const HANDSHAKE_LEN: usize = 4 + 4 + 4 + 8;

/// On big-endian targets payloads are converted to and from wire bytes in chunks of
/// this size: big enough that system calls are amortized, small enough to stay in cache.
const CHUNK_BYTES: usize = 256 << 10;

/// Bound on the goodbye write at drop: a peer that stopped reading must not hang exit.
const BYE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a failed write waits for the reader to learn why the peer went away (its
/// goodbye, failure notice or EOF), so that the error names the real cause.
const CAUSE_GRACE: Duration = Duration::from_millis(200);

/// A failure reason longer than this is a corrupt stream, not a message.
const MAX_REASON_BYTES: usize = 1 << 20;

mod kind {
    pub const DATA: u8 = 1;
    pub const FAIL: u8 = 2;
    pub const BYE: u8 = 3;
}

/// Wire codes of the operations, by position.
const OPS: [CommOp; 7] = [
    CommOp::AllGather,
    CommOp::AllToAll,
    CommOp::AllReduce,
    CommOp::Send,
    CommOp::Recv,
    CommOp::SendRecv,
    CommOp::Barrier,
];

fn op_code(op: CommOp) -> u8 {
    OPS.iter().position(|&o| o == op).unwrap_or(0) as u8
}

fn op_from_code(code: u8) -> Option<CommOp> {
    OPS.get(code as usize).copied()
}

/// What a message belongs to (as in the in-process backend).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    P2p { tag: u64 },
    Coll { group: Vec<usize>, seq: u64 },
}

struct Message {
    op: CommOp,
    data: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    Alive,
    /// Said goodbye: everything it sent has been delivered.
    Exited,
    /// Its connection closed without a goodbye or broke; recorded as a failure too.
    Lost,
}

struct State {
    queues: HashMap<(usize, Key), VecDeque<Message>>,
    peers: Vec<PeerState>,
    /// Failures seen by this rank, first one first (that is the one reported).
    failures: Vec<(usize, String)>,
}

/// Payload buffers handed back by the caller once it has copied a message out, for
/// the readers to receive the next large messages into. A fresh multi-megabyte `Vec` is
/// fresh pages from the OS, and faulting them in cost more than the socket copy itself;
/// a collective's messages recur with the same sizes step after step, so recycling a
/// few buffers removes that cost.
struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
    /// How many buffers to keep: enough for one message from each peer in flight twice.
    max_buffers: usize,
}

/// Messages smaller than this are cheap to allocate and are not recycled.
const POOL_MIN_ELEMS: usize = (64 << 10) / 4;

impl BufferPool {
    /// A buffer of `elems` elements (contents unspecified: the reader overwrites them),
    /// recycled when one fits. Recycled buffers keep their old contents, so a buffer
    /// reused for the same size is not even zero-filled again.
    fn take(&self, elems: usize) -> Result<Vec<f32>, TryReserveError> {
        let mut buf = Vec::new();
        if elems >= POOL_MIN_ELEMS {
            let mut free = lock(&self.free);
            // Best fit: the smallest buffer that holds the message.
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= elems)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                buf = free.swap_remove(i);
            }
        }
        if buf.len() >= elems {
            buf.truncate(elems);
        } else {
            buf.try_reserve_exact(elems - buf.len())?;
            buf.resize(elems, 0.0);
        }
        Ok(buf)
    }

    fn give(&self, buf: Vec<f32>) {
        if buf.capacity() < POOL_MIN_ELEMS {
            return;
        }
        let mut free = lock(&self.free);
        free.push(buf);
        if free.len() > self.max_buffers {
            // Keep the largest: they serve every size below them too.
            let smallest = free
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = smallest {
                free.swap_remove(i);
            }
        }
    }
}

/// What the caller and the reader threads share.
struct Shared {
    pool: BufferPool,
    state: Mutex<State>,
    arrived: Condvar,
    /// Set by our own drop, so readers treat the EOF they then see as expected.
    closing: AtomicBool,
}

/// Locks ignoring poisoning: critical sections only move data in and out of maps, and
/// failure handling must keep working precisely when some thread panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn deliver(&self, from: usize, key: Key, msg: Message) {
        lock(&self.state)
            .queues
            .entry((from, key))
            .or_default()
            .push_back(msg);
        self.arrived.notify_all();
    }

    fn record_failure(&self, rank: usize, reason: &str) {
        let mut state = lock(&self.state);
        // One entry per rank: its FAIL notice and then its EOF must not count twice.
        if !state.failures.iter().any(|(r, _)| *r == rank) {
            state.failures.push((rank, reason.to_string()));
        }
        self.arrived.notify_all();
    }

    fn set_peer(&self, peer: usize, to: PeerState) {
        let mut state = lock(&self.state);
        if state.peers[peer] == PeerState::Alive {
            state.peers[peer] = to;
        }
        self.arrived.notify_all();
    }
}

// ---------------------------------------------------------------------------------------
// Wire format

/// The bytes of an f32 slice as they lie in memory. On little-endian targets (all the
/// ones ditto runs on) that is the wire format, so payloads go from the caller's slice
/// to the socket, and from the socket into the message buffer, with no conversion pass:
/// at tens of MB per message each extra pass over memory is a visible share of the
/// loopback bandwidth.
fn f32_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: the byte slice covers exactly the memory of `data` (same start, size_of_val
    // bytes) and borrows it immutably for the same lifetime; u8 has alignment 1 and
    // every byte of an f32 is initialized (f32 has no padding).
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// Mutable counterpart of [`f32_bytes`], to receive straight into a message buffer.
fn f32_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `f32_bytes`, with the unique borrow passed on; any bytes written
    // through the view form valid f32 values (every bit pattern is an f32).
    unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(data))
    }
}

/// The portable path (big-endian targets): little-endian bytes of `src` into `dst`.
fn encode_f32s(src: &[f32], dst: &mut [u8]) {
    for (d, x) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

/// The portable path: f32s of the little-endian bytes `src` into `dst`.
fn decode_f32s(src: &[u8], dst: &mut [f32]) {
    for (x, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *x = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

/// Payloads up to this size are copied behind the header and written in one call, so
/// that a small message is one segment (TCP_NODELAY); larger ones are written from the
/// caller's slice directly.
const INLINE_BYTES: usize = 64 << 10;

/// Writes one data frame. `buf` is scratch reused across calls.
fn write_data(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    op: CommOp,
    key: &Key,
    data: &[f32],
) -> io::Result<()> {
    let (is_coll, word, group): (u8, u64, &[usize]) = match key {
        Key::P2p { tag } => (0, *tag, &[]),
        Key::Coll { group, seq } => (1, *seq, group),
    };
    buf.clear();
    buf.extend_from_slice(&[kind::DATA, op_code(op), is_coll]);
    buf.extend_from_slice(&word.to_le_bytes());
    buf.extend_from_slice(&(group.len() as u32).to_le_bytes());
    for &r in group {
        buf.extend_from_slice(&(r as u32).to_le_bytes());
    }
    buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
    if cfg!(target_endian = "little") {
        let bytes = f32_bytes(data);
        if bytes.len() <= INLINE_BYTES {
            buf.extend_from_slice(bytes);
            return stream.write_all(buf);
        }
        stream.write_all(buf)?;
        return stream.write_all(bytes);
    }
    for chunk in data.chunks(CHUNK_BYTES / 4) {
        let start = buf.len();
        buf.resize(start + chunk.len() * 4, 0);
        encode_f32s(chunk, &mut buf[start..]);
        if buf.len() >= CHUNK_BYTES {
            stream.write_all(buf)?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        stream.write_all(buf)?;
    }
    Ok(())
}

/// Reads a payload into `data` (already `elems` long).
fn read_payload(r: &mut impl Read, data: &mut [f32], scratch: &mut Vec<u8>) -> io::Result<()> {
    if cfg!(target_endian = "little") {
        return r.read_exact(f32_bytes_mut(data));
    }
    scratch.resize(CHUNK_BYTES, 0);
    for chunk in data.chunks_mut(CHUNK_BYTES / 4) {
        let bytes = &mut scratch[..chunk.len() * 4];
        r.read_exact(bytes)?;
        decode_f32s(bytes, chunk);
    }
    Ok(())
}

fn write_fail(stream: &mut TcpStream, reason: &str) -> io::Result<()> {
    // Peers reject longer reasons as corrupt; cut at a character boundary.
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason[..end];
    let mut frame = vec![kind::FAIL];
    frame.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    frame.extend_from_slice(reason.as_bytes());
    stream.write_all(&frame)
}

enum Frame {
    Data {
        op: CommOp,
        key: Key,
        data: Vec<f32>,
    },
    Fail(String),
    Bye,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut a = [0u8; N];
    r.read_exact(&mut a)?;
    Ok(a)
}

fn read_frame(
    r: &mut impl Read,
    world_size: usize,
    scratch: &mut Vec<u8>,
    pool: &BufferPool,
) -> io::Result<Frame> {
    let [k] = read_array::<1>(r)?;
    match k {
        kind::DATA => {
            let [code, is_coll] = read_array::<2>(r)?;
            let op = op_from_code(code).ok_or_else(|| invalid(format!("bad op code {code}")))?;
            let word = u64::from_le_bytes(read_array(r)?);
            let group_len = u32::from_le_bytes(read_array(r)?) as usize;
            if group_len > world_size {
                return Err(invalid(format!("group of {group_len} ranks")));
            }
            let group = (0..group_len)
                .map(|_| Ok(u32::from_le_bytes(read_array(r)?) as usize))
                .collect::<io::Result<Vec<usize>>>()?;
            let elems = usize::try_from(u64::from_le_bytes(read_array(r)?))
                .map_err(|_| invalid("message too large for this machine".into()))?;
            // A corrupt length must be an error, not an allocation abort.
            let mut data = pool
                .take(elems)
                .map_err(|e| invalid(format!("cannot allocate {elems} element(s): {e}")))?;
            read_payload(r, &mut data, scratch)?;
            let key = if is_coll == 1 {
                Key::Coll { group, seq: word }
            } else {
                Key::P2p { tag: word }
            };
            Ok(Frame::Data { op, key, data })
        }
        kind::FAIL => {
            let n = u32::from_le_bytes(read_array(r)?) as usize;
            if n > MAX_REASON_BYTES {
                return Err(invalid(format!("failure reason of {n} bytes")));
            }
            let mut reason = vec![0u8; n];
            r.read_exact(&mut reason)?;
            Ok(Frame::Fail(String::from_utf8_lossy(&reason).into_owned()))
        }
        kind::BYE => Ok(Frame::Bye),
        other => Err(invalid(format!("unknown frame kind {other}"))),
    }
}

fn reader_loop(shared: &Shared, peer: usize, world_size: usize, stream: TcpStream) {
    let mut r = BufReader::with_capacity(64 << 10, stream);
    let mut scratch = Vec::new();
    loop {
        match read_frame(&mut r, world_size, &mut scratch, &shared.pool) {
            Ok(Frame::Data { op, key, data }) => shared.deliver(peer, key, Message { op, data }),
            Ok(Frame::Fail(reason)) => shared.record_failure(peer, &reason),
            Ok(Frame::Bye) => {
                shared.set_peer(peer, PeerState::Exited);
                return;
            }
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "its connection closed without a goodbye (process killed or crashed?)"
                        .to_string()
                } else {
                    format!("its connection failed: {e}")
                };
                // Failure first: a waiter woken by the state change must find the reason.
                shared.record_failure(peer, &reason);
                shared.set_peer(peer, PeerState::Lost);
                return;
            }
        }
    }
}

fn handshake(rank: usize, world_size: usize, instance: u64) -> [u8; HANDSHAKE_LEN] {
    let mut h = [0u8; HANDSHAKE_LEN];
    h[0..4].copy_from_slice(&HANDSHAKE_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(world_size as u32).to_le_bytes());
    h[12..20].copy_from_slice(&instance.to_le_bytes());
    h
}

/// `(rank, world_size, instance)` of a handshake, `None` if it is not one of ours.
fn parse_handshake(h: &[u8; HANDSHAKE_LEN]) -> Option<(usize, usize, u64)> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if word(0) != HANDSHAKE_MAGIC {
        return None;
    }
    let mut inst = [0u8; 8];
    inst.copy_from_slice(&h[12..20]);
    Some((word(4) as usize, word(8) as usize, u64::from_le_bytes(inst)))
}

// ---------------------------------------------------------------------------------------
// The communicator

/// One rank's endpoint of a TCP mesh. Build it with [`TcpComm::connect`]; dropping it
/// says goodbye to every peer and closes the connections.
pub struct TcpComm {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Next sequence number per group (keyed by the ordered rank list).
    seqs: HashMap<Vec<usize>, u64>,
    stats: CommStats,
    shared: Arc<Shared>,
    /// Write side of the connection to each peer, by rank; `None` at this rank.
    links: Vec<Option<TcpStream>>,
    readers: Vec<JoinHandle<()>>,
    /// Encoding scratch, reused so sends do not allocate per chunk.
    scratch: Vec<u8>,
    /// Whether this rank's FAIL notice went out already (`fail` is idempotent).
    announced_failure: bool,
}

fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn left_until(deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(d) => d.saturating_duration_since(Instant::now()),
        None => Duration::MAX,
    }
}

/// Socket timeouts must be non-zero; a zero communicator timeout still gets 1 ms.
fn socket_timeout(t: Duration) -> Duration {
    t.max(Duration::from_millis(1))
}

impl TcpComm {
    /// Joins the mesh of `world_size` ranks as `rank`, meeting the others through
    /// `store` (whose world size and rank must agree). `timeout` bounds the setup and
    /// is then the timeout of every blocking call.
    ///
    /// Setup is reported as a [`CommOp::Barrier`] over the world (it is one): a rank that
    /// never publishes its address or never connects is named by
    /// [`CommError::Timeout`]; socket and store errors are [`CommError::Transport`].
    pub fn connect(
        store: &TcpStore,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<TcpComm, CommError> {
        let op = CommOp::Barrier;
        let transport = |message: String| CommError::Transport { rank, op, message };
        let store_err = |e: StoreError| transport(e.to_string());
        if rank >= world_size {
            return Err(CommError::InvalidRank {
                rank,
                op,
                peer: rank,
                world_size,
            });
        }
        if store.world_size() != world_size || store.rank() != rank {
            return Err(transport(format!(
                "the store client at {} is rank {} of {}, not rank {rank} of {world_size}",
                store.addr(),
                store.rank(),
                store.world_size()
            )));
        }
        let deadline = deadline_after(timeout);
        let instance = store
            .add(&format!("ditto/tcp/instance/{rank}"), 1)
            .map_err(store_err)? as u64;
        let addr_key = |r: usize| format!("ditto/tcp/{instance}/addr/{r}");

        // Listen where rank 0's store is reachable from: on one host that is loopback,
        // across hosts it is the interface the other ranks can route to as well.
        let ip = store.local_addr().ip();
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .map_err(|e| transport(format!("cannot listen on {ip}: {e}")))?;
        let me_addr = listener
            .local_addr()
            .map_err(|e| transport(format!("listener address: {e}")))?;
        store
            .set(&addr_key(rank), me_addr.to_string().as_bytes())
            .map_err(store_err)?;

        let mut links: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
        let hello = handshake(rank, world_size, instance);
        // Connect to every higher rank. Each has bound its listener before publishing,
        // so the connection succeeds whether or not it is accepting yet: no ordering
        // between ranks can deadlock here.
        for (peer, link) in links.iter_mut().enumerate().skip(rank + 1) {
            let value = match store.get_timeout(&addr_key(peer), left_until(deadline)) {
                Ok(v) => v,
                Err(StoreError::KeyTimeout { .. }) => {
                    let missing = (peer..world_size)
                        .filter(|&r| !matches!(store.try_get(&addr_key(r)), Ok(Some(_))))
                        .collect();
                    return Err(CommError::Timeout {
                        rank,
                        op,
                        waiting_for: missing,
                        after: timeout,
                    });
                }
                Err(e) => return Err(store_err(e)),
            };
            let peer_addr: SocketAddr = std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| transport(format!("rank {peer} published a bad address")))?;
            let stream =
                TcpStream::connect_timeout(&peer_addr, socket_timeout(left_until(deadline)))
                    .and_then(|mut s| s.write_all(&hello).map(|()| s))
                    .map_err(|e| {
                        transport(format!("cannot connect to rank {peer} at {peer_addr}: {e}"))
                    })?;
            *link = Some(stream);
        }

        // Accept every lower rank, in whatever order they come.
        listener
            .set_nonblocking(true)
            .map_err(|e| transport(format!("listener on {me_addr}: {e}")))?;
        let mut waiting: BTreeSet<usize> = (0..rank).collect();
        while !waiting.is_empty() {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let mut h = [0u8; HANDSHAKE_LEN];
                    let read = stream
                        .set_nonblocking(false)
                        .and_then(|()| {
                            stream.set_read_timeout(Some(socket_timeout(left_until(deadline))))
                        })
                        .and_then(|()| stream.read_exact(&mut h));
                    match read.ok().and_then(|()| parse_handshake(&h)) {
                        Some((peer, world, inst)) if inst == instance => {
                            if world != world_size {
                                return Err(transport(format!(
                                    "rank {peer} joined a world of {world} rank(s), not {world_size}"
                                )));
                            }
                            if waiting.remove(&peer) {
                                links[peer] = Some(stream);
                            }
                        }
                        // A stale communicator's or a stranger's connection: not ours.
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if left_until(deadline).is_zero() {
                        return Err(CommError::Timeout {
                            rank,
                            op,
                            waiting_for: waiting.into_iter().collect(),
                            after: timeout,
                        });
                    }
                    // Polling keeps the deadline simple; setup happens once per job.
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(transport(format!("accepting on {me_addr}: {e}"))),
            }
        }

        // Configure every socket before anything runs on it: a failure here only has to
        // close sockets.
        let mut reader_streams = Vec::new();
        for (peer, link) in links.iter().enumerate() {
            let Some(stream) = link else { continue };
            let clone = stream
                .set_nodelay(true)
                .and_then(|()| stream.set_read_timeout(None))
                .and_then(|()| stream.set_write_timeout(Some(socket_timeout(timeout))))
                .and_then(|()| stream.try_clone())
                .map_err(|e| transport(format!("socket to rank {peer}: {e}")))?;
            reader_streams.push((peer, clone));
        }
        let mut comm = TcpComm {
            rank,
            world_size,
            timeout,
            seqs: HashMap::new(),
            stats: CommStats::default(),
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queues: HashMap::new(),
                    peers: vec![PeerState::Alive; world_size],
                    failures: Vec::new(),
                }),
                arrived: Condvar::new(),
                closing: AtomicBool::new(false),
                pool: BufferPool {
                    free: Mutex::new(Vec::new()),
                    max_buffers: 2 * world_size,
                },
            }),
            links,
            readers: Vec::new(),
            scratch: Vec::new(),
            announced_failure: false,
        };
        for (peer, stream) in reader_streams {
            let shared = Arc::clone(&comm.shared);
            let reader = thread::Builder::new()
                .name(format!("ditto-tcp-{rank}<-{peer}"))
                .spawn(move || reader_loop(&shared, peer, world_size, stream))
                // `comm`'s drop shuts the sockets down, which ends the readers started.
                .map_err(|e| transport(format!("cannot start the reader for rank {peer}: {e}")))?;
            comm.readers.push(reader);
        }
        Ok(comm)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the timeout of later calls (e.g. longer for a first step that compiles).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        for link in self.links.iter().flatten() {
            let _ = link.set_write_timeout(Some(socket_timeout(timeout)));
        }
    }

    fn failure_error(&self, state: &State, op: CommOp) -> Option<CommError> {
        state
            .failures
            .first()
            .map(|(rank, reason)| CommError::PeerFailed {
                rank: *rank,
                reason: reason.clone(),
                observer: self.rank,
                op,
            })
    }

    fn check_failed(&self, op: CommOp) -> Result<(), CommError> {
        match self.failure_error(&lock(&self.shared.state), op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_peer(&self, op: CommOp, peer: usize) -> Result<(), CommError> {
        if peer >= self.world_size {
            return Err(CommError::InvalidRank {
                rank: self.rank,
                op,
                peer,
                world_size: self.world_size,
            });
        }
        Ok(())
    }

    /// The error for a peer that is no longer alive, if it is not.
    fn gone_error(&self, state: &State, op: CommOp, peer: usize) -> Option<CommError> {
        match state.peers[peer] {
            PeerState::Alive => None,
            PeerState::Exited => Some(CommError::PeerExited {
                rank: peer,
                observer: self.rank,
                op,
            }),
            // A lost peer is recorded as a failure, so this is normally `Some`.
            PeerState::Lost => self
                .failure_error(state, op)
                .or(Some(CommError::PeerExited {
                    rank: peer,
                    observer: self.rank,
                    op,
                })),
        }
    }

    /// Sends one message. Synchronous: see the module comment for why it cannot
    /// deadlock.
    fn post(&mut self, op: CommOp, to: usize, key: Key, data: &[f32]) -> Result<(), CommError> {
        if to == self.rank {
            let data = data.to_vec();
            self.shared.deliver(to, key, Message { op, data });
            return Ok(());
        }
        if let Some(e) = self.gone_error(&lock(&self.shared.state), op, to) {
            return Err(e);
        }
        let Some(stream) = self.links[to].as_mut() else {
            return Err(CommError::Transport {
                rank: self.rank,
                op,
                message: format!("no connection to rank {to}"),
            });
        };
        match write_data(stream, &mut self.scratch, op, &key, data) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link_error(op, to, e)),
        }
    }

    /// Turns a failed write into the error that names the real cause.
    fn link_error(&mut self, op: CommOp, to: usize, e: io::Error) -> CommError {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            // The peer stopped reading for a whole timeout. Part of a frame may be on the
            // wire, so the connection cannot be used again: close it (the peer then sees
            // this rank as lost) and remember the peer as failed here.
            if let Some(stream) = &self.links[to] {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let reason = format!(
                "stopped reading from rank {} for {:?}",
                self.rank, self.timeout
            );
            self.shared.record_failure(to, &reason);
            self.shared.set_peer(to, PeerState::Lost);
            return CommError::Timeout {
                rank: self.rank,
                op,
                waiting_for: vec![to],
                after: self.timeout,
            };
        }
        let deadline = Instant::now() + CAUSE_GRACE;
        let mut state = lock(&self.shared.state);
        while state.peers[to] == PeerState::Alive {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = match self.shared.arrived.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        if let Some(err) = self.gone_error(&state, op, to) {
            return err;
        }
        drop(state);
        self.shared
            .record_failure(to, &format!("its connection failed: {e}"));
        self.shared.set_peer(to, PeerState::Lost);
        let state = lock(&self.shared.state);
        self.failure_error(&state, op)
            .unwrap_or(CommError::PeerExited {
                rank: to,
                observer: self.rank,
                op,
            })
    }

    /// Waits until one message for each `(sender, key)` in `wanted` has arrived, a
    /// failure is recorded, a sender exits, or `deadline` passes. Returns them in
    /// `wanted` order.
    fn wait_all(
        &self,
        op: CommOp,
        wanted: &[(usize, Key)],
        deadline: Option<Instant>,
    ) -> Result<Vec<Message>, CommError> {
        let mut got: Vec<Option<Message>> = wanted.iter().map(|_| None).collect();
        let mut state = lock(&self.shared.state);
        loop {
            // Failure first: once poisoned, data that happens to be there must not let
            // this rank run on into its next collective.
            if let Some(e) = self.failure_error(&state, op) {
                return Err(e);
            }
            for (slot, (from, key)) in got.iter_mut().zip(wanted) {
                if slot.is_some() {
                    continue;
                }
                let qkey = (*from, key.clone());
                if let Some(queue) = state.queues.get_mut(&qkey) {
                    *slot = queue.pop_front();
                    if queue.is_empty() {
                        state.queues.remove(&qkey);
                    }
                }
            }
            let missing: Vec<usize> = got
                .iter()
                .zip(wanted)
                .filter(|(m, _)| m.is_none())
                .map(|(_, (from, _))| *from)
                .collect();
            if missing.is_empty() {
                return Ok(got.into_iter().flatten().collect());
            }
            if let Some(e) = missing.iter().find_map(|&r| self.gone_error(&state, op, r)) {
                return Err(e);
            }
            let left = left_until(deadline);
            if left.is_zero() {
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    waiting_for: missing,
                    after: self.timeout,
                });
            }
            state = match self.shared.arrived.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The common shape of every collective: post `payload(j)` to each other member j,
    /// then collect one message from each. Returns the caller's index in the group and
    /// the received payloads indexed by member (`None` at the caller's own index).
    fn exchange<'a>(
        &mut self,
        op: CommOp,
        group: &Group,
        payload: impl Fn(usize) -> &'a [f32],
    ) -> Result<(usize, Received), CommError> {
        let deadline = deadline_after(self.timeout);
        self.check_failed(op)?;
        let me = group.validate(self.rank, self.world_size, op)?;
        let seq = {
            let counter = self.seqs.entry(group.ranks.clone()).or_insert(0);
            let seq = *counter;
            *counter += 1;
            seq
        };
        let key = Key::Coll {
            group: group.ranks.clone(),
            seq,
        };
        // Start with the next member, not member 0: with everyone starting at 0, every
        // rank would first pour its payload into the same socket.
        let g = group.size();
        for k in 1..g {
            let j = (me + k) % g;
            self.post(op, group.ranks[j], key.clone(), payload(j))?;
        }
        let wanted: Vec<(usize, Key)> = group
            .ranks
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, &from)| (from, key.clone()))
            .collect();
        let mut messages = self.wait_all(op, &wanted, deadline)?.into_iter();
        let mut received = Vec::with_capacity(g);
        for (i, &from) in group.ranks.iter().enumerate() {
            if i == me {
                received.push(None);
                continue;
            }
            let Some(msg) = messages.next() else {
                // wait_all returns one message per wanted entry; unreachable in practice.
                return Err(CommError::Timeout {
                    rank: self.rank,
                    op,
                    waiting_for: vec![from],
                    after: self.timeout,
                });
            };
            if msg.op != op {
                return Err(CommError::OpMismatch {
                    rank: self.rank,
                    op,
                    peer: from,
                    peer_op: msg.op,
                });
            }
            received.push(Some(msg.data));
        }
        Ok((me, received))
    }

    /// Hands a collective's received payloads back to the readers' pool.
    fn recycle(&self, received: Received) {
        for buf in received.into_iter().flatten() {
            self.shared.pool.give(buf);
        }
    }

    fn recv_inner(
        &mut self,
        op: CommOp,
        from: usize,
        tag: u64,
        out: &mut [f32],
        deadline: Option<Instant>,
    ) -> Result<(), CommError> {
        self.check_peer(op, from)?;
        let mut msgs = self.wait_all(op, &[(from, Key::P2p { tag })], deadline)?;
        let data = msgs.pop().map(|m| m.data).unwrap_or_default();
        collectives::size_check(self.rank, op, from, out.len(), data.len())?;
        out.copy_from_slice(&data);
        self.shared.pool.give(data);
        Ok(())
    }

    fn send_inner(
        &mut self,
        op: CommOp,
        to: usize,
        tag: u64,
        data: &[f32],
    ) -> Result<(), CommError> {
        self.check_peer(op, to)?;
        self.post(op, to, Key::P2p { tag }, data)?;
        self.stats.record_send(data.len());
        Ok(())
    }
}

impl collectives::Exchange for TcpComm {
    fn this_rank(&self) -> usize {
        self.rank
    }
    fn exchange<'a>(
        &mut self,
        op: CommOp,
        group: &Group,
        payload: impl Fn(usize) -> &'a [f32],
    ) -> Result<(usize, Received), CommError> {
        TcpComm::exchange(self, op, group, payload)
    }
    fn stats_mut(&mut self) -> &mut CommStats {
        &mut self.stats
    }
    fn recycle(&mut self, received: Received) {
        TcpComm::recycle(self, received)
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        collectives::all_gather(self, group, input, output)
    }

    fn all_to_all(
        &mut self,
        group: &Group,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), CommError> {
        collectives::all_to_all(self, group, input, output)
    }

    fn all_reduce_sum(&mut self, group: &Group, data: &mut [f32]) -> Result<(), CommError> {
        collectives::all_reduce_sum(self, group, data)
    }

    fn send(&mut self, to: usize, tag: u64, data: &[f32]) -> Result<(), CommError> {
        let op = CommOp::Send;
        self.check_failed(op)?;
        self.send_inner(op, to, tag, data)
    }

    fn recv(&mut self, from: usize, tag: u64, out: &mut [f32]) -> Result<(), CommError> {
        let op = CommOp::Recv;
        let deadline = deadline_after(self.timeout);
        self.check_failed(op)?;
        self.recv_inner(op, from, tag, out, deadline)
    }

    fn sendrecv(
        &mut self,
        to: usize,
        send: &[f32],
        from: usize,
        recv: &mut [f32],
        tag: u64,
    ) -> Result<(), CommError> {
        let op = CommOp::SendRecv;
        let deadline = deadline_after(self.timeout);
        self.check_failed(op)?;
        self.check_peer(op, from)?;
        // Send first, then wait: the peer's reader drains our send whatever its program
        // is doing, so every rank of a ring can call this at once.
        self.send_inner(op, to, tag, send)?;
        self.recv_inner(op, from, tag, recv, deadline)
    }

    fn barrier(&mut self, group: &Group) -> Result<(), CommError> {
        collectives::barrier(self, group)
    }

    fn stats(&self) -> &CommStats {
        &self.stats
    }

    fn reset_stats(&mut self) {
        self.stats.reset();
    }

    fn fail(&mut self, reason: &str) {
        self.shared.record_failure(self.rank, reason);
        if self.announced_failure {
            return;
        }
        self.announced_failure = true;
        for link in self.links.iter_mut().flatten() {
            // Best effort and bounded: a peer we cannot reach learns from the closed
            // socket. No data frame follows (this rank is poisoned now), so the shorter
            // write timeout cannot cut a later frame.
            let _ = link.set_write_timeout(Some(BYE_TIMEOUT.min(socket_timeout(self.timeout))));
            let _ = write_fail(link, reason);
        }
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        if thread::panicking() {
            // The panic message is not reachable here; what matters is that peers stop
            // waiting now rather than at their timeout.
            let reason = format!("rank {} panicked", self.rank);
            self.fail(&reason);
        }
        self.shared.closing.store(true, Ordering::SeqCst);
        for link in self.links.iter_mut().flatten() {
            let _ = link.set_write_timeout(Some(BYE_TIMEOUT));
            let _ = link.write_all(&[kind::BYE]);
            // Shutting down also wakes our reader blocked on the same socket.
            let _ = link.shutdown(Shutdown::Both);
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Bandwidth measurement

/// Measures, in one run, the TCP all_gather of `bytes` per rank over `world_size`
/// ranks (threads of this process, sockets on 127.0.0.1) against a plain copy of the
/// same bytes between two threads over one loopback socket. Returns
/// `(all_gather GB/s, plain socket GB/s)`; GB = 1e9 bytes; best of a few repetitions
/// after a warmup, for both.
///
/// The all_gather figure is the bytes each rank sends (`bytes * (G-1)`, the
/// [`CommStats`] convention) over the time until the slowest rank has its output, so
/// with two ranks it compares "send N while receiving N" with "send N". The ratio is
/// what the framing, the f32 conversion, the mailbox and the final copy cost over a
/// bare socket.
pub fn loopback_bandwidth(bytes: usize, world_size: usize) -> Result<(f64, f64), CommError> {
    const REPS: usize = 3;
    let timeout = Duration::from_secs(120);
    let transport = |message: String| CommError::Transport {
        rank: 0,
        op: CommOp::AllGather,
        message,
    };
    if world_size < 2 {
        return Err(transport(format!(
            "loopback_bandwidth needs at least 2 ranks, got {world_size}"
        )));
    }
    let elems = (bytes / 4).max(1);
    let server = TcpStore::serve("127.0.0.1:0", world_size, timeout)
        .map_err(|e| transport(e.to_string()))?;
    let addr = server.local_addr();
    let per_rank: Vec<Result<Vec<f64>, CommError>> = thread::scope(|s| {
        let joins: Vec<_> = (0..world_size)
            .map(|rank| {
                s.spawn(move || -> Result<Vec<f64>, CommError> {
                    let store = TcpStore::connect(addr, rank, timeout)
                        .map_err(|e| transport(e.to_string()))?;
                    let mut comm = TcpComm::connect(&store, rank, world_size, timeout)?;
                    let group = Group::world(world_size);
                    let input: Vec<f32> = (0..elems).map(|i| (i + rank) as f32).collect();
                    let mut output = vec![0.0f32; elems * world_size];
                    comm.all_gather(&group, &input, &mut output)?; // warmup
                    let mut times = Vec::with_capacity(REPS);
                    for _ in 0..REPS {
                        comm.barrier(&group)?;
                        let start = Instant::now();
                        comm.all_gather(&group, &input, &mut output)?;
                        times.push(start.elapsed().as_secs_f64());
                    }
                    Ok(times)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(transport("a rank thread panicked".into())))
            })
            .collect()
    });
    let per_rank = per_rank.into_iter().collect::<Result<Vec<_>, _>>()?;
    drop(server);
    // Per repetition, the slowest rank; then the best repetition.
    let all_gather_s = (0..REPS)
        .map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max))
        .fold(f64::INFINITY, f64::min);
    let sent = (elems * 4 * (world_size - 1)) as f64;
    let socket_s = plain_socket_copy(elems * 4, REPS).map_err(|e| transport(e.to_string()))?;
    Ok((
        sent / all_gather_s / 1e9,
        (elems * 4) as f64 / socket_s / 1e9,
    ))
}

/// Best time of `reps` copies of `bytes` bytes from one thread to another over a
/// loopback socket (after one warmup copy).
fn plain_socket_copy(bytes: usize, reps: usize) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let payload = vec![0xA5u8; bytes];
        for _ in 0..=reps {
            // Wait for the reader's go so that each copy is timed from its start.
            let mut go = [0u8; 1];
            s.read_exact(&mut go)?;
            s.write_all(&payload)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut sink = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let start = Instant::now();
        s.write_all(&[1])?;
        s.read_exact(&mut sink)?;
        if rep > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    writer
        .join()
        .map_err(|_| io::Error::other("writer thread panicked"))??;
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_wire_paths_agree() {
        // The portable (big-endian) conversion is otherwise never run on our machines:
        // check it against the wire format and the in-memory view used on little-endian.
        let src = [1.5f32, -0.0, f32::MIN_POSITIVE, f32::NAN, 3.0e38];
        let mut encoded = vec![0u8; 20];
        encode_f32s(&src, &mut encoded);
        let wire: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(encoded, wire);
        if cfg!(target_endian = "little") {
            assert_eq!(f32_bytes(&src), &wire[..]);
        }
        let mut decoded = [0f32; 5];
        decode_f32s(&encoded, &mut decoded);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&decoded), bits(&src));
    }

    #[test]
    fn tcp_buffer_pool_recycles_large_buffers_only() {
        let pool = BufferPool {
            free: Mutex::new(Vec::new()),
            max_buffers: 2,
        };
        let big = pool.take(POOL_MIN_ELEMS * 2).unwrap();
        assert_eq!(big.len(), POOL_MIN_ELEMS * 2);
        let ptr = big.as_ptr();
        pool.give(big);
        // A smaller message reuses the same allocation, at its own length.
        let again = pool.take(POOL_MIN_ELEMS).unwrap();
        assert_eq!((again.as_ptr(), again.len()), (ptr, POOL_MIN_ELEMS));
        pool.give(vec![0.0; 10]);
        assert!(lock(&pool.free).is_empty());
        for _ in 0..3 {
            pool.give(vec![0.0; POOL_MIN_ELEMS]);
        }
        assert_eq!(lock(&pool.free).len(), 2);
    }
}
