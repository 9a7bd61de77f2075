//! Where this process stands in a multi-process run, read from the variables the usual
//! launchers set: `ditto launch` and torchrun (RANK, WORLD_SIZE, LOCAL_RANK, ...),
//! Open MPI's and MPICH/Hydra's mpirun (OMPI_COMM_WORLD_*, PMI_*), SLURM's srun
//! (SLURM_PROCID, SLURM_NTASKS, ...).
//!
//! [`Membership::join`] then meets the other ranks: rank 0 hosts the rendezvous store at
//! MASTER_ADDR:MASTER_PORT, every rank connects to it and builds its TCP communicator.

use std::fmt;
use std::time::Duration;

use ditto_runtime::comm::store::{StoreServer, TcpStore};
use ditto_runtime::comm::tcp::TcpComm;
use ditto_runtime::comm::{CommError, Communicator};

use crate::parallel::SharedComm;
use crate::Error;

/// Port of the rendezvous when the launcher gives none (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The exit status of a rank that failed only because another rank failed, exited or
/// never came to a collective (its error names that rank). `ditto launch` blames such a
/// rank only when no rank failed on its own: the process that exits first is not always
/// the one where the failure started.
pub const PEER_FAILED_EXIT: u8 = 3;

/// Which launcher's variables gave the place (for messages: a wrong value is easier to
/// track down when the error names the variables it came from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// RANK / WORLD_SIZE: `ditto launch`, torchrun, or set by hand.
    Torchrun,
    /// OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE (Open MPI's mpirun).
    OpenMpi,
    /// PMI_RANK / PMI_SIZE (MPICH / Intel MPI's Hydra, srun --mpi=pmi2).
    Pmi,
    /// SLURM_PROCID / SLURM_NTASKS inside an srun step.
    Slurm,
}

impl Launcher {
    /// The variables that name the rank and the world size.
    pub fn variables(self) -> (&'static str, &'static str) {
        match self {
            Launcher::Torchrun => ("RANK", "WORLD_SIZE"),
            Launcher::OpenMpi => ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            Launcher::Pmi => ("PMI_RANK", "PMI_SIZE"),
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS"),
        }
    }
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, w) = self.variables();
        write!(f, "{r}/{w}")
    }
}

/// This process's place in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node (0 when the launcher does not say).
    pub local_rank: usize,
    /// Processes on this node, when the launcher says.
    pub local_world_size: Option<usize>,
    /// This node's index, when the launcher says.
    pub node_rank: Option<usize>,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

/// A launcher variable that is missing, malformed or contradicts another.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("launcher environment: {0}")]
pub struct DistEnvError(pub String);

impl DistEnv {
    /// Reads the process environment. `Ok(None)`: no launcher variables, a plain
    /// single-process run.
    pub fn from_env() -> Result<Option<DistEnv>, DistEnvError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (tests).
    ///
    /// Precedence, first match wins: RANK (torchrun, `ditto launch`: when torchrun is itself
    /// started by srun or mpirun, the scheduler's variables count nodes, not ranks), then
    /// OMPI_COMM_WORLD_RANK, then PMI_RANK, then SLURM_PROCID. SLURM's variables count only
    /// inside an srun step (SLURM_STEP_ID set): an sbatch script has SLURM_PROCID=0 and
    /// SLURM_NTASKS=N for the whole allocation, and a `ditto` started there directly is not
    /// one of N ranks.
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<DistEnv>, DistEnvError> {
        // Empty values are treated as unset (`RANK= ditto ...` clears a variable in a script).
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let launcher = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            Launcher::Torchrun
        } else if get("OMPI_COMM_WORLD_RANK").is_some() || get("OMPI_COMM_WORLD_SIZE").is_some() {
            Launcher::OpenMpi
        } else if get("PMI_RANK").is_some() || get("PMI_SIZE").is_some() {
            Launcher::Pmi
        } else if get("SLURM_PROCID").is_some()
            && (get("SLURM_STEP_ID").is_some() || get("SLURM_STEPID").is_some())
        {
            Launcher::Slurm
        } else {
            return Ok(None);
        };
        let num =
            |k: &str| -> Result<Option<usize>, DistEnvError> {
                match get(k) {
                    None => Ok(None),
                    Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                        DistEnvError(format!("{k}={v:?} is not a non-negative integer"))
                    }),
                }
            };
        let (rank_var, size_var) = launcher.variables();
        let rank = num(rank_var)?.ok_or_else(|| {
            DistEnvError(format!(
                "{size_var} is set but {rank_var} is not: every process needs both"
            ))
        })?;
        let world_size = num(size_var)?.ok_or_else(|| {
            DistEnvError(format!(
                "{rank_var} is set but {size_var} is not: every process needs both"
            ))
        })?;
        if world_size == 0 {
            return Err(DistEnvError(format!(
                "{size_var}=0: the world needs at least one rank"
            )));
        }
        if rank >= world_size {
            return Err(DistEnvError(format!(
                "{rank_var}={rank} but {size_var}={world_size}: ranks go from 0 to {}",
                world_size - 1
            )));
        }

        let (local_rank_var, local_size_var, node_var) = match launcher {
            Launcher::Torchrun => ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"),
            Launcher::OpenMpi => (
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
                "OMPI_COMM_WORLD_NODE_RANK",
            ),
            Launcher::Pmi => ("MPI_LOCALRANKID", "MPI_LOCALNRANKS", ""),
            Launcher::Slurm => ("SLURM_LOCALID", "", "SLURM_NODEID"),
        };
        let opt = |k: &str| if k.is_empty() { Ok(None) } else { num(k) };
        let local_rank = opt(local_rank_var)?;
        let mut local_world_size = opt(local_size_var)?;
        // torchrun's GROUP_RANK is its name for the node index.
        let node_rank = match (opt(node_var)?, launcher) {
            (None, Launcher::Torchrun) => num("GROUP_RANK")?,
            (n, _) => n,
        };
        if launcher == Launcher::Slurm && local_world_size.is_none() {
            // One node: every task is local.
            if num("SLURM_STEP_NUM_NODES")?.or(num("SLURM_NNODES")?) == Some(1) {
                local_world_size = Some(world_size);
            }
        }
        if let Some(l) = local_world_size {
            if l == 0 || l > world_size {
                return Err(DistEnvError(format!(
                    "{local_size_var}={l} with {size_var}={world_size}: a node holds 1 to {world_size} rank(s)"
                )));
            }
            if let Some(lr) = local_rank {
                if lr >= l {
                    return Err(DistEnvError(format!(
                        "{local_rank_var}={lr} but {local_size_var}={l}: local ranks go from 0 to {}",
                        l - 1
                    )));
                }
            }
        }
        if let Some(lr) = local_rank {
            if lr > rank {
                return Err(DistEnvError(format!(
                    "{local_rank_var}={lr} is larger than {rank_var}={rank}"
                )));
            }
        }
        // torchrun places ranks node by node, LOCAL_WORLD_SIZE per node; a contradiction
        // means variables from two different runs were mixed (a stale export in a script).
        if launcher == Launcher::Torchrun {
            if let (Some(n), Some(l), Some(lr)) = (node_rank, local_world_size, local_rank) {
                if n * l + lr != rank {
                    return Err(DistEnvError(format!(
                        "RANK={rank} but NODE_RANK={n} x LOCAL_WORLD_SIZE={l} + LOCAL_RANK={lr} = {}",
                        n * l + lr
                    )));
                }
            }
        }

        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a.trim().to_string(),
            None if world_size == 1 || local_world_size == Some(world_size) => {
                // Every rank on this machine: the rendezvous can only be here.
                "127.0.0.1".to_string()
            }
            None => {
                let hint = match launcher {
                    Launcher::Slurm => {
                        " (under SLURM, e.g. `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)`)"
                    }
                    _ => "",
                };
                return Err(DistEnvError(format!(
                    "{rank_var}={rank} of {size_var}={world_size} but MASTER_ADDR is not set: give the host of rank 0{hint}"
                )));
            }
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(DistEnvError(format!(
                        "MASTER_PORT={p:?} is not a port number (1 to 65535)"
                    )))
                }
            },
        };
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank: local_rank.unwrap_or(0),
            local_world_size,
            node_rank,
            master_addr,
            master_port,
            launcher,
        }))
    }

    /// `host:port` of the rendezvous (IPv6 literals bracketed).
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// This process's part in a multi-process run: its place, its communicator to the other
/// ranks, and the rendezvous store (rank 0 also runs the store's server, which must stay up
/// until every rank is done with it).
pub struct Membership {
    pub env: DistEnv,
    pub comm: SharedComm,
    store: TcpStore,
    server: Option<StoreServer>,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("env", &self.env)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Meets the other ranks within `timeout`: rank 0 serves the store at
    /// MASTER_ADDR:MASTER_PORT, every rank connects to it, and the ranks build their TCP
    /// links through it. A rank that never comes makes this fail naming it.
    pub fn join(env: DistEnv, timeout: Duration) -> Result<Membership, Error> {
        let addr = env.master();
        let fail = |what: &str, e: &dyn fmt::Display| {
            Error::Rank(format!(
                "rank {} of {}: {what}: {e}",
                env.rank, env.world_size
            ))
        };
        let server = if env.rank == 0 {
            Some(
                TcpStore::serve(addr.as_str(), env.world_size, timeout)
                    .map_err(|e| fail("rendezvous", &e))?,
            )
        } else {
            None
        };
        let store = TcpStore::connect(addr.as_str(), env.rank, timeout).map_err(|e| {
            let hint = if env.rank == 0 {
                ""
            } else {
                " (rank 0 hosts it: is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?)"
            };
            fail("rendezvous", &format!("{e}{hint}"))
        })?;
        if store.world_size() != env.world_size {
            return Err(fail(
                "rendezvous",
                &format!(
                    "the store at {addr} was started for {} rank(s), this process has {}={}",
                    store.world_size(),
                    env.launcher.variables().1,
                    env.world_size
                ),
            ));
        }
        // Everyone meets at the store first: the store is the one place that knows who
        // came, so a missing rank is named here ("rank(s) 1 did not arrive") rather than
        // as a failed connection later.
        store.barrier("ditto/join").map_err(|e| {
            fail(
                "waiting for the other ranks",
                &format!(
                    "{e} (every rank must be started with {}={} and MASTER_ADDR:MASTER_PORT {addr})",
                    env.launcher.variables().1,
                    env.world_size
                ),
            )
        })?;
        let comm = TcpComm::connect(&store, env.rank, env.world_size, timeout)
            .map_err(|e| fail("connecting to the other ranks", &e))?;
        let comm: Box<dyn Communicator> = Box::new(comm);
        Ok(Membership {
            comm: SharedComm::new(comm),
            env,
            store,
            server,
        })
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Rank 0: the process that writes the outputs and prints the report.
    pub fn is_leader(&self) -> bool {
        self.env.rank == 0
    }

    /// Waits until every rank is done before leaving, so that rank 0, which hosts the
    /// store, does not take it down under a rank still using it, and no rank reads the
    /// exit of a peer as a failure.
    pub fn finish(mut self) -> Result<(), CommError> {
        self.comm.barrier_all()?;
        drop(self.store);
        drop(self.server.take());
        Ok(())
    }

    /// Announces this rank's failure to the others (their pending and later calls fail
    /// naming this rank with `reason`) and leaves.
    pub fn abort(mut self, reason: &str) {
        self.comm.fail(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, DistEnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        assert_eq!(env(&[]).unwrap(), None);
        // An sbatch script's own variables do not make a rank.
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(),
            None
        );
    }

    #[test]
    fn torchrun() {
        let e = env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!((e.local_world_size, e.node_rank), (Some(4), Some(1)));
        assert_eq!(e.master(), "node0:1234");
        assert_eq!(e.launcher, Launcher::Torchrun);
    }

    #[test]
    fn mpi_and_slurm() {
        let e = env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ])
        .unwrap()
        .unwrap();
        // All four on this node: the rendezvous defaults to loopback.
        assert_eq!(
            (e.rank, e.world_size, e.master()),
            (3, 4, "127.0.0.1:29500".into())
        );
        let e = env(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MASTER_ADDR", "h")])
            .unwrap()
            .unwrap();
        assert_eq!((e.rank, e.world_size, e.launcher), (1, 2, Launcher::Pmi));
        let e = env(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "6000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.node_rank), (2, 4, Some(1)));
        assert_eq!(e.master(), "10.0.0.1:6000");
        // RANK wins over SLURM's variables (torchrun under srun).
        let e = env(&[
            ("RANK", "6"),
            ("WORLD_SIZE", "8"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEP_ID", "0"),
            ("MASTER_ADDR", "h"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size), (6, 8));
    }

    #[test]
    fn inconsistent_values_are_clear_errors() {
        let err = |vars: &[(&str, &str)]| env(vars).unwrap_err().to_string();
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2 but WORLD_SIZE=2"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("WORLD_SIZE=0"));
        assert!(
            err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")])
                .contains("MASTER_ADDR is not set")
        );
        assert!(err(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000")
        ])
        .contains("MASTER_PORT=\"70000\""));
        assert!(err(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("NODE_RANK", "1"),
            ("MASTER_ADDR", "h"),
        ])
        .contains("NODE_RANK=1 x LOCAL_WORLD_SIZE=2 + LOCAL_RANK=1 = 3"));
        assert!(err(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .contains("LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2"));
        let slurm = err(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NNODES", "2"),
        ]);
        assert!(
            slurm.contains("MASTER_ADDR is not set") && slurm.contains("scontrol"),
            "{slurm}"
        );
    }
}
