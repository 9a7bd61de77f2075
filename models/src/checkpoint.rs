//! Access to diffusers-format safetensors checkpoints: memory-mapped from disk, or bytes
//! compiled into the binary ([`Checkpoint::from_static_bytes`]).
//!
//! Weights stay on disk (mapped, paged in lazily) until a tensor is asked for, so opening a
//! multi-gigabyte checkpoint only costs parsing its headers. Every tensor is converted to f32
//! on load because the runtime computes in f32 whatever the storage dtype.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::tensor_file::HostTensor;

/// File name diffusers' `save_pretrained` uses for an unsharded model.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// File name diffusers uses for the index of a sharded model.
pub const WEIGHTS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

const SAFETENSORS_EXT: &str = ".safetensors";
const INDEX_EXT: &str = ".safetensors.index.json";
const MAX_SUGGESTIONS: usize = 3;

/// Errors from reading or writing checkpoints and tensor files. Every variant carries the file
/// and/or tensor it is about, so the message alone is enough to find the problem.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid safetensors file (truncated or corrupt?): {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid shard index {}: {reason}", .path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error(
        "shard {} (listed in {} for tensor `{tensor}`) does not exist",
        .shard.display(), .index.display()
    )]
    MissingShard {
        index: PathBuf,
        shard: PathBuf,
        tensor: String,
    },
    #[error("no checkpoint found at {}: {reason}", .path.display())]
    NoCheckpoint { path: PathBuf, reason: String },
    #[error(
        "tensor `{name}` is stored twice, in {} and in {}",
        .first.display(), .second.display()
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "tensor `{name}` not found in checkpoint {}{}",
        .path.display(), format_suggestions(.suggestions)
    )]
    MissingTensor {
        name: String,
        path: PathBuf,
        suggestions: Vec<String>,
    },
    #[error(
        "tensor `{name}` in {} has shape {found:?}, expected {expected:?}",
        .path.display()
    )]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {} has dtype {dtype}, which cannot be converted to f32",
        .path.display()
    )]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: DiskDType,
    },
    #[error("cannot write {}: tensor `{name}`: {reason}", .path.display())]
    InvalidTensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
}

fn format_suggestions(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = suggestions.iter().map(|s| format!("`{s}`")).collect();
    format!("; similar names: {}", quoted.join(", "))
}

fn io_error<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Element type of a tensor as stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
    Bool,
    /// Any other safetensors dtype (fp8, unsigned/narrow ints, ...): listed, but not loadable.
    Other(Dtype),
}

impl DiskDType {
    fn from_safetensors(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F64 => Self::F64,
            Dtype::F32 => Self::F32,
            Dtype::F16 => Self::F16,
            Dtype::BF16 => Self::BF16,
            Dtype::I64 => Self::I64,
            Dtype::I32 => Self::I32,
            Dtype::U8 => Self::U8,
            Dtype::BOOL => Self::Bool,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for DiskDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F64 => f.write_str("F64"),
            Self::F32 => f.write_str("F32"),
            Self::F16 => f.write_str("F16"),
            Self::BF16 => f.write_str("BF16"),
            Self::I64 => f.write_str("I64"),
            Self::I32 => f.write_str("I32"),
            Self::U8 => f.write_str("U8"),
            Self::Bool => f.write_str("BOOL"),
            Self::Other(d) => write!(f, "{d}"),
        }
    }
}

/// One tensor's header entry, with its byte range relative to the whole file (not the data
/// section) so callers can slice the file buffer directly.
pub(crate) struct HeaderEntry {
    pub name: String,
    pub dtype: DiskDType,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// Parses and validates a safetensors header. `safetensors` checks that offsets are contiguous,
/// match shape x dtype and cover the file exactly, so the returned ranges are in bounds.
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let data_start = header_len
        .checked_add(8)
        .ok_or_else(|| corrupt("header length overflows".into()))?;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        let range = match (data_start.checked_add(start), data_start.checked_add(end)) {
            (Some(s), Some(e)) if s <= e && e <= bytes.len() => s..e,
            _ => return Err(corrupt(format!("tensor `{name}` lies outside the file"))),
        };
        entries.push(HeaderEntry {
            name,
            dtype: DiskDType::from_safetensors(info.dtype),
            shape: info.shape.clone(),
            range,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Decodes little-endian tensor bytes to f32; `None` for dtypes with no f32 meaning.
/// Integers convert by value (exact up to 2^24), bools to 0.0/1.0.
pub(crate) fn convert_to_f32(dtype: DiskDType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DiskDType::F32 => f32_from_le_bytes(bytes),
        DiskDType::F16 => half_to_f32(bytes, |bits, dst| {
            bits.reinterpret_cast::<f16>().convert_to_f32_slice(dst)
        }),
        DiskDType::BF16 => half_to_f32(bytes, |bits, dst| {
            bits.reinterpret_cast::<bf16>().convert_to_f32_slice(dst)
        }),
        DiskDType::F64 => le_words::<8>(bytes)
            .map(|w| f64::from_le_bytes(w) as f32)
            .collect(),
        DiskDType::I64 => le_words::<8>(bytes)
            .map(|w| i64::from_le_bytes(w) as f32)
            .collect(),
        DiskDType::I32 => le_words::<4>(bytes)
            .map(|w| i32::from_le_bytes(w) as f32)
            .collect(),
        DiskDType::U8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        DiskDType::Bool => bytes.iter().map(|&b| f32::from(u8::from(b != 0))).collect(),
        DiskDType::Other(_) => return None,
    })
}

fn le_words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut w = [0u8; N];
        w.copy_from_slice(c);
        w
    })
}

#[cfg(target_endian = "little")]
fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / 4;
    let mut out = vec![0f32; n];
    // SAFETY: `out` owns exactly `4 * n` writable bytes, the regions cannot overlap, and every
    // bit pattern is a valid f32. A plain byte copy is used because the data section of a
    // safetensors file need not be 4-byte aligned, which rules out reinterpreting the slice,
    // and it is much faster than a per-element decode in unoptimised builds.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), 4 * n);
    }
    out
}

#[cfg(not(target_endian = "little"))]
fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    le_words::<4>(bytes).map(f32::from_le_bytes).collect()
}

/// Converts 16-bit floats through a small staging buffer of bits: the file bytes may be
/// unaligned (so they cannot be viewed as `[u16]` in place), and staging in chunks keeps the
/// `half` slice conversion (SIMD where available) without a second full-size copy.
fn half_to_f32(bytes: &[u8], convert: fn(&[u16], &mut [f32])) -> Vec<f32> {
    const CHUNK: usize = 16 * 1024;
    let n = bytes.len() / 2;
    let mut out = vec![0f32; n];
    let mut bits = vec![0u16; CHUNK.min(n)];
    for (dst, src) in out.chunks_mut(CHUNK).zip(bytes.chunks(2 * CHUNK)) {
        let bits = &mut bits[..dst.len()];
        for (b, w) in bits.iter_mut().zip(le_words::<2>(src)) {
            *b = u16::from_le_bytes(w);
        }
        convert(bits, dst);
    }
    out
}

/// Where a checkpoint file's bytes live. Neither is ever written through, so sharing them
/// across threads is sound.
enum Storage {
    Mapped(Mmap),
    Static(&'static [u8]),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Static(bytes) => bytes,
        }
    }
}

/// One safetensors file of a checkpoint; `path` names it in errors (for static bytes, the
/// label they were given).
struct CheckpointFile {
    path: PathBuf,
    storage: Storage,
}

struct Entry {
    file: usize,
    dtype: DiskDType,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// A diffusers checkpoint (one file or a sharded set, memory-mapped; or one file's bytes in
/// memory) indexed by tensor name. `Send + Sync`: any number of threads may load tensors
/// concurrently.
pub struct Checkpoint {
    path: PathBuf,
    files: Vec<CheckpointFile>,
    tensors: BTreeMap<String, Entry>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// `path` is a folder (diffusers layout: `diffusion_pytorch_model.safetensors`, or a sharded
    /// `diffusion_pytorch_model.safetensors.index.json` with its `weight_map`, or if neither
    /// exists, exactly one `*.safetensors.index.json` or else exactly one `*.safetensors` file),
    /// a single `.safetensors` file, or a `.safetensors.index.json` file.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let meta = fs::metadata(path).map_err(io_error(path, "open checkpoint"))?;
        let mut checkpoint = Self {
            path: path.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        let target = if meta.is_dir() {
            resolve_folder(path)?
        } else {
            path.to_path_buf()
        };
        if is_index_name(&target) {
            checkpoint.add_sharded(&target)?;
        } else {
            checkpoint.add_file(&target)?;
        }
        Ok(checkpoint)
    }

    /// A checkpoint over the bytes of one safetensors file that live for the whole program
    /// (e.g. `include_bytes!`), parsed and validated as [`Checkpoint::open`] does a file;
    /// `label` stands for the file's path in [`Checkpoint::path`] and in errors.
    pub fn from_static_bytes(label: &str, bytes: &'static [u8]) -> Result<Self, CheckpointError> {
        let path = PathBuf::from(label);
        let mut checkpoint = Self {
            path: path.clone(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        checkpoint.add_storage(&path, Storage::Static(bytes))?;
        Ok(checkpoint)
    }

    /// The path given to [`Checkpoint::open`], or the label given to
    /// [`Checkpoint::from_static_bytes`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<DiskDType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// The tensor's raw little-endian bytes as stored, for callers that keep the disk dtype.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let entry = self.tensors.get(name)?;
        self.files
            .get(entry.file)?
            .storage
            .bytes()
            .get(entry.range.clone())
    }

    /// Reads a tensor as f32, checking its shape first so a layout mistake is reported before
    /// any conversion work.
    pub fn load_f32(
        &self,
        name: &str,
        expected_shape: &[usize],
    ) -> Result<Vec<f32>, CheckpointError> {
        let entry = self.entry(name)?;
        if entry.shape != expected_shape {
            return Err(CheckpointError::ShapeMismatch {
                name: name.to_string(),
                path: self.file_path(entry).to_path_buf(),
                expected: expected_shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        self.convert(name, entry)
    }

    /// Reads a tensor as f32 with whatever shape it has on disk.
    pub fn load(&self, name: &str) -> Result<HostTensor, CheckpointError> {
        let entry = self.entry(name)?;
        let data = self.convert(name, entry)?;
        Ok(HostTensor::new(entry.shape.clone(), data))
    }

    /// Total number of elements over all tensors.
    pub fn num_parameters(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Total size of the tensor data on disk, in bytes (headers excluded).
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.range.len()).sum()
    }

    fn entry(&self, name: &str) -> Result<&Entry, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                name: name.to_string(),
                path: self.path.clone(),
                suggestions: similar_names(name, self.tensors.keys().map(String::as_str)),
            })
    }

    fn file_path(&self, entry: &Entry) -> &Path {
        self.files
            .get(entry.file)
            .map_or(self.path.as_path(), |f| f.path.as_path())
    }

    fn convert(&self, name: &str, entry: &Entry) -> Result<Vec<f32>, CheckpointError> {
        let path = self.file_path(entry);
        let bytes = self
            .files
            .get(entry.file)
            .and_then(|f| f.storage.bytes().get(entry.range.clone()))
            .ok_or_else(|| CheckpointError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` lies outside the file"),
            })?;
        convert_to_f32(entry.dtype, bytes).ok_or_else(|| CheckpointError::UnsupportedDtype {
            name: name.to_string(),
            path: path.to_path_buf(),
            dtype: entry.dtype,
        })
    }

    /// Maps one safetensors file and indexes its tensors; returns the file's slot and the
    /// names it holds.
    fn add_file(&mut self, path: &Path) -> Result<(usize, Vec<String>), CheckpointError> {
        let file = File::open(path).map_err(io_error(path, "open"))?;
        // SAFETY: the map is only ever read. Like every mmap-based weight loader, this relies on
        // the file not being truncated or rewritten while the checkpoint is open (that would
        // show up as changed data or SIGBUS); checkpoints are immutable inputs, and mapping
        // avoids reading gigabytes that may never be used.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error(path, "memory-map"))?;
        self.add_storage(path, Storage::Mapped(map))
    }

    /// Indexes the tensors of one file's bytes; returns the file's slot and the names it holds.
    fn add_storage(
        &mut self,
        path: &Path,
        storage: Storage,
    ) -> Result<(usize, Vec<String>), CheckpointError> {
        let headers = parse_header(path, storage.bytes())?;
        let slot = self.files.len();
        let mut names = Vec::with_capacity(headers.len());
        for h in headers {
            if let Some(prev) = self.tensors.get(&h.name) {
                return Err(CheckpointError::DuplicateTensor {
                    first: self.file_path(prev).to_path_buf(),
                    second: path.to_path_buf(),
                    name: h.name,
                });
            }
            names.push(h.name.clone());
            self.tensors.insert(
                h.name,
                Entry {
                    file: slot,
                    dtype: h.dtype,
                    shape: h.shape,
                    range: h.range,
                },
            );
        }
        self.files.push(CheckpointFile {
            path: path.to_path_buf(),
            storage,
        });
        Ok((slot, names))
    }

    fn add_sharded(&mut self, index_path: &Path) -> Result<(), CheckpointError> {
        let bad_index = |reason: String| CheckpointError::BadIndex {
            path: index_path.to_path_buf(),
            reason,
        };
        let text = fs::read_to_string(index_path).map_err(io_error(index_path, "read"))?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| bad_index(e.to_string()))?;
        if index.weight_map.is_empty() {
            return Err(bad_index("`weight_map` is empty".into()));
        }
        let folder = index_path.parent().unwrap_or(Path::new(""));

        // Shard name -> the first tensor mapped to it, so a missing shard can be reported with
        // a tensor that needs it.
        let mut shards: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in &index.weight_map {
            shards.entry(shard.as_str()).or_insert(tensor.as_str());
        }
        for (&shard, &tensor) in &shards {
            let shard_path = folder.join(shard);
            if !shard_path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard_path,
                    tensor: tensor.to_string(),
                });
            }
        }
        let mut held: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for &shard in shards.keys() {
            let (_, names) = self.add_file(&folder.join(shard))?;
            held.insert(shard, names.into_iter().collect());
        }
        // Shards may hold tensors the index does not list (they are kept: the headers are the
        // truth), but a listed tensor that is not in its shard means the index and files are
        // out of sync, which would otherwise surface later as a confusing "missing tensor".
        for (tensor, shard) in &index.weight_map {
            let present = held.get(shard.as_str()).is_some_and(|n| n.contains(tensor));
            if !present {
                return Err(bad_index(format!(
                    "`weight_map` puts tensor `{tensor}` in {}, which does not contain it",
                    folder.join(shard).display()
                )));
            }
        }
        Ok(())
    }
}

fn is_index_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(INDEX_EXT))
}

/// Picks the checkpoint file (or index) inside a folder, following diffusers' preference for
/// its own file names, then falling back to an unambiguous single candidate.
fn resolve_folder(folder: &Path) -> Result<PathBuf, CheckpointError> {
    for name in [WEIGHTS_NAME, WEIGHTS_INDEX_NAME] {
        let candidate = folder.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    for dir_entry in fs::read_dir(folder).map_err(io_error(folder, "list"))? {
        let dir_entry = dir_entry.map_err(io_error(folder, "list"))?;
        let path = dir_entry.path();
        // `is_file` follows symlinks, which the Hugging Face cache uses for every file.
        if !path.is_file() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(INDEX_EXT) {
            indexes.push(path);
        } else if name.ends_with(SAFETENSORS_EXT) {
            files.push(path);
        }
    }
    indexes.sort();
    files.sort();
    let no_checkpoint = |reason: String| CheckpointError::NoCheckpoint {
        path: folder.to_path_buf(),
        reason,
    };
    let list = |paths: &[PathBuf]| {
        paths
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (indexes.len(), files.len()) {
        (1, _) => Ok(indexes.swap_remove(0)),
        (0, 1) => Ok(files.swap_remove(0)),
        (0, 0) => Err(no_checkpoint(format!(
            "the folder has no `{WEIGHTS_NAME}`, `{WEIGHTS_INDEX_NAME}` or other `*.safetensors` file"
        ))),
        (0, _) => Err(no_checkpoint(format!(
            "no `{WEIGHTS_NAME}` and several `*.safetensors` files ({}); pass the file to use",
            list(&files)
        ))),
        _ => Err(no_checkpoint(format!(
            "no `{WEIGHTS_INDEX_NAME}` and several index files ({}); pass the index to use",
            list(&indexes)
        ))),
    }
}

/// Up to [`MAX_SUGGESTIONS`] names close to `target`: names that differ only by a prefix
/// (e.g. a stray `transformer.` or `model.`) first, then by edit distance.
fn similar_names<'a>(target: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let limit = (target.len() / 3).max(3);
    let mut scored: Vec<(bool, usize, &str)> = names
        .filter_map(|name| {
            let affix = !name.is_empty() && (name.ends_with(target) || target.ends_with(name));
            let distance = edit_distance(target, name);
            (affix || distance <= limit).then_some((!affix, distance, name))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(_, _, n)| n.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{err_text, fixture};
    use safetensors::tensor::TensorView;
    use std::collections::HashMap;

    /// Serializes `(name, dtype, shape, raw bytes)` tensors with the reference writer.
    fn safetensors_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    *name,
                    TensorView::new(*dtype, shape.clone(), bytes).expect("valid view"),
                )
            })
            .collect();
        safetensors::serialize(views, None::<HashMap<String, String>>).expect("serialize")
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn write(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).expect("write test file");
    }

    #[test]
    fn checkpoint_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checkpoint>();
        assert_send_sync::<CheckpointError>();
    }

    #[test]
    fn opens_dit_fixture_folder() {
        let ckpt = Checkpoint::open(&fixture("dit")).expect("open dit");
        assert_eq!(
            ckpt.shape("pos_embed.proj.weight"),
            Some(&[64, 4, 2, 2][..])
        );
        assert_eq!(ckpt.dtype("pos_embed.proj.weight"), Some(DiskDType::F32));
        assert!(ckpt.contains("pos_embed.proj.bias"));
        assert!(!ckpt.contains("pos_embed.proj"));
        assert_eq!(ckpt.shape("nope"), None);
        assert_eq!(ckpt.dtype("nope"), None);

        let names = ckpt.names();
        assert_eq!(names.len(), 44);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "names sorted");

        let w = ckpt
            .load_f32("pos_embed.proj.weight", &[64, 4, 2, 2])
            .expect("load");
        assert_eq!(w.len(), 1024);
        assert!(w.iter().all(|v| v.is_finite()) && w.iter().any(|&v| v != 0.0));
        assert_eq!(
            ckpt.bytes("pos_embed.proj.weight").map(<[u8]>::len),
            Some(4096)
        );

        assert!(ckpt.num_parameters() > 0);
        assert_eq!(ckpt.total_bytes(), 4 * ckpt.num_parameters());
    }

    #[test]
    fn opens_every_family_fixture() {
        let cases: &[(&str, &str, &[usize])] = &[
            ("pixart", "adaln_single.linear.weight", &[384, 64]),
            ("sd3", "pos_embed.pos_embed", &[1, 1024, 64]),
            ("sd3", "context_embedder.weight", &[64, 32]),
            ("flux", "proj_out.weight", &[16, 64]),
            ("flux", "context_embedder.bias", &[64]),
            ("vae", "decoder.conv_in.weight", &[64, 4, 3, 3]),
            (
                "dit-pipeline/transformer",
                "pos_embed.proj.weight",
                &[64, 4, 2, 2],
            ),
        ];
        for &(folder, name, shape) in cases {
            let ckpt = Checkpoint::open(&fixture(folder)).expect(folder);
            assert_eq!(ckpt.shape(name), Some(shape), "{folder}: {name}");
            let data = ckpt.load_f32(name, shape).expect(name);
            assert_eq!(data.len(), shape.iter().product::<usize>());
        }
    }

    #[test]
    fn opens_a_single_file_and_matches_the_folder() {
        let by_folder = Checkpoint::open(&fixture("dit")).expect("folder");
        let by_file = Checkpoint::open(&fixture("dit").join(WEIGHTS_NAME)).expect("file");
        assert_eq!(by_folder.names(), by_file.names());
        let shape = [64, 4, 2, 2];
        assert_eq!(
            by_folder
                .load_f32("pos_embed.proj.weight", &shape)
                .expect("a"),
            by_file
                .load_f32("pos_embed.proj.weight", &shape)
                .expect("b")
        );
    }

    #[test]
    fn static_bytes_match_the_file() {
        let path = fixture("dit").join(WEIGHTS_NAME);
        let bytes: &'static [u8] = fs::read(&path).expect("fixture").leak();
        let by_file = Checkpoint::open(&path).expect("file");
        let in_memory = Checkpoint::from_static_bytes("built-in/dit", bytes).expect("bytes");
        assert_eq!(in_memory.path(), Path::new("built-in/dit"));
        assert_eq!(in_memory.names(), by_file.names());
        assert_eq!(in_memory.total_bytes(), by_file.total_bytes());
        let shape = [64, 4, 2, 2];
        assert_eq!(
            in_memory
                .load_f32("pos_embed.proj.weight", &shape)
                .expect("a"),
            by_file
                .load_f32("pos_embed.proj.weight", &shape)
                .expect("b")
        );
        let msg = err_text(in_memory.load_f32("pos_embed.proj.weight", &[64]));
        assert!(msg.contains("built-in/dit"), "{msg}");

        let half: &'static [u8] = safetensors_bytes(&[(
            "h",
            Dtype::F16,
            vec![2],
            [1.5f32, -2.0]
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        )])
        .leak();
        let ckpt = Checkpoint::from_static_bytes("half", half).expect("f16");
        assert_eq!(ckpt.load_f32("h", &[2]).expect("load"), [1.5, -2.0]);

        let msg = err_text(Checkpoint::from_static_bytes("cut", &bytes[..100]));
        assert!(
            msg.contains("cut") && msg.contains("not a valid safetensors file"),
            "{msg}"
        );
    }

    #[test]
    fn f16_and_bf16_load_as_f32() {
        // Values exactly representable in both formats, plus ones that must round.
        let values = [0.0f32, -1.5, 2.0, 0.25, 1024.0, -0.0078125, 3.1, -7.77];
        let f16_bits: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let bf16_bits: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir.path().join(WEIGHTS_NAME),
            &safetensors_bytes(&[
                ("half", Dtype::F16, vec![2, 4], f16_bits),
                ("brain", Dtype::BF16, vec![8], bf16_bits),
            ]),
        );
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ckpt.dtype("half"), Some(DiskDType::F16));
        assert_eq!(ckpt.dtype("brain"), Some(DiskDType::BF16));
        let half = ckpt.load_f32("half", &[2, 4]).expect("f16");
        let brain = ckpt.load_f32("brain", &[8]).expect("bf16");
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(half[i], f16::from_f32(v).to_f32(), "f16 {v}");
            assert_eq!(brain[i], bf16::from_f32(v).to_f32(), "bf16 {v}");
        }
        assert_eq!(&half[..5], &[0.0, -1.5, 2.0, 0.25, 1024.0]);
        assert_eq!(&brain[..5], &[0.0, -1.5, 2.0, 0.25, 1024.0]);
        assert_eq!(ckpt.total_bytes(), 32);
        assert_eq!(ckpt.num_parameters(), 16);
    }

    #[test]
    fn large_f16_tensor_crosses_staging_chunks() {
        let n = 40_000; // > 2 staging chunks, not a multiple of one
        let values: Vec<f32> = (0..n).map(|i| (i % 2048) as f32 - 1024.0).collect();
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.safetensors");
        write(
            &path,
            &safetensors_bytes(&[("x", Dtype::F16, vec![n], bits)]),
        );
        let ckpt = Checkpoint::open(&path).expect("open");
        assert_eq!(ckpt.load_f32("x", &[n]).expect("load"), values);
    }

    #[test]
    fn other_dtypes_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mixed.safetensors");
        write(
            &path,
            &safetensors_bytes(&[
                (
                    "d",
                    Dtype::F64,
                    vec![2],
                    [1.25f64, -3.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                (
                    "l",
                    Dtype::I64,
                    vec![2],
                    [999i64, -7].iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                (
                    "i",
                    Dtype::I32,
                    vec![2],
                    [250i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            ]),
        );
        let ckpt = Checkpoint::open(&path).expect("open");
        assert_eq!(ckpt.dtype("l"), Some(DiskDType::I64));
        assert_eq!(ckpt.load_f32("d", &[2]).expect("f64"), [1.25, -3.0]);
        assert_eq!(ckpt.load_f32("l", &[2]).expect("i64"), [999.0, -7.0]);
        assert_eq!(ckpt.load_f32("i", &[2]).expect("i32"), [250.0, -1.0]);
        let t = ckpt.load("l").expect("load");
        assert_eq!(t.shape, [2]);
    }

    #[test]
    fn unsupported_dtype_opens_but_does_not_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fp8.safetensors");
        write(
            &path,
            &safetensors_bytes(&[("q", Dtype::F8_E4M3, vec![4], vec![1, 2, 3, 4])]),
        );
        let ckpt = Checkpoint::open(&path).expect("open");
        assert_eq!(ckpt.dtype("q"), Some(DiskDType::Other(Dtype::F8_E4M3)));
        let msg = err_text(ckpt.load_f32("q", &[4]));
        assert!(msg.contains("`q`") && msg.contains("F8_E4M3"), "{msg}");
        assert!(msg.contains("fp8.safetensors"), "{msg}");
    }

    /// Writes a two-shard checkpoint; returns the values of `a.weight` and `b.weight`.
    fn write_sharded(dir: &Path, index_name: &str) -> (Vec<f32>, Vec<f32>) {
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = vec![-1.0, 2.0, -3.0];
        let shard1 = "diffusion_pytorch_model-00001-of-00002.safetensors";
        let shard2 = "diffusion_pytorch_model-00002-of-00002.safetensors";
        write(
            &dir.join(shard1),
            &safetensors_bytes(&[("a.weight", Dtype::F32, vec![2, 3], f32_bytes(&a))]),
        );
        let b_bf16: Vec<u8> = b
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        write(
            &dir.join(shard2),
            &safetensors_bytes(&[
                ("b.weight", Dtype::BF16, vec![3], b_bf16),
                ("b.bias", Dtype::F32, vec![1], f32_bytes(&[0.5])),
            ]),
        );
        let index = serde_json::json!({
            "metadata": { "total_size": 40 },
            "weight_map": { "a.weight": shard1, "b.weight": shard2, "b.bias": shard2 },
        });
        write(&dir.join(index_name), index.to_string().as_bytes());
        (a, b)
    }

    #[test]
    fn sharded_checkpoint_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = write_sharded(dir.path(), WEIGHTS_INDEX_NAME);
        let ckpt = Checkpoint::open(dir.path()).expect("open sharded");
        assert_eq!(ckpt.names(), ["a.weight", "b.bias", "b.weight"]);
        assert_eq!(ckpt.load_f32("a.weight", &[2, 3]).expect("a"), a);
        assert_eq!(ckpt.load_f32("b.weight", &[3]).expect("b"), b);
        assert_eq!(ckpt.num_parameters(), 10);
        assert_eq!(ckpt.total_bytes(), 24 + 6 + 4);

        // The index file itself is also accepted.
        let by_index = Checkpoint::open(&dir.path().join(WEIGHTS_INDEX_NAME)).expect("index");
        assert_eq!(by_index.names(), ckpt.names());
    }

    #[test]
    fn sharded_checkpoint_with_other_index_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sharded(dir.path(), "model.safetensors.index.json");
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ckpt.names().len(), 3);
    }

    #[test]
    fn sharded_checkpoint_loads_concurrently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = write_sharded(dir.path(), WEIGHTS_INDEX_NAME);
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    assert_eq!(ckpt.load_f32("a.weight", &[2, 3]).expect("a"), a);
                    assert_eq!(ckpt.load_f32("b.weight", &[3]).expect("b"), b);
                });
            }
        });
    }

    #[test]
    fn folder_with_one_other_safetensors_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            &dir.path().join("diffusion_pytorch_model.fp16.safetensors"),
            &safetensors_bytes(&[("w", Dtype::F32, vec![1], f32_bytes(&[4.0]))]),
        );
        fs::write(dir.path().join("config.json"), "{}").expect("config");
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(ckpt.load_f32("w", &[1]).expect("w"), [4.0]);
    }

    #[test]
    fn folder_with_several_candidates_is_ambiguous() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["one.safetensors", "two.safetensors"] {
            write(
                &dir.path().join(name),
                &safetensors_bytes(&[("w", Dtype::F32, vec![1], f32_bytes(&[4.0]))]),
            );
        }
        let msg = err_text(Checkpoint::open(dir.path()));
        assert!(msg.contains("one.safetensors, two.safetensors"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn missing_tensor_names_it_and_suggests() {
        let ckpt = Checkpoint::open(&fixture("dit")).expect("open");
        let msg = err_text(ckpt.load_f32("pos_embed.proj.weigth", &[64, 4, 2, 2]));
        assert!(msg.contains("`pos_embed.proj.weigth` not found"), "{msg}");
        assert!(msg.contains(&fixture("dit").display().to_string()), "{msg}");
        assert!(
            msg.contains("similar names: `pos_embed.proj.weight`"),
            "{msg}"
        );

        let msg = err_text(ckpt.load_f32("transformer.pos_embed.proj.bias", &[64]));
        assert!(
            msg.contains("similar names: `pos_embed.proj.bias`"),
            "{msg}"
        );

        match ckpt.load_f32("transformer_blocks.0.attn1.to_q.weigh", &[64, 64]) {
            Err(CheckpointError::MissingTensor { suggestions, .. }) => {
                assert!(!suggestions.is_empty() && suggestions.len() <= 3);
                assert_eq!(suggestions[0], "transformer_blocks.0.attn1.to_q.weight");
            }
            other => panic!("expected MissingTensor, got {other:?}"),
        }

        let msg = err_text(ckpt.load("zzzzzzzzzzzzzzzzzzzzzz"));
        assert!(!msg.contains("similar names"), "{msg}");
    }

    #[test]
    fn wrong_shape_names_tensor_and_both_shapes() {
        let ckpt = Checkpoint::open(&fixture("dit")).expect("open");
        let msg = err_text(ckpt.load_f32("pos_embed.proj.weight", &[64, 4, 2]));
        assert!(msg.contains("`pos_embed.proj.weight`"), "{msg}");
        assert!(
            msg.contains("[64, 4, 2, 2]") && msg.contains("[64, 4, 2]"),
            "{msg}"
        );
        assert!(msg.contains(WEIGHTS_NAME), "{msg}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let bytes = fs::read(fixture("dit").join(WEIGHTS_NAME)).expect("fixture");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(WEIGHTS_NAME);
        for cut in [bytes.len() / 2, 4000, 7, 0] {
            write(&path, &bytes[..cut]);
            let msg = err_text(Checkpoint::open(dir.path()));
            assert!(
                msg.contains(&path.display().to_string()),
                "cut {cut}: {msg}"
            );
            assert!(
                msg.contains("not a valid safetensors file"),
                "cut {cut}: {msg}"
            );
        }
    }

    #[test]
    fn garbage_headers_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.safetensors");
        let with_header = |header: &str, data_len: usize| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.resize(b.len() + data_len, 0);
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "random bytes",
                (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            ),
            ("huge header length", {
                let mut b = u64::MAX.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            }),
            ("header past the end", {
                let mut b = 500u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            }),
            (
                "invalid JSON",
                with_header("{\"w\": {\"dtype\": \"F32\", ", 0),
            ),
            ("invalid UTF-8", {
                let mut b = 4u64.to_le_bytes().to_vec();
                b.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
                b
            }),
            (
                "unknown dtype",
                with_header(
                    r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                    1,
                ),
            ),
            (
                "offsets past the end",
                with_header(
                    r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
            ),
            (
                "size does not match shape",
                with_header(
                    r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "overlapping tensors",
                with_header(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    4,
                ),
            ),
            (
                "trailing bytes",
                with_header(
                    r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    8,
                ),
            ),
            (
                "overflowing shape",
                with_header(
                    r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                    4,
                ),
            ),
        ];
        for (what, bytes) in cases {
            write(&path, &bytes);
            let msg = err_text(Checkpoint::open(&path));
            assert!(msg.contains("bad.safetensors"), "{what}: {msg}");
            assert!(
                msg.contains("not a valid safetensors file"),
                "{what}: {msg}"
            );
        }
    }

    #[test]
    fn index_naming_a_missing_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sharded(dir.path(), WEIGHTS_INDEX_NAME);
        let gone = "diffusion_pytorch_model-00002-of-00002.safetensors";
        fs::remove_file(dir.path().join(gone)).expect("remove shard");
        let msg = err_text(Checkpoint::open(dir.path()));
        assert!(
            msg.contains(gone) && msg.contains("does not exist"),
            "{msg}"
        );
        assert!(msg.contains(WEIGHTS_INDEX_NAME), "{msg}");
        assert!(msg.contains("`b.bias`"), "{msg}");
    }

    #[test]
    fn index_out_of_sync_with_shards() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_sharded(dir.path(), WEIGHTS_INDEX_NAME);
        let index = serde_json::json!({ "weight_map": {
            "a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
        }});
        write(
            &dir.path().join(WEIGHTS_INDEX_NAME),
            index.to_string().as_bytes(),
        );
        let msg = err_text(Checkpoint::open(dir.path()));
        assert!(
            msg.contains("`a.weight`") && msg.contains("does not contain it"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = dir.path().join(WEIGHTS_INDEX_NAME);
        for (what, text) in [
            ("not JSON", "{ weight_map"),
            ("no weight_map", r#"{"metadata": {}}"#),
            ("empty weight_map", r#"{"weight_map": {}}"#),
        ] {
            write(&index, text.as_bytes());
            let msg = err_text(Checkpoint::open(dir.path()));
            assert!(msg.contains("invalid shard index"), "{what}: {msg}");
            assert!(msg.contains(WEIGHTS_INDEX_NAME), "{what}: {msg}");
        }
    }

    #[test]
    fn tensor_in_two_shards_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["s1.safetensors", "s2.safetensors"] {
            write(
                &dir.path().join(name),
                &safetensors_bytes(&[("w", Dtype::F32, vec![1], f32_bytes(&[1.0]))]),
            );
        }
        let index =
            serde_json::json!({ "weight_map": { "w": "s1.safetensors", "x": "s2.safetensors" }});
        write(
            &dir.path().join(WEIGHTS_INDEX_NAME),
            index.to_string().as_bytes(),
        );
        let msg = err_text(Checkpoint::open(dir.path()));
        assert!(msg.contains("`w` is stored twice"), "{msg}");
        assert!(
            msg.contains("s1.safetensors") && msg.contains("s2.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn empty_folder_and_missing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msg = err_text(Checkpoint::open(dir.path()));
        assert!(msg.contains("no checkpoint found at"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(WEIGHTS_NAME), "{msg}");

        let missing = dir.path().join("nowhere");
        let msg = err_text(Checkpoint::open(&missing));
        assert!(msg.contains("nowhere"), "{msg}");
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("weight", "weigth"), 2);
    }
}
