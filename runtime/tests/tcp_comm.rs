//! The TCP communicator and the rendezvous store, over real sockets on 127.0.0.1.
//!
//! Ranks are threads of the test process (each test serves its own store on port 0, so
//! tests never share a port), except in the SIGKILL test, where one rank is a child
//! process re-running this test binary. Every collective is compared with the
//! in-process backend on the same inputs: outputs bit for bit, errors and `CommStats`
//! equal. Fault tests check that errors name the right rank and arrive well before the
//! timeout.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ditto_runtime::comm::{
    in_process_world, loopback_bandwidth, CommError, CommOp, CommStats, Communicator, Group,
    StoreError, StoreServer, TcpComm, TcpStore,
};

/// Generous: passing tests never wait for it, it only bounds a broken test.
const LONG: Duration = Duration::from_secs(20);

fn serve(world_size: usize) -> StoreServer {
    TcpStore::serve("127.0.0.1:0", world_size, LONG).expect("serve the store")
}

/// Runs `f` on every rank of a fresh TCP world (one thread per rank, real sockets) and
/// returns each rank's result.
fn on_tcp_world<T: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(TcpComm) -> T + Sync,
) -> Vec<T> {
    let server = serve(world_size);
    let addr = server.local_addr();
    let f = &f;
    thread::scope(|s| {
        let joins: Vec<_> = (0..world_size)
            .map(|rank| {
                s.spawn(move || {
                    let store = TcpStore::connect(addr, rank, LONG).expect("store connect");
                    let comm =
                        TcpComm::connect(&store, rank, world_size, timeout).expect("mesh connect");
                    f(comm)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// The same with the in-process backend, for comparison.
fn on_in_process_world<T: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(Box<dyn Communicator>) -> T + Sync,
) -> Vec<T> {
    let f = &f;
    thread::scope(|s| {
        let joins: Vec<_> = in_process_world(world_size, timeout)
            .into_iter()
            .map(|c| s.spawn(move || f(Box::new(c))))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Distinct values with fractional parts, so that a wrong chunk or a reordered sum shows.
fn values(rank: usize, salt: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (rank as f32 + 1.0) * 0.1 + (i as f32) * 1e-7 * (rank as f32) + salt as f32 / 3.0)
        .collect()
}

/// Every operation of the trait, on the world, a reversed world, this rank alone, and
/// the contiguous and strided halves where the world splits: the outputs (as bits) in
/// call order and the final stats.
fn every_collective(c: &mut dyn Communicator) -> Result<(Vec<Vec<u32>>, CommStats), CommError> {
    let (me, w) = (c.rank(), c.world_size());
    let mut groups = vec![Group::world(w), Group::new(vec![me])];
    if w >= 2 {
        // Group order, not rank order, defines chunk order.
        groups.push(Group::new((0..w).rev().collect()));
    }
    if w % 2 == 0 && w > 2 {
        let inner = Group::contiguous(w, 2).unwrap();
        let outer = Group::strided(w, 2).unwrap();
        groups.push(Group::find(&inner, me).unwrap().clone());
        groups.push(Group::find(&outer, me).unwrap().clone());
    }
    if w == 3 && me != 1 {
        groups.push(Group::new(vec![2, 0]));
    }
    let mut out = Vec::new();
    for (salt, g) in groups.iter().enumerate() {
        let size = g.size();
        let mut gathered = vec![0.0; 3 * size];
        c.all_gather(g, &values(me, salt, 3), &mut gathered)?;
        out.push(bits(&gathered));
        let a2a_in = values(me, salt + 10, 2 * size);
        let mut a2a_out = vec![0.0; 2 * size];
        c.all_to_all(g, &a2a_in, &mut a2a_out)?;
        out.push(bits(&a2a_out));
        let mut reduced = values(me, salt + 20, 5);
        c.all_reduce_sum(g, &mut reduced)?;
        out.push(bits(&reduced));
        c.barrier(g)?;
    }
    let (next, prev) = ((me + 1) % w, (me + w - 1) % w);
    c.send(next, 7, &values(me, 30, 4))?;
    c.send(next, 9, &values(me, 31, 2))?;
    c.send(next, 7, &values(me, 32, 4))?;
    // Out of send order across tags, in order within a tag.
    for (tag, len) in [(9, 2), (7, 4), (7, 4)] {
        let mut r = vec![0.0; len];
        c.recv(prev, tag, &mut r)?;
        out.push(bits(&r));
    }
    let mut block = values(me, 40, 3);
    for _ in 0..w {
        let mut incoming = vec![0.0; 3];
        c.sendrecv(next, &block, prev, &mut incoming, 42)?;
        block = incoming;
        out.push(bits(&block));
    }
    let mut own = [0.0; 2];
    c.sendrecv(me, &[1.5, 2.5], me, &mut own, 43)?;
    out.push(bits(&own));
    Ok((out, c.stats().clone()))
}

#[test]
fn tcp_every_collective_matches_in_process_world_sizes_1_to_4() {
    for world in 1..=4 {
        let tcp = on_tcp_world(world, LONG, |mut c| every_collective(&mut c));
        let local = on_in_process_world(world, LONG, |mut c| every_collective(c.as_mut()));
        for (rank, (t, l)) in tcp.into_iter().zip(local).enumerate() {
            let (t, l) = (t.unwrap(), l.unwrap());
            assert_eq!(t.0, l.0, "world {world}, rank {rank}: outputs");
            assert_eq!(t.1, l.1, "world {world}, rank {rank}: stats");
            assert!(world == 1 || t.1.total_bytes() > 0);
        }
    }
}

#[test]
fn tcp_all_gather_is_correct_not_just_equal() {
    // Guards the comparison above against a shared mistake: the expected output is
    // computed here directly.
    let out = on_tcp_world(3, LONG, |mut c| {
        let mut o = vec![0.0; 6];
        c.all_gather(&Group::new(vec![2, 0, 1]), &[c.rank() as f32, 0.5], &mut o)
            .map(|()| o)
    });
    for o in out {
        assert_eq!(o.unwrap(), vec![2.0, 0.5, 0.0, 0.5, 1.0, 0.5]);
    }
}

/// Calls that go wrong in every way the trait reports, on a world of 2.
fn misuse(c: &mut dyn Communicator) -> Vec<Result<(), CommError>> {
    let me = c.rank();
    let g = Group::world(2);
    let input = vec![0.0; 2 + me];
    let mut o = vec![0.0; 2 * input.len()];
    let mut errs = vec![c.all_gather(&g, &input, &mut o)];
    errs.push(if me == 0 {
        c.barrier(&g)
    } else {
        c.all_reduce_sum(&g, &mut [])
    });
    let mut one = [0.0; 1];
    errs.push(c.all_gather(&Group::new(vec![1 - me]), &[1.0], &mut one));
    errs.push(c.all_gather(&Group::new(vec![me, me]), &[1.0], &mut [0.0; 2]));
    errs.push(c.barrier(&Group::new(vec![])));
    errs.push(c.all_gather(&g, &[1.0], &mut one));
    errs.push(c.all_to_all(&g, &[1.0; 3], &mut [0.0; 3]));
    errs.push(c.send(9, 0, &[1.0]));
    errs.push(if me == 0 {
        c.send(1, 8, &[1.0; 3])
    } else {
        c.recv(0, 8, &mut [0.0; 2])
    });
    // Still usable after all that.
    errs.push(c.barrier(&g));
    errs
}

#[test]
fn tcp_errors_match_in_process() {
    let tcp = on_tcp_world(2, LONG, |mut c| misuse(&mut c));
    let local = on_in_process_world(2, LONG, |mut c| misuse(c.as_mut()));
    assert_eq!(tcp, local);
    assert!(matches!(
        tcp[1][1],
        Err(CommError::OpMismatch {
            rank: 1,
            peer: 0,
            peer_op: CommOp::Barrier,
            ..
        })
    ));
    assert!(matches!(
        tcp[1][8],
        Err(CommError::SizeMismatch {
            op: CommOp::Recv,
            expected: 2,
            got: 3,
            ..
        })
    ));
    assert_eq!(tcp[0][9], Ok(()));
}

#[test]
fn tcp_large_all_gather_32mb_per_rank() {
    let world = 4;
    let elems = (32 << 20) / 4;
    let input_of = |r: usize| -> Vec<f32> {
        (0..elems)
            .map(|i| ((i * 7 + r * 13) % 1_000_003) as f32)
            .collect()
    };
    let start = Instant::now();
    let out = on_tcp_world(world, LONG, |mut c| {
        let mut o = vec![0.0; elems * world];
        c.all_gather(&Group::world(world), &input_of(c.rank()), &mut o)?;
        // Compare in place: keeping four 128 MB outputs around is needless.
        let ok = (0..world).all(|r| o[r * elems..(r + 1) * elems] == input_of(r)[..]);
        Ok::<_, CommError>((ok, c.stats().all_gather()))
    });
    eprintln!("32 MB x {world} all_gather took {:?}", start.elapsed());
    for (rank, r) in out.into_iter().enumerate() {
        let (ok, stats) = r.unwrap();
        assert!(ok, "rank {rank}: wrong output");
        assert_eq!(stats.bytes, (32u64 << 20) * (world as u64 - 1));
    }
}

#[test]
fn tcp_large_sendrecv_ring_does_not_deadlock() {
    // Every rank sends 16 MB to its successor at once: both sides of each socket are
    // busy writing, which deadlocks an implementation that writes without draining.
    let world = 3;
    let elems = (16 << 20) / 4;
    let out = on_tcp_world(world, LONG, |mut c| {
        let me = c.rank();
        let send = vec![me as f32; elems];
        let mut recv = vec![0.0; elems];
        c.sendrecv(
            (me + 1) % world,
            &send,
            (me + world - 1) % world,
            &mut recv,
            1,
        )?;
        Ok::<_, CommError>(recv.iter().all(|&x| x == ((me + world - 1) % world) as f32))
    });
    assert!(out.into_iter().all(|r| r.unwrap()));
}

#[test]
fn tcp_two_communicators_over_one_store() {
    // The second connect must not pick up the first one's addresses.
    let world = 3;
    let server = serve(world);
    let addr = server.local_addr();
    let out: Vec<Vec<f32>> = thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let store = TcpStore::connect(addr, rank, LONG).unwrap();
                    let mut a = TcpComm::connect(&store, rank, world, LONG).unwrap();
                    let mut b = TcpComm::connect(&store, rank, world, LONG).unwrap();
                    let mut x = [rank as f32];
                    let mut y = [10.0 * rank as f32];
                    a.all_reduce_sum(&Group::world(world), &mut x).unwrap();
                    b.all_reduce_sum(&Group::world(world), &mut y).unwrap();
                    vec![x[0], y[0]]
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert!(out.iter().all(|v| v == &vec![3.0, 30.0]), "{out:?}");
}

#[test]
fn tcp_communicator_is_object_safe() {
    let out = on_tcp_world(2, LONG, |c| {
        let mut boxed: Box<dyn Communicator> = Box::new(c);
        let mut o = [0.0; 2];
        boxed
            .all_gather(&Group::world(2), &[boxed.rank() as f32], &mut o)
            .map(|()| o)
    });
    assert_eq!(out, vec![Ok([0.0, 1.0]), Ok([0.0, 1.0])]);
}

// ---------------------------------------------------------------------------------------
// Faults

#[test]
fn tcp_dropped_rank_mid_collective_is_named_promptly() {
    let timeout = Duration::from_secs(4);
    let out = on_tcp_world(4, timeout, |mut c| {
        let g = Group::world(4);
        let mut o = vec![0.0; 4];
        c.all_gather(&g, &[1.0], &mut o).unwrap();
        if c.rank() == 3 {
            thread::sleep(Duration::from_millis(50));
            drop(c); // leaves while the others wait for it
            return (Ok(()), Duration::ZERO);
        }
        let start = Instant::now();
        let r = c.all_gather(&g, &[2.0], &mut o);
        (r, start.elapsed())
    });
    for (rank, (r, elapsed)) in out.into_iter().enumerate().take(3) {
        assert_eq!(
            r,
            Err(CommError::PeerExited {
                rank: 3,
                observer: rank,
                op: CommOp::AllGather
            })
        );
        assert!(elapsed < timeout / 2, "rank {rank} took {elapsed:?}");
    }
}

#[test]
fn tcp_panicking_rank_fails_peers_promptly() {
    let timeout = Duration::from_secs(4);
    let out = on_tcp_world(3, timeout, |mut c| {
        let g = Group::world(3);
        let mut o = vec![0.0; 3];
        c.all_gather(&g, &[1.0], &mut o).unwrap();
        if c.rank() == 2 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                thread::sleep(Duration::from_millis(30));
                let _owned = c; // dropped while unwinding
                panic!("boom in rank 2");
            }));
            assert!(r.is_err());
            return (Ok(()), Duration::ZERO);
        }
        let start = Instant::now();
        let r = c.all_gather(&g, &[2.0], &mut o);
        (r, start.elapsed())
    });
    for (rank, (r, elapsed)) in out.into_iter().enumerate().take(2) {
        assert_eq!(
            r,
            Err(CommError::PeerFailed {
                rank: 2,
                reason: "rank 2 panicked".into(),
                observer: rank,
                op: CommOp::AllGather
            })
        );
        assert!(elapsed < timeout / 2, "rank {rank} took {elapsed:?}");
    }
}

#[test]
fn tcp_fail_wakes_pending_recv_and_poisons_later_calls() {
    let timeout = Duration::from_secs(4);
    let out = on_tcp_world(3, timeout, |mut c| {
        let start = Instant::now();
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(30));
            c.fail("out of memory");
            return (Ok(()), Ok(()), Duration::ZERO);
        }
        let pending = c.recv(1, 0, &mut [0.0]);
        let elapsed = start.elapsed();
        let later = c.barrier(&Group::new(vec![c.rank()]));
        (pending, later, elapsed)
    });
    for rank in [0, 2] {
        let (pending, later, elapsed) = &out[rank];
        let want = |op| {
            Err(CommError::PeerFailed {
                rank: 1,
                reason: "out of memory".into(),
                observer: rank,
                op,
            })
        };
        assert_eq!(pending, &want(CommOp::Recv));
        assert_eq!(later, &want(CommOp::Barrier));
        assert!(*elapsed < timeout / 2, "rank {rank} took {elapsed:?}");
    }
}

#[test]
fn tcp_missing_rank_times_out_naming_it() {
    let timeout = Duration::from_millis(400);
    let done = AtomicUsize::new(0);
    let out = on_tcp_world(3, timeout, |mut c| {
        if c.rank() == 2 {
            // Alive and connected, but never joins: hold the connection until the
            // others have given up.
            while done.load(Ordering::SeqCst) < 2 {
                thread::sleep(Duration::from_millis(5));
            }
            return (Ok(()), Duration::ZERO);
        }
        let start = Instant::now();
        let r = c.all_gather(&Group::world(3), &[1.0], &mut [0.0; 3]);
        let elapsed = start.elapsed();
        done.fetch_add(1, Ordering::SeqCst);
        (r, elapsed)
    });
    for (rank, (r, elapsed)) in out.into_iter().enumerate().take(2) {
        assert_eq!(
            r,
            Err(CommError::Timeout {
                rank,
                op: CommOp::AllGather,
                waiting_for: vec![2],
                after: timeout
            })
        );
        assert!(elapsed >= timeout, "rank {rank} returned after {elapsed:?}");
    }
}

#[test]
fn tcp_exited_peer_is_reported_after_its_messages() {
    let timeout = Duration::from_secs(4);
    let out = on_tcp_world(2, timeout, |mut c| {
        if c.rank() == 1 {
            let sent = c.send(0, 5, &[7.0]);
            return (sent.map(|()| 0.0), Ok(()), Duration::ZERO); // drops: exits
        }
        thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let mut first = [0.0];
        let first = c.recv(1, 5, &mut first).map(|()| first[0]);
        let second = c.recv(1, 5, &mut [0.0]);
        (first, second, start.elapsed())
    });
    let (first, second, elapsed) = &out[0];
    assert_eq!(first, &Ok(7.0));
    assert_eq!(
        second,
        &Err(CommError::PeerExited {
            rank: 1,
            observer: 0,
            op: CommOp::Recv
        })
    );
    assert!(*elapsed < timeout / 2, "took {elapsed:?}");
}

#[test]
fn tcp_connect_times_out_naming_the_absent_rank() {
    let timeout = Duration::from_millis(500);
    let server = serve(3);
    let addr = server.local_addr();
    let out: Vec<_> = thread::scope(|s| {
        let joins: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let store = TcpStore::connect(addr, rank, LONG).unwrap();
                    let start = Instant::now();
                    let r = TcpComm::connect(&store, rank, 3, timeout).map(|_| ());
                    (r, start.elapsed())
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (rank, (r, elapsed)) in out.into_iter().enumerate() {
        assert_eq!(
            r,
            Err(CommError::Timeout {
                rank,
                op: CommOp::Barrier,
                waiting_for: vec![2],
                after: timeout
            })
        );
        assert!(elapsed >= timeout && elapsed < LONG, "{elapsed:?}");
    }
}

/// Set in the child process of `tcp_killed_process_is_reported_promptly`: "addr rank world".
const CHILD_ENV: &str = "DITTO_TCP_TEST_CHILD_RANK";

/// Not a test of its own: the body of the rank that the SIGKILL test runs as a child
/// process (this binary, filtered to this function with `--ignored`), so it is ignored in
/// normal runs.
#[test]
#[ignore = "the child rank of tcp_killed_process_is_reported_promptly"]
fn tcp_child_rank_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let addr: SocketAddr = parts[0].parse().unwrap();
    let rank: usize = parts[1].parse().unwrap();
    let world: usize = parts[2].parse().unwrap();
    let store = TcpStore::connect(addr, rank, LONG).unwrap();
    let mut c = TcpComm::connect(&store, rank, world, LONG).unwrap();
    let mut o = vec![0.0; world];
    c.all_gather(&Group::world(world), &[rank as f32], &mut o)
        .unwrap();
    // Wait to be killed (the parent does it right away; this only bounds a broken run).
    thread::sleep(Duration::from_secs(60));
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_killed_process_is_reported_promptly() {
    let world = 4;
    let timeout = Duration::from_secs(10);
    let server = serve(world);
    let addr = server.local_addr();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "tcp_child_rank_process",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{addr} 3 {world}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child rank");
    let mut child = KillOnDrop(child);
    let ready = AtomicUsize::new(0);
    let ready = &ready;
    let (out, killed_at) = thread::scope(|s| {
        let joins: Vec<_> = (0..world - 1)
            .map(|rank| {
                s.spawn(move || {
                    let store = TcpStore::connect(addr, rank, LONG).unwrap();
                    let mut c = TcpComm::connect(&store, rank, world, timeout).unwrap();
                    let g = Group::world(world);
                    let mut o = vec![0.0; world];
                    c.all_gather(&g, &[rank as f32], &mut o).unwrap();
                    ready.fetch_add(1, Ordering::SeqCst);
                    let r = c.all_gather(&g, &[1.0], &mut o);
                    (r, Instant::now())
                })
            })
            .collect();
        while ready.load(Ordering::SeqCst) < world - 1 {
            thread::sleep(Duration::from_millis(5));
        }
        // Let the survivors block in the second all_gather, then SIGKILL rank 3.
        thread::sleep(Duration::from_millis(100));
        child.0.kill().expect("SIGKILL the child");
        let killed_at = Instant::now();
        let out: Vec<_> = joins.into_iter().map(|j| j.join().unwrap()).collect();
        (out, killed_at)
    });
    for (rank, (r, returned_at)) in out.into_iter().enumerate() {
        match &r {
            Err(CommError::PeerFailed {
                rank: 3,
                observer,
                op: CommOp::AllGather,
                reason,
            }) => {
                assert_eq!(*observer, rank);
                assert!(reason.contains("without a goodbye"), "{reason}");
            }
            other => panic!("rank {rank}: expected PeerFailed naming 3, got {other:?}"),
        }
        let after_kill = returned_at.saturating_duration_since(killed_at);
        assert!(
            after_kill < timeout / 2,
            "rank {rank}: {after_kill:?} after the kill"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Rendezvous store

/// Runs `f` on `world_size` store clients, one thread each.
fn on_store<T: Send>(world_size: usize, f: impl Fn(TcpStore) -> T + Sync) -> Vec<T> {
    let server = serve(world_size);
    let addr = server.local_addr();
    let f = &f;
    thread::scope(|s| {
        let joins: Vec<_> = (0..world_size)
            .map(|rank| s.spawn(move || f(TcpStore::connect(addr, rank, LONG).unwrap())))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

#[test]
fn store_get_blocks_until_set() {
    let out = on_store(2, |store| {
        if store.rank() == 1 {
            thread::sleep(Duration::from_millis(150));
            store.set("addr/1", b"hello").unwrap();
            return (Vec::new(), Duration::ZERO);
        }
        let start = Instant::now();
        (store.get("addr/1").unwrap(), start.elapsed())
    });
    assert_eq!(out[0].0, b"hello");
    assert!(out[0].1 >= Duration::from_millis(100), "{:?}", out[0].1);
}

#[test]
fn store_get_timeout_names_the_key() {
    let out = on_store(1, |store| {
        let start = Instant::now();
        let r = store.get_timeout("addr/7", Duration::from_millis(200));
        (r, store.try_get("addr/7"), start.elapsed())
    });
    let (r, now, elapsed) = &out[0];
    let err = r.clone().unwrap_err();
    assert!(matches!(&err, StoreError::KeyTimeout { key, .. } if key == "addr/7"));
    assert!(
        err.to_string()
            .contains("key `addr/7` was not set within 200ms"),
        "{err}"
    );
    assert_eq!(now, &Ok(None));
    assert!(*elapsed >= Duration::from_millis(200));
}

#[test]
fn store_add_is_atomic_across_ranks() {
    let (world, per_rank) = (4, 200);
    let seen = on_store(world, |store| {
        (0..per_rank)
            .map(|_| store.add("counter", 1).unwrap())
            .collect::<Vec<i64>>()
    });
    let mut all: Vec<i64> = seen.into_iter().flatten().collect();
    all.sort_unstable();
    let total = (world * per_rank) as i64;
    assert_eq!(all, (1..=total).collect::<Vec<_>>());
    let store = on_store(1, |s| {
        s.set("c", b"40").unwrap();
        (s.add("c", 2), s.get("c"), s.add("c", -50))
    });
    assert_eq!(store[0], (Ok(42), Ok(b"42".to_vec()), Ok(-8)));
}

#[test]
fn store_barrier_waits_for_everyone_and_is_reusable() {
    let world = 4;
    let before = AtomicUsize::new(0);
    let seen = on_store(world, |store| {
        let mut seen = Vec::new();
        for step in 1..=3 {
            // Stagger arrivals so that a barrier letting anyone through early shows.
            thread::sleep(Duration::from_millis(10 * store.rank() as u64));
            before.fetch_add(1, Ordering::SeqCst);
            store.barrier("step").unwrap();
            seen.push(before.load(Ordering::SeqCst) >= step * world);
        }
        seen
    });
    assert!(seen.iter().flatten().all(|&s| s), "{seen:?}");
}

#[test]
fn store_barrier_timeout_names_the_missing_ranks() {
    let out = on_store(4, |store| {
        if store.rank() >= 2 {
            return None;
        }
        Some(store.barrier_timeout("init", Duration::from_millis(300)))
    });
    for r in out.into_iter().take(2) {
        let err = r.unwrap().unwrap_err();
        assert_eq!(
            err,
            StoreError::BarrierTimeout {
                name: "init".into(),
                after: Duration::from_millis(300),
                missing: vec![2, 3]
            }
        );
        assert_eq!(
            err.to_string(),
            "rendezvous `init` timed out after 300ms: rank(s) 2, 3 did not arrive"
        );
    }
}

/// An address where nothing listens: a port the OS just handed out and took back.
fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn store_connect_times_out_naming_the_address() {
    let addr = dead_address();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = TcpStore::connect(addr, 1, timeout).unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(&err, StoreError::Connect { addr: a, .. } if a == &addr.to_string()));
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("within 300ms"),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(elapsed >= timeout && elapsed < timeout * 10, "{elapsed:?}");
}

#[test]
fn store_connect_waits_for_a_late_server() {
    let addr = dead_address();
    let client = thread::spawn(move || TcpStore::connect(addr, 0, LONG).map(|s| s.world_size()));
    thread::sleep(Duration::from_millis(200));
    let _server = TcpStore::serve(addr, 5, LONG).unwrap();
    assert_eq!(client.join().unwrap(), Ok(5));
}

#[test]
fn store_lost_server_is_reported_naming_the_address() {
    let server = serve(2);
    let addr = server.local_addr();
    let store = TcpStore::connect(addr, 1, LONG).unwrap();
    let waiter = thread::spawn(move || {
        let start = Instant::now();
        (store.get("never"), store.set("k", b"v"), start.elapsed())
    });
    thread::sleep(Duration::from_millis(100));
    drop(server);
    let (pending, later, elapsed) = waiter.join().unwrap();
    for r in [pending.map(|_| ()), later] {
        match r {
            Err(e @ StoreError::Disconnected { .. }) => {
                assert!(e.to_string().contains(&addr.to_string()), "{e}")
            }
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    assert!(elapsed < LONG / 2, "{elapsed:?}");
}

#[test]
fn store_rejects_a_rank_outside_the_world() {
    let server = serve(2);
    let err = TcpStore::connect(server.local_addr(), 2, LONG).unwrap_err();
    assert!(
        matches!(&err, StoreError::Rejected { message, .. } if message.contains("outside the world")),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Bandwidth

/// A measurement, not a check: `cargo test --release --test tcp_comm -- --ignored
/// --nocapture tcp_loopback_bandwidth_report` prints the TCP all-gather's bandwidth next to
/// a plain socket copy of the same bytes in the same run.
#[test]
#[ignore = "a bandwidth measurement; run it alone with --ignored --nocapture"]
fn tcp_loopback_bandwidth_report() {
    let bytes = 32 << 20;
    for world in [2, 4] {
        let (all_gather, socket) = loopback_bandwidth(bytes, world).unwrap();
        println!(
            "loopback, {} MB per rank, {world} ranks: all_gather {all_gather:.2} GB/s sent per rank, \
             plain socket {socket:.2} GB/s, ratio {:.2}",
            bytes >> 20,
            all_gather / socket
        );
        assert!(all_gather > 0.0 && all_gather.is_finite());
        assert!(socket > 0.0 && socket.is_finite());
    }
}
