//! Tests of the communicator trait on the in-process backend. Every collective is
//! checked against a direct computation on the same inputs; failure tests check that
//! errors name the right rank and arrive well before the timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Generous: successful tests never wait for it, it only bounds a broken test.
const LONG: Duration = Duration::from_secs(5);

/// Runs `f` on every rank of a fresh world and returns each rank's result (errors
/// included, unlike `run_ranks`, so tests can look at every rank's outcome).
fn on_world<T: Send>(
    world_size: usize,
    timeout: Duration,
    f: impl Fn(InProcessComm) -> T + Sync,
) -> Vec<T> {
    let f = &f;
    thread::scope(|s| {
        let joins: Vec<_> = in_process_world(world_size, timeout)
            .into_iter()
            .map(|comm| s.spawn(move || f(comm)))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Distinct, exactly representable values: rank r's element i.
fn input_of(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 1000 + i) as f32).collect()
}

#[test]
fn comm_all_gather_world_sizes_1_to_4() {
    for world in 1..=4 {
        let n = 3;
        let out = run_ranks(world, LONG, |mut c| {
            let group = Group::world(c.world_size());
            let mut output = vec![0.0; n * world];
            c.all_gather(&group, &input_of(c.rank(), n), &mut output)?;
            Ok::<_, CommError>(output)
        })
        .unwrap();
        let expected: Vec<f32> = (0..world).flat_map(|r| input_of(r, n)).collect();
        for (rank, o) in out.iter().enumerate() {
            assert_eq!(o, &expected, "world {world}, rank {rank}");
        }
    }
}

/// Element `k` of the chunk that `src` sends to `dst`: encodes all three, so a chunk in
/// the wrong place is visible.
fn a2a_value(src: usize, dst: usize, k: usize) -> f32 {
    (src * 100 + dst * 10 + k) as f32
}

#[test]
fn comm_all_to_all_chunk_semantics_world_sizes_1_to_4() {
    for world in 1..=4 {
        let c_len = 2;
        let out = run_ranks(world, LONG, |mut c| {
            let group = Group::world(c.world_size());
            let me = c.rank();
            let input: Vec<f32> = (0..world)
                .flat_map(|dst| (0..c_len).map(move |k| a2a_value(me, dst, k)))
                .collect();
            let mut output = vec![0.0; input.len()];
            c.all_to_all(&group, &input, &mut output)?;
            Ok::<_, CommError>(output)
        })
        .unwrap();
        for (me, o) in out.iter().enumerate() {
            // Output chunk i is what member i sent to me.
            let expected: Vec<f32> = (0..world)
                .flat_map(|src| (0..c_len).map(move |k| a2a_value(src, me, k)))
                .collect();
            assert_eq!(o, &expected, "world {world}, rank {me}");
        }
    }
}

#[test]
fn comm_all_reduce_world_sizes_1_to_4_bit_identical() {
    for world in 1..=4 {
        let n = 5;
        // Values whose sum depends on the order of additions in f32, so that a rank
        // summing in its own order would disagree with the others.
        let value = |r: usize, i: usize| (r as f32 + 1.0) * 0.1 + (i as f32) * 1e-7 * (r as f32);
        let out = run_ranks(world, LONG, |mut c| {
            let group = Group::world(c.world_size());
            let r = c.rank();
            let mut data: Vec<f32> = (0..n).map(|i| value(r, i)).collect();
            c.all_reduce_sum(&group, &mut data)?;
            Ok::<_, CommError>(data)
        })
        .unwrap();
        let expected: Vec<f32> = (0..n)
            .map(|i| {
                let mut acc = value(0, i);
                for r in 1..world {
                    acc += value(r, i);
                }
                acc
            })
            .collect();
        for (rank, o) in out.iter().enumerate() {
            let bits: Vec<u32> = o.iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = expected.iter().map(|x| x.to_bits()).collect();
            assert_eq!(bits, want, "world {world}, rank {rank}");
        }
    }
}

#[test]
fn comm_barrier_world_sizes_1_to_4() {
    for world in 1..=4 {
        let before = AtomicUsize::new(0);
        let seen = run_ranks(world, LONG, |mut c| {
            before.fetch_add(1, Ordering::SeqCst);
            c.barrier(&Group::world(c.world_size()))?;
            // Everyone incremented before anyone got past the barrier.
            Ok::<_, CommError>(before.load(Ordering::SeqCst))
        })
        .unwrap();
        assert!(seen.iter().all(|&s| s == world), "world {world}: {seen:?}");
    }
}

/// Runs all_gather, all_to_all, all_reduce and barrier on `groups` (disjoint, covering
/// the world) concurrently, interleaved with world collectives, and checks every result.
fn check_subgroups(world: usize, groups: Vec<Group>) {
    let groups = &groups;
    let out = run_ranks(world, LONG, |mut c| {
        let me = c.rank();
        let group = Group::find(groups, me).unwrap().clone();
        let g = group.size();
        let all = Group::world(world);
        let mut gathered = vec![0.0; 2 * g];
        c.all_gather(&group, &input_of(me, 2), &mut gathered)?;
        // A world collective between two group collectives must not steal their data.
        let mut world_gathered = vec![0.0; world];
        c.all_gather(&all, &[me as f32], &mut world_gathered)?;
        let idx = group.index_of(me).unwrap();
        let a2a_in: Vec<f32> = (0..g).map(|dst| a2a_value(idx, dst, 0)).collect();
        let mut a2a_out = vec![0.0; g];
        c.all_to_all(&group, &a2a_in, &mut a2a_out)?;
        let mut reduced = vec![me as f32, 1.0];
        c.all_reduce_sum(&group, &mut reduced)?;
        c.barrier(&group)?;
        c.barrier(&all)?;
        Ok::<_, CommError>((gathered, world_gathered, a2a_out, reduced))
    })
    .unwrap();
    for (me, (gathered, world_gathered, a2a_out, reduced)) in out.into_iter().enumerate() {
        let group = Group::find(groups, me).unwrap();
        let idx = group.index_of(me).unwrap();
        let want: Vec<f32> = group.ranks.iter().flat_map(|&r| input_of(r, 2)).collect();
        assert_eq!(gathered, want, "rank {me}: group all_gather");
        let want: Vec<f32> = (0..world).map(|r| r as f32).collect();
        assert_eq!(world_gathered, want, "rank {me}: world all_gather");
        let want: Vec<f32> = (0..group.size())
            .map(|src| a2a_value(src, idx, 0))
            .collect();
        assert_eq!(a2a_out, want, "rank {me}: group all_to_all");
        let sum: f32 = group.ranks.iter().map(|&r| r as f32).sum();
        assert_eq!(
            reduced,
            vec![sum, group.size() as f32],
            "rank {me}: all_reduce"
        );
    }
}

#[test]
fn comm_contiguous_subgroups_run_concurrently() {
    let groups = Group::contiguous(4, 2).unwrap();
    assert_eq!(groups, vec![Group::new(vec![0, 1]), Group::new(vec![2, 3])]);
    check_subgroups(4, groups);
}

#[test]
fn comm_strided_subgroups_run_concurrently() {
    let groups = Group::strided(4, 2).unwrap();
    assert_eq!(groups, vec![Group::new(vec![0, 2]), Group::new(vec![1, 3])]);
    check_subgroups(4, groups);
}

#[test]
fn comm_usp_mesh_inner_and_outer_groups_interleave() {
    // Ulysses over {0,1},{2,3}, Ring/CFG over {0,2},{1,3}, alternating as USP does.
    let inner = Group::contiguous(4, 2).unwrap();
    let outer = Group::strided(4, 2).unwrap();
    let (inner, outer) = (&inner, &outer);
    let out = run_ranks(4, LONG, |mut c| {
        let me = c.rank();
        let gi = Group::find(inner, me).unwrap().clone();
        let go = Group::find(outer, me).unwrap().clone();
        let mut sums = Vec::new();
        for step in 0..3 {
            let mut a = vec![(me + step) as f32];
            c.all_reduce_sum(&gi, &mut a)?;
            let mut b = vec![(me * 10 + step) as f32];
            c.all_reduce_sum(&go, &mut b)?;
            sums.push((a[0], b[0]));
        }
        Ok::<_, CommError>(sums)
    })
    .unwrap();
    for (me, sums) in out.iter().enumerate() {
        let gi = Group::find(inner, me).unwrap();
        let go = Group::find(outer, me).unwrap();
        for (step, &(a, b)) in sums.iter().enumerate() {
            let want_a: usize = gi.ranks.iter().map(|r| r + step).sum();
            let want_b: usize = go.ranks.iter().map(|r| r * 10 + step).sum();
            assert_eq!(
                (a, b),
                (want_a as f32, want_b as f32),
                "rank {me} step {step}"
            );
        }
    }
}

#[test]
fn comm_send_recv_tags_do_not_mix_and_keep_order() {
    let out = run_ranks(2, LONG, |mut c| {
        if c.rank() == 0 {
            c.send(1, 7, &[1.0])?;
            c.send(1, 9, &[2.0, 2.5])?;
            c.send(1, 7, &[3.0])?;
            Ok::<_, CommError>(vec![])
        } else {
            let mut b = [0.0; 2];
            let mut a1 = [0.0];
            let mut a2 = [0.0];
            // Out of send order across tags, in order within a tag.
            c.recv(0, 9, &mut b)?;
            c.recv(0, 7, &mut a1)?;
            c.recv(0, 7, &mut a2)?;
            Ok(vec![b[0], b[1], a1[0], a2[0]])
        }
    })
    .unwrap();
    assert_eq!(out[1], vec![2.0, 2.5, 1.0, 3.0]);
}

#[test]
fn comm_sendrecv_ring_rotation_4_ranks() {
    let world = 4;
    let out = run_ranks(world, LONG, |mut c| {
        let me = c.rank();
        let (next, prev) = ((me + 1) % world, (me + world - 1) % world);
        let mut block = input_of(me, 3);
        let mut held = vec![block[0]];
        for _ in 0..world {
            let mut incoming = vec![0.0; 3];
            c.sendrecv(next, &block, prev, &mut incoming, 42)?;
            block = incoming;
            held.push(block[0]);
        }
        Ok::<_, CommError>((held, block))
    })
    .unwrap();
    for (me, (held, block)) in out.into_iter().enumerate() {
        // After s steps rank r holds the block of rank (r - s) mod P; after P, its own.
        let want: Vec<f32> = (0..=world)
            .map(|s| input_of((me + world * 2 - s) % world, 1)[0])
            .collect();
        assert_eq!(held, want, "rank {me}");
        assert_eq!(block, input_of(me, 3), "rank {me}");
    }
}

#[test]
fn comm_sendrecv_to_self_on_one_rank() {
    let out = run_ranks(1, LONG, |mut c| {
        let mut r = [0.0; 2];
        c.sendrecv(0, &[1.0, 2.0], 0, &mut r, 0)?;
        Ok::<_, CommError>(r)
    })
    .unwrap();
    assert_eq!(out[0], [1.0, 2.0]);
}

#[test]
fn comm_stats_follow_documented_formulas() {
    let g = 4u64;
    let stats = run_ranks(4, LONG, |mut c| {
        let all = Group::world(4);
        let me = c.rank();
        let mut out = vec![0.0; 24];
        c.all_gather(&all, &[0.0; 6], &mut out)?; // 6 elems = 24 bytes in
        let mut a2a = vec![0.0; 8];
        c.all_to_all(&all, &[0.0; 8], &mut a2a)?; // 32 bytes in
        let mut red = vec![0.0; 8];
        c.all_reduce_sum(&all, &mut red)?; // 32 bytes
        c.barrier(&all)?;
        let (next, prev) = ((me + 1) % 4, (me + 3) % 4);
        c.send(next, 1, &[0.0; 5])?; // 20 bytes
        let mut r5 = [0.0; 5];
        c.recv(prev, 1, &mut r5)?;
        let mut r3 = [0.0; 3];
        c.sendrecv(next, &[0.0; 3], prev, &mut r3, 2)?; // 12 bytes
        let before_reset = c.stats().clone();
        c.reset_stats();
        assert_eq!(c.stats(), &CommStats::default());
        Ok::<_, CommError>(before_reset)
    })
    .unwrap();
    for s in stats {
        assert_eq!(
            s.all_gather(),
            KindStats {
                calls: 1,
                bytes: 24 * (g - 1)
            }
        );
        assert_eq!(
            s.all_to_all(),
            KindStats {
                calls: 1,
                bytes: 32 * (g - 1) / g
            }
        );
        assert_eq!(
            s.all_reduce(),
            KindStats {
                calls: 1,
                bytes: 2 * (g - 1) * 32 / g
            }
        );
        assert_eq!(
            s.send_recv(),
            KindStats {
                calls: 2,
                bytes: 20 + 12
            }
        );
        assert_eq!(s.barrier_calls(), 1);
        assert_eq!(s.total_bytes(), 72 + 24 + 48 + 32);
    }
    // One rank: calls count, bytes do not.
    assert_eq!(CommStats::all_gather_bytes(10, 1), 0);
    assert_eq!(CommStats::all_to_all_bytes(10, 1), 0);
    assert_eq!(CommStats::all_reduce_bytes(10, 1), 0);
}

#[test]
fn comm_bad_groups_and_lengths_name_the_caller() {
    let out = on_world(4, LONG, |mut c| {
        if c.rank() != 2 {
            return vec![];
        }
        let mut o = vec![0.0; 2];
        vec![
            c.all_gather(&Group::new(vec![0, 1]), &[1.0], &mut o),
            c.all_gather(&Group::new(vec![2, 2]), &[1.0], &mut o),
            c.all_gather(&Group::new(vec![2, 4]), &[1.0], &mut o),
            c.barrier(&Group::new(vec![])),
            c.all_gather(&Group::new(vec![2]), &[1.0], &mut o),
            c.all_to_all(&Group::new(vec![1, 2]), &[1.0; 3], &mut [0.0; 3]),
            c.send(9, 0, &[1.0]),
        ]
    });
    let errs = &out[2];
    assert_eq!(
        errs[0],
        Err(CommError::NotMember {
            rank: 2,
            op: CommOp::AllGather,
            group: vec![0, 1]
        })
    );
    assert!(
        matches!(&errs[1], Err(CommError::InvalidGroup { rank: 2, reason, .. }) if reason.contains("twice"))
    );
    assert!(
        matches!(&errs[2], Err(CommError::InvalidGroup { rank: 2, reason, .. }) if reason.contains("outside"))
    );
    assert!(matches!(
        &errs[3],
        Err(CommError::InvalidGroup {
            rank: 2,
            op: CommOp::Barrier,
            ..
        })
    ));
    assert!(matches!(
        &errs[4],
        Err(CommError::BadLength {
            rank: 2,
            op: CommOp::AllGather,
            ..
        })
    ));
    assert!(matches!(
        &errs[5],
        Err(CommError::BadLength {
            rank: 2,
            op: CommOp::AllToAll,
            ..
        })
    ));
    assert_eq!(
        errs[6],
        Err(CommError::InvalidRank {
            rank: 2,
            op: CommOp::Send,
            peer: 9,
            world_size: 4
        })
    );
}

#[test]
fn comm_mismatched_calls_are_errors_not_hangs() {
    let out = on_world(2, LONG, |mut c| {
        let g = Group::world(2);
        let me = c.rank();
        // Different sizes in one all_gather, then different collectives.
        let input = vec![0.0; 2 + me];
        let mut o = vec![0.0; 2 * input.len()];
        let sizes = c.all_gather(&g, &input, &mut o);
        let ops = if me == 0 {
            c.barrier(&g)
        } else {
            c.all_reduce_sum(&g, &mut [])
        };
        (sizes, ops)
    });
    assert_eq!(
        out[0].0,
        Err(CommError::SizeMismatch {
            rank: 0,
            op: CommOp::AllGather,
            peer: 1,
            expected: 2,
            got: 3
        })
    );
    assert_eq!(
        out[1].0,
        Err(CommError::SizeMismatch {
            rank: 1,
            op: CommOp::AllGather,
            peer: 0,
            expected: 3,
            got: 2
        })
    );
    assert_eq!(
        out[0].1,
        Err(CommError::OpMismatch {
            rank: 0,
            op: CommOp::Barrier,
            peer: 1,
            peer_op: CommOp::AllReduce
        })
    );
}

#[test]
fn comm_panic_mid_collective_fails_peers_promptly() {
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let out = on_world(4, timeout, |mut c| {
        let g = Group::world(4);
        let mut o = vec![0.0; 4];
        // Everyone completes one collective, then rank 3 panics before the second.
        c.all_gather(&g, &[1.0], &mut o).unwrap();
        if c.rank() == 3 {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                thread::sleep(Duration::from_millis(30));
                let _owned = c; // dropped while unwinding
                panic!("boom in rank 3");
            }));
            assert!(r.is_err());
            return (Ok(()), Duration::ZERO);
        }
        let r = c.all_gather(&g, &[2.0], &mut o);
        (r, start.elapsed())
    });
    for (rank, (r, elapsed)) in out.iter().enumerate().take(3) {
        match r {
            Err(CommError::PeerFailed {
                rank: 3,
                observer,
                op: CommOp::AllGather,
                ..
            }) => {
                assert_eq!(*observer, rank)
            }
            other => panic!("rank {rank}: expected PeerFailed naming 3, got {other:?}"),
        }
        assert!(*elapsed < timeout / 2, "rank {rank} took {elapsed:?}");
    }
}

#[test]
fn comm_fail_wakes_pending_recv_and_poisons_later_calls() {
    let timeout = Duration::from_secs(2);
    let out = on_world(3, timeout, |mut c| {
        let start = Instant::now();
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(20));
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
fn comm_missing_rank_times_out_naming_it() {
    let timeout = Duration::from_millis(300);
    let mut comms = in_process_world(3, timeout);
    // Rank 2 stays alive (not exited, not failed) but never joins the collective.
    let absent = comms.pop().unwrap();
    let out: Vec<(Result<(), CommError>, Duration)> = thread::scope(|s| {
        let joins: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let start = Instant::now();
                    let mut o = vec![0.0; 3];
                    let r = c.all_gather(&Group::world(3), &[1.0], &mut o);
                    (r, start.elapsed())
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    drop(absent);
    for (rank, (r, elapsed)) in out.into_iter().enumerate() {
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
fn comm_exited_peer_is_reported_promptly_after_its_messages() {
    let timeout = Duration::from_secs(2);
    let out = on_world(2, timeout, |mut c| {
        if c.rank() == 1 {
            let sent = c.send(0, 5, &[7.0]);
            return (sent.map(|_| 0.0), Ok(()), Duration::ZERO); // drops the comm: exits
        }
        thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        let mut first = [0.0];
        // Sent before the exit: still delivered.
        let first = c.recv(1, 5, &mut first).map(|_| first[0]);
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
fn comm_run_ranks_returns_the_failing_ranks_error() {
    let seen = std::sync::Mutex::new(Vec::new());
    let start = Instant::now();
    let timeout = Duration::from_secs(2);
    let err = run_ranks(4, timeout, |mut c| {
        let g = Group::world(4);
        if c.rank() == 2 {
            thread::sleep(Duration::from_millis(20));
            return Err(format!("rank {} could not load weights", c.rank()));
        }
        let r = c.barrier(&g);
        seen.lock().unwrap().push((c.rank(), r.clone()));
        r.map_err(|e| e.to_string())
    })
    .unwrap_err();
    assert!(start.elapsed() < timeout / 2);
    assert_eq!(err.rank, 2);
    assert!(!err.panicked);
    assert_eq!(err.message, "rank 2 could not load weights");
    assert_eq!(err.failed_ranks, vec![0, 1, 2, 3]);
    assert!(err.to_string().contains("rank 2 failed"));
    for (rank, r) in seen.into_inner().unwrap() {
        assert!(
            matches!(&r, Err(CommError::PeerFailed { rank: 2, reason, .. }) if reason.contains("weights")),
            "rank {rank}: {r:?}"
        );
    }
}

#[test]
fn comm_run_ranks_reports_a_panic_with_its_message() {
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let err = run_ranks(3, timeout, |mut c| {
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(20));
            panic!("index out of bounds in rank 1");
        }
        c.barrier(&Group::world(3))
    })
    .unwrap_err();
    assert!(start.elapsed() < timeout / 2);
    assert_eq!(err.rank, 1);
    assert!(err.panicked);
    assert_eq!(err.message, "index out of bounds in rank 1");
}

#[test]
fn comm_run_ranks_ok_returns_results_in_rank_order() {
    let out = run_ranks(3, LONG, |c| Ok::<_, CommError>(c.rank() * 2)).unwrap();
    assert_eq!(out, vec![0, 2, 4]);
    assert_eq!(
        run_ranks(0, LONG, |c| Ok::<_, CommError>(c.rank())).unwrap(),
        Vec::<usize>::new()
    );
}

#[test]
fn comm_communicator_is_object_safe() {
    // Executors hold `Box<dyn Communicator>` so backends are chosen at run time.
    let out = run_ranks(2, LONG, |c| {
        let mut boxed: Box<dyn Communicator> = Box::new(c);
        let mut o = [0.0; 2];
        boxed.all_gather(&Group::world(2), &[boxed.rank() as f32], &mut o)?;
        Ok::<_, CommError>(o)
    })
    .unwrap();
    assert_eq!(out, vec![[0.0, 1.0], [0.0, 1.0]]);
}
