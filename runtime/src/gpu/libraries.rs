//! Finding the CUDA libraries before cudarc does: cudarc opens them by file name on first
//! use and panics when that fails. ditto opens each by name first (the loader's paths,
//! `LD_LIBRARY_PATH`), then by full path in the folders NVIDIA's installs use (the toolkit,
//! pip's `nvidia/*/lib`). A library loaded by full path is found again by its soname, so
//! cudarc's own lookup then lands on the same file. A missing one is
//! [`GpuError::LibraryMissing`], naming what was tried and how to get it.

use std::path::PathBuf;
use std::sync::Mutex;

use ditto_codegen::cuda::library_search_dirs;

use super::GpuError;

/// A library the GPU backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// The driver API (`libcuda.so.1`, installed with the NVIDIA driver).
    Driver,
    /// cuBLASLt (GEMMs).
    CublasLt,
    /// NCCL (collectives between GPUs), opened by ditto itself (see `gpu::nccl`).
    Nccl,
}

impl Library {
    fn names(self) -> &'static [&'static str] {
        match self {
            Library::Driver => &["libcuda.so.1", "libcuda.so"],
            Library::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            Library::Nccl => &["libnccl.so.2", "libnccl.so"],
        }
    }
    fn what(self) -> &'static str {
        match self {
            Library::Driver => "libcuda (the NVIDIA driver's CUDA library)",
            Library::CublasLt => "libcublasLt (cuBLASLt)",
            Library::Nccl => "libnccl (NCCL)",
        }
    }
    fn hint(self) -> &'static str {
        match self {
            Library::Driver => {
                "The CUDA backend needs an NVIDIA GPU and its driver; without one, run on the \
                 CPU (--device cpu)"
            }
            Library::CublasLt => {
                "Install it (e.g. `pip install nvidia-cublas==13.0.*`, or the CUDA toolkit) and \
                 add its folder to LD_LIBRARY_PATH"
            }
            Library::Nccl => {
                "Install it (e.g. `pip install nvidia-nccl-cu13`), or leave DITTO_NCCL unset to \
                 exchange through the host"
            }
        }
    }
}

/// Libraries kept open for the life of the process (so their sonames stay resolvable).
static OPENED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Makes sure `lib` can be loaded, loading it if needed.
pub fn require(lib: Library) -> Result<(), GpuError> {
    find(lib).map(|_| ())
}

/// Where `lib` is: a name the loader finds, or a full path. It stays loaded for the life
/// of the process.
pub fn find(lib: Library) -> Result<PathBuf, GpuError> {
    let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    let mut tried: Vec<String> = Vec::new();
    let mut candidates: Vec<PathBuf> = lib.names().iter().map(PathBuf::from).collect();
    if lib != Library::Driver {
        // The driver comes with the system; user-space libraries may sit in a wheel.
        for d in library_search_dirs() {
            candidates.extend(lib.names().iter().map(|n| d.join(n)));
        }
    }
    for c in candidates {
        if c.is_absolute() && !c.is_file() {
            continue;
        }
        // SAFETY: loading a CUDA library runs only its initializers, which have no
        // preconditions.
        match unsafe { libloading::Library::new(&c) } {
            Ok(l) => {
                opened.push(l);
                return Ok(c);
            }
            Err(_) => tried.push(c.display().to_string()),
        }
    }
    Err(GpuError::LibraryMissing {
        lib: lib.what().into(),
        tried,
        hint: lib.hint().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_with_what_was_tried() {
        // Where NCCL is installed this only finds it; where it is not (CI), the error
        // names the library, every place tried, and the way out.
        match find(Library::Nccl) {
            Ok(path) => eprintln!("NCCL found: {}", path.display()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("libnccl (NCCL) was not found"), "{msg}");
                assert!(msg.contains("libnccl.so.2"), "{msg}");
                assert!(msg.contains("DITTO_NCCL"), "{msg}");
            }
        }
    }
}
