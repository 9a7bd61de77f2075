//! Compiled kernels cached by content: a kernel's PTX is keyed by the hash of its source,
//! the target architecture and the compiler options, in memory and optionally on disk, so
//! the 28 identical layers of a model, a second program with the same shapes, or a second
//! run of `ditto` compile nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::nvrtc::{self, COMPILE_OPTIONS};
use super::{CudaError, CudaKernel};

/// FNV-1a (64-bit) of a kernel's source: stable across runs, platforms and Rust versions
/// (unlike `std`'s `DefaultHasher`), which an on-disk cache needs.
pub fn kernel_hash(src: &str) -> u64 {
    fnv1a(0xcbf2_9ce4_8422_2325, src.as_bytes())
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where the kernels of the last [`KernelCache::compile`] calls came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: usize,
    pub disk_hits: usize,
    pub compiled: usize,
}

/// PTX by (source, architecture, options). Thread-safe; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct KernelCache {
    dir: Option<PathBuf>,
    mem: Mutex<HashMap<u64, Arc<str>>>,
    stats: Mutex<CacheStats>,
}

/// First line of a cache file: names the key, so a file renamed or cut short is not used.
fn header(key: u64) -> String {
    format!("// ditto kernel cache {key:016x}\n")
}

impl KernelCache {
    /// An in-memory cache.
    pub fn new() -> KernelCache {
        KernelCache::default()
    }

    /// A cache that also keeps `<dir>/<key>.ptx` files (the folder is created on the first
    /// store). Clear it when the NVRTC version changes: PTX from a newer NVRTC may not load on
    /// an older driver.
    pub fn with_dir(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache {
            dir: Some(dir.into()),
            ..KernelCache::default()
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The cache key of `kernel` compiled for `arch` with [`COMPILE_OPTIONS`].
    pub fn key(kernel: &CudaKernel, arch: &str) -> u64 {
        let mut h = kernel_hash(&kernel.source);
        for part in [arch].iter().chain(COMPILE_OPTIONS) {
            h = fnv1a(h ^ 0xff, part.as_bytes());
        }
        h
    }

    fn path(&self, key: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key:016x}.ptx")))
    }

    /// The cached PTX for `key`: from memory, else from the folder (then kept in memory).
    pub fn get(&self, key: u64) -> Option<Arc<str>> {
        if let Some(p) = self.lock_mem().get(&key) {
            self.lock_stats().memory_hits += 1;
            return Some(p.clone());
        }
        let text = std::fs::read_to_string(self.path(key)?).ok()?;
        let ptx: Arc<str> = text.strip_prefix(&header(key))?.into();
        self.lock_mem().insert(key, ptx.clone());
        self.lock_stats().disk_hits += 1;
        Some(ptx)
    }

    /// Stores `ptx` under `key`, in memory and (written whole, then renamed into place, so
    /// concurrent processes never read half a file) in the folder.
    pub fn insert(&self, key: u64, ptx: &str) -> Result<Arc<str>, CudaError> {
        let ptx: Arc<str> = ptx.into();
        self.lock_mem().insert(key, ptx.clone());
        if let (Some(dir), Some(path)) = (&self.dir, self.path(key)) {
            let io = |p: &Path, e: std::io::Error| CudaError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            };
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            let tmp = dir.join(format!(".{key:016x}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, format!("{}{ptx}", header(key))).map_err(|e| io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        }
        Ok(ptx)
    }

    /// PTX for every kernel (in order, with its name), compiling with NVRTC only those not
    /// cached. Fully cached programs need no NVRTC at all.
    pub fn compile(
        &self,
        kernels: &[CudaKernel],
        arch: &str,
        include_dirs: &[PathBuf],
    ) -> Result<Vec<(String, Arc<str>)>, CudaError> {
        self.compile_with(kernels, arch, |missing| {
            nvrtc::compile_ptx(missing, arch, include_dirs)
        })
    }

    /// [`compile`](Self::compile) with another compiler for the misses (`compile` gets the
    /// kernels to build and returns `(name, ptx)` in the same order).
    pub fn compile_with(
        &self,
        kernels: &[CudaKernel],
        arch: &str,
        compile: impl FnOnce(&[CudaKernel]) -> Result<Vec<(String, String)>, CudaError>,
    ) -> Result<Vec<(String, Arc<str>)>, CudaError> {
        let keys: Vec<u64> = kernels.iter().map(|k| Self::key(k, arch)).collect();
        let mut found: Vec<Option<Arc<str>>> = keys.iter().map(|&k| self.get(k)).collect();
        // Each distinct missing source once.
        let mut missing: Vec<CudaKernel> = Vec::new();
        let mut missing_keys: Vec<u64> = Vec::new();
        for (i, k) in kernels.iter().enumerate() {
            if found[i].is_none() && !missing_keys.contains(&keys[i]) {
                missing.push(k.clone());
                missing_keys.push(keys[i]);
            }
        }
        if !missing.is_empty() {
            let built = compile(&missing)?;
            if built.len() != missing.len() {
                return Err(CudaError::Nvrtc(format!(
                    "the compiler returned {} kernels for {}",
                    built.len(),
                    missing.len()
                )));
            }
            self.lock_stats().compiled += built.len();
            for ((_, ptx), key) in built.iter().zip(&missing_keys) {
                let ptx = self.insert(*key, ptx)?;
                for (i, &k) in keys.iter().enumerate() {
                    if k == *key {
                        found[i] = Some(ptx.clone());
                    }
                }
            }
        }
        Ok(kernels
            .iter()
            .zip(found)
            .map(|(k, p)| (k.name.clone(), p.unwrap_or_else(|| "".into())))
            .collect())
    }

    pub fn stats(&self) -> CacheStats {
        *self.lock_stats()
    }

    pub fn len(&self) -> usize {
        self.lock_mem().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic while holding these locks leaves plain data behind, still usable.
    fn lock_mem(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<str>>> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn lock_stats(&self) -> std::sync::MutexGuard<'_, CacheStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str, body: &str) -> CudaKernel {
        let source = format!("extern \"C\" __global__ void {name}() {{ {body} }}\n");
        CudaKernel {
            name: name.into(),
            hash: kernel_hash(&source),
            source,
        }
    }

    #[test]
    fn fnv1a_known_values() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(kernel_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(kernel_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(kernel_hash("foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(kernel_hash("k0"), kernel_hash("k1"));
    }

    #[test]
    fn keys_depend_on_source_and_arch() {
        let a = kernel("a", "");
        let b = kernel("a", "int x = 0;");
        assert_ne!(KernelCache::key(&a, "sm_90"), KernelCache::key(&b, "sm_90"));
        assert_ne!(KernelCache::key(&a, "sm_90"), KernelCache::key(&a, "sm_80"));
        assert_eq!(
            KernelCache::key(&a, "sm_90"),
            KernelCache::key(&a.clone(), "sm_90")
        );
    }

    #[test]
    fn compiles_each_distinct_source_once() {
        let cache = KernelCache::new();
        let ks = vec![kernel("a", ""), kernel("b", ""), kernel("a", "")];
        let fake = |ks: &[CudaKernel]| -> Result<Vec<(String, String)>, CudaError> {
            Ok(ks
                .iter()
                .map(|k| (k.name.clone(), format!("ptx of {}", k.name)))
                .collect())
        };
        let out = cache.compile_with(&ks, "sm_90", fake).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(&*out[0].1, "ptx of a");
        assert_eq!(&*out[2].1, "ptx of a");
        assert_eq!(cache.stats().compiled, 2);
        // Everything cached: the compiler is not called.
        let out = cache
            .compile_with(&ks, "sm_90", |_| panic!("nothing to compile"))
            .unwrap();
        assert_eq!(&*out[1].1, "ptx of b");
        assert_eq!(cache.stats().memory_hits, 3);
        // Another architecture is another key.
        let out = cache.compile_with(&ks[..1], "sm_80", fake).unwrap();
        assert_eq!(&*out[0].1, "ptx of a");
        assert_eq!(cache.stats().compiled, 3);
    }

    #[test]
    fn disk_cache_survives_the_process_and_rejects_foreign_files() {
        let dir = std::env::temp_dir().join(format!("ditto-kcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ks = vec![kernel("a", "")];
        let key = KernelCache::key(&ks[0], "sm_90");
        {
            let cache = KernelCache::with_dir(&dir);
            cache
                .compile_with(&ks, "sm_90", |_| Ok(vec![("a".into(), "PTX".into())]))
                .unwrap();
        }
        let cache = KernelCache::with_dir(&dir);
        let out = cache
            .compile_with(&ks, "sm_90", |_| panic!("should come from disk"))
            .unwrap();
        assert_eq!(&*out[0].1, "PTX");
        assert_eq!(cache.stats().disk_hits, 1);
        // A file whose header names another key is ignored.
        std::fs::write(
            dir.join(format!("{key:016x}.ptx")),
            "// ditto kernel cache 0\nX",
        )
        .unwrap();
        assert!(KernelCache::with_dir(&dir).get(key).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
