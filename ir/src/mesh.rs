//! The device mesh that parallel programs are compiled for, and the ways attention over a
//! split sequence can be computed. Shared by the sharding pass, codegen and the runtime.

use serde::{Deserialize, Serialize};

/// An axis of the device mesh. Ranks are laid out as `rank = (cfg * ring + r) * ulysses + u`:
/// Ulysses innermost (contiguous ranks, the fastest links), then Ring, then the CFG pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MeshAxis {
    /// The classifier-free-guidance pair: batch halves.
    Cfg,
    /// All sequence-parallel ranks (ring x ulysses); index `r * ulysses + u`.
    Sp,
    /// The inner sequence-parallel axis.
    Ulysses,
    /// The outer sequence-parallel axis.
    Ring,
}

impl MeshAxis {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshAxis::Cfg => "cfg",
            MeshAxis::Sp => "sp",
            MeshAxis::Ulysses => "ulysses",
            MeshAxis::Ring => "ring",
        }
    }
    pub fn parse(s: &str) -> Option<MeshAxis> {
        Some(match s {
            "cfg" => MeshAxis::Cfg,
            "sp" => MeshAxis::Sp,
            "ulysses" => MeshAxis::Ulysses,
            "ring" => MeshAxis::Ring,
            _ => return None,
        })
    }
}

/// The device mesh of a run: `cfg * ring * ulysses` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mesh {
    pub cfg: usize,
    pub ring: usize,
    pub ulysses: usize,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            cfg: 1,
            ring: 1,
            ulysses: 1,
        }
    }
}

impl Mesh {
    pub fn world_size(&self) -> usize {
        self.cfg * self.ring * self.ulysses
    }
    pub fn sp(&self) -> usize {
        self.ring * self.ulysses
    }
    pub fn size(&self, axis: MeshAxis) -> usize {
        match axis {
            MeshAxis::Cfg => self.cfg,
            MeshAxis::Sp => self.sp(),
            MeshAxis::Ulysses => self.ulysses,
            MeshAxis::Ring => self.ring,
        }
    }
    /// (cfg, ring, ulysses) coordinates of `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize, usize) {
        let u = rank % self.ulysses;
        let r = (rank / self.ulysses) % self.ring;
        let c = rank / (self.ulysses * self.ring);
        (c, r, u)
    }
    pub fn rank_of(&self, c: usize, r: usize, u: usize) -> usize {
        (c * self.ring + r) * self.ulysses + u
    }
    /// `rank`'s index along `axis`.
    pub fn index(&self, rank: usize, axis: MeshAxis) -> usize {
        let (c, r, u) = self.coords(rank);
        match axis {
            MeshAxis::Cfg => c,
            MeshAxis::Sp => r * self.ulysses + u,
            MeshAxis::Ulysses => u,
            MeshAxis::Ring => r,
        }
    }
    /// The ranks that differ from `rank` only along `axis`, ordered by their index on it.
    pub fn group(&self, rank: usize, axis: MeshAxis) -> Vec<usize> {
        let (c, r, u) = self.coords(rank);
        match axis {
            MeshAxis::Cfg => (0..self.cfg).map(|c| self.rank_of(c, r, u)).collect(),
            MeshAxis::Sp => (0..self.sp())
                .map(|s| self.rank_of(c, s / self.ulysses, s % self.ulysses))
                .collect(),
            MeshAxis::Ulysses => (0..self.ulysses).map(|u| self.rank_of(c, r, u)).collect(),
            MeshAxis::Ring => (0..self.ring).map(|r| self.rank_of(c, r, u)).collect(),
        }
    }
}

impl SeqMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            SeqMethod::Ulysses => "ulysses",
            SeqMethod::Ring => "ring",
            SeqMethod::Usp => "usp",
            SeqMethod::Displaced => "displaced",
        }
    }
    pub fn parse(s: &str) -> Option<SeqMethod> {
        Some(match s {
            "ulysses" => SeqMethod::Ulysses,
            "ring" => SeqMethod::Ring,
            "usp" => SeqMethod::Usp,
            "displaced" => SeqMethod::Displaced,
            _ => return None,
        })
    }
}

/// How attention over a split sequence is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SeqMethod {
    /// All-to-all over the Sp axis (sequence <-> heads), local attention, all-to-all back.
    Ulysses,
    /// K/V blocks passed around the Sp ring, online-softmax merge with the LSE.
    Ring,
    /// Ulysses over the Ulysses axis, then Ring over the Ring axis on the gathered blocks.
    Usp,
    /// Displaced patch parallelism (DistriFusion, PCPP, PipeFusion): the local queries
    /// attend to a per-layer store of every Sp member's K/V that persists across denoising
    /// steps. Exact when the store is gathered synchronously (warmup); an approximation
    /// when the other members' slots hold the previous step's K/V, exchanged after the
    /// step. Needs the runtime's stale state (`ditto_runtime::parallel::stale`).
    Displaced,
}

impl SeqMethod {
    /// Every method, in the order the IR's error messages list them.
    pub const ALL: [SeqMethod; 4] = [
        SeqMethod::Ulysses,
        SeqMethod::Ring,
        SeqMethod::Usp,
        SeqMethod::Displaced,
    ];
}
