//! NCCL for [`CudaDevice`](super::CudaDevice): the device exchanges with the other ranks'
//! devices itself, on its own stream, instead of through the host.
//!
//! The library is opened here, by name and then in the folders NVIDIA's installs use (pip's
//! `nvidia/nccl/lib` holds only `libnccl.so.2`, a name cudarc's loader does not try), and
//! the few entry points used are looked up in it. A missing library is an error naming it.
//!
//! The world communicator is made from a unique id that rank 0 draws and every rank gets
//! through the host communicator (an all-gather of its 128 bytes). A collective over a
//! group smaller than the world gets a communicator of its own, split from the world's on
//! first use (`ncclCommSplit`, colour = the group's first rank): Programs are SPMD, so
//! every rank reaches its group's first collective of an axis at the same step, as the
//! split requires. Point-to-point transfers use the world communicator, whose ranks are the
//! global ranks.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};

use super::libraries::{self, Library};
use super::{DevicePtr, GpuError};
use crate::comm::{Communicator, Group};

type Comm = *mut c_void;
type Status = c_int;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclInt8`: bytes.
const BYTES: c_int = 0;

/// The entry points, looked up once.
struct Api {
    _lib: libloading::Library,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> Status,
    comm_split: unsafe extern "C" fn(Comm, c_int, c_int, *mut Comm, *mut c_void) -> Status,
    comm_destroy: unsafe extern "C" fn(Comm) -> Status,
    all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> Status,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, *mut c_void) -> Status,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> Status,
    group_start: unsafe extern "C" fn() -> Status,
    group_end: unsafe extern "C" fn() -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

impl Api {
    fn load() -> Result<Api, GpuError> {
        let path = libraries::find(Library::Nccl)?;
        // SAFETY: loading NCCL runs only its initializers.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| GpuError::Driver(format!("cannot load {}: {e}", path.display())))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has the C signature of the field it fills (nccl.h).
                *unsafe { lib.get($name) }.map_err(|e| {
                    GpuError::Driver(format!(
                        "{}: no {}: {e}",
                        path.display(),
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    ))
                })?
            };
        }
        Ok(Api {
            get_unique_id: sym!(b"ncclGetUniqueId\0"),
            comm_init_rank: sym!(b"ncclCommInitRank\0"),
            comm_split: sym!(b"ncclCommSplit\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            all_gather: sym!(b"ncclAllGather\0"),
            send: sym!(b"ncclSend\0"),
            recv: sym!(b"ncclRecv\0"),
            group_start: sym!(b"ncclGroupStart\0"),
            group_end: sym!(b"ncclGroupEnd\0"),
            error_string: sym!(b"ncclGetErrorString\0"),
            _lib: lib,
        })
    }

    fn check(&self, what: &str, status: Status) -> Result<(), GpuError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static NUL-terminated string for any status.
        let text = unsafe { CStr::from_ptr((self.error_string)(status)) };
        Err(GpuError::Driver(format!(
            "NCCL {what}: {} (status {status})",
            text.to_string_lossy()
        )))
    }
}

/// One rank's NCCL communicators.
pub(crate) struct Nccl {
    api: Api,
    rank: usize,
    world_size: usize,
    world: Comm,
    /// Split communicators by their members (global ranks, in order).
    groups: HashMap<Vec<usize>, Comm>,
}

// SAFETY: NCCL communicators may be used from any thread, one call at a time; `Nccl` is
// only reached through `&mut`.
unsafe impl Send for Nccl {}

impl Nccl {
    /// The world communicator of `host`'s ranks, on the device that is current on this
    /// thread (the caller's `CudaDevice` binds it first). Every rank calls this at once.
    pub(crate) fn new(host: &mut dyn Communicator) -> Result<Nccl, GpuError> {
        let api = Api::load()?;
        let (rank, world_size) = (host.rank(), host.world_size());
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: `id` is a valid out-pointer.
            api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        }
        // Every rank's 128 bytes as 32 f32 bit patterns; rank 0's are the id.
        let words: Vec<f32> = id
            .internal
            .chunks(4)
            .map(|c| {
                f32::from_bits(u32::from_le_bytes([
                    c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
                ]))
            })
            .collect();
        let mut all = vec![0.0f32; 32 * world_size];
        host.all_gather(&Group::world(world_size), &words, &mut all)?;
        for (i, w) in all[..32].iter().enumerate() {
            for (j, b) in w.to_bits().to_le_bytes().into_iter().enumerate() {
                id.internal[4 * i + j] = b as c_char;
            }
        }
        let mut world: Comm = std::ptr::null_mut();
        // SAFETY: `world` is a valid out-pointer; every rank passes the same id.
        api.check("ncclCommInitRank", unsafe {
            (api.comm_init_rank)(&mut world, world_size as c_int, id, rank as c_int)
        })?;
        Ok(Nccl {
            api,
            rank,
            world_size,
            world,
            groups: HashMap::new(),
        })
    }

    /// The communicator of `group` (the world's when it is the whole world in order).
    fn comm(&mut self, group: &Group) -> Result<Comm, GpuError> {
        if group.ranks.len() == self.world_size
            && group.ranks.iter().enumerate().all(|(i, &r)| i == r)
        {
            return Ok(self.world);
        }
        if let Some(&c) = self.groups.get(&group.ranks) {
            return Ok(c);
        }
        let key = group.index_of(self.rank).ok_or_else(|| {
            GpuError::Unsupported(format!(
                "rank {} is not in group {:?}",
                self.rank, group.ranks
            ))
        })?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `world` is live; every member of every group of this axis splits at once.
        self.api.check("ncclCommSplit", unsafe {
            (self.api.comm_split)(
                self.world,
                group.ranks[0] as c_int,
                key as c_int,
                &mut comm,
                std::ptr::null_mut(),
            )
        })?;
        self.groups.insert(group.ranks.clone(), comm);
        Ok(comm)
    }

    /// `recv` = every member's `bytes` at `send`, in group order, on `stream`.
    pub(crate) fn all_gather(
        &mut self,
        group: &Group,
        send: DevicePtr,
        recv: DevicePtr,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<(), GpuError> {
        let comm = self.comm(group)?;
        // SAFETY: the buffers hold `bytes` and `bytes * group.size()` bytes on this device.
        self.api.check("ncclAllGather", unsafe {
            (self.api.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                bytes,
                BYTES,
                comm,
                stream,
            )
        })
    }

    /// Chunk j of `send` (`chunk` bytes) to member j of `group`, chunk j of `recv` from
    /// member j: grouped sends and receives (NCCL has no all-to-all of its own).
    pub(crate) fn all_to_all(
        &mut self,
        group: &Group,
        send: DevicePtr,
        recv: DevicePtr,
        chunk: usize,
        stream: *mut c_void,
    ) -> Result<(), GpuError> {
        let comm = self.comm(group)?;
        let api = &self.api;
        // SAFETY: both buffers hold `group.size() * chunk` bytes on this device; the group
        // makes every send and receive one operation.
        unsafe {
            api.check("ncclGroupStart", (api.group_start)())?;
            let mut result = Ok(());
            for j in 0..group.size() {
                let off = (j * chunk) as u64;
                result = result
                    .and(api.check(
                        "ncclSend",
                        (api.send)(
                            (send + off) as *const c_void,
                            chunk,
                            BYTES,
                            j as c_int,
                            comm,
                            stream,
                        ),
                    ))
                    .and(api.check(
                        "ncclRecv",
                        (api.recv)(
                            (recv + off) as *mut c_void,
                            chunk,
                            BYTES,
                            j as c_int,
                            comm,
                            stream,
                        ),
                    ));
            }
            let ended = api.check("ncclGroupEnd", (api.group_end)());
            result.and(ended)
        }
    }

    /// Sends `bytes` at `send` to global rank `to` and receives as many from `from`.
    pub(crate) fn sendrecv(
        &mut self,
        to: usize,
        send: DevicePtr,
        from: usize,
        recv: DevicePtr,
        bytes: usize,
        stream: *mut c_void,
    ) -> Result<(), GpuError> {
        let api = &self.api;
        // SAFETY: both buffers hold `bytes` bytes on this device; the group makes the send
        // and the receive one operation, so a ring of them cannot deadlock.
        unsafe {
            api.check("ncclGroupStart", (api.group_start)())?;
            let sent = api.check(
                "ncclSend",
                (api.send)(
                    send as *const c_void,
                    bytes,
                    BYTES,
                    to as c_int,
                    self.world,
                    stream,
                ),
            );
            let received = api.check(
                "ncclRecv",
                (api.recv)(
                    recv as *mut c_void,
                    bytes,
                    BYTES,
                    from as c_int,
                    self.world,
                    stream,
                ),
            );
            let ended = api.check("ncclGroupEnd", (api.group_end)());
            sent.and(received).and(ended)
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: each communicator was made here and is destroyed once.
        unsafe {
            for (_, c) in self.groups.drain() {
                let _ = (self.api.comm_destroy)(c);
            }
            let _ = (self.api.comm_destroy)(self.world);
        }
    }
}
