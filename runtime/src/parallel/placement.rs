//! Where a program's ranks run: on communicator ranks other than `0..world`, and with its
//! ring axis cut into virtual patches that one group of ranks plays one after another.
//!
//! PipeFusion runs each pipeline stage on its own group of ranks (a sequence-parallel and
//! CFG-parallel layout inside the stage), and the image's row patches through the stage one
//! at a time. The stage's patch program is compiled for a mesh whose ring axis is
//! `patches x R` (R: the stage's physical ring degree), so that its sequence splits in
//! `patches x R x U` members and program ring index `patch * R + r` holds patch `patch`'s
//! r-th piece; the physical rank at ring index r plays that member when the run computes
//! that patch. Collectives then stay inside the patch's members (the other patches are not
//! running), which are the stage's physical ranks, mapped to their communicator ranks.

use ditto_codegen::{Mesh, MeshAxis};

use crate::RuntimeError;

/// Physical ranks that play a program (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Virtual patches along the program's ring axis (1: none, every program rank is a
    /// physical rank).
    pub patches: usize,
    /// The communicator rank of each physical rank, in the order of the physical mesh
    /// (`cfg x ring / patches x ulysses`, Ulysses innermost).
    pub ranks: Vec<usize>,
}

impl Placement {
    /// The program's ranks on communicator ranks `ranks`, with no virtual patches.
    pub fn on(ranks: Vec<usize>) -> Placement {
        Placement { patches: 1, ranks }
    }

    /// The mesh of the physical ranks for a program mesh.
    pub fn physical_mesh(&self, mesh: &Mesh) -> Mesh {
        Mesh {
            ring: mesh.ring / self.patches.max(1),
            ..*mesh
        }
    }

    /// Checks that this placement fits a program mesh.
    pub fn check(&self, mesh: &Mesh) -> Result<(), RuntimeError> {
        if self.patches == 0 || mesh.ring % self.patches != 0 {
            return Err(RuntimeError::Binding(format!(
                "{} virtual patch(es) do not divide the program's ring axis of {} ({mesh:?})",
                self.patches, mesh.ring
            )));
        }
        let world = self.physical_mesh(mesh).world_size();
        if self.ranks.len() != world {
            return Err(RuntimeError::Binding(format!(
                "the program's mesh {mesh:?} with {} virtual patch(es) runs on {world} rank(s), \
                 but {} communicator rank(s) were given",
                self.patches,
                self.ranks.len()
            )));
        }
        Ok(())
    }

    /// The program rank that physical rank `physical` plays for patch `patch`.
    pub fn program_rank(&self, mesh: &Mesh, physical: usize, patch: usize) -> usize {
        let phys = self.physical_mesh(mesh);
        let (c, r, u) = phys.coords(physical);
        mesh.rank_of(c, patch * phys.ring + r, u)
    }

    /// The patch a program rank belongs to, and the physical rank that plays it.
    pub fn locate(&self, mesh: &Mesh, rank: usize) -> (usize, usize) {
        let phys = self.physical_mesh(mesh);
        let (c, r, u) = mesh.coords(rank);
        (r / phys.ring, phys.rank_of(c, r % phys.ring, u))
    }

    /// The communicator rank of a program rank.
    pub fn comm_rank(&self, mesh: &Mesh, rank: usize) -> usize {
        self.ranks[self.locate(mesh, rank).1]
    }

    /// `rank`'s group along `axis` (program ranks, in index order), restricted to its
    /// patch: the members that are running when it runs.
    pub fn members(&self, mesh: &Mesh, rank: usize, axis: MeshAxis) -> Vec<usize> {
        let patch = self.locate(mesh, rank).0;
        mesh.group(rank, axis)
            .into_iter()
            .filter(|&r| self.locate(mesh, r).0 == patch)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_outermost_on_the_ring_axis() {
        // 3 patches x ring 2 x ulysses 2, CFG pair: 8 physical ranks.
        let mesh = Mesh {
            cfg: 2,
            ring: 6,
            ulysses: 2,
        };
        let p = Placement {
            patches: 3,
            ranks: (10..18).collect(),
        };
        p.check(&mesh).unwrap();
        for patch in 0..3 {
            for g in 0..8 {
                let r = p.program_rank(&mesh, g, patch);
                assert_eq!(p.locate(&mesh, r), (patch, g));
                assert_eq!(p.comm_rank(&mesh, r), 10 + g);
                // Sp index: patch-major, so patch `patch` holds a contiguous band.
                let sp = mesh.index(r, MeshAxis::Sp);
                assert_eq!(sp / 4, patch);
            }
        }
        // The Sp group of a rank is its patch's 4 members; Cfg stays a pair.
        let r = p.program_rank(&mesh, 5, 1);
        let sp = p.members(&mesh, r, MeshAxis::Sp);
        assert_eq!(sp.len(), 4);
        assert!(sp.iter().all(|&m| p.locate(&mesh, m).0 == 1));
        assert_eq!(p.members(&mesh, r, MeshAxis::Cfg).len(), 2);
        assert_eq!(p.members(&mesh, r, MeshAxis::Ring).len(), 2);
        assert!(Placement {
            patches: 4,
            ranks: vec![0; 8]
        }
        .check(&mesh)
        .is_err());
        assert!(Placement::on(vec![0; 7]).check(&mesh).is_err());
    }
}
