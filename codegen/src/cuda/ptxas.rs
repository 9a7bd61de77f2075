//! Resource usage of compiled kernels from `ptxas -v` (registers, spills, stack, shared
//! memory): what CI checks so a change that makes a hot kernel spill is caught without a
//! GPU. ptxas comes with the CUDA toolkit, or from pip's `nvidia-cuda-nvcc` wheel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::nvrtc::find_nvrtc;
use super::{kernel_hash, CudaError};

/// The ptxas executable to use.
pub const PTXAS_ENV: &str = "DITTO_PTXAS";

/// What ptxas reports for one entry function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxasFunction {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    pub shared_bytes: u32,
}

/// `DITTO_PTXAS`, else `bin/ptxas` beside libnvrtc's folder (pip's `nvidia/cu13/bin`, a
/// toolkit's `bin`), `$CUDA_HOME/bin`, `/usr/local/cuda/bin`, then `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(PTXAS_ENV) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(lib) = find_nvrtc() {
        if let Some(root) = lib.parent().and_then(|d| d.parent()) {
            dirs.push(root.join("bin"));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(root).join("bin"));
        }
    }
    dirs.push("/usr/local/cuda/bin".into());
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.into_iter()
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

/// Assembles `ptx` for `arch` with `ptxas -v` and returns each entry function's resources.
pub fn ptxas_info(ptxas: &Path, ptx: &str, arch: &str) -> Result<Vec<PtxasFunction>, CudaError> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let stem = std::env::temp_dir().join(format!(
        "ditto-ptxas-{}-{}-{:016x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        kernel_hash(ptx)
    ));
    let (src, bin) = (stem.with_extension("ptx"), stem.with_extension("cubin"));
    std::fs::write(&src, ptx).map_err(|e| CudaError::Io {
        path: src.display().to_string(),
        reason: e.to_string(),
    })?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&bin);
    let out = out.map_err(|e| CudaError::Ptxas(format!("cannot run {}: {e}", ptxas.display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(CudaError::Ptxas(text));
    }
    Ok(parse(&text))
}

/// Parses `ptxas -v` output.
fn parse(text: &str) -> Vec<PtxasFunction> {
    let mut fns: Vec<PtxasFunction> = Vec::new();
    // The number before `word` in `line` ("12 bytes spill stores" -> 12 for "bytes spill stores").
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            fns.push(PtxasFunction {
                name: name.to_string(),
                ..PtxasFunction::default()
            });
            continue;
        }
        let Some(f) = fns.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            f.stack_frame = num_before(line, "bytes stack frame").unwrap_or(0);
            f.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            f.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        }
        if let Some(r) = num_before(line, "registers") {
            if line.contains("Used") {
                f.registers = r;
                f.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    fns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'layer_norm' for 'sm_90'\n\
            ptxas info    : Function properties for layer_norm\n\
            \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 368 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'k0_add' for 'sm_90'\n\
            ptxas info    : Function properties for k0_add\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 16 registers, used 0 barriers, 376 bytes cmem[0]\n";
        let f = parse(text);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0],
            PtxasFunction {
                name: "layer_norm".into(),
                registers: 40,
                spill_stores: 4,
                spill_loads: 12,
                stack_frame: 8,
                shared_bytes: 128,
            }
        );
        assert_eq!(
            (f[1].name.as_str(), f[1].registers, f[1].shared_bytes),
            ("k0_add", 16, 0)
        );
    }
}
