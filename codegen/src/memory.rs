//! Memory planning: every intermediate value gets a buffer; a buffer is reused once the last
//! reader of every value in it has run (liveness), best-fit by size. Views (reshapes) share
//! their source's storage and extend its lifetime.

use crate::program::{Storage, Value};

/// Plans buffers for `values` given each step's (outputs, operands) in execution order and the
/// values that must survive to the end (graph outputs). Values whose storage is
/// `Storage::Buffer(usize::MAX)` are intermediates to place; their `root` is the value that
/// owns the storage (itself unless it is a view).
pub fn plan(
    values: &mut [Value],
    root: &[usize],
    steps: &[(usize, Vec<usize>)],
    keep: &[usize],
) -> Vec<usize> {
    let n = values.len();
    // Last step index reading each root value (through any view).
    let mut last_use = vec![None::<usize>; n];
    for (si, (out, ops)) in steps.iter().enumerate() {
        last_use[root[*out]] = Some(last_use[root[*out]].map_or(si, |u: usize| u.max(si)));
        for &o in ops {
            let r = root[o];
            last_use[r] = Some(last_use[r].map_or(si, |u| u.max(si)));
        }
    }
    for &k in keep {
        last_use[root[k]] = Some(usize::MAX);
    }
    let mut buffers: Vec<usize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buffer_of = vec![None::<usize>; n];
    // Values to release after each step.
    let mut release: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (si, (out, _)) in steps.iter().enumerate() {
        let r = root[*out];
        if values[r].storage == Storage::Buffer(usize::MAX) && buffer_of[r].is_none() {
            let size = values[r].numel().max(1);
            // Best fit among free buffers; grow the largest free one if none fits.
            let pick = free
                .iter()
                .enumerate()
                .filter(|(_, &b)| buffers[b] >= size)
                .min_by_key(|(_, &b)| buffers[b])
                .map(|(i, _)| i)
                .or_else(|| {
                    free.iter()
                        .enumerate()
                        .max_by_key(|(_, &b)| buffers[b])
                        .map(|(i, _)| i)
                });
            let b = match pick {
                Some(i) => free.swap_remove(i),
                None => {
                    buffers.push(0);
                    buffers.len() - 1
                }
            };
            buffers[b] = buffers[b].max(size);
            buffer_of[r] = Some(b);
            match last_use[r] {
                Some(u) if u != usize::MAX => release[u.max(si)].push(b),
                Some(_) => {}
                None => release[si].push(b),
            }
        }
        for b in std::mem::take(&mut release[si]) {
            free.push(b);
        }
    }
    for v in 0..n {
        if let Some(b) = buffer_of[root[v]] {
            if values[v].storage == Storage::Buffer(usize::MAX) {
                values[v].storage = Storage::Buffer(b);
            }
        }
    }
    buffers
}
