//! Compiling kernels to PTX with NVRTC (through cudarc, loaded at run time).
//!
//! cudarc finds libnvrtc by file name through the loader's search path and panics when it
//! is missing. ditto looks for it first — `DITTO_NVRTC_LIB`, `LD_LIBRARY_PATH`, the CUDA
//! toolkit, pip's `nvidia/cu13/lib` — and opens it by full path (with its
//! `libnvrtc-builtins`, which NVRTC itself opens by name at compile time). A library already
//! loaded is found again by its soname, so cudarc's own lookup then lands on the same file,
//! and a missing library is a [`CudaError::LibraryMissing`] naming every place searched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{CudaError, CudaKernel};

/// The libnvrtc file, or the folder holding it.
pub const NVRTC_LIB_ENV: &str = "DITTO_NVRTC_LIB";
/// Folders (`:`-separated) holding `cuda_fp16.h` / `cuda_bf16.h`.
pub const CUDA_INCLUDE_ENV: &str = "DITTO_CUDA_INCLUDE";

/// NVRTC options besides `--gpu-architecture`: C++17, and line info so profilers map
/// instructions to the generated source (it changes no code). No fast-math: the kernels
/// keep IEEE division and accurate `expf`, so the GPU matches the CPU reference closely;
/// they are memory-bound, so it costs nothing measurable.
pub const COMPILE_OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// File names tried in each folder, newest first (cudarc is built for CUDA 13; NVRTC 12
/// also emits sm_90 PTX).
const LIB_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

struct Loaded {
    path: PathBuf,
    version: (i32, i32),
    #[cfg(unix)]
    _libs: Vec<libloading::os::unix::Library>,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Folders searched for libnvrtc, in order (`DITTO_NVRTC_LIB` is handled before these).
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Folders where NVIDIA's libraries are looked for, in order: `LD_LIBRARY_PATH`, the CUDA
/// toolkit (`CUDA_HOME`, ...), `/usr/local/cuda`, and pip's wheels (`nvidia/cu13/lib`,
/// `nvidia/cublas/lib`, `nvidia/nccl/lib`, ...).
pub fn library_search_dirs() -> Vec<PathBuf> {
    let mut dirs = search_dirs();
    for site in python_site_dirs() {
        dirs.push(site.join("nvidia/cublas/lib"));
        dirs.push(site.join("nvidia/nccl/lib"));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Python package folders where pip puts NVIDIA's wheels (`nvidia/...`).
fn python_site_dirs() -> Vec<PathBuf> {
    let mut sites: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("PYTHONPATH") {
        sites.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    let mut bases: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            bases.push(v.into());
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        bases.push(PathBuf::from(home).join(".local"));
    }
    bases.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for base in bases {
        let Ok(entries) = std::fs::read_dir(base.join("lib")) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys.into_iter().rev() {
            sites.push(py.join("site-packages"));
            sites.push(py.join("dist-packages"));
        }
    }
    sites.push("/usr/lib/python3/dist-packages".into());
    sites
}

fn lib_in(dir: &Path) -> Option<PathBuf> {
    LIB_NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// Where libnvrtc is: `DITTO_NVRTC_LIB` (a file or folder; when set, nothing else is
/// tried), else the first hit in the search folders, else a name the system loader knows.
pub fn find_nvrtc() -> Result<PathBuf, CudaError> {
    let missing = |searched: Vec<String>| CudaError::LibraryMissing {
        lib: "libnvrtc".into(),
        searched,
    };
    if let Some(p) = std::env::var_os(NVRTC_LIB_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            lib_in(&p).ok_or_else(|| missing(vec![format!("{NVRTC_LIB_ENV}={}", p.display())]))
        };
    }
    let dirs = search_dirs();
    if let Some(p) = dirs.iter().find_map(|d| lib_in(d)) {
        return Ok(p);
    }
    #[cfg(unix)]
    for name in LIB_NAMES {
        // The loader's own paths (ld.so.cache, /etc/ld.so.conf): a name is enough.
        // SAFETY: opening NVRTC runs only its initializers, which have no preconditions.
        if unsafe {
            libloading::os::unix::Library::open(Some(*name), libloading::os::unix::RTLD_LAZY)
        }
        .is_ok()
        {
            return Ok(PathBuf::from(name));
        }
    }
    let mut searched: Vec<String> = vec![format!("{NVRTC_LIB_ENV} (unset)")];
    searched.extend(dirs.iter().map(|d| d.display().to_string()));
    searched.push("the system loader's paths".into());
    Err(missing(searched))
}

#[cfg(unix)]
fn load() -> Result<&'static Loaded, CudaError> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    if let Some(l) = LOADED.get() {
        return Ok(l);
    }
    let _guard = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = LOADED.get() {
        return Ok(l);
    }
    let path = find_nvrtc()?;
    let err = |p: &Path, e: &dyn std::fmt::Display| CudaError::LibraryLoad {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    let mut libs = Vec::new();
    // libnvrtc opens libnvrtc-builtins by name when it compiles; pip's wheels set no
    // RUNPATH for it, so load it from the same folder first.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|es| {
                es.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        let n = p
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt.")
                    })
                    .collect()
            })
            .unwrap_or_default();
        builtins.sort();
        if let Some(b) = builtins.last() {
            // SAFETY: as above; RTLD_GLOBAL so NVRTC's own dlopen finds it by soname.
            libs.push(
                unsafe { Library::open(Some(b), RTLD_NOW | RTLD_GLOBAL) }
                    .map_err(|e| err(b, &e))?,
            );
        }
    }
    // SAFETY: as above.
    let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| err(&path, &e))?;
    let version = {
        type VersionFn = unsafe extern "C" fn(*mut i32, *mut i32) -> i32;
        // SAFETY: `nvrtcVersion` has this signature in every NVRTC release.
        let f = unsafe { lib.get::<VersionFn>(b"nvrtcVersion\0") }.map_err(|e| err(&path, &e))?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let rc = unsafe { f(&mut major, &mut minor) };
        if rc != 0 {
            return Err(err(&path, &format!("nvrtcVersion returned {rc}")));
        }
        (major, minor)
    };
    libs.push(lib);
    // cudarc opens "libnvrtc.so" first: make sure that is the library loaded above and not
    // another NVRTC on the loader's path.
    // SAFETY: checks for a loadable library; never panics.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(err(
            &path,
            &"loaded, but cudarc cannot find it by name (no soname among libnvrtc.so, libnvrtc.so.13, libnvrtc.so.12)",
        ));
    }
    // SAFETY: libnvrtc is present (checked above); two valid out-pointers.
    let rc = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (rc, major, minor)
    });
    let (rc, major, minor) = match rc {
        Ok((rc, major, minor)) => (Some(rc), major, minor),
        Err(_) => (None, 0, 0),
    };
    if rc != Some(cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS) || (major, minor) != version {
        return Err(err(
            &path,
            &format!(
                "cudarc resolved another libnvrtc (version {major}.{minor}, this one is {}.{}); put {} first in LD_LIBRARY_PATH",
                version.0,
                version.1,
                path.parent().map(|d| d.display().to_string()).unwrap_or_default()
            ),
        ));
    }
    Ok(LOADED.get_or_init(|| Loaded {
        path,
        version,
        _libs: libs,
    }))
}

#[cfg(not(unix))]
fn load() -> Result<&'static Loaded, CudaError> {
    Err(CudaError::LibraryMissing {
        lib: "libnvrtc".into(),
        searched: vec!["(only Linux is supported)".into()],
    })
}

/// NVRTC's version, loading it if needed, and the file it came from.
pub fn nvrtc_version() -> Result<((i32, i32), PathBuf), CudaError> {
    let l = load()?;
    Ok((l.version, l.path.clone()))
}

/// Folders with the CUDA headers the 16-bit kernels include: `DITTO_CUDA_INCLUDE`, then
/// `../include` beside libnvrtc (pip's `nvidia/cu13/include` once `nvidia-cuda-runtime` is
/// installed; a toolkit's `include`), then `$CUDA_HOME/include` and `/usr/local/cuda/include`.
/// Only folders holding `cuda_fp16.h` are returned.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os(CUDA_INCLUDE_ENV) {
        dirs.extend(std::env::split_paths(&p));
    }
    if let Ok(lib) = find_nvrtc() {
        if let Some(root) = lib.parent().and_then(|d| d.parent()) {
            dirs.push(root.join("include"));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(root).join("include"));
        }
    }
    dirs.push("/usr/local/cuda/include".into());
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let keep = d.join("cuda_fp16.h").is_file() && !seen.contains(d);
        seen.push(d.clone());
        keep
    });
    dirs
}

/// Compiles each kernel to PTX for `arch` (`"sm_90"`; `"sm_90a"` for wgmma), in parallel.
/// Returns `(name, ptx)` in input order. `include_dirs` must hold `cuda_fp16.h` /
/// `cuda_bf16.h` when a kernel includes them (see [`cuda_include_dirs`]).
pub fn compile_ptx(
    sources: &[CudaKernel],
    arch: &str,
    include_dirs: &[PathBuf],
) -> Result<Vec<(String, String)>, CudaError> {
    let valid_arch = ["sm_", "compute_"].iter().any(|p| {
        arch.strip_prefix(p)
            .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()))
    });
    if !valid_arch {
        return Err(CudaError::Nvrtc(format!(
            "`{arch}` is not a GPU architecture (e.g. sm_90)"
        )));
    }
    if sources.is_empty() {
        return Ok(vec![]);
    }
    for header in ["cuda_fp16.h", "cuda_bf16.h"] {
        let wanted = sources
            .iter()
            .any(|k| k.source.contains(&format!("#include <{header}>")));
        if wanted && !include_dirs.iter().any(|d| d.join(header).is_file()) {
            let mut searched: Vec<String> = include_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            if searched.is_empty() {
                searched.push("(no include folders given; see cuda_include_dirs)".into());
            }
            return Err(CudaError::HeadersMissing {
                header: header.into(),
                searched,
            });
        }
    }
    load()?;
    let mut options: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    options.extend(COMPILE_OPTIONS.iter().map(|s| s.to_string()));
    let include_paths: Vec<String> = include_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();

    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<String, CudaError>>>> =
        sources.iter().map(|_| Mutex::new(None)).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(sources.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(k) = sources.get(i) else { break };
                let r = compile_one(k, &options, &include_paths);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    sources
        .iter()
        .zip(results)
        .map(|(k, r)| {
            let r = r.into_inner().unwrap_or_else(|e| e.into_inner());
            let ptx = r.unwrap_or_else(|| {
                Err(CudaError::Nvrtc(format!(
                    "kernel `{}` was not compiled",
                    k.name
                )))
            })?;
            Ok((k.name.clone(), ptx))
        })
        .collect()
}

fn compile_one(
    k: &CudaKernel,
    options: &[String],
    include_paths: &[String],
) -> Result<String, CudaError> {
    if k.source.contains('\0') {
        return Err(CudaError::Compile {
            kernel: k.name.clone(),
            log: "the source contains a NUL byte".into(),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: options.to_vec(),
        include_paths: include_paths.to_vec(),
        name: Some(format!("{}.cu", k.name)),
        ..Default::default()
    };
    // cudarc panics on a few conditions (a missing symbol in an unexpected NVRTC, non-UTF-8
    // PTX); a panic in a library must not take the caller down.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(&k.source, opts).map(|p| p.to_src())
    }));
    match r {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(cudarc::nvrtc::CompileError::CompileError { log, .. })) => Err(CudaError::Compile {
            kernel: k.name.clone(),
            log: log.to_string_lossy().into_owned(),
        }),
        Ok(Err(e)) => Err(CudaError::Nvrtc(format!("kernel `{}`: {e:?}", k.name))),
        Err(p) => Err(CudaError::Nvrtc(format!(
            "kernel `{}`: cudarc panicked: {}",
            k.name,
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or(p.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        ))),
    }
}
